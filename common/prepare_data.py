"""Download (or find in the cache), verify and parse a MovieLens set; print its statistics.

    python -m common.prepare_data                    # ml-100k
    python -m common.prepare_data --dataset ml-1m --out runs/data

On ml-100k you should see 943 users, 1682 items, 100000 interactions, and a split of
98114 training interactions with 943 validation and 943 test users.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from common.data.download import DataIntegrityError
from common.data.movielens import DataUnavailable, add_dataset_args, load_movielens
from common.data.split import split_dataset
from common.runtime import write_results


@dataclass(frozen=True)
class Config:
    dataset: str
    data_dir: str | None
    source: str
    out: str | None


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(p)
    p.add_argument("--out", default=None, help="directory for results.json with the statistics (default: print only)")
    a = p.parse_args(argv)
    return Config(dataset=a.dataset, data_dir=a.data_dir, source=a.source, out=a.out)


def main(argv: list[str] | None = None) -> dict[str, object]:
    cfg = parse_args(argv)
    try:
        ds = load_movielens(cfg.dataset, cfg.data_dir, cfg.source)
    except (DataUnavailable, DataIntegrityError) as err:
        raise SystemExit(f"error: {err}") from None  # one line that says what to do, not a traceback
    split = split_dataset(ds)
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
        f"{stats['genres']} genres; user features: {'yes' if ds.has_user_features else 'no'}"
    )
    print(
        f"  split (temporal leave-last-out): train {stats['train_interactions']}, "
        f"valid {stats['valid_users']} users, test {stats['test_users']} users"
    )
    top = np.argsort(-np.bincount(ds.item, minlength=ds.num_items), kind="stable")[:3]
    print("  most interacted: " + "; ".join(f"{ds.item_title[i]} ({ds.item_year[i]})" for i in top))
    print(f"  fingerprint {stats['fingerprint'][:16]}")
    if cfg.out:
        write_results(cfg.out, stats)
    return stats


if __name__ == "__main__":
    main()
