"""One way into every data set: ``--dataset ml-100k`` (a MovieLens variant) or ``--dataset
path/to/spec.json`` (an interaction log of one's own, common/data/logs.py). Every entry point
takes its data through :func:`add_dataset_args` and :func:`load_dataset`."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.data.dataset import InteractionData
from common.data.movielens import ARCHIVES, load_movielens

BUILT_IN = (*ARCHIVES, "completejourney")  # MovieLens, and a purchase log with repeats


def is_spec(dataset: str) -> bool:
    """Whether ``dataset`` names a spec file rather than a built-in data set."""
    return dataset not in BUILT_IN


def add_dataset_args(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, others: tuple[str, ...] = (), others_help: str = ""
) -> None:
    """The data flags every script shares: --dataset, --data-dir, --source, --eval-users, --on-bad-row. ``others``
    are extra --dataset values a script supports besides MovieLens and logs."""
    parser.add_argument(
        "--dataset",
        default="ml-100k",
        type=dataset_ref,
        help=f"a MovieLens variant ({', '.join(sorted(ARCHIVES))}), completejourney (grocery purchases, with "
        f"repeats){others_help}, or the path of an interaction log's spec file (common/data/logs.py) "
        "(default: ml-100k)",
    )
    parser.add_argument(
        "--data-dir", default=None, help="cache directory (default: $RECSYS_DATA_DIR or ~/.cache/recsys-examples)"
    )
    parser.add_argument(
        "--source",
        default="auto",
        choices=["auto", "grouplens", "recbole"],
        help="MovieLens: auto: cache, then GroupLens, then (ml-100k) the recbole wheel from PyPI (default: auto)",
    )
    parser.add_argument(
        "--eval-users",
        type=int,
        default=0,
        help="evaluate a fixed sample of this many users (seed 0), each ranked against the whole catalog; "
        "for large data sets (default: 0, every user)",
    )
    parser.add_argument(
        "--on-bad-row",
        default="error",
        choices=["error", "skip"],
        help="logs: stop at the first bad interaction row (default), or skip and count bad rows",
    )


def load_dataset(
    dataset: str, data_dir: str | Path | None = None, source: str = "auto", on_bad_row: str = "error"
) -> InteractionData:
    """The data set named by ``dataset``: a MovieLens variant or a log's spec path."""
    if dataset == "completejourney":
        from common.data.completejourney import load_completejourney

        return load_completejourney(data_dir, on_bad_row)
    if not is_spec(dataset):
        return load_movielens(dataset, data_dir, source)
    from common.data.logs import LogError, load_log

    if Path(dataset).suffix not in (".json", ".toml") and not Path(dataset).is_file():
        raise LogError(
            f"unknown dataset {dataset!r}: give a built-in data set ({', '.join(sorted(BUILT_IN))}) or the path "
            f"of an interaction log's spec file (.json or .toml; see common/data/logs.py)"
        )

    return load_log(dataset, data_dir, on_bad_row)


def dataset_ref(dataset: str) -> str:
    """How a config and an artifact record a data set so that it can be loaded again from anywhere:
    the MovieLens name, or the spec's absolute path."""
    path = Path(dataset)
    if dataset in BUILT_IN or not (path.suffix in (".json", ".toml") or path.is_file()):
        return dataset  # a name (a script's own data sets, e.g. criteo, pass through)
    return str(path.resolve())
