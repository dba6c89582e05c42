"""One DLRM ranker over the union of every candidate source's lists, trained on lists like those it serves.

    python -m integration.union_ranker --artifacts runs                    # after make demo: valid and test
    python -m integration.union_ranker --artifacts runs --loss pointwise   # the loss compared on validation
    python -m integration.union_ranker --artifacts runs --no-test          # validation only

**The lists.** For each user, the union of every source's top 100 (two-tower, SASRec, BERT4Rec where
trained, EASE or the neighbours, the transitions, "again" on a log with repeats), each candidate with
the ranker's features (golden_training/ranking_data.py: IDs, categoricals, the history, popularity,
the sequence statistics, the repeat features) and its provenance (candidates/provenance.py: each
source's reciprocal rank, whether it proposed it, its standardised score; the ensemble's fused score;
how many sources proposed it).

**Training without a leak.** Every source was fitted on the training split, so its lists for the
validation targets were chosen without having seen them, as its lists for the test targets and for
served users are. Those are the ranker's training lists: one per validation user, label 1 on the
target. Lists for training targets would not do: the sources were fitted on those targets, so they
find them more often and rank them higher than they ever will an unseen one, and a ranker trained
there learns to trust them too much. (The per-source rankers sample negatives for training
interactions instead; on another source's lists they collapse: README.md, "A purchase log".)

**The loss.** Listwise (default): a softmax over each list, cross-entropy on its target; a list
whose target no source proposed teaches nothing and is skipped. Pointwise: binary cross-entropy
on every row, as the per-source rankers train.

**The figures.** Validation is both the training set and the chooser of the served system, so the
validation figure is cross-fitted: the users in ``--folds`` folds, each fold's lists ranked by a
model trained on the other folds' lists. Beside it, the ensemble (the fusion the ranker must beat; its
weights were fitted on all of validation, so its validation figure flatters it) and the paired
difference.

**Served.** Then a model is trained on every validation list and saved (integration/union_model.py:
``<artifacts>/serving/union-ranker``, with what its lists were made of), and the served system is
chosen again with its cross-fitted figure among the others (integration/ensemble.py,
:func:`~integration.ensemble.with_union_ranker`): where it has the best validation NDCG@10, the
pipeline serves it (its lists built and scored by the same calls as here). Test is scored once, by
that model (``--no-test``: never; the demo's table scores it). The model is TorchRec's DLRM
(golden_training/model.py), unsharded in one process (the lists are a few hundred thousand rows), in
fp32 eager when served: not yet sharded under torchrun, nor packaged INT8 or compiled.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from torchrec.datasets.utils import Batch

from candidates.provenance import UnionLists, union_lists
from common.data.split import Split
from common.features import FeatureSchema
from common.metrics import MAX_K, RankingReport, evaluate_topk, paired_difference, report_from_ranks
from common.runtime import Progress, seed_everything, write_json_atomic, write_results
from golden_training.model import TorchRecDLRM
from integration.ensemble import print_choice, with_union_ranker
from integration.feature_store import FeatureStore
from integration.loader import choice_file, create_pipeline, sequential_exports
from integration.pipeline import CANDIDATES, RecommendationPipeline
from integration.union_model import ARTIFACT, ID_FEATURES, NAME, UnionRanker, list_batch, pad_lists, ranker_schema

LOSSES = ("listwise", "pointwise")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default="runs", help="run directory holding the stages (default: %(default)s)")
    p.add_argument(
        "--sequential",
        default="auto",
        help="sequential sources: sasrec, bert4rec, both (sasrec,bert4rec), none, or auto: those whose export is there (default: auto)",
    )
    p.add_argument(
        "--data-dir", default=None, help="data cache (default: $RECSYS_DATA_DIR or ~/.cache/recsys-examples)"
    )
    p.add_argument("--loss", default="listwise", choices=LOSSES, help="(default: %(default)s)")
    p.add_argument("--folds", type=int, default=5, help="cross-fitting folds of validation users (default: 5)")
    p.add_argument("--epochs", type=int, default=4, help="passes over the training lists (default: %(default)s)")
    p.add_argument("--lists-per-batch", type=int, default=32, help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam's learning rate (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=1e-2, help="(default: %(default)s)")
    p.add_argument("--embedding-dim", type=int, default=16, help="every table's width (default: %(default)s)")
    p.add_argument("--dense-arch", type=int, nargs="+", default=[64, 16], help="ends in --embedding-dim")
    p.add_argument("--over-arch", type=int, nargs="+", default=[64, 32, 1], help="ends in 1")
    p.add_argument(
        "--ids",
        action="store_true",
        help=f"add the ID features {', '.join(ID_FEATURES)} (default: off, unless the data set has no categorical "
        "feature for the DLRM's tables)",
    )
    p.add_argument(
        "--attention",
        type=int,
        default=10,
        help="target attention over the user's latest N items in the two-tower's item space (0: none; 10 "
        "had the best cross-fitted validation NDCG@10 of 0, 10, 20, 50 on ml-100k, within noise) "
        "(default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default: %(default)s)")
    p.add_argument("--no-test", action="store_true", help="end on validation: test is never scored")
    p.add_argument("--out", default=None, help="results directory (default: <artifacts>/union-ranker)")
    a = p.parse_args(argv)
    if a.dense_arch[-1] != a.embedding_dim or a.over_arch[-1] != 1:
        p.error(f"--dense-arch must end in --embedding-dim ({a.embedding_dim}) and --over-arch in 1")
    if a.folds < 2:
        p.error(f"--folds {a.folds}: cross-fitting needs at least 2")
    try:
        sequential_exports(a.sequential)
    except ValueError as err:
        p.error(str(err))
    return a


# -- the lists and their rows ------------------------------------------------------------------


@dataclasses.dataclass
class Lists:
    """One stage's union lists as training rows: ``batches[j]`` holds the rows of the lists
    ``chunks[j]`` (indices into ``users``), list by list, each list's rows in union order."""

    stage: str
    schema: FeatureSchema
    users: np.ndarray
    targets: np.ndarray
    union: UnionLists
    chunks: list[np.ndarray]
    batches: list[Batch]
    repeat: np.ndarray | None


def pipeline_lists(pipeline: RecommendationPipeline, stage: str, order: np.ndarray, cfg) -> Lists:
    """:func:`stage_lists` of the pipeline's sources and its feature store before ``stage``'s targets
    (as served), the two-tower's queries for the ``retrieval_score`` feature."""
    p = pipeline.at_stage(stage)
    users = p.split.targets(stage)[0]
    hists = [p.store.history(u) for u in users.tolist()]
    queries = np.concatenate(
        [
            p.retriever.query_embeddings(users[lo : lo + 1024], hists[lo : lo + 1024])
            for lo in range(0, len(users), 1024)
        ]
    )
    return stage_lists(p.split, p.store, p.all_sources, p.ensemble.weights, (queries, p.item_embeddings), order, cfg)


def stage_lists(
    split: Split,
    store: FeatureStore,
    sources: list,
    weights: dict[str, float],
    two_tower: tuple[np.ndarray, np.ndarray] | None,
    order: np.ndarray,
    cfg,
) -> Lists:
    """The union lists of ``sources`` for the users with a target in the store's stage (their
    histories and "now" as the store holds them before it: what serving reads), every row's
    features (:func:`integration.union_model.list_batch`, serving's call), in batches of
    ``cfg.lists_per_batch`` lists taken in ``order`` (a permutation of the users). ``two_tower``:
    (each user's query, the item embeddings) for the ``retrieval_score`` feature (0 without)."""
    stage = store.stage
    users, targets = split.targets(stage)
    histories = [store.history(u) for u in users.tolist()]
    now = store.last_time[users]
    bar = Progress(len(users), f"{stage} lists", "users")
    parts = []
    for lo in range(0, len(users), 256):
        parts.append(union_lists(sources, weights, users[lo : lo + 256], histories[lo : lo + 256], CANDIDATES))
        bar.update(len(parts[-1].users))
    bar.close()
    width = max(x.items.shape[1] for x in parts)
    items = np.concatenate(
        [np.pad(x.items, ((0, 0), (0, width - x.items.shape[1])), constant_values=-1) for x in parts]
    )
    feats = np.concatenate([np.pad(x.features, ((0, 0), (0, width - x.features.shape[1]), (0, 0))) for x in parts])
    lists = UnionLists(users, items, feats, parts[0].names)
    schema = ranker_schema(store.features, lists.names, cfg.ids, cfg.attention)
    chunks = [order[lo : lo + cfg.lists_per_batch] for lo in range(0, len(order), cfg.lists_per_batch)]
    batches = [
        list_batch(store.features, schema, lists, c, histories, now, two_tower, targets, cfg.attention) for c in chunks
    ]
    repeat = split.is_repeat(stage, users, targets) if split.repeats else None
    return Lists(stage, schema, users, targets, lists, chunks, batches, repeat)


def list_sizes(lists: Lists, j: int) -> np.ndarray:
    return (lists.union.items[lists.chunks[j]] >= 0).sum(axis=1)


# -- the model and its training -----------------------------------------------------------------


def train_model(lists: Lists, chunks: list[int], cfg, seed: int, manifest: dict | None = None) -> UnionRanker:
    """A DLRM trained on the batches ``chunks`` of ``lists``, with the dense features' mean and scale
    on those rows (every dense input is standardised by them)."""
    seed_everything(seed)
    model = TorchRecDLRM(lists.schema, cfg.embedding_dim, cfg.dense_arch, cfg.over_arch)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    dense = torch.cat([lists.batches[j].dense_features for j in chunks])
    mean, scale = dense.mean(dim=0), dense.std(dim=0).clamp_min(1e-6)
    rng = np.random.default_rng(seed)
    for _ in range(cfg.epochs):
        for j in rng.permutation(chunks).tolist():
            b = lists.batches[j]
            logits = model((b.dense_features - mean) / scale, b.sparse_features)
            loss = list_loss(logits, b.labels, list_sizes(lists, j), cfg.loss)
            if loss is None:
                continue
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return UnionRanker(model, mean, scale, lists.schema, manifest or {})


def list_loss(logits: torch.Tensor, labels: torch.Tensor, sizes: np.ndarray, loss: str) -> torch.Tensor | None:
    """Listwise: the mean over lists holding a target of -log softmax(list)[target]; pointwise: BCE per row."""
    if loss == "pointwise":
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
    padded, mask = pad_lists(logits, sizes)
    target, _ = pad_lists(labels, sizes)
    has = target.sum(dim=1) > 0
    if not bool(has.any()):
        return None
    logp = torch.log_softmax(padded.masked_fill(~mask, -torch.inf), dim=1)
    return -(logp.masked_fill(~mask, 0.0) * target)[has].sum(dim=1).mean()


def ranked(ranker: UnionRanker, lists: Lists, chunks: list[int]) -> dict:
    """Each list of ``chunks`` ordered by the model: user index -> rank of its target (``MAX_K`` when
    the target is not among the first ``MAX_K``, or not in the list)."""
    out = {}
    for j in chunks:
        items, _ = ranker.order(lists.union, lists.chunks[j], lists.batches[j])
        for row, u in zip(items, lists.chunks[j].tolist()):
            hit = np.nonzero(row == lists.targets[u])[0]
            out[u] = int(hit[0]) if len(hit) and hit[0] < MAX_K else MAX_K
    return out


def report(lists: Lists, rank_of: dict, n_boot: int) -> RankingReport:
    ranks = np.array([rank_of[u] for u in range(len(lists.users))])
    return report_from_ranks(lists.stage, lists.users, ranks, n_boot, lists.repeat)


def ensemble_report(pipeline: RecommendationPipeline, lists: Lists, n_boot: int) -> RankingReport:
    """The fusion the ranker must beat, on the same users: the ensemble's own top 100."""
    p = pipeline.at_stage(lists.stage)
    return evaluate_topk(
        lambda users: p.ensemble.top_k(users, [p.store.history(u) for u in users.tolist()], MAX_K)[0],
        p.split,
        lists.stage,
        batch_size=256,
        n_boot=n_boot,
    )


def line(name: str, rep: RankingReport) -> str:
    cells = [f"{m} {rep.means[m]:.4f} [{rep.ci95[m][0]:.3f}, {rep.ci95[m][1]:.3f}]" for m in ("NDCG@10", "HR@10")]
    extra = [f"{m} {rep.means[m]:.4f}" for m in ("NDCG@10 repeat", "NDCG@10 new") if m in rep.means]
    return f"  {name:34s} " + " | ".join(cells + extra)


def main(argv: list[str] | None = None) -> dict[str, object]:
    cfg = parse_args(argv)
    t0 = time.perf_counter()
    # the ensemble as chosen (its weights are the fused feature), whatever is served: this retrains the
    # union ranker even where the served one no longer fits the sources
    pipeline = create_pipeline(
        cfg.artifacts,
        data_dir=cfg.data_dir,
        sequential=sequential_exports(cfg.sequential),
        candidate_source="ensemble",
    )
    ds, split = pipeline.dataset, pipeline.split
    print(f"{ds.name}: sources {[s.name for s in pipeline.all_sources]}, ensemble weights {pipeline.ensemble.weights}")
    rng = np.random.default_rng(cfg.seed)
    valid_users = split.targets("valid")[0]
    order = rng.permutation(len(valid_users))
    valid = pipeline_lists(pipeline, "valid", order, cfg)
    prov = valid.union.names
    proposed = np.mean([valid.targets[u] in valid.union.items[u] for u in range(len(valid.users))])
    print(f"valid: {len(valid.users)} lists, {valid.union.items.shape[1]} candidates at most, target in {proposed:.1%}")
    if not cfg.ids and set(ID_FEATURES) & set(valid.schema.sparse_names):
        print(f"note: {ds.name} has no categorical feature for the DLRM's tables: it takes the IDs {ID_FEATURES}")

    # Cross-fitting: batch j belongs to fold j % folds (batches hold whole lists, drawn in random order).
    fold_of = np.arange(len(valid.chunks)) % cfg.folds
    rank_of: dict[int, int] = {}
    for f in range(cfg.folds):
        model = train_model(valid, np.nonzero(fold_of != f)[0].tolist(), cfg, cfg.seed + f)
        rank_of |= ranked(model, valid, np.nonzero(fold_of == f)[0].tolist())
        print(f"fold {f + 1}/{cfg.folds} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    reports = {"valid": {"union ranker (cross-fitted)": report(valid, rank_of, cfg.n_boot)}}
    reports["valid"]["ensemble (weights fitted here)"] = ensemble_report(pipeline, valid, cfg.n_boot)
    results: dict[str, object] = {"dataset": ds.name, "config": vars(cfg), "features": prov}
    print(f"{ds.name} valid ({cfg.loss} loss):")
    for name, rep in reports["valid"].items():
        print(line(name, rep))

    # The served model: trained on every validation list, saved with what its lists were made of.
    served = train_model(
        valid,
        list(range(len(valid.chunks))),
        cfg,
        cfg.seed,
        {
            "data_fingerprint": ds.fingerprint,
            "sources": [s.name for s in pipeline.all_sources],
            "models": pipeline.model_digests["sources"],
            "weights": pipeline.ensemble.weights,
            "store": pipeline.store.config,
            "model": {"embedding_dim": cfg.embedding_dim, "dense_arch": cfg.dense_arch, "over_arch": cfg.over_arch},
            "config": vars(cfg),
            "valid_cross_fitted": reports["valid"]["union ranker (cross-fitted)"].means,
            "valid_cross_fitted_ranks": {
                "users": valid.users.tolist(),
                "ranks": [rank_of[u] for u in range(len(valid.users))],
            },
        },
    )
    out = served.save(Path(cfg.artifacts) / ARTIFACT)
    path = choice_file(cfg.artifacts, [s.name for s in pipeline.all_sources])
    choice = with_union_ranker(json.loads(path.read_text()), served.manifest, pipeline.model_digests["sources"])
    write_json_atomic(path, choice)
    print(f"saved to {out}; the served system chosen again on validation NDCG@10:")
    print_choice(choice)
    print(f"served: {choice['system']} (written to {path})")
    results["served"] = choice["system"]

    stages = ["valid"] if cfg.no_test else ["valid", "test"]
    if "test" in stages:
        test_users = split.targets("test")[0]
        test = pipeline_lists(pipeline, "test", np.arange(len(test_users)), cfg)
        reports["test"] = {
            NAME: report(test, ranked(served, test, list(range(len(test.chunks)))), cfg.n_boot),
            "ensemble": ensemble_report(pipeline, test, cfg.n_boot),
        }
        print(f"{ds.name} test:")
        for name, rep in reports["test"].items():
            print(line(name, rep))
    for stage in stages:
        a, b = reports[stage].values()
        gain = paired_difference(a, b, cfg.n_boot)
        lo, hi = gain["NDCG@10_ci95"]
        print(f"{stage}: union ranker minus ensemble, NDCG@10 {gain['NDCG@10']:+.4f} [{lo:+.4f}, {hi:+.4f}]")
        results[stage] = {name: rep.to_dict() for name, rep in reports[stage].items()}
        results[f"{stage}_ranker_minus_ensemble"] = gain
    results["seconds"] = time.perf_counter() - t0
    write_results(Path(cfg.out or Path(cfg.artifacts) / "union-ranker"), results)
    return results


if __name__ == "__main__":
    main()
