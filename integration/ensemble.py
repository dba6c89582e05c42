"""Score fusion of the candidate sources, and the served system chosen on validation.

    python -m integration.ensemble --artifacts runs                       # the sources runs/ has
    python -m integration.ensemble --artifacts runs --sequential sasrec --item-item none   # two-tower + SASRec

Each source scores the whole catalog for a user: the two-tower its dot products, SASRec and
BERT4Rec their next-item logits, EASE and the transitions (retrieval/item_item.py) their item-to-item
sums over the user's history. Their scales have nothing in common, so each source's scores become
ranks among the items the user has not seen (0 for its best), and the ensemble scores an item by
its weighted reciprocal ranks, ``sum_s w_s / (10 + rank_s)`` (reciprocal rank fusion, Cormack et
al. 2009, there with 60 in place of 10): a source counts only through its order, and its top items
count most; on ml-100k validation this fusion beat z-scored scores summed, and 10 beat the other
offsets tried (integration/README.md has the figures). The weights are the point of a grid over the simplex (step 0.1: 66 points for
three sources, 286 for four) with the best validation NDCG@10, every point scored by full ranking
of the validation targets (the protocol of every other figure). Picking the best of many points
flatters it, so beside it the choice reports a cross-fitted figure: weights fitted on one half of
the validation users and scored on the other, in turn (:func:`cross_fitted`).

Then every system the pipeline can be is evaluated on validation (each source alone and re-ranked
by the ranker trained on its candidates, the union alone and re-ranked, the fitted ensemble, and the
union ranker of integration/union_ranker.py where one was trained on these sources and weights) and
the one with the best NDCG@10 is written to ``<artifacts>/serving/served-<sources>.json``, with the
weights and a digest of every model it compared. Each system is compared by a figure it was not
fitted on: the ensemble's and the union ranker's are cross-fitted (their weights and model were
fitted on validation). ``python -m integration.union_ranker`` chooses again when it trains. ``create_pipeline`` serves that system by default;
a retrained model no longer matches its digest and the pipeline refuses to start until this command
chooses again. Test is never touched here.
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np

from candidates.sources import excluded, reciprocal_ranks, unseen_mask
from common.runtime import write_json_atomic
from integration.loader import choice_file, create_pipeline, sequential_exports
from integration.union_model import NAME as UNION_RANKER
from integration.union_model import read_manifest, why_stale

STEP = 0.1  # the weight grid's step


def simplex(names: list[str], step: float = STEP) -> list[dict[str, float]]:
    """Every weighting of ``names`` on a grid of ``step`` whose weights sum to 1."""
    n = round(1 / step)
    points = [c for c in itertools.product(range(n + 1), repeat=len(names)) if sum(c) == n]
    return [{name: round(c * step, 10) for name, c in zip(names, point)} for point in points]


# Items a grid point's ranking is computed over: each source's top SHORTLIST (and the target). Exact
# for NDCG@10 and HR@10 with up to 11 sources: see grid_ndcg.
SHORTLIST = 200


def grid_ndcg(
    sources: list,
    users: np.ndarray,
    histories: list[np.ndarray],
    targets: np.ndarray,
    step: float = STEP,
    chunk: int = 256,
) -> tuple[list[dict[str, float]], np.ndarray]:
    """Every grid point's weights, and each user's NDCG@10 of their target under each ``[points, users]``
    (0 beyond rank 10), by full ranking of the unseen items (of every item, on a data set with
    repeats). ``chunk`` users at a time: a large catalog's scores for every user do not fit.

    Each point ranks only the items in some source's top :data:`SHORTLIST` (and the target), which
    gives the full ranking's NDCG@10: an item outside every shortlist scores at most
    ``1 / (10 + SHORTLIST)``, while the top 10 of the heaviest source (weight >= 1 / #sources) each
    score at least ``1 / (19 #sources)``, more with up to 11 sources; so an outside item can only
    outscore a target that ten shortlisted items outscore too, whose NDCG@10 is 0 either way."""
    names = [src.name for src in sources]
    points = simplex(names, step)
    if len(names) > 11:
        raise ValueError(f"{len(names)} sources: the shortlist is exact for at most 11")
    repeats = any(getattr(src, "repeats", False) for src in sources)
    ndcg = np.empty((len(points), len(users)))
    for lo in range(0, len(users), chunk):
        u, h, t = users[lo : lo + chunk], histories[lo : lo + chunk], targets[lo : lo + chunk]
        z, unseen = {}, None
        for src in sources:
            s = src.scores(u, h)
            unseen = unseen_mask(s.shape, excluded(h, repeats)) if unseen is None else unseen
            z[src.name] = reciprocal_ranks(s, unseen)
        rows = np.arange(len(u))
        listed = np.zeros(unseen.shape, dtype=bool)
        for zs in z.values():
            if zs.shape[1] > SHORTLIST:
                np.put_along_axis(listed, np.argpartition(-zs, SHORTLIST, axis=1)[:, :SHORTLIST], True, axis=1)
            else:
                listed[:] = True
        listed &= unseen
        listed[rows, t] = False  # the target is scored on its own
        width = max(int(listed.sum(axis=1).max()), 1)
        cols = np.argsort(~listed, axis=1, kind="stable")[:, :width]  # each row's listed items first
        valid = np.take_along_axis(listed, cols, 1)
        zc = {name: np.take_along_axis(zs, cols, 1) for name, zs in z.items()}
        zt = {name: zs[rows, t] for name, zs in z.items()}
        before = cols < t[:, None]
        for n, weights in enumerate(points):
            s = sum(w * zc[name] for name, w in weights.items())
            at = sum(w * zt[name] for name, w in weights.items())[:, None]
            rank = ((s > at) & valid).sum(axis=1) + ((s == at) & valid & before).sum(axis=1)  # a stable sort's
            ndcg[n, lo : lo + len(u)] = np.where(rank < 10, 1.0 / np.log2(rank + 2.0), 0.0)
    return points, ndcg


def fit_weights(
    sources: list, users: np.ndarray, histories: list[np.ndarray], targets: np.ndarray, step: float = STEP
) -> tuple[dict[str, float], list[dict[str, object]]]:
    """The grid point with the best NDCG@10 of ``targets`` (ties: the first in grid order), and
    every point's HR@10 and NDCG@10, best first."""
    points, ndcg = grid_ndcg(sources, users, histories, targets, step)
    return fit_from_grid(points, ndcg)


def fit_from_grid(points: list[dict[str, float]], ndcg: np.ndarray) -> tuple[dict[str, float], list[dict[str, object]]]:
    grid = [
        {"weights": w, "HR@10": float((row > 0).mean()), "NDCG@10": float(row.mean())} for w, row in zip(points, ndcg)
    ]
    best = max(grid, key=lambda g: g["NDCG@10"])  # max keeps the first of equals
    return dict(best["weights"]), sorted(grid, key=lambda g: -g["NDCG@10"])


def cross_fitted(points: list[dict[str, float]], ndcg: np.ndarray, folds: int = 2, seed: int = 0) -> dict[str, object]:
    """An estimate of the fitted ensemble's NDCG@10 that is not its own selection: the users in
    ``folds`` random folds, the weights fitted on all but one fold and scored on that one, in turn.
    Beside it, each source alone (its weight 1) on the same users, and the gain over the best of them
    ("best_source" is chosen on all users, so the gain is, if anything, understated)."""
    fold = np.random.default_rng(seed).permutation(ndcg.shape[1]) % folds
    held_out = np.empty(ndcg.shape[1])
    per_fold = []
    for f in range(folds):
        best = int(np.argmax(ndcg[:, fold != f].mean(axis=1)))
        held_out[fold == f] = ndcg[best, fold == f]
        per_fold.append(points[best])
    alone = {name: float(ndcg[n].mean()) for n, w in enumerate(points) for name, v in w.items() if v == 1.0}
    best_source = max(alone, key=alone.get)
    return {
        "folds": folds,
        "seed": seed,
        "NDCG@10": float(held_out.mean()),
        "weights_per_fold": per_fold,
        "sources_alone": alone,
        "gain_over_best_source": float(held_out.mean() - alone[best_source]),
        "best_source": best_source,
    }


def choose(pipeline, step: float = STEP, n_boot: int = 100) -> dict[str, object]:
    """Fit the ensemble on validation (with two sources or more), evaluate every system there (the
    union ranker by its cross-fitted figure, where it was trained for these sources and weights),
    and name the best NDCG@10."""
    valid = pipeline.at_stage("valid")
    users, targets = valid.split.targets("valid")
    hists = [valid.store.history(u) for u in users]
    t0 = time.perf_counter()
    sources = valid.all_sources
    weights, grid, honest = None, [], None
    if len(sources) > 1:
        points, ndcg = grid_ndcg(sources, users, hists, targets, step)
        weights, grid = fit_from_grid(points, ndcg)
        honest = cross_fitted(points, ndcg)
    fit_seconds = time.perf_counter() - t0
    reports = (valid.with_ensemble(weights) if weights else valid).evaluate("valid", n_boot=n_boot)
    choice = {
        "weights": weights,
        "models": pipeline.model_digests,
        "valid": {name: rep.means for name, rep in reports.items()},
        "grid": grid,
        "cross_fitted": honest,
        "step": step,
        "fit_seconds": fit_seconds,
        "file": str(choice_file(pipeline.artifacts_dir, [s.name for s in pipeline.all_sources])),
    }
    return with_union_ranker(choice, read_manifest(pipeline.artifacts_dir), pipeline.model_digests["sources"])


def with_union_ranker(choice: dict, manifest: dict | None, models: dict[str, str]) -> dict:
    """``choice`` with the union ranker among its systems, where ``manifest`` (integration/union_model.py)
    fits the choice's sources (``models``, their digests) and weights, and the served system named
    again: the best validation NDCG@10, each system's by a figure it was not fitted on. The sources and
    their rankers never saw validation; the ensemble's weights and the union ranker's model were
    fitted there, so theirs are cross-fitted (:func:`cross_fitted`; the union ranker's folds of lists)."""
    valid = {name: means for name, means in choice["valid"].items() if name != UNION_RANKER}
    out = {k: v for k, v in choice.items() if k != "union_ranker"}
    if manifest is not None and why_stale(manifest, models, choice["weights"]) is None:
        valid[UNION_RANKER] = manifest["valid_cross_fitted"]
        out["union_ranker"] = {"model_sha256": manifest["model_sha256"]}
    by = {name: means["NDCG@10"] for name, means in valid.items()}
    if choice.get("cross_fitted") and "ensemble" in by:
        by["ensemble"] = choice["cross_fitted"]["NDCG@10"]
    system = max(by, key=by.get)  # max keeps the first of equals
    source, rerank = (system[: -len(" + ranker")], True) if system.endswith(" + ranker") else (system, False)
    return {
        **out,
        "valid": valid,
        "chosen_by": by,
        "chosen_on": "valid NDCG@10 (cross-fitted for the ensemble and the union ranker)",
        "system": system,
        "candidate_source": source,
        "rerank": rerank,
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
    p.add_argument(
        "--item-item",
        default="auto",
        choices=["auto", "none"],
        help="the item-to-item sources (EASE, transitions) of <artifacts>/item-item/export: auto (if there) or "
        "none (default: %(default)s)",
    )
    p.add_argument("--step", type=float, default=STEP, help="the weight grid's step (default: %(default)s)")
    p.add_argument("--n-boot", type=int, default=100, help="bootstrap resamples (default: %(default)s)")
    p.add_argument(
        "--data-dir", default=None, help="MovieLens cache (default: $RECSYS_DATA_DIR or ~/.cache/recsys-examples)"
    )
    a = p.parse_args(argv)
    if not 0 < a.step <= 1 or abs(round(1 / a.step) * a.step - 1) > 1e-9:
        p.error(f"--step {a.step}: must divide 1 (0.1, 0.05, 0.25, ...)")
    try:
        sequential = sequential_exports(a.sequential)
    except ValueError as err:
        p.error(str(err))
    pipeline = create_pipeline(
        a.artifacts,
        data_dir=a.data_dir,
        sequential=sequential,
        served=False,
        item_item=None if a.item_item == "none" else "auto",
    )
    result = choose(pipeline, a.step, a.n_boot)
    write_json_atomic(result["file"], result)
    if result["weights"]:
        w = ", ".join(f"{n} {v:g}" for n, v in result["weights"].items())
        print(f"ensemble weights (validation NDCG@10 {result['grid'][0]['NDCG@10']:.4f}): {w}")
        c = result["cross_fitted"]
        print(
            f"cross-fitted over {c['folds']} folds of users (weights fitted on one, scored on the other): NDCG@10 "
            f"{c['NDCG@10']:.4f}, {c['gain_over_best_source']:+.4f} over the best source alone ({c['best_source']})"
        )
    print(f"{pipeline.dataset.name} valid, NDCG@10 of every system:")
    print_choice(result)
    print(f"served: {result['system']} (written to {result['file']})")
    return result


def print_choice(choice: dict) -> None:
    """Every system's validation NDCG@10, as chosen by (cross-fitted where marked), best first."""
    for name, ndcg in sorted(choice["chosen_by"].items(), key=lambda kv: -kv[1]):
        fitted = name == UNION_RANKER or (name == "ensemble" and bool(choice.get("cross_fitted")))
        fitted = " (cross-fitted)" if fitted else ""
        print(f"  {name:22s} {ndcg:.4f}{fitted}" + ("  <- served" if name == choice["system"] else ""))


if __name__ == "__main__":
    main()
