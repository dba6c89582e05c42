"""Download (or find in the cache), verify and parse a MovieLens set; print its statistics.

    python -m common.prepare_data                    # ml-100k
    python -m common.prepare_data --dataset ml-1m --out runs/data

What it prints for ml-100k is in README.md, "MovieLens".
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from common.data.download import DataIntegrityError
from common.data.load import add_dataset_args, load_dataset
from common.data.logs import LogError
from common.data.movielens import DataUnavailable
from common.data.split import split_dataset
from common.runtime import write_results


@dataclass(frozen=True)
class Config:
    dataset: str
    data_dir: str | None
    source: str
    on_bad_row: str
    eval_users: int
    out: str | None


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(p)
    p.add_argument("--out", default=None, help="directory for results.json with the statistics (default: print only)")
    a = p.parse_args(argv)
    return Config(**vars(a))


def main(argv: list[str] | None = None) -> dict[str, object]:
    cfg = parse_args(argv)
    try:
        ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.source, cfg.on_bad_row)
    except (DataUnavailable, DataIntegrityError, LogError) as err:
        raise SystemExit(f"error: {err}") from None  # one line that says what to do, not a traceback
    split = split_dataset(ds, cfg.eval_users)
    stats = {
        **ds.stats(),
        "train_interactions": len(split.train_user),
        "valid_users": len(split.valid_user),
        "test_users": len(split.test_user),
    }
    print(
        f"{ds.name} from {ds.source}: {stats['users']} users, {stats['items']} items, "
        f"{stats['interactions']} interactions (density {stats['density']:.4f})"
    )
    print(
        f"  per user: min {stats['interactions_per_user_min']}, median {stats['interactions_per_user_median']:.0f}; "
        f"item features: {', '.join(stats['item_features']) or 'none'}; "
        f"user features: {', '.join(stats['user_features']) or 'none'}"
    )
    print(
        f"  split (temporal leave-last-out): train {stats['train_interactions']}, "
        f"valid {stats['valid_users']} users, test {stats['test_users']} users"
    )
    top = np.argsort(-np.bincount(ds.item, minlength=ds.num_items), kind="stable")[:3]
    print("  most interacted: " + "; ".join(ds.title(i) for i in top))
    print(f"  fingerprint {stats['fingerprint'][:16]}")
    if cfg.out:
        write_results(cfg.out, stats)
    return stats


if __name__ == "__main__":
    main()
