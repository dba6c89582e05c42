#!/usr/bin/env bash
# Create (or update) the project's virtualenv with pinned dependencies.
#   bash scripts/install.sh [cpu|cuda] [VENV_DIR]
# Called by the Makefile; safe to run again (pip skips what is already installed).
set -euo pipefail
device="${1:-cpu}"
venv="${2:-.venv}"
python="${PYTHON:-python3}"
cd "$(dirname "$0")/.."

case "$device" in
  cpu|cuda) ;;
  *) echo "install.sh: DEVICE must be 'cpu' or 'cuda', got '$device'" >&2; exit 2 ;;
esac

if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 10))'; then
  echo "install.sh: Python >= 3.10 is required ($python is $("$python" --version 2>&1))." >&2
  echo "            Set PYTHON=/path/to/python3.11 and run again." >&2
  exit 2
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "Creating virtualenv $venv with $("$python" --version)"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install --quiet --upgrade pip
# The device-specific wheels go first so that nothing else can pull a different torch build.
"${pip[@]}" install --quiet -r "requirements/$device.txt"
"${pip[@]}" install --quiet -r requirements/base.txt
"${pip[@]}" install --quiet --no-deps -r requirements/torchrec.txt
# Put the repository on the venv's path (what an editable install does), so that scripts run by
# file path, as torchx's dist.ddp --script does, still import common/, retrieval/ and the rest.
"$venv/bin/python" -c 'import pathlib, site, sys; pathlib.Path(site.getsitepackages()[0], "torchrec_recsys_examples.pth").write_text(sys.argv[1] + "\n")' "$PWD"
"$venv/bin/python" - <<PY
import torch, torchrec, faiss, fbgemm_gpu  # noqa: F401  fail here, not in the first test
print(f"environment ready: torch {torch.__version__}, torchrec {torchrec.__version__}, "
      f"faiss {faiss.__version__}, cuda available: {torch.cuda.is_available()}")
PY
