"""Train the DLRM ranker on raw 64-bit IDs with each way of mapping IDs to rows, and measure what
zero-collision hashing buys over plain modulo hashing.

    python -m zch.main                                   # ml-100k: every variant at 0.25x, 0.5x, 1x table size
    python -m zch.main --variants modulo zch_lfu --ratios 0.5
    torchrun --nproc_per_node=2 -m zch.main --ratios 0.5
    python -m zch.main --dataset synthetic --rows 100000 # millions of power-law IDs into 100k rows
    python -m zch.main --epochs 1 --limit-batches 20     # smoke run

The task: predict whether a user liked a movie (rating >= 4) from the user's and the movie's IDs
(each a salted 63-bit hash of the raw ID, so the model never sees dense indices) and the data set's
dense columns (on MovieLens: age, gender, release year, genres). Any data set with ratings works
(``--dataset path/to/spec.json``, common/data/logs.py). Examples are read in time order: the first 80%
train, the next 10% validate, the last 10% test, so users and movies that arrive late are unseen
at the start, as in production. Tables are sized as a share (``--ratios``) of the distinct IDs in
the data; ``full`` has one row per ID (the unhashed upper bound).

For each variant and size: test AUC (and validation AUC), collision rate (share of the distinct IDs
active in test whose row is shared with another active ID; the same among the tenth of them most
frequent in training; and the share of test lookups landing on a shared row), evictions (IDs that
lost their row), and training examples per second. Results go to <out>/results.json and <out>/results.md; each run's DCP
checkpoints, which hold the ZCH ID-to-row mapping, to <out>/<variant>-<ratio>/checkpoints.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.models.dlrm import DLRM
from tqdm import tqdm

from common.checkpoint import CheckpointSchedule, resume_if_possible, run_config, save_checkpoint
from common.data.dataset import time_order
from common.data.load import add_dataset_args, load_dataset
from common.flags import add_trainer_args
from common.metrics import BinaryMetrics
from common.runtime import (
    MetricsLog,
    Runtime,
    init_runtime,
    print0,
    seed_everything,
    shutdown,
    write_json_atomic,
    write_results,
)
from common.sharding import local_shards, shard_model
from zch.sparse_arch import VARIANTS, RemappedModel, Remapper, build_remapper, collision_report, salted_raw_ids

FEATURES = ("user_id", "item_id")


@dataclass(frozen=True)
class Config:
    dataset: str = "ml-100k"
    data_dir: str | None = None
    source: str = "auto"
    on_bad_row: str = "error"
    eval_users: int = 0
    synthetic_ids: int = 2_500_000
    synthetic_events: int = 4_000_000
    variants: tuple[str, ...] = VARIANTS
    ratios: tuple[float, ...] = (0.25, 0.5, 1.0)
    rows: int | None = None
    eviction_interval: int = 1
    embedding_dim: int = 16
    epochs: int = 3
    batch_size: int = 256
    sparse_lr: float = 0.05
    dense_lr: float = 3e-3
    seed: int = 0
    limit_batches: int | None = None
    checkpoint_every: str = "0"
    resume: bool = False
    log_every: int = 100
    device: str = "auto"
    out: str = "runs/zch"
    tensorboard: bool = False


def parse_args(argv: list[str] | None = None) -> Config:
    d = Config()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    add_dataset_args(data, ("synthetic",), "; or synthetic: millions of power-law IDs, new ones arriving over time")
    data.add_argument(
        "--synthetic-ids",
        type=int,
        default=d.synthetic_ids,
        help=f"popularity ranks per feature of --dataset synthetic; each gets two IDs over the run (default: {d.synthetic_ids:,})",
    )
    data.add_argument(
        "--synthetic-events",
        type=int,
        default=d.synthetic_events,
        help=f"examples of --dataset synthetic (default: {d.synthetic_events:,})",
    )
    tables = p.add_argument_group("ID mapping")
    tables.add_argument(
        "--variants",
        nargs="+",
        default=list(d.variants),
        choices=VARIANTS,
        help="ID-to-row variants to train (default: all)",
    )
    tables.add_argument(
        "--ratios",
        type=float,
        nargs="+",
        default=list(d.ratios),
        help="table rows as a share of each feature's distinct IDs (default: 0.25 0.5 1)",
    )
    tables.add_argument(
        "--rows", type=int, default=None, help="rows per table instead of --ratios (e.g. 100000 for the synthetic run)"
    )
    tables.add_argument(
        "--eviction-interval",
        type=int,
        default=d.eviction_interval,
        help=f"ZCH admits and evicts every N training batches (default: {d.eviction_interval})",
    )
    groups = add_trainer_args(
        p,
        d,
        epochs="passes over the training examples, in time order (default: {default})",
        seed="seed for initialization and the synthetic data (default: {default})",
        checkpoint_every="DCP checkpoints every N steps (200) or every interval of wall time (30s, 5min, 1h); "
        "0 = end of training only (default: {default})",
        resume="continue each run from its latest checkpoint under --out",
        tensorboard="also write the curves as TensorBoard events under each run's folder (pip install tensorboard)",
    )
    groups["model"] = p.add_argument_group("model")
    groups["model"].add_argument(
        "--embedding-dim", type=int, default=d.embedding_dim, help=f"embedding dimension (default: {d.embedding_dim})"
    )
    a = vars(p.parse_args(argv))
    a["variants"], a["ratios"] = tuple(dict.fromkeys(a["variants"])), tuple(a["ratios"])
    if any(not 0 < r for r in a["ratios"]):
        p.error(f"--ratios must be positive shares of the distinct IDs, got {a['ratios']}")
    if a["rows"] is not None and a["rows"] < 2:
        p.error(f"--rows must be at least 2 (ZCH keeps one row for IDs it has not admitted), got {a['rows']}")
    return Config(**a)


# ------------------------------------------------------------------------------------------
# Data: one time-ordered stream of examples with raw IDs


@dataclass
class Stream:
    raw: dict[str, np.ndarray]  # feature -> raw 63-bit ID per example, in time order
    dense: np.ndarray  # float32 [n, d]
    label: np.ndarray  # float32 [n]
    train: slice
    valid: slice
    test: slice
    fingerprint: str
    description: str
    vocab: dict[str, np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        self.vocab = {f: np.unique(ids) for f, ids in self.raw.items()}

    def distinct(self, feature: str) -> int:
        return len(self.vocab[feature])


def _time_split(n: int) -> tuple[slice, slice, slice]:
    a, b = int(n * 0.8), int(n * 0.9)
    return slice(0, a), slice(a, b), slice(b, n)


def _dense_columns(features: dict, n: int) -> np.ndarray:
    """Dense inputs from a data set's columns: numeric ones normalised, two-valued categoricals as
    0 / 1, multi-valued ones with up to 64 values multi-hot (on MovieLens: age, gender; year, genres)."""
    cols = []
    for f in features.values():
        if f.kind == "numeric":
            cols.append(f.dense()[:, None])
        elif f.kind == "categorical" and f.cardinality == 2:
            cols.append(np.asarray(f.values, np.float32)[:, None])
        elif f.kind == "multi" and f.cardinality <= 64:
            hot = np.zeros((n, f.cardinality), np.float32)
            hot[np.repeat(np.arange(n), f.lengths), f.values] = 1.0
            cols.append(hot)
    return np.concatenate(cols, axis=1) if cols else np.zeros((n, 1), np.float32)


def _integer_ids(raw: np.ndarray) -> np.ndarray:
    """Raw IDs as 64-bit integers: as they are, or the first 8 bytes of SHA-256 of a text ID."""
    if raw.dtype != object:
        return raw
    import hashlib

    return np.array([int.from_bytes(hashlib.sha256(str(r).encode()).digest()[:8], "big") >> 1 for r in raw], np.int64)


def movielens_stream(cfg: Config) -> Stream:
    ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.source, cfg.on_bad_row)
    # One global time order; same-second ties by the split's SHA-256 tie key (common/data/split.py),
    # not by ID, so the 80/10/10 boundaries do not favour low or high IDs.
    order = time_order(ds.timestamp, ds.user_raw_ids[ds.user], ds.item_raw_ids[ds.item])
    user, item = ds.user[order], ds.item[order]
    dense = np.concatenate(
        [_dense_columns(ds.user_features, ds.num_users)[user], _dense_columns(ds.item_features, ds.num_items)[item]],
        axis=1,
    )
    raw = {
        "user_id": salted_raw_ids(_integer_ids(ds.user_raw_ids)[user], salt=1),
        "item_id": salted_raw_ids(_integer_ids(ds.item_raw_ids)[item], salt=2),
    }
    if np.all(ds.rating == ds.rating[0]):
        raise SystemExit(
            f"error: {ds.name} has no ratings to learn from (every interaction weighs {ds.rating[0]}); the ZCH "
            f"task predicts rating >= 4, so give the log's spec a rating column"
        )
    label = (ds.rating[order] >= 4).astype(np.float32)
    return Stream(
        raw,
        dense,
        label,
        *_time_split(len(label)),
        fingerprint=ds.fingerprint,
        description=f"{ds.name}: {len(label):,} ratings, {ds.num_users:,} users, {ds.num_items:,} movies",
    )


def synthetic_stream(cfg: Config) -> Stream:
    """Power-law IDs at scale: each example draws a user and an item popularity rank from a Zipf law
    (exponent 1.1) over ``synthetic_ids`` ranks. New IDs keep arriving: once during the run, at a
    time drawn per rank, each rank's ID is replaced by a new one (a new item taking an old one's
    place), so late IDs are unseen at the start. Each ID has a hidden effect on the label, which only
    a row of its own can learn exactly."""
    rng = np.random.default_rng(cfg.seed)
    n, space = cfg.synthetic_events, cfg.synthetic_ids
    t = np.arange(n) / n
    raw, effects = {}, []
    for salt, f in enumerate(FEATURES, start=1):
        rank = (rng.zipf(1.1, n) - 1) % space
        renewal = np.random.default_rng([cfg.seed, salt, 1]).random(space)  # when each rank's ID is replaced
        ids = rank + space * (t >= renewal[rank])
        raw[f] = salted_raw_ids(ids, salt=salt + 10)
        effect = np.random.default_rng([cfg.seed, salt]).normal(0.0, 1.0, 2 * space).astype(np.float32)
        effects.append(effect[ids])
    logit = effects[0] + effects[1] - 0.5
    label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    dense = rng.normal(size=(n, 4)).astype(np.float32)  # uninformative: the IDs carry the signal
    return Stream(
        raw,
        dense,
        label,
        *_time_split(n),
        fingerprint=f"synthetic-{cfg.seed}-{space}-{n}",
        description=f"synthetic: {n:,} examples, Zipf(1.1) IDs over {space:,} ranks per feature, each renewed once",
    )


def batches(
    data: Stream, rows: slice, batch_size: int, rt: Runtime, first_step: int = 0, limit: int | None = None
) -> Iterator[tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor]]:
    """This rank's share of each global batch of ``rows``, in time order (the last partial global
    batch is dropped so that every rank takes the same number of steps)."""
    per_step = batch_size * rt.world_size
    steps = (rows.stop - rows.start) // per_step
    steps = steps if limit is None else min(steps, limit)
    for step in range(first_step, steps):
        start = rows.start + step * per_step + rt.rank * batch_size
        yield _batch(data, slice(start, start + batch_size))


def _batch(data: Stream, rows: slice) -> tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor]:
    values = np.concatenate([data.raw[f][rows] for f in FEATURES])
    n = rows.stop - rows.start
    kjt = KeyedJaggedTensor(
        keys=list(FEATURES), values=torch.from_numpy(values), lengths=torch.ones(n * len(FEATURES), dtype=torch.int32)
    )
    return torch.from_numpy(data.dense[rows]), kjt, torch.from_numpy(data.label[rows])


# ------------------------------------------------------------------------------------------
# Model


def build(variant: str, table_rows: dict[str, int], data: Stream, cfg: Config, rt: Runtime):
    """The remapper, TorchRec's DLRM on its tables (sharded table-wise by DMP), and the optimizer."""
    remapper = build_remapper(variant, table_rows, data.vocab, cfg.eviction_interval)
    ebc = EmbeddingBagCollection(
        device=torch.device("meta"),
        tables=[
            EmbeddingBagConfig(
                name=f, embedding_dim=cfg.embedding_dim, num_embeddings=remapper.tables[f], feature_names=[f]
            )
            for f in FEATURES
        ],
    )
    dlrm = DLRM(
        embedding_bag_collection=ebc,
        dense_in_features=data.dense.shape[1],
        dense_arch_layer_sizes=[64, cfg.embedding_dim],
        over_arch_layer_sizes=[64, 1],
    )
    model, optimizer = shard_model(RemappedModel(remapper, dlrm), [ebc], rt, "table_wise", cfg.sparse_lr, cfg.dense_lr)
    return model, optimizer, remapper


class RowReset:
    """Re-initializes the embedding rows that ZCH hands to a new ID (TorchRec's sharded CUDA MC-EBC
    does this inside its TBE; here the tables are plain sharded EBCs), with the table's own
    initialization, U(-1/sqrt(rows), 1/sqrt(rows)), and zeroes their row-wise Adagrad state, so a new
    ID does not inherit the evicted ID's embedding."""

    def __init__(self, model: nn.Module, remapper, seed: int) -> None:
        self._g = torch.Generator().manual_seed(seed)
        self._bound = {f: 1.0 / math.sqrt(n) for f, n in remapper.tables.items()}
        self._views: dict[str, list[tuple[int, torch.Tensor]]] = {f: [] for f in remapper.tables}
        state = dict(model.state_dict())
        state.update(_flatten(model.fused_optimizer.state_dict()["state"]))
        for key, offsets, tensor in local_shards(state):
            for f in remapper.tables:
                if key.endswith(f"embedding_bags.{f}.weight") or key.endswith(f"{f}.momentum1"):
                    self._views[f].append((offsets[0], tensor))

    def __call__(self, reassigned: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for f, rows in reassigned.items():
                for offset, view in self._views[f]:
                    local = rows - offset
                    local = local[(local >= 0) & (local < view.shape[0])]
                    if local.numel() == 0:
                        continue
                    if view.dim() == 2:  # weights
                        fresh = torch.empty(len(local), view.shape[1]).uniform_(
                            -self._bound[f], self._bound[f], generator=self._g
                        )
                        view[local] = fresh.to(view.dtype)
                    else:  # row-wise Adagrad's one accumulator per row
                        view[local] = 0


def _flatten(state: dict) -> dict[str, torch.Tensor]:
    out = {}
    for param_key, entries in state.items():
        for name, value in entries.items():
            out[f"{param_key}/{name}"] = value
    return out


# ------------------------------------------------------------------------------------------
# Training and evaluation


@torch.no_grad()
def evaluate(model: nn.Module, data: Stream, rows: slice, batch_size: int = 4096) -> dict[str, float]:
    """AUC over ``rows``. Every rank scores every row (the sharded tables need every rank in each
    forward), with the remapper in eval mode: no ID is admitted while scoring."""
    model.eval()
    metrics = BinaryMetrics()
    for start in range(rows.start, rows.stop, batch_size):
        dense, kjt, label = _batch(data, slice(start, min(start + batch_size, rows.stop)))
        metrics.update(torch.sigmoid(model(dense, kjt).squeeze(-1)), label)
    model.train()
    return metrics.compute(gather=False)


def table_rows_for(data: Stream, ratio: float | None, rows: int | None) -> dict[str, int]:
    if rows is not None:
        return {f: rows for f in FEATURES}
    return {f: max(2, int(round(ratio * data.distinct(f)))) for f in FEATURES}


def train_variant(
    variant: str, label: str, table_rows: dict[str, int], data: Stream, cfg: Config, rt: Runtime
) -> tuple[dict[str, object], nn.Module, Remapper]:
    """Train one variant (resuming from its checkpoints with ``cfg.resume``), evaluate it, and
    return its results, the trained model and its remapper."""
    seed_everything(cfg.seed)
    model, optimizer, remapper = build(variant, table_rows, data, cfg, rt)
    reset = RowReset(model, remapper, cfg.seed + rt.rank)
    run_dir = Path(cfg.out) / f"{variant}-{label}"
    state = {"model": model, "optimizer": optimizer}
    # what defines this run: not which other variants and sizes the command also trains
    settings = {k: v for k, v in run_config(cfg, data.fingerprint).items() if k not in ("variants", "ratios")}
    settings.update(variant=variant, table_rows=table_rows)
    meta = resume_if_possible(run_dir / "checkpoints", state, settings, cfg.resume) or {
        "epoch": 0,
        "step": 0,
        "seconds": 0.0,
    }
    epoch0, step0, seconds = meta["epoch"], meta["step"], meta["seconds"]
    if meta.get("global_step"):
        print0(f"{variant} {label}: resumed at epoch {epoch0}, step {step0}")
    loss_fn = nn.BCEWithLogitsLoss()
    per_step = cfg.batch_size * rt.world_size
    steps = (data.train.stop - data.train.start) // per_step
    steps = steps if cfg.limit_batches is None else min(steps, cfg.limit_batches)
    if steps == 0:
        raise ValueError(
            f"batch size {cfg.batch_size} x {rt.world_size} ranks exceeds the training examples; lower --batch-size"
        )
    global_step = epoch0 * steps + step0

    def checkpoint(epoch: int, step: int) -> None:
        save_checkpoint(
            run_dir / "checkpoints",
            global_step,
            state,
            meta={"epoch": epoch, "step": step, "global_step": global_step, "seconds": seconds, "run_config": settings},
        )

    log = MetricsLog(
        run_dir, f"zch-{variant}-{label}".replace(" ", "-"), cfg.tensorboard
    )  # the curves: <run>/metrics.jsonl
    schedule = CheckpointSchedule(cfg.checkpoint_every)
    for epoch in range(epoch0, cfg.epochs):
        bar = tqdm(
            total=steps,
            initial=step0,
            desc=f"{variant} {label} epoch {epoch}",
            leave=False,
            disable=not rt.is_rank0 or None,
        )
        t0 = t_log = time.perf_counter()
        n_log = 0
        for step, (dense, kjt, y) in enumerate(
            batches(data, data.train, cfg.batch_size, rt, step0, steps), start=step0 + 1
        ):
            loss = loss_fn(model(dense, kjt).squeeze(-1), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            reset(remapper.pop_reassigned())
            global_step += 1
            n_log += per_step
            bar.update(1)
            if step % cfg.log_every == 0:
                print0(f"{variant} {label} | epoch {epoch} | step {step}/{steps} | loss {loss.item():.4f}")
                log.log(
                    "train", global_step, epoch, loss=loss.item(), examples_per_s=n_log / (time.perf_counter() - t_log)
                )
                t_log, n_log = time.perf_counter(), 0
            if schedule.due(step) and step < steps:
                seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                checkpoint(epoch, step)
                schedule.saved()
        seconds += time.perf_counter() - t0
        bar.close()
        step0 = 0
        checkpoint(epoch + 1, 0)

    if hasattr(remapper, "check_replicas"):
        remapper.check_replicas()
    valid, test = evaluate(model, data, data.valid), evaluate(model, data, data.test)
    log.log("valid", global_step, cfg.epochs - 1, **{k: v for k, v in valid.items() if isinstance(v, (int, float))})
    log.close()
    collisions = {f: collision_report(remapper, f, data.raw[f][data.test], data.raw[f][data.train]) for f in FEATURES}
    result = {
        "variant": variant,
        "table_size": label,
        "table_rows": remapper.tables,
        "distinct_ids": {f: data.distinct(f) for f in FEATURES},
        "auc_test": test["auc"],
        "auc_valid": valid["auc"],
        "logloss_test": test["logloss"],
        "collision_rate": float(np.mean([c["collision_rate"] for c in collisions.values()])),
        "collision_rate_frequent": float(np.mean([c["collision_rate_frequent"] for c in collisions.values()])),
        "lookups_on_shared_rows": float(np.mean([c["lookups_on_shared_rows"] for c in collisions.values()])),
        "collisions": collisions,
        "evictions": remapper.evictions,
        "examples_per_s": global_step * per_step / seconds if seconds > 0 else float("nan"),
        "steps": global_step,
        "world_size": rt.world_size,
        "nodes": rt.nodes,
    }
    if hasattr(remapper, "mapping_digest"):
        result["mapping_digest"] = remapper.mapping_digest()
    write_results(run_dir, result)
    return result, model, remapper


def markdown_table(results: list[dict[str, object]], description: str) -> str:
    lines = [
        f"{description}; test AUC and collisions over the IDs active in test.",
        "",
        "| variant | table size | rows (user / item) | test AUC | valid AUC | collision rate | frequent IDs | "
        "lookups on shared rows | evictions | train ex/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows = r["table_rows"]
        lines.append(
            f"| {r['variant']} | {r['table_size']} | {rows['user_id']:,} / {rows['item_id']:,} | "
            f"{r['auc_test']:.4f} | {r['auc_valid']:.4f} | {r['collision_rate']:.3f} | "
            f"{r['collision_rate_frequent']:.3f} | {r['lookups_on_shared_rows']:.3f} | {r['evictions']:,} | "
            f"{r['examples_per_s']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, object]:
    cfg = parse_args(argv)
    rt = init_runtime(cfg.device)
    try:
        data = synthetic_stream(cfg) if cfg.dataset == "synthetic" else movielens_stream(cfg)
        print0(data.description + " | distinct IDs: " + ", ".join(f"{f} {data.distinct(f):,}" for f in FEATURES))
        runs: list[tuple[str, str, dict[str, int]]] = []
        if "full" in cfg.variants:
            runs.append(("full", "all IDs", {f: data.distinct(f) + 1 for f in FEATURES}))
        sizes = [(f"{cfg.rows:,} rows", None)] if cfg.rows is not None else [(f"{r:g}x", r) for r in cfg.ratios]
        for label, ratio in sizes:
            rows = table_rows_for(data, ratio, cfg.rows)
            runs += [(v, label, rows) for v in cfg.variants if v != "full"]
        results = []
        for variant, label, rows in runs:
            r, _, _ = train_variant(variant, label, rows, data, cfg, rt)
            results.append(r)
            print0(
                f"{variant:8s} {label:10s} | test AUC {r['auc_test']:.4f} | collision rate {r['collision_rate']:.3f} "
                f"(frequent {r['collision_rate_frequent']:.3f}) | evictions {r['evictions']:,} | "
                f"{r['examples_per_s']:,.0f} ex/s"
            )
        table = markdown_table(results, data.description)
        print0("\n" + table)
        summary = {"config": asdict(cfg), "data": data.description, "results": results}
        if rt.is_rank0:
            write_json_atomic(Path(cfg.out) / "results.json", summary)
            (Path(cfg.out) / "results.md").write_text(table)
        return summary
    finally:
        shutdown()


if __name__ == "__main__":
    main()
