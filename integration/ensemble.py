"""Score fusion of the candidate sources, and the served system chosen on validation.

    python -m integration.ensemble --artifacts runs                       # the sources runs/ has
    python -m integration.ensemble --artifacts runs --sequential sasrec   # two-tower + SASRec only

Each source scores the whole catalog for a user: the two-tower its dot products, SASRec and
BERT4Rec their next-item logits. Their scales have nothing in common, so each user's scores are
standardized over the items the user has not seen (z-scores), then summed with one weight per
source. The weights are the point of a grid over the simplex (step 0.1: 66 points for three
sources) with the best validation NDCG@10, every point scored by full ranking of the validation
targets (the protocol of every other figure).

Then every system the pipeline can be is evaluated on validation (each source alone and re-ranked
by the ranker trained on its candidates, the union alone and re-ranked, the fitted ensemble) and
the one with the best NDCG@10 is written to ``<artifacts>/serving/served-<sources>.json``, with the
weights and a digest of every model it compared. ``create_pipeline`` serves that system by default;
a retrained model no longer matches its digest and the pipeline refuses to start until this command
chooses again. Test is never touched here.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np

from common.runtime import write_json_atomic

STEP = 0.1  # the weight grid's step


def choice_file(root: str | Path, sources: list[str]) -> Path:
    """Where the served system chosen among ``sources`` (names, two-tower first) is written."""
    return Path(root) / "serving" / f"served-{'-'.join(n.lower() for n in sources)}.json"


def unseen_mask(shape: tuple[int, int], histories: list[np.ndarray]) -> np.ndarray:
    mask = np.ones(shape, dtype=bool)
    for r, h in enumerate(histories):
        mask[r, h] = False
    return mask


def standardize(scores: np.ndarray, unseen: np.ndarray) -> np.ndarray:
    """Each row's scores minus their mean over the unseen items, over their standard deviation there."""
    s = scores.astype(np.float64)
    n = np.maximum(unseen.sum(axis=1, keepdims=True), 1)
    mean = np.where(unseen, s, 0.0).sum(axis=1, keepdims=True) / n
    std = np.sqrt(np.where(unseen, (s - mean) ** 2, 0.0).sum(axis=1, keepdims=True) / n)
    return ((s - mean) / np.maximum(std, 1e-12)).astype(np.float32)


class EnsembleSource:
    """Candidates by the weighted sum of the member sources' standardized scores."""

    name = "ensemble"

    def __init__(self, sources: list, weights: dict[str, float]) -> None:
        names = [src.name for src in sources]
        unknown = [n for n in weights if n not in names]
        if unknown:
            raise ValueError(f"ensemble weights name sources {unknown} the pipeline does not have ({names})")
        self.weights = {n: float(w) for n, w in weights.items()}
        self.members = [(src, self.weights[src.name]) for src in sources if self.weights.get(src.name, 0.0) > 0]
        if not self.members:
            raise ValueError(f"ensemble weights {weights}: at least one must be positive")

    def scores(self, users: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
        unseen = None
        total = None
        for src, w in self.members:
            s = src.scores(users, histories)
            unseen = unseen_mask(s.shape, histories) if unseen is None else unseen
            z = w * standardize(s, unseen)
            total = z if total is None else total + z
        return total

    def top_k(self, users: np.ndarray, histories: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
        from integration.pipeline import top_unseen

        return top_unseen(self.scores(users, histories), histories, k)


def simplex(names: list[str], step: float = STEP) -> list[dict[str, float]]:
    """Every weighting of ``names`` on a grid of ``step`` whose weights sum to 1."""
    n = round(1 / step)
    points = [c for c in itertools.product(range(n + 1), repeat=len(names)) if sum(c) == n]
    return [{name: round(c * step, 10) for name, c in zip(names, point)} for point in points]


def fit_weights(
    sources: list, users: np.ndarray, histories: list[np.ndarray], targets: np.ndarray, step: float = STEP
) -> tuple[dict[str, float], list[dict[str, object]]]:
    """The grid point with the best NDCG@10 of ``targets`` (ties: the first in grid order), and
    every point's HR@10 and NDCG@10, best first."""
    scores = {
        src.name: np.concatenate(
            [src.scores(users[lo : lo + 256], histories[lo : lo + 256]) for lo in range(0, len(users), 256)]
        )
        for src in sources
    }
    unseen = unseen_mask(next(iter(scores.values())).shape, histories)
    z = {name: standardize(s, unseen) for name, s in scores.items()}
    del scores
    rows = np.arange(len(users))
    before = np.arange(unseen.shape[1])[None, :] < targets[:, None]
    grid = []
    for weights in simplex(list(z), step):
        s = sum(w * z[name] for name, w in weights.items())
        t = s[rows, targets][:, None]
        rank = ((s > t) & unseen).sum(axis=1) + ((s == t) & unseen & before).sum(axis=1)  # as a stable sort ranks
        hit = rank < 10
        grid.append(
            {
                "weights": weights,
                "HR@10": float(hit.mean()),
                "NDCG@10": float(np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0).mean()),
            }
        )
    best = max(grid, key=lambda g: g["NDCG@10"])  # max keeps the first of equals
    return dict(best["weights"]), sorted(grid, key=lambda g: -g["NDCG@10"])


def choose(pipeline, step: float = STEP, n_boot: int = 100) -> dict[str, object]:
    """Fit the ensemble on validation (with two sources or more), evaluate every system there, and
    name the best NDCG@10."""
    valid = pipeline.at_stage("valid")
    users, targets = valid.split.targets("valid")
    hists = [valid.store.history(u) for u in users]
    t0 = time.perf_counter()
    weights, grid = fit_weights(valid.sources, users, hists, targets, step) if len(valid.sources) > 1 else (None, [])
    fit_seconds = time.perf_counter() - t0
    reports = (valid.with_ensemble(weights) if weights else valid).evaluate("valid", n_boot=n_boot)
    system = max(reports, key=lambda n: reports[n].means["NDCG@10"])
    source, rerank = (system[: -len(" + ranker")], True) if system.endswith(" + ranker") else (system, False)
    return {
        "system": system,
        "candidate_source": source,
        "rerank": rerank,
        "weights": weights,
        "chosen_on": "valid NDCG@10",
        "models": pipeline.model_digests,
        "valid": {name: rep.means for name, rep in reports.items()},
        "grid": grid,
        "step": step,
        "fit_seconds": fit_seconds,
        "file": str(choice_file(pipeline.artifacts_dir, [s.name for s in pipeline.sources])),
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default="runs", help="run directory holding the stages (default: %(default)s)")
    p.add_argument(
        "--sequential",
        default="auto",
        help="sequential sources beside the two-tower: sasrec, bert4rec, both (sasrec,bert4rec), none, or auto: "
        "those whose export is there (default: %(default)s)",
    )
    p.add_argument("--step", type=float, default=STEP, help="the weight grid's step (default: %(default)s)")
    p.add_argument("--n-boot", type=int, default=100, help="bootstrap resamples (default: %(default)s)")
    p.add_argument(
        "--data-dir", default=None, help="MovieLens cache (default: $RECSYS_DATA_DIR or ~/.cache/recsys-examples)"
    )
    a = p.parse_args(argv)
    if not 0 < a.step <= 1 or abs(round(1 / a.step) * a.step - 1) > 1e-9:
        p.error(f"--step {a.step}: must divide 1 (0.1, 0.05, 0.25, ...)")
    from integration.pipeline import create_pipeline

    names = [m for m in a.sequential.split(",") if m and m != "none"]
    sequential = "auto" if names == ["auto"] else [f"{m}/export" for m in names]
    pipeline = create_pipeline(a.artifacts, data_dir=a.data_dir, sequential=sequential, served=False)
    result = choose(pipeline, a.step, a.n_boot)
    write_json_atomic(result["file"], result)
    if result["weights"]:
        w = ", ".join(f"{n} {v:g}" for n, v in result["weights"].items())
        print(f"ensemble weights (validation NDCG@10 {result['grid'][0]['NDCG@10']:.4f}): {w}")
    print(f"{pipeline.dataset.name} valid, NDCG@10 of every system:")
    for name, means in sorted(result["valid"].items(), key=lambda kv: -kv[1]["NDCG@10"]):
        print(f"  {name:22s} {means['NDCG@10']:.4f}" + ("  <- served" if name == result["system"] else ""))
    print(f"served: {result['system']} (written to {result['file']})")
    return result


if __name__ == "__main__":
    main()
