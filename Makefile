# Two commands: `make demo` runs the main job, `make test` runs every test tier.
# Each sets up .venv by itself the first time (and again only when requirements/ change).
# DEVICE=cuda installs the CUDA wheels (fbgemm-gpu, faiss-gpu) instead of the CPU ones.

DEVICE ?= cpu
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(DEVICE)
DATASET ?= ml-100k

.PHONY: compare demo data test test-fast lint report baseline bench scale notebooks lab setup clean-venv screenshot

$(STAMP): requirements/base.txt requirements/$(DEVICE).txt requirements/torchrec.txt scripts/install.sh
	PYTHON=$(PYTHON) bash scripts/install.sh $(DEVICE) $(VENV)
	rm -f $(VENV)/.installed-*
	touch $@

setup: $(STAMP)

# The main job: train what is missing (a few minutes the first time), then recommend movies to
# MovieLens users and print the offline evaluation of every stage.
demo: $(STAMP)
	$(PY) -m integration.demo --dataset $(DATASET)

# Every system on ml-100k, each row the mean of three training seeds: the two-tower and SASRec,
# each with its ranker, EASE and the transitions, their ensemble, and the served system (about 60 minutes on 2 CPU
# cores). SEQUENTIAL=sasrec,bert4rec adds BERT4Rec as another source (about 20 more minutes a seed).
SEQUENTIAL ?= sasrec
compare: $(STAMP)
	$(PY) -m integration.compare --dataset $(DATASET) --sequential $(SEQUENTIAL)

# Fetch and verify a data set and print its statistics.
data: $(STAMP)
	$(PY) -m common.prepare_data --dataset $(DATASET)

# Every tier: -m "" lifts pyproject.toml's default selection (plain pytest is the fast tier).
test: $(STAMP)
	$(PY) -m pytest -m ""

# ruff over the whole repository, notebooks included: lint rules, then the formatting (check only); then
# the import contracts (pyproject.toml's [tool.importlinter]: common, the stages, integration, bench and tests).
lint: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements/dev.txt
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

# Charts (docs/charts/*.png) from the results files in bench/results/; with runs/ there, its curves and
# results are collected first.
report: $(STAMP)
	$(PY) -m bench.report $(if $(wildcard runs),--collect runs)

# The fast tier only (plain pytest): no multi-process runs, no notebooks, no chains of trained stages.
test-fast: $(STAMP)
	$(PY) -m pytest

# The README's picture of the web page (integration/page.png), taken by the browser test in headless Chromium.
screenshot: $(STAMP)
	RECSYS_SCREENSHOT=integration/page.png RECSYS_REQUIRE_BROWSER=1 $(PY) -m pytest -m "" tests/test_integration.py -k web_page

# Execute the sharding notebooks from fresh kernels and store their outputs in the .ipynb files.
notebooks: $(STAMP)
	$(PY) -m sharding.execute

# Open the notebooks in JupyterLab with the project's environment as the kernel (installs
# requirements/notebooks.txt into .venv the first time).
lab: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements/notebooks.txt
	$(VENV)/bin/jupyter lab sharding/

# Popularity baseline under the shared evaluation protocol.
baseline: $(STAMP)
	$(PY) -m common.baselines --dataset $(DATASET)

bench: $(STAMP)
	$(PY) -m bench.run_all

# The whole chain on synthetic logs of 1e5, 1e6, 1e7 and 2e7 interactions (about 1.5 hours on 2 cores):
# bench/results/scale.json and docs/charts/scale.png. SIZES="1e5 1e6" for some.
scale: $(STAMP)
	$(PY) -m bench.scale $(if $(SIZES),--sizes $(SIZES))

clean-venv:
	rm -rf $(VENV)
