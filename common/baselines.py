"""Popularity baseline under the shared protocol: the floor every model must beat.

    python -m common.baselines                     # ml-100k, valid and test
    python -m common.baselines --dataset ml-1m --out runs/popularity

Scores every item by its interaction count in what the model may see (training for valid;
training plus validation for test), excludes the user's history (keeps it on a data set with
repeats, reporting repeat and new-item targets apart), breaks ties by item index. Its ml-100k
figures are the first row of the README's demo table. On a data set with repeats the other floor
is "again" (``python -m candidates.again``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import torch

from common.data.load import add_dataset_args, load_dataset
from common.data.split import Split, split_dataset
from common.metrics import RankingReport, evaluate_scores
from common.runtime import write_results


@dataclass(frozen=True)
class Config:
    dataset: str
    data_dir: str | None
    source: str
    on_bad_row: str
    eval_users: int
    out: str | None
    n_boot: int


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(p.add_argument_group("data"))
    out = p.add_argument_group("output")
    out.add_argument("--out", default=None, help="directory for results.json (default: print only)")
    out.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the 95%% CI (default: 1000)")
    a = p.parse_args(argv)
    return Config(**vars(a))


def popularity_report(split: Split, stage: str, n_boot: int = 1000, counts: np.ndarray | None = None) -> RankingReport:
    """Items ranked by their interactions before ``stage``: ``split``'s, or ``counts`` where the
    split holds only some users (the evaluated ones, a rank's share)."""
    counts = torch.as_tensor(split.item_counts(stage) if counts is None else counts, dtype=torch.float32)
    return evaluate_scores(lambda users: counts.expand(len(users), -1).clone(), split, stage, n_boot=n_boot)


def format_report(name: str, rep: RankingReport) -> str:
    cells = [f"{k} {v:.4f} [{rep.ci95[k][0]:.4f}, {rep.ci95[k][1]:.4f}]" for k, v in rep.means.items()]
    return f"{name:<12} {rep.stage:<5} users {rep.num_users:>6} | " + " | ".join(cells)


def main(argv: list[str] | None = None) -> dict[str, dict[str, object]]:
    cfg = parse_args(argv)
    ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.source, cfg.on_bad_row)
    split = split_dataset(ds, cfg.eval_users)
    results: dict[str, dict[str, object]] = {}
    print(
        f"{ds.name} ({ds.source}): {ds.num_users} users, {ds.num_items} items, "
        f"{ds.num_interactions} interactions; metric mean [95% bootstrap CI]"
    )
    for stage in ("valid", "test"):
        rep = popularity_report(split, stage, cfg.n_boot)
        results[stage] = rep.to_dict()
        print(format_report("popularity", rep))
    if cfg.out:
        write_results(cfg.out, {"model": "popularity", "dataset": ds.name, "fingerprint": ds.fingerprint, **results})
    return results


if __name__ == "__main__":
    main()
