"""Popularity baseline under the shared protocol: the floor every model must beat.

    python -m common.baselines                     # ml-100k, valid and test
    python -m common.baselines --dataset ml-1m --out runs/popularity

Scores every item by its interaction count in what the model may see (training for valid;
training plus validation for test), excludes the user's history (not on a data set with repeats),
breaks ties by item index. Its ml-100k figures are the first row of the README's demo table. On a
data set with repeats it also reports "again": each user's own earlier items by recency-weighted
frequency, the half-life chosen on validation.
"""

from __future__ import annotations

import argparse
import math
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


# Half-lives the "again" baseline chooses among on validation, in purchases (inf: plain frequency).
HALF_LIVES = (3, 10, 30, 100, 300, 1000, math.inf)


def again_scores(histories: list[np.ndarray], num_items: int, half_life: float) -> np.ndarray:
    """Each history's items scored by recency-weighted frequency ``[B, num_items]`` (float32): the
    ``j``-th latest interaction (0: the last) adds ``0.5 ** (j / half_life)`` to its item. Items
    never had score 0, below every item had: "again" proposes only what a user had before."""
    out = np.zeros((len(histories), num_items), dtype=np.float32)
    lengths = np.array([len(h) for h in histories], dtype=np.int64)
    if lengths.sum() == 0:
        return out
    rows = np.repeat(np.arange(len(histories)), lengths)
    age = np.concatenate([np.arange(n - 1, -1, -1) for n in lengths.tolist()])
    weight = np.exp2(-age / half_life) if math.isfinite(half_life) else np.ones(len(age))
    flat = np.bincount(rows * num_items + np.concatenate(histories), weights=weight, minlength=out.size)
    out.reshape(-1)[:] = flat
    return out


def again_report(split: Split, stage: str, half_life: float, n_boot: int = 1000) -> RankingReport:
    """The "again" baseline on ``stage``: each user's history before it, by :func:`again_scores`."""
    indptr, hist = split.history(stage)

    def score(users: torch.Tensor) -> torch.Tensor:
        hists = [hist[indptr[u] : indptr[u + 1]] for u in users.tolist()]
        return torch.from_numpy(again_scores(hists, split.num_items, half_life))

    return evaluate_scores(score, split, stage, batch_size=256, n_boot=n_boot)


def fit_half_life(split: Split, n_boot: int = 0) -> tuple[float, dict[float, float]]:
    """The half-life of :data:`HALF_LIVES` with the best validation NDCG@10 (the shorter on a tie),
    and each one's figure."""
    figures = {h: again_report(split, "valid", h, n_boot=n_boot).means["NDCG@10"] for h in HALF_LIVES}
    return max(figures, key=lambda h: (figures[h], -h)), figures


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
    if split.repeats:
        half_life, figures = fit_half_life(split)
        print(f"again: half-life {half_life} purchases on validation (NDCG@10 by half-life: {figures})")
        results["again"] = {"half_life": half_life}
        for stage in ("valid", "test"):
            rep = again_report(split, stage, half_life, cfg.n_boot)
            results["again"][stage] = rep.to_dict()
            print(format_report("again", rep))
    if cfg.out:
        write_results(cfg.out, {"model": "popularity", "dataset": ds.name, "fingerprint": ds.fingerprint, **results})
    return results


if __name__ == "__main__":
    main()
