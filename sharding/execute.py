"""Execute the sharding notebooks from a fresh kernel, top to bottom, and store their outputs.

    python -m sharding.execute              # run both and write the outputs into the .ipynb files
    python -m sharding.execute --check      # run both, write nothing (what tests/test_notebooks.py does)
    python -m sharding.execute sharding/uvm.ipynb

The kernel is this interpreter's (the project's virtualenv), started in sharding/ as Jupyter would
when you open a notebook there. A cell that raises stops the run with the cell and its traceback.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
NOTEBOOKS = (HERE / "sharding.ipynb", HERE / "uvm.ipynb")


def execute(path: str | Path, write: bool = True, timeout_s: int = 600) -> nbformat.NotebookNode:
    """Run ``path`` in a fresh ``python3`` kernel (each cell within ``timeout_s``); with ``write``,
    save the executed notebook over the original. Raises nbclient's ``CellExecutionError`` on the
    first failing cell."""
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=timeout_s, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()
    if write:
        nbformat.write(nb, path)
    return nb


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "notebooks",
        nargs="*",
        type=Path,
        default=list(NOTEBOOKS),
        help="notebooks to run (default: sharding.ipynb and uvm.ipynb)",
    )
    p.add_argument("--check", action="store_true", help="run without writing the outputs back")
    p.add_argument("--timeout", type=int, default=600, help="seconds allowed per cell (default: 600)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    seconds = {}
    for path in args.notebooks:
        start = time.perf_counter()
        print(f"executing {path} ...", flush=True)
        execute(path, write=not args.check, timeout_s=args.timeout)
        seconds[str(path)] = round(time.perf_counter() - start, 1)
        print(
            f"{path}: every cell ran in {seconds[str(path)]} s" + ("" if args.check else ", outputs saved"), flush=True
        )
    return seconds


if __name__ == "__main__":
    main()
