"""Train the two-tower retriever on MovieLens, evaluate it, and export it for serving.

    python -m retrieval.two_tower_train                                  # ml-100k, 1 CPU process
    torchrun --nproc_per_node=2 -m retrieval.two_tower_train             # 2 processes (gloo on CPU, nccl on GPUs)
    python -m retrieval.two_tower_train --epochs 1 --limit-batches 20    # quick smoke run

The query tower sees the user ID, age bucket, gender, occupation, zip region and the user's last
50 items; the candidate tower sees the item ID, genres and year. Embeddings live in TorchRec
EmbeddingBagCollections sharded by DistributedModelParallel, updated by a fused RowWiseAdagrad
applied in backward; the MLPs use Adam. TrainPipelineSparseDist overlaps batch loading and the
sparse-feature all-to-all with compute (with several processes or on CUDA; one CPU process, with
nothing to overlap, runs TrainPipelineBase: ``--pipeline``). Loss: in-batch sampled softmax with logQ correction and
accidental hits masked (Yi et al., RecSys 2019; see retrieval/modules/two_tower.py).

Each epoch ends with validation under the shared protocol (common/metrics.py); the run ends with
test, printed beside the popularity baseline and written to <out>/results.json (with --no-test,
validation again: test is never scored, as in a model-selection run). DCP checkpoints
(<out>/checkpoints) let a killed run resume exactly: rerun the same command with --resume. The export
(<out>/export) holds the unsharded weights, the catalog's item embeddings, a FAISS index and a
manifest, which retrieval/two_tower_retrieval.py serves.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np
import torch
from torchrec.distributed.model_parallel import DistributedModelParallel
from tqdm import tqdm

from common.baselines import popularity_report
from common.checkpoint import (
    CheckpointSchedule,
    gathered_state_dict,
    resume_if_possible,
    run_config,
    save_checkpoint,
)
from common.data.dataset import InteractionData
from common.data.load import add_dataset_args, load_dataset
from common.data.split import Split, history_before_test, rank_splits
from common.data.tables import last_n
from common.flags import add_trainer_args
from common.metrics import RankingReport, evaluate_scores
from common.runtime import (
    MetricsLog,
    Runtime,
    all_reduce,
    init_runtime,
    print0,
    seed_everything,
    shutdown,
    write_json_atomic,
    write_results,
)
from common.sharding import release_pipeline, shard_model, train_pipeline
from retrieval.modules.feature_processor import TwoTowerFeatures
from retrieval.modules.index import INDEX_TYPES, build_index
from retrieval.modules.two_tower import EXPORT_FORMAT, SERVING_ARRAYS, TwoTower, TwoTowerBatch


@dataclass(frozen=True)
class Config:
    dataset: str = "ml-100k"
    data_dir: str | None = None
    source: str = "auto"
    on_bad_row: str = "error"
    eval_users: int = 0
    history_len: int = 50
    embedding_dim: int = 64
    layer_sizes: tuple[int, ...] = (128, 64)
    temperature: float = 0.05
    user_id_dropout: float = 0.0
    holdout_last: int = 0
    epochs: int = 10
    batch_size: int = 512
    sparse_lr: float = 0.05
    dense_lr: float = 1e-3
    seed: int = 0
    limit_batches: int | None = None
    device: str = "auto"
    sharding_type: str = "table_wise"
    pipeline: str = "auto"
    out: str = "runs/retrieval"
    checkpoint_every: str = "5min"
    resume: bool = False
    log_every: int = 50
    eval_batch_size: int = 1024
    index_type: str = "auto"
    n_boot: int = 1000
    no_test: bool = False
    tensorboard: bool = False


def parse_args(argv: list[str] | None = None) -> Config:
    d = Config()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    add_dataset_args(data)
    data.add_argument(
        "--history-len",
        type=int,
        default=d.history_len,
        help=f"items of history the query tower sees (default: {d.history_len})",
    )
    model = p.add_argument_group("model")
    model.add_argument(
        "--embedding-dim",
        type=int,
        default=d.embedding_dim,
        help=f"embedding table dimension (default: {d.embedding_dim})",
    )
    model.add_argument(
        "--layer-sizes",
        type=int,
        nargs="+",
        default=list(d.layer_sizes),
        help="tower MLP sizes; the last is the output dimension (default: 128 64)",
    )
    model.add_argument(
        "--temperature",
        type=float,
        default=d.temperature,
        help=f"softmax temperature on cosine scores (default: {d.temperature})",
    )
    model.add_argument(
        "--user-id-dropout",
        type=float,
        default=d.user_id_dropout,
        help=f"share of training examples whose user ID is hidden, so the tower also serves new users from features and history (default: {d.user_id_dropout})",
    )
    data.add_argument(
        "--holdout-last",
        type=int,
        default=d.holdout_last,
        help=f"leave each user's last N training interactions out of training, for a ranker to learn from (default: {d.holdout_last})",
    )
    groups = add_trainer_args(
        p,
        d,
        batch_size="examples per rank per step; also the in-batch negatives (default: {default})",
        out="run directory: checkpoints/, export/, results.json (default: {default})",
    )
    out = groups["output"]
    out.add_argument(
        "--eval-batch-size",
        type=int,
        default=d.eval_batch_size,
        help=f"users per scoring batch (default: {d.eval_batch_size})",
    )
    out.add_argument(
        "--index-type",
        default=d.index_type,
        choices=INDEX_TYPES,
        help="FAISS index for serving; auto picks by catalog size (default: auto)",
    )
    a = vars(p.parse_args(argv))
    a["layer_sizes"] = tuple(a["layer_sizes"])
    return Config(**a)


# ------------------------------------------------------------------------------------------
# Data: training examples are (user, next item) pairs with the user's earlier items as history.


class TrainExamples:
    """This rank's training interactions as examples, and its batches for one epoch.

    ``split`` is the rank's share of the users (:func:`common.data.split.rank_splits`: a contiguous
    range of the data set, balanced by training examples; everyone in one process), so a rank reads
    only its share, and its in-batch negatives are its own users' items (the logQ correction counts
    every rank's). The order is a permutation seeded by (seed, epoch), so a resumed run sees the same
    batches; the last partial batch is dropped. ``steps_per_epoch`` and ``item_counts`` are the
    share's: a distributed run lowers the first to the smallest share's (every rank must run the
    same number of steps) and sums the second over the ranks (:func:`main`).
    """

    def __init__(
        self,
        features: TwoTowerFeatures,
        split: Split,
        batch_size: int,
        rank: int,
        seed: int,
        user_id_dropout: float = 0.0,
        holdout_last: int = 0,
    ) -> None:
        self.features, self.split = features, split
        self.batch_size, self.rank, self.seed = batch_size, rank, seed
        self.user_id_dropout = user_id_dropout
        user = split.train_user
        self.user_start = np.searchsorted(user, np.arange(split.num_users))  # train rows are sorted by user
        # --holdout-last N: each user's last N training interactions are not trained on (a
        # ranker can then learn from interactions this model has not seen).
        user_end = np.r_[self.user_start[1:], len(user)]
        self.rows = np.where(np.arange(len(user)) < user_end[user] - holdout_last)[0]
        self.num_examples = len(self.rows)
        self.steps_per_epoch = self.num_examples // batch_size
        self.item_counts = np.bincount(split.train_item[self.rows], minlength=split.num_items)

    def batches(self, epoch: int, start_step: int = 0, limit: int | None = None):
        perm = self.rows[np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)]
        steps = self.steps_per_epoch if limit is None else min(limit, self.steps_per_epoch)
        for step in range(start_step, steps):
            lo = step * self.batch_size
            drop = (
                np.random.default_rng([self.seed, epoch, step, self.rank]).random(self.batch_size)
                < self.user_id_dropout
            )
            yield self.batch(perm[lo : lo + self.batch_size], drop)

    def batch(self, rows: np.ndarray, drop_user_id: np.ndarray | None = None) -> TwoTowerBatch:
        s, f = self.split, self.features
        users, items = s.train_user[rows], s.train_item[rows]
        history = last_n(s.train_item, self.user_start[users], rows, f.history_len)
        user_cols = {name: col[users] for name, col in f.user_columns.items()}
        ids = users if drop_user_id is None else np.where(drop_user_id, -1, users)
        query = f.query_batch(ids, history, user_cols)
        candidate = self.features.candidate_batch(items)
        return TwoTowerBatch(query.sparse, candidate.sparse, torch.from_numpy(items))


def query_histories(split: Split, stage: str, users: np.ndarray, history_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The last ``history_len`` items each user had before ``stage``'s target."""
    indptr, items = split.history(stage)
    return last_n(items, indptr[users], indptr[users + 1], history_len)


# ------------------------------------------------------------------------------------------
# Model


def build_model(
    cfg: Config, features: TwoTowerFeatures, item_counts: np.ndarray, rt: Runtime
) -> tuple[DistributedModelParallel, torch.optim.Optimizer]:
    model = TwoTower(
        features.query_schema,
        features.candidate_schema,
        cfg.embedding_dim,
        list(cfg.layer_sizes),
        item_counts,
        cfg.temperature,
        device=torch.device("meta"),
    )
    # Tables are built on "meta" and materialized by DMP on the rank that owns each shard; the
    # small MLPs are built on the CPU from the seeded global RNG and moved to the device by DMP.
    return shard_model(
        model, [model.query_tower.ebc, model.candidate_tower.ebc], rt, cfg.sharding_type, cfg.sparse_lr, cfg.dense_lr
    )


# ------------------------------------------------------------------------------------------
# Evaluation: every rank embeds every user and item (sharded towers need all ranks in each
# forward), then the shared protocol scores its slice of users and gathers.


@torch.no_grad()
def embed_items(
    model: torch.nn.Module, features: TwoTowerFeatures, device: torch.device, batch_size: int = 4096
) -> torch.Tensor:
    tower = _unwrap(model).candidate_tower
    out = [
        tower(features.candidate_batch(np.arange(lo, min(lo + batch_size, features.num_items))).sparse.to(device))
        for lo in range(0, features.num_items, batch_size)
    ]
    return torch.cat(out)


@torch.no_grad()
def embed_queries(
    model: torch.nn.Module,
    features: TwoTowerFeatures,
    split: Split,
    stage: str,
    device: torch.device,
    batch_size: int = 4096,
    hide_user_id: bool = False,
    users: np.ndarray | None = None,
) -> torch.Tensor:
    """Query embeddings of ``users`` (default all; row i = ``users[i]``) with their history before
    ``stage``; ``hide_user_id`` treats every user as new (features and history only)."""
    tower = _unwrap(model).query_tower
    every = np.arange(features.num_users) if users is None else np.asarray(users, dtype=np.int64)
    out = []
    for lo in range(0, len(every), batch_size):
        users = every[lo : lo + batch_size]
        cols = {name: col[users] for name, col in features.user_columns.items()}
        batch = features.query_batch(
            np.full_like(users, -1) if hide_user_id else users,
            query_histories(split, stage, users, features.history_len),
            cols,
        )
        out.append(tower(batch.sparse.to(device)))
    return torch.cat(out)


def evaluate(
    model: torch.nn.Module,
    features: TwoTowerFeatures,
    split: Split,
    stage: str,
    device: torch.device,
    cfg: Config,
    hide_user_id: bool = False,
) -> tuple[RankingReport, torch.Tensor]:
    model.eval()
    items = embed_items(model, features, device)
    # Only the evaluated users (the --eval-users sample at scale: 10,000 of 1,000,000).
    users, _ = split.targets(stage)
    queries = embed_queries(model, features, split, stage, device, hide_user_id=hide_user_id, users=users)
    row = torch.full((features.num_users,), -1, dtype=torch.long, device=queries.device)
    row[torch.from_numpy(users).to(queries.device)] = torch.arange(len(users), device=queries.device)
    report = evaluate_scores(
        lambda users: queries[row[users.to(queries.device)]] @ items.T,
        split,
        stage,
        batch_size=cfg.eval_batch_size,
        device=device,
        n_boot=cfg.n_boot,
    )
    model.train()
    return report, items


def _unwrap(model: torch.nn.Module) -> TwoTower:
    return model.module if isinstance(model, DistributedModelParallel) else model


# ------------------------------------------------------------------------------------------
# Export


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export(
    out_dir: Path,
    cfg: Config,
    model: torch.nn.Module,
    features: TwoTowerFeatures,
    ds: InteractionData,
    ds_name: str,
    item_emb: torch.Tensor,
) -> Path | None:
    """Write the serving artifacts (rank 0): weights.pt, item_embeddings.npy, index.faiss,
    features.json (feature tables), the ID maps, histories and popularity as .npy, and
    manifest.json last."""
    weights = gathered_state_dict(model)  # collective
    if torch.distributed.get_rank() != 0:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    query_w = {k.removeprefix("query_tower."): v for k, v in weights.items() if k.startswith("query_tower.")}
    cand_w = {k.removeprefix("candidate_tower."): v for k, v in weights.items() if k.startswith("candidate_tower.")}
    torch.save({"query_tower": query_w, "candidate_tower": cand_w}, out_dir / "weights.pt")
    emb = item_emb.detach().cpu().numpy().astype(np.float32)
    np.save(out_dir / "item_embeddings.npy", emb)
    t0 = time.perf_counter()
    index, kind, params = build_index(cfg.index_type, emb, seed=cfg.seed)
    index_seconds = time.perf_counter() - t0
    faiss.write_index(index, str(out_dir / "index.faiss"))
    # Serving by user ID needs each known user's history: everything before test (train + valid).
    # The per-user and per-item arrays are .npy (memory-mappable; JSON lists of millions of histories
    # were slow to write and parse); features.json keeps the feature tables.
    # Rank 0 reads every user's interactions here (and only here).
    indptr, hist = history_before_test(ds)
    (out_dir / "features.json").write_text(json.dumps({"features": features.to_dict()}))
    counts = np.bincount(hist, minlength=ds.num_items)
    arrays = dict(zip(SERVING_ARRAYS, (ds.user_raw_ids, ds.item_raw_ids, indptr, hist, counts), strict=True))
    for name, a in arrays.items():
        np.save(out_dir / f"{name}.npy", a.astype(str) if a.dtype == object else a, allow_pickle=False)
    files = ["weights.pt", "item_embeddings.npy", "index.faiss", "features.json", *(f"{n}.npy" for n in arrays)]
    manifest = {
        "format": EXPORT_FORMAT,
        "dataset": ds_name,
        "data_fingerprint": ds.fingerprint,
        "repeats": ds.repeats,  # the protocol's: whether search leaves a user's history out
        "query_schema": features.query_schema.to_dict(),
        "candidate_schema": features.candidate_schema.to_dict(),
        "embedding_dim": cfg.embedding_dim,
        "layer_sizes": list(cfg.layer_sizes),
        "output_dim": cfg.layer_sizes[-1],
        "num_users": features.num_users,
        "num_items": features.num_items,
        "index": {
            "type": kind,
            "params": params,
            "ntotal": int(index.ntotal),
            "metric": "inner_product",
            "build_seconds": round(index_seconds, 3),
        },
        "item_embeddings_sha256": _sha256(out_dir / "item_embeddings.npy"),
        "files": {f: _sha256(out_dir / f) for f in files},
        "config": asdict(cfg),
        "versions": {"torch": torch.__version__, "faiss": faiss.__version__},
    }
    write_json_atomic(out_dir / "manifest.json", manifest)
    return out_dir


# ------------------------------------------------------------------------------------------


def finish(cfg: Config, rt, model, features, ds, share: Split, split: Split, run: dict) -> dict[str, object]:
    """The trained model on test (validation with --no-test) beside popularity and without the user
    ID, its export, and results.json (``run``: what the training loop recorded)."""
    out = Path(cfg.out)
    stage = "valid" if cfg.no_test else "test"  # --no-test: the final table on validation, test never scored
    test, item_emb = evaluate(model, features, split, stage, rt.device, cfg)
    new_users, _ = evaluate(model, features, split, stage, rt.device, cfg, hide_user_id=True)
    # Popularity counts every user's interactions before the stage: each rank counts its share's.
    pop = popularity_report(split, stage, cfg.n_boot, all_reduce(share.item_counts(stage), "sum", rt.device))
    print0(f"{stage:<22} | " + " | ".join(f"{k:>10}" for k in test.means))
    for name, rep in (("popularity", pop), ("two-tower", test), ("two-tower, no user ID", new_users)):
        print0(f"{name:<22} | " + " | ".join(f"{v:>10.4f}" for v in rep.means.values()))
    export_dir = export(
        out / "export",
        cfg,
        model,
        features,
        ds,
        cfg.dataset,
        item_emb,
    )
    results = {
        "dataset": ds.name,
        "data_fingerprint": ds.fingerprint,
        "world_size": rt.world_size,
        "nodes": rt.nodes,
        "device": rt.device.type,
        "config": asdict(cfg),
        "valid_per_epoch": run["history"],
        **(
            {"valid": test.to_dict(), "popularity_valid": pop.to_dict(), "valid_without_user_id": new_users.to_dict()}
            if cfg.no_test
            else {"test": test.to_dict(), "popularity_test": pop.to_dict(), "test_without_user_id": new_users.to_dict()}
        ),
        "train_seconds": run["train_seconds"],
        "train_examples_per_s": run["train_examples_per_s"],
        "resumed_from_step": run["resumed_from_step"],
        "steps": run["steps"],
        "export": str(export_dir) if export_dir else None,
    }
    write_results(out, results)
    if export_dir:
        print0(f"wrote {out / 'results.json'} and {export_dir}")
    return results


def main(argv: list[str] | None = None) -> dict[str, object]:
    cfg = parse_args(argv)
    rt = init_runtime(cfg.device)
    seed_everything(cfg.seed)
    out = Path(cfg.out)

    ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.source, cfg.on_bad_row)
    # This rank's share of the users to train on, and the evaluated users (the same on every rank).
    # (With --eval-users 0, every user is evaluated, so every rank also reads every user's rows.)
    share, split = rank_splits(ds, rt.rank, rt.world_size, cfg.eval_users, cfg.holdout_last)
    features = TwoTowerFeatures.from_dataset(ds, history_len=cfg.history_len)
    examples = TrainExamples(features, share, cfg.batch_size, rt.rank, cfg.seed, cfg.user_id_dropout, cfg.holdout_last)
    examples.steps_per_epoch = int(all_reduce(examples.steps_per_epoch, "min", rt.device))
    num_examples = int(all_reduce(examples.num_examples, "sum", rt.device))
    if examples.steps_per_epoch == 0:
        fewest = int(all_reduce(examples.num_examples, "min", rt.device))
        raise ValueError(
            f"batch size {cfg.batch_size} exceeds the {fewest} training examples of the smallest rank "
            f"share ({rt.world_size} ranks, {num_examples} examples in all); lower --batch-size"
        )
    model, optimizer = build_model(cfg, features, all_reduce(examples.item_counts, "sum", rt.device), rt)
    print0(
        f"{ds.name}: {ds.num_users} users, {ds.num_items} items, {num_examples} training examples; "
        f"{rt.world_size} x {rt.device.type} ({rt.backend}); {examples.steps_per_epoch} steps/epoch"
    )
    print0(str(model.plan))

    state = {"model": model, "optimizer": optimizer}
    meta = resume_if_possible(out / "checkpoints", state, run_config(cfg, ds.fingerprint), cfg.resume) or {
        "epoch": 0,
        "step": 0,
        "global_step": 0,
        "valid": [],
    }
    first_epoch, start_step, global_step, history = meta["epoch"], meta["step"], meta["global_step"], meta["valid"]
    resumed_from = global_step
    if resumed_from:
        print0(f"resumed from step {global_step} (epoch {first_epoch}, step {start_step})")
    steps_this_epoch = (
        examples.steps_per_epoch if cfg.limit_batches is None else min(cfg.limit_batches, examples.steps_per_epoch)
    )

    def checkpoint(epoch_: int, step_: int) -> None:
        save_checkpoint(
            out / "checkpoints",
            global_step,
            state,
            meta={
                "epoch": epoch_,
                "step": step_,
                "global_step": global_step,
                "valid": history,
                "run_config": run_config(cfg, ds.fingerprint),
            },
        )

    log = MetricsLog(out, "two_tower", cfg.tensorboard)  # the curves: <out>/metrics.jsonl
    schedule = CheckpointSchedule(cfg.checkpoint_every)
    train_start = time.perf_counter()
    loop_seconds, trained = 0.0, 0  # the training loop alone (no evaluation), for throughput
    for epoch in range(first_epoch, cfg.epochs):
        pipeline = train_pipeline(model, optimizer, rt, cfg.pipeline)
        batches = examples.batches(epoch, start_step, cfg.limit_batches)
        bar = tqdm(
            total=steps_this_epoch,
            initial=start_step,
            desc=f"epoch {epoch}",
            disable=not rt.is_rank0 or None,
            leave=False,
        )
        t0, n0 = time.perf_counter(), 0
        epoch_start, step = time.perf_counter(), start_step
        while True:
            try:
                loss, acc = pipeline.progress(batches)
            except StopIteration:
                break
            step += 1
            global_step += 1
            n0 += cfg.batch_size * rt.world_size
            bar.update(1)
            if step % cfg.log_every == 0 or step == steps_this_epoch:
                rate = n0 / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{loss.item():.4f}")
                print0(
                    f"epoch {epoch} | step {step}/{steps_this_epoch} | loss {loss.item():.4f} | "
                    f"in-batch acc {acc.item():.3f} | {rate / 1000:.1f}k ex/s"
                )
                log.log("train", global_step, epoch, loss=loss.item(), in_batch_acc=acc.item(), examples_per_s=rate)
                t0, n0 = time.perf_counter(), 0
            if schedule.due(step) and step < steps_this_epoch:
                checkpoint(epoch, step)
                schedule.saved()
        bar.close()
        release_pipeline(pipeline)
        loop_seconds += time.perf_counter() - epoch_start
        trained += (step - start_step) * cfg.batch_size * rt.world_size
        report, _ = evaluate(model, features, split, "valid", rt.device, cfg)
        history.append({"epoch": epoch, **report.means})
        print0(f"epoch {epoch} | valid | {report.line()}")
        log.log("valid", global_step, epoch, **report.means)
        start_step = 0
        checkpoint(epoch + 1, 0)
    train_seconds = time.perf_counter() - train_start
    log.close()

    run = {"history": history, "train_seconds": train_seconds, "resumed_from_step": resumed_from, "steps": global_step}
    run["train_examples_per_s"] = trained / loop_seconds if loop_seconds else None  # loop only, this run
    results = finish(cfg, rt, model, features, ds, share, split, run)
    shutdown()
    return results


if __name__ == "__main__":
    main()
