""" "Again": each user's own earlier items, by recency-weighted frequency. The floor on a data set
where people come back to items (common/data/split.py, ``repeats``), as popularity is everywhere.

    python -m candidates.again --dataset completejourney   # popularity and again, valid and test

The ``j``-th latest interaction of a history (0: the last) adds ``0.5 ** (j / half_life)`` to its
item; items the user never had score 0, after every item they had, so "again" proposes only what a
user had before. The half-life (in interactions) is the best of :data:`HALF_LIVES` on validation
NDCG@10. The pipeline serves it as a source (:class:`AgainSource`): a row of every table, a member
of the ensemble and of the union (integration/pipeline.py); on data without repeats it is off.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from common.baselines import format_report, popularity_report
from common.data.load import add_dataset_args, load_dataset
from common.data.split import Split, split_dataset
from common.metrics import RankingReport, evaluate_scores, top_unseen
from common.runtime import write_results

# Half-lives chosen among on validation, in interactions (inf: plain frequency).
HALF_LIVES = (3, 10, 30, 100, 300, 1000, math.inf)


def again_scores(histories: list[np.ndarray], num_items: int, half_life: float) -> np.ndarray:
    """Each history's items scored by recency-weighted frequency ``[B, num_items]`` (float32)."""
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
    """ "Again" on ``stage``: each user's history before it, by :func:`again_scores`."""
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


class AgainSource:
    """ "Again" as a candidate source (candidates/sources.py's interface)."""

    name = "again"
    repeats = True
    in_union = True  # the pipeline's union and rankers take its candidates (integration/pipeline.py)
    ranks_its_scores = True  # top_k is top_unseen of scores (candidates.sources.top_k_of)

    def __init__(self, num_items: int, half_life: float) -> None:
        self.num_items, self.half_life = int(num_items), float(half_life)

    def scores(self, users: np.ndarray | None, histories: list[np.ndarray]) -> np.ndarray:
        return again_scores(histories, self.num_items, self.half_life)

    def top_k(self, users: np.ndarray | None, histories: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
        parts = [
            top_unseen(self.scores(None, histories[lo : lo + 256]), None, k) for lo in range(0, len(histories), 256)
        ]
        if not parts:
            return np.zeros((0, min(k, self.num_items)), np.int64), np.zeros((0, min(k, self.num_items)), np.float32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(p.add_argument_group("data"))
    p.add_argument("--out", default=None, help="directory for results.json (default: print only)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the 95%% CI (default: 1000)")
    a = p.parse_args(argv)
    ds = load_dataset(a.dataset, a.data_dir, a.source, a.on_bad_row)
    split = split_dataset(ds, a.eval_users)
    if not split.repeats:
        raise SystemExit(f"error: {ds.name} declares no repeats, so a seen item is never a target: no again here")
    half_life, figures = fit_half_life(split)
    print(f"{ds.name}: again's half-life {half_life} interactions, chosen on validation NDCG@10 {figures}")
    results: dict[str, object] = {"dataset": ds.name, "fingerprint": ds.fingerprint, "half_life": half_life}
    for stage in ("valid", "test"):
        for name, rep in (
            ("popularity", popularity_report(split, stage, a.n_boot)),
            ("again", again_report(split, stage, half_life, a.n_boot)),
        ):
            results[f"{name}_{stage}"] = rep.to_dict()
            print(format_report(name, rep))
    if a.out:
        write_results(a.out, results)
    return results


if __name__ == "__main__":
    main()
