"""One DLRM ranker over the union of every candidate source's lists, trained on lists like those it serves.

    python -m integration.union_ranker --artifacts runs                    # after make demo: valid and test
    python -m integration.union_ranker --artifacts runs --loss pointwise   # the loss compared on validation
    python -m integration.union_ranker --artifacts runs --no-test          # validation only
    python -m integration.union_ranker --artifacts runs --resume           # continue a killed run
    python -m integration.union_ranker --artifacts runs --folds 2 --epochs 1 --n-boot 10   # quick
    torchrun --standalone --nproc_per_node=2 -m integration.union_ranker --artifacts runs  # 2 processes, tables sharded

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

**New items.** On a log with repeats a household's own past dominates the top of its lists, as it
should, and products new to it rarely reach the top 10. The order adds a bonus to the logit of each
product the household never had (``--new-item-bonus``; by default chosen on the cross-fitted
validation ranks: of ``BONUS_GRID``, the best NDCG@10 among the bonuses whose NDCG@10 on new-item
targets is at least popularity's, integration/union_model.py's ``choose_bonus``), saved in the manifest and applied wherever
the model orders a list.

**Served.** Then a model is trained on every validation list and saved (integration/union_model.py:
``<artifacts>/serving/union-ranker``, with what its lists were made of and the world size it was
trained with), and the served system is chosen again with its cross-fitted figure among the others
(integration/ensemble.py, :func:`~integration.ensemble.with_union_ranker`): where it has the best
validation NDCG@10, the pipeline serves it (its lists built and scored by the same calls as here).
Test is scored once, by that model (``--no-test``: never; the demo's table scores it). Each model's
training (each fold's, the served one's) saves a DCP checkpoint every epoch under
``<out>/checkpoints/<fold-N|served>``; ``--resume`` continues a killed run from them, and a finished
run removes them (the artifact is ``model.pt``: a rerun starts afresh).

**Several processes.** The model is TorchRec's DLRM (golden_training/model.py). In one process it
trains unsharded, Adam on every parameter: the README's figures. Under torchrun every rank builds
the lists (below, ``main``), each global batch of ``--lists-per-batch`` lists is split between the
ranks (whole lists: the loss is a softmax over one list), the tables are sharded by TorchRec's
planner (``--sharding-type``; integration/union_sharding.py) and the dense layers kept in step by
DistributedModelParallel's DDP;
rank 0 gathers each model into plain tensors and alone ranks, prints and writes, so the artifact
loads in one process unchanged. Served in fp32, compiled with AOTInductor
(``python -m integration.union_model``, integration/union_model.py); not INT8 (its tables hold a few
thousand rows).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torchrec.datasets.utils import Batch

from candidates.provenance import UnionLists, union_lists
from common.baselines import popularity_report
from common.checkpoint import gathered_state_dict, resume_if_possible, run_config, save_checkpoint
from common.data.split import Split
from common.features import FeatureSchema
from common.flags import add_trainer_args
from common.metrics import MAX_K, RankingReport, evaluate_topk, paired_difference, report_from_ranks
from common.runtime import (
    Progress,
    Runtime,
    all_gather,
    init_runtime,
    print0,
    seed_everything,
    shutdown,
    write_json_atomic,
    write_results,
)
from common.sharding import CUDA_ONLY, SHARDING_TYPES
from golden_training.model import TorchRecDLRM
from integration.ensemble import print_choice, with_union_ranker
from integration.feature_store import FeatureStore
from integration.loader import choice_file, create_pipeline, sequential_exports
from integration.pipeline import CANDIDATES, RecommendationPipeline
from integration.union_model import (
    ARTIFACT,
    BONUS_GRID,
    ID_FEATURES,
    NAME,
    NEW_ITEM_BONUS,
    UnionRanker,
    choose_bonus,
    list_batch,
    pad_lists,
    ranker_schema,
)
from integration.union_sharding import lists_digest, rank_part, sharded

LOSSES = ("listwise", "pointwise")
# What gloo can shard (row-wise kinds need CUDA), and data_parallel: the tables replicated on every rank.
CPU_SHARDING_TYPES = (*(t for t in SHARDING_TYPES if t not in CUDA_ONLY), "data_parallel")


@dataclasses.dataclass(frozen=True)
class Config:
    artifacts: str = "runs"
    sequential: str = "auto"
    data_dir: str | None = None
    loss: str = "listwise"
    folds: int = 5
    epochs: int = 4
    lists_per_batch: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-2
    embedding_dim: int = 16
    dense_arch: tuple[int, ...] = (64, 16)
    over_arch: tuple[int, ...] = (64, 32, 1)
    ids: bool = False
    attention: int = 10
    new_item_bonus: float | None = None
    seed: int = 0
    sharding_type: str = "table_wise"
    sparse_lr: float = 0.05
    resume: bool = False
    n_boot: int = 1000
    no_test: bool = False
    out: str | None = None


def parse_args(argv: list[str] | None = None) -> Config:
    d = Config()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument(
        "--artifacts", default=d.artifacts, help="run directory holding the stages (default: %(default)s)"
    )
    data.add_argument(
        "--sequential",
        default=d.sequential,
        help="sequential sources: sasrec, bert4rec, both (sasrec,bert4rec), none, or auto: those whose export is there (default: auto)",
    )
    data.add_argument(
        "--data-dir", default=d.data_dir, help="data cache (default: $RECSYS_DATA_DIR or ~/.cache/recsys-examples)"
    )
    model = p.add_argument_group("model")
    model.add_argument(
        "--embedding-dim", type=int, default=d.embedding_dim, help="every table's width (default: %(default)s)"
    )
    model.add_argument("--dense-arch", type=int, nargs="+", default=list(d.dense_arch), help="ends in --embedding-dim")
    model.add_argument("--over-arch", type=int, nargs="+", default=list(d.over_arch), help="ends in 1")
    model.add_argument(
        "--ids",
        action="store_true",
        help=f"add the ID features {', '.join(ID_FEATURES)} (default: off, unless the data set has no categorical "
        "feature for the DLRM's tables)",
    )
    model.add_argument(
        "--attention",
        type=int,
        default=d.attention,
        help="target attention over the user's latest N items in the two-tower's item space (0: none; 10 "
        "had the best cross-fitted validation NDCG@10 of 0, 10, 20, 50 on ml-100k, within noise) "
        "(default: %(default)s)",
    )
    model.add_argument(
        "--new-item-bonus",
        type=float,
        default=d.new_item_bonus,
        help="on a log with repeats, added to the logit of each product new to the user (default: chosen on "
        "validation: of BONUS_GRID, the best cross-fitted NDCG@10 among those whose new-item NDCG@10 is at least "
        "popularity's; ignored without repeats, where every candidate is new)",
    )
    groups = add_trainer_args(
        p,
        d,
        CPU_SHARDING_TYPES,
        epochs="passes over the training lists (default: {default})",
        sharding_type="with several processes, how the DLRM's tables are placed by TorchRec's planner: table_wise, "
        "column_wise, table_column_wise (sharded, RowWiseAdagrad fused into the backward at --sparse-lr) or "
        "data_parallel (replicated, Adam as in one process); one process trains unsharded (default: {default})",
        sparse_lr="RowWiseAdagrad's learning rate of sharded tables (several processes) (default: {default})",
        out="results and checkpoints (default: <artifacts>/union-ranker)",
        no_test="end on validation: test is never scored",
    )
    train = groups["training"]
    train.add_argument("--loss", default=d.loss, choices=LOSSES, help="(default: %(default)s)")
    train.add_argument(
        "--folds", type=int, default=d.folds, help="cross-fitting folds of validation users (default: 5)"
    )
    train.add_argument("--lists-per-batch", type=int, default=d.lists_per_batch, help="(default: %(default)s)")
    train.add_argument("--lr", type=float, default=d.lr, help="Adam's learning rate (default: %(default)s)")
    train.add_argument(
        "--weight-decay", type=float, default=d.weight_decay, help="Adam's weight decay (default: %(default)s)"
    )
    a = vars(p.parse_args(argv))
    cfg = Config(**{**a, "dense_arch": tuple(a["dense_arch"]), "over_arch": tuple(a["over_arch"])})
    if cfg.dense_arch[-1] != cfg.embedding_dim or cfg.over_arch[-1] != 1:
        p.error(f"--dense-arch must end in --embedding-dim ({cfg.embedding_dim}) and --over-arch in 1")
    if cfg.folds < 2:
        p.error(f"--folds {cfg.folds}: cross-fitting needs at least 2")
    try:
        sequential_exports(cfg.sequential)
    except ValueError as err:
        p.error(str(err))
    return cfg


# -- the lists and their rows ------------------------------------------------------------------


@dataclasses.dataclass
class Lists:
    """One stage's union lists as training rows: ``batches[j]`` holds the rows of the lists
    ``chunks[j]`` (indices into ``users``), list by list, each list's rows in union order;
    ``shares[j]`` and ``share_batches[j]`` are this rank's part of ``chunks[j]`` (whole lists; all of
    it in one process) and its rows."""

    stage: str
    schema: FeatureSchema
    users: np.ndarray
    targets: np.ndarray
    union: UnionLists
    chunks: list[np.ndarray]
    batches: list[Batch]
    shares: list[np.ndarray]
    share_batches: list[Batch]
    repeat: np.ndarray | None


def pipeline_lists(
    pipeline: RecommendationPipeline, stage: str, order: np.ndarray, cfg: Config, share: tuple[int, int] = (0, 1)
) -> Lists:
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
    two_tower = (queries, p.item_embeddings)
    return stage_lists(p.split, p.store, p.all_sources, p.ensemble.weights, two_tower, order, cfg, share)


def stage_lists(
    split: Split,
    store: FeatureStore,
    sources: list,
    weights: dict[str, float],
    two_tower: tuple[np.ndarray, np.ndarray] | None,
    order: np.ndarray,
    cfg: Config,
    share: tuple[int, int] = (0, 1),
) -> Lists:
    """The union lists of ``sources`` for the users with a target in the store's stage (their
    histories and "now" as the store holds them before it: what serving reads), every row's
    features (:func:`integration.union_model.list_batch`, serving's call), in batches of
    ``cfg.lists_per_batch`` lists taken in ``order`` (a permutation of the users). ``two_tower``:
    (each user's query, the item embeddings) for the ``retrieval_score`` feature (0 without).
    ``share``: (rank, world size): each batch's lists are split between the ranks in that many
    contiguous parts, and this rank's part gets its own rows."""
    stage = store.stage
    rank, world_size = share
    users, targets = split.targets(stage)
    histories, times = zip(*(store.timed_history(u) for u in users.tolist())) if len(users) else ((), ())
    now = store.last_time[users]
    bar = Progress(len(users), f"{stage} lists", "users", enabled=rank == 0)
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

    def rows(c: np.ndarray) -> Batch:
        return list_batch(store.features, schema, lists, c, histories, now, two_tower, targets, cfg.attention, times)

    chunks = [order[lo : lo + cfg.lists_per_batch] for lo in range(0, len(order), cfg.lists_per_batch)]
    batches = [rows(c) for c in chunks]
    if world_size == 1:
        shares, share_batches = chunks, batches
    else:
        shares = [np.array_split(c, world_size)[rank] for c in chunks]
        share_batches = [rows(s) for s in shares]
    repeat = split.is_repeat(stage, users, targets) if split.repeats else None
    return Lists(stage, schema, users, targets, lists, chunks, batches, shares, share_batches, repeat)


def list_sizes(lists: Lists, rows: np.ndarray) -> np.ndarray:
    return (lists.union.items[rows] >= 0).sum(axis=1)


def loss_terms(lists: Lists, rows: np.ndarray, loss: str) -> int:
    """How many terms the loss over the lists ``rows`` averages: listwise, the lists that hold their
    target; pointwise, their rows."""
    items = lists.union.items[rows]
    if loss == "pointwise":
        return int((items >= 0).sum())
    return int((items == lists.targets[rows][:, None]).any(axis=1).sum())


# -- the model and its training -----------------------------------------------------------------


def train_model(
    lists: Lists, chunks: list[int], cfg: Config, seed: int, rt: Runtime, ckpt: Path, settings: dict
) -> UnionRanker | None:
    """A DLRM trained on the batches ``chunks`` of ``lists``, with the dense features' mean and scale
    on those rows (every dense input is standardised by them), a DCP checkpoint under ``ckpt`` after
    every epoch (``settings``: what a resumed run must share). In one process unsharded, as the
    published figures were trained; with several, :func:`sharded`, each rank on its share of each
    batch, and rank 0 gets the model gathered into plain tensors (other ranks: None)."""
    seed_everything(seed)
    model = TorchRecDLRM(lists.schema, cfg.embedding_dim, cfg.dense_arch, cfg.over_arch)
    if rt.world_size == 1:
        # Unsharded, so that one process keeps its figures bit for bit: FBGEMM's kernels pool and
        # accumulate in another order than nn.EmbeddingBag, and fuse no Adam on CPU.
        net, opt = model, torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        net, opt = sharded(model, rt, cfg.sharding_type, cfg.sparse_lr, cfg.lr, cfg.weight_decay)
    dense = torch.cat([lists.batches[j].dense_features for j in chunks])
    mean, scale = dense.mean(dim=0), dense.std(dim=0).clamp_min(1e-6)
    state = {"model": net, "optimizer": opt}
    done = (resume_if_possible(ckpt, state, settings, cfg.resume) or {"epoch": 0})["epoch"]
    rng = np.random.default_rng(seed)
    for epoch in range(cfg.epochs):
        order = rng.permutation(chunks).tolist()  # drawn for the epochs a resumed run skips too: the same order
        if epoch < done:
            continue
        for j in order:
            total = loss_terms(lists, lists.chunks[j], cfg.loss)
            if total == 0:  # no list of the batch holds its target: nothing to learn, on any rank
                continue
            b, rows = lists.share_batches[j], lists.shares[j]
            logits = net((b.dense_features - mean) / scale, b.sparse_features)
            loss = list_loss(logits, b.labels, list_sizes(lists, rows), cfg.loss)
            if rt.world_size > 1:
                loss = rank_part(loss, logits, loss_terms(lists, rows, cfg.loss), total, rt.world_size)
            opt.zero_grad()
            loss.backward()
            opt.step()
        save_checkpoint(ckpt, epoch + 1, state, meta={"epoch": epoch + 1, "run_config": settings})
    if rt.world_size == 1:
        model.eval()
        return UnionRanker(model, mean, scale, lists.schema, {})
    weights = gathered_state_dict(net)
    if not rt.is_rank0:
        return None
    served = TorchRecDLRM(lists.schema, cfg.embedding_dim, cfg.dense_arch, cfg.over_arch)
    served.load_state_dict(weights)
    served.eval()
    return UnionRanker(served, mean, scale, lists.schema, {})


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


def ranked(ranker: UnionRanker, lists: Lists, chunks: list[int], new_item_bonus: float | None = None) -> dict:
    """Each list of ``chunks`` ordered by the model (with ``new_item_bonus``; None: the ranker's
    manifest's): user index -> rank of its target (``MAX_K`` when the target is not among the first
    ``MAX_K``, or not in the list)."""
    out = {}
    for j in chunks:
        items, _ = ranker.order(lists.union, lists.chunks[j], lists.batches[j], new_item_bonus)
        for row, u in zip(items, lists.chunks[j].tolist()):
            hit = np.nonzero(row == lists.targets[u])[0]
            out[u] = int(hit[0]) if len(hit) and hit[0] < MAX_K else MAX_K
    return out


def report(lists: Lists, rank_of: dict, n_boot: int) -> RankingReport:
    ranks = np.array([rank_of[u] for u in range(len(lists.users))])
    return report_from_ranks(lists.stage, lists.users, ranks, n_boot, lists.repeat)


def ensemble_report(pipeline: RecommendationPipeline, stage: str, n_boot: int) -> RankingReport:
    """The fusion the ranker must beat, on the same users: the ensemble's own top 100. Collective
    (:func:`common.metrics.evaluate_topk`): every rank scores its share of the users."""
    p = pipeline.at_stage(stage)
    return evaluate_topk(
        lambda users: p.ensemble.top_k(users, [p.store.history(u) for u in users.tolist()], MAX_K)[0],
        p.split,
        stage,
        batch_size=256,
        n_boot=n_boot,
    )


def line(name: str, rep: RankingReport) -> str:
    cells = [f"{m} {rep.means[m]:.4f} [{rep.ci95[m][0]:.3f}, {rep.ci95[m][1]:.3f}]" for m in ("NDCG@10", "HR@10")]
    extra = [f"{m} {rep.means[m]:.4f}" for m in ("NDCG@10 repeat", "NDCG@10 new") if m in rep.means]
    return f"  {name:34s} " + " | ".join(cells + extra)


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Rank 0's results (written to ``<out>/results.json``); other ranks return an empty dict."""
    cfg = parse_args(argv)
    # On CPU, whatever the machine has: the lists are a few hundred thousand rows, and the served
    # model runs on CPU (UnionRanker); gloo between the processes.
    rt = init_runtime("cpu")
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
    print0(f"{ds.name}: sources {[s.name for s in pipeline.all_sources]}, ensemble weights {pipeline.ensemble.weights}")
    rng = np.random.default_rng(cfg.seed)
    valid_users = split.targets("valid")[0]
    order = rng.permutation(len(valid_users))
    # Every rank builds the lists: they are a deterministic function of the artifacts (checked below),
    # built in seconds, where sending them would copy every row's features to every rank.
    valid = pipeline_lists(pipeline, "valid", order, cfg, (rt.rank, rt.world_size))
    if rt.world_size > 1:
        if len(set(all_gather(lists_digest(valid)))) > 1:
            raise RuntimeError("the ranks built different validation lists from the same artifacts")
        if min(len(c) for c in valid.chunks) < rt.world_size:
            raise ValueError(
                f"a batch of {min(len(c) for c in valid.chunks)} lists (the last) is fewer than the {rt.world_size} "
                "processes, which take whole lists: choose another --lists-per-batch"
            )
    proposed = np.mean([valid.targets[u] in valid.union.items[u] for u in range(len(valid.users))])
    print0(
        f"valid: {len(valid.users)} lists, {valid.union.items.shape[1]} candidates at most, target in {proposed:.1%}"
    )
    if not cfg.ids and set(ID_FEATURES) & set(valid.schema.sparse_names):
        print0(f"note: {ds.name} has no categorical feature for the DLRM's tables: it takes the IDs {ID_FEATURES}")
    out = Path(cfg.out or Path(cfg.artifacts) / "union-ranker")
    # What a resumed run must share with the killed one: the settings, and what the lists were made of.
    settings = {
        **run_config(cfg, ds.fingerprint),
        "models": pipeline.model_digests["sources"],
        "weights": pipeline.ensemble.weights,
        "sharded": rt.world_size > 1,
    }

    # Cross-fitting: batch j belongs to fold j % folds (batches hold whole lists, drawn in random order).
    fold_of = np.arange(len(valid.chunks)) % cfg.folds
    # Each held-out fold ranked with every bonus to choose from (a log with repeats), or with none.
    bonuses = (0.0,) if not split.repeats else BONUS_GRID if cfg.new_item_bonus is None else (cfg.new_item_bonus,)
    rank_of: dict[float, dict[int, int]] = {b: {} for b in bonuses}
    for f in range(cfg.folds):
        train = np.nonzero(fold_of != f)[0].tolist()
        model = train_model(valid, train, cfg, cfg.seed + f, rt, out / "checkpoints" / f"fold-{f + 1}", settings)
        if model is not None:
            for b in bonuses:
                rank_of[b] |= ranked(model, valid, np.nonzero(fold_of == f)[0].tolist(), b)
        print0(f"fold {f + 1}/{cfg.folds} done ({time.perf_counter() - t0:.0f} s)")
    # the ensemble and popularity on the same users (collective), and the served model: trained on every
    # validation list
    ensemble = {"valid": ensemble_report(pipeline, "valid", cfg.n_boot)}
    if split.repeats:
        ensemble["popularity"] = popularity_report(split, "valid", cfg.n_boot)
    everything = list(range(len(valid.chunks)))
    served = train_model(valid, everything, cfg, cfg.seed, rt, out / "checkpoints" / "served", settings)
    if not cfg.no_test:
        ensemble["test"] = ensemble_report(pipeline, "test", cfg.n_boot)
    results: dict[str, object] = {}
    if served is not None:  # rank 0
        results = report_and_serve(cfg, rt, pipeline, valid, rank_of, served, ensemble)
        results["seconds"] = time.perf_counter() - t0
        write_results(out, results)
        # The checkpoints served to resume this run; the artifact is model.pt: a rerun starts afresh.
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    shutdown()
    return results


def report_and_serve(
    cfg: Config,
    rt: Runtime,
    pipeline: RecommendationPipeline,
    valid: Lists,
    rank_of: dict[float, dict[int, int]],
    served: UnionRanker,
    ensemble: dict[str, RankingReport],
) -> dict[str, object]:
    """Rank 0: the new-item bonus chosen (a log with repeats); the cross-fitted figures beside the
    ensemble's; the served model saved with what its lists were made of; the served system chosen
    again; test scored once (unless ``cfg.no_test``); the paired differences. Returns the results."""
    ds = pipeline.dataset
    by_bonus = {b: report(valid, ranks, cfg.n_boot) for b, ranks in rank_of.items()}
    bonus = 0.0
    if "popularity" in ensemble:
        popular_new = ensemble["popularity"].means["NDCG@10 new"]
        bonus = choose_bonus(by_bonus, popular_new) if cfg.new_item_bonus is None else cfg.new_item_bonus
        print(f"new-item bonus (cross-fitted validation; popularity's NDCG@10 on new items {popular_new:.4f}):")
        for b, rep in by_bonus.items():
            mark = "  <- chosen" if b == bonus else ""
            print(f"  {b:5.3f}: NDCG@10 {rep.means['NDCG@10']:.4f}, on new items {rep.means['NDCG@10 new']:.4f}{mark}")
    reports = {"valid": {"union ranker (cross-fitted)": by_bonus[bonus]}}
    reports["valid"]["ensemble (weights fitted here)"] = ensemble["valid"]
    print(f"{ds.name} valid ({cfg.loss} loss):")
    for name, rep in reports["valid"].items():
        print(line(name, rep))
    served.manifest = {
        "data_fingerprint": ds.fingerprint,
        "sources": [s.name for s in pipeline.all_sources],
        "models": pipeline.model_digests["sources"],
        "weights": pipeline.ensemble.weights,
        "store": pipeline.store.config,
        "model": {"embedding_dim": cfg.embedding_dim, "dense_arch": cfg.dense_arch, "over_arch": cfg.over_arch},
        "config": dataclasses.asdict(cfg),
        "world_size": rt.world_size,
        "valid_cross_fitted": reports["valid"]["union ranker (cross-fitted)"].means,
        "valid_cross_fitted_ranks": {
            "users": valid.users.tolist(),
            "ranks": [rank_of[bonus][u] for u in range(len(valid.users))],
        },
        NEW_ITEM_BONUS: bonus,
    }
    out = served.save(Path(cfg.artifacts) / ARTIFACT)
    path = choice_file(cfg.artifacts, [s.name for s in pipeline.all_sources])
    choice = with_union_ranker(json.loads(path.read_text()), served.manifest, pipeline.model_digests["sources"])
    write_json_atomic(path, choice)
    print(f"saved to {out}; the served system chosen again on validation NDCG@10:")
    print_choice(choice)
    print(f"served: {choice['system']} (written to {path})")
    results: dict[str, object] = {
        "dataset": ds.name,
        "config": dataclasses.asdict(cfg),
        "world_size": rt.world_size,
        "features": valid.union.names,
        "served": choice["system"],
        NEW_ITEM_BONUS: bonus,
        "new_item_bonus_valid": {str(b): rep.means for b, rep in by_bonus.items()},
    }

    if not cfg.no_test:
        test_users = pipeline.split.targets("test")[0]
        test = pipeline_lists(pipeline, "test", np.arange(len(test_users)), cfg)
        ranks = ranked(served, test, list(range(len(test.chunks))))
        reports["test"] = {NAME: report(test, ranks, cfg.n_boot), "ensemble": ensemble["test"]}
        print(f"{ds.name} test:")
        for name, rep in reports["test"].items():
            print(line(name, rep))
    for stage, pair in reports.items():
        a, b = pair.values()
        gain = paired_difference(a, b, cfg.n_boot)
        lo, hi = gain["NDCG@10_ci95"]
        print(f"{stage}: union ranker minus ensemble, NDCG@10 {gain['NDCG@10']:+.4f} [{lo:+.4f}, {hi:+.4f}]")
        results[stage] = {name: rep.to_dict() for name, rep in pair.items()}
        results[f"{stage}_ranker_minus_ensemble"] = gain
    return results


if __name__ == "__main__":
    main()
