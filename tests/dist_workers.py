"""Worker functions for the multi-process tests, launched in-process with ``elastic_launch``
on gloo (as torchrec_dlrm's tests do). Module-level so that spawned workers can import them."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from common.runtime import launch_local as launch  # noqa: F401  (the tests call dist_workers.launch)


def build_sharded_ebc(runtime, sharding: dict[str, str]):
    """A 3-table EBC under DMP with the given per-table sharding types and a fused
    RowWiseAdagrad applied in backward (TorchRec's sparse-optimizer pattern)."""
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner
    from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.distributed.sharding_plan import get_default_sharders
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    from common.sharding import RESERVED_SHARE, topology

    torch.manual_seed(0)
    tables = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=40 + 10 * i, feature_names=[f"f{i}"])
        for i in range(3)
    ]
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    apply_optimizer_in_backward(RowWiseAdagrad, ebc.parameters(), {"lr": 0.1})
    planner = EmbeddingShardingPlanner(
        topology=topology(runtime.world_size, compute_device=runtime.device.type),
        constraints={t: ParameterConstraints(sharding_types=[st]) for t, st in sharding.items()},
        storage_reservation=FixedPercentageStorageReservation(RESERVED_SHARE),
    )
    plan = planner.collective_plan(ebc, get_default_sharders(), torch.distributed.GroupMember.WORLD)
    return DistributedModelParallel(ebc, device=runtime.device, plan=plan)


def full_tables(model) -> dict[str, torch.Tensor]:
    """Every table's full weight, gathered from its shards (collective)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    out = {}
    for key, value in model.state_dict().items():
        if isinstance(value, ShardedTensor):
            full = torch.empty(value.size()) if torch.distributed.get_rank() == 0 else None
            value.gather(dst=0, out=full)
            out[key] = full
        else:
            out[key] = value.detach().clone()
    return out


def train_and_save(ckpt_dir: str, out_file: str) -> None:
    """2 ranks: train 3 steps on rank-specific data, checkpoint, write the gathered weights."""
    from torchrec import KeyedJaggedTensor

    from common.checkpoint import save_checkpoint
    from common.runtime import init_runtime, shutdown

    rt = init_runtime("cpu")
    model = build_sharded_ebc(rt, {"t0": "table_wise", "t1": "column_wise", "t2": "data_parallel"})
    g = torch.Generator().manual_seed(100 + rt.rank)
    for _ in range(3):
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["f0", "f1", "f2"],
            values=torch.randint(0, 40, (24,), generator=g),
            lengths=torch.ones(24, dtype=torch.int32),
        )
        loss = sum(v.pow(2).sum() for v in model(kjt).to_dict().values())
        loss.backward()
    save_checkpoint(ckpt_dir, 3, {"model": model, "sparse_opt": model.fused_optimizer}, meta={"epoch": 0})
    tables = full_tables(model)
    if rt.rank == 0:
        torch.save({"plan": str(model.plan), "tables": tables}, out_file)
    shutdown()


def evaluate_popularity_distributed(out_file: str) -> None:
    """2 ranks: the popularity baseline through the distributed evaluation path."""
    from common.baselines import popularity_report
    from common.data.movielens import load_movielens
    from common.data.split import split_dataset
    from common.runtime import init_runtime, shutdown

    rt = init_runtime("cpu")
    ds = load_movielens("ml-100k")
    rep = popularity_report(split_dataset(ds), "test", n_boot=50)
    if rt.rank == 0:
        torch.save({"users": rep.users, "ranks": rep.ranks, "means": rep.means}, out_file)
    shutdown()


def ranks_of_this_process(path: str) -> None:
    """Writes this process's view of the runtime, to check rank/world/backend detection."""
    from common.runtime import init_runtime, print0, shutdown, write_results

    rt = init_runtime("auto")
    Path(path, f"rank{rt.rank}.txt").write_text(f"{rt.rank} {rt.world_size} {rt.local_rank} {rt.backend} {rt.device}")
    write_results(path, {"written_by": rt.rank})
    print0("hello from rank 0")
    shutdown()


def bert4rec_evaluate(run_dir: str) -> dict[str, dict[str, float]]:
    """Load a BERT4Rec run's best checkpoint into this world size's sharding and evaluate test."""
    from bert4rec.bert4rec_main import Config, build, evaluate
    from common.checkpoint import latest_checkpoint, load_checkpoint
    from common.data.movielens import load_movielens
    from common.data.split import split_dataset
    from common.runtime import init_runtime

    rt = init_runtime("cpu")
    torch.set_num_threads(1)  # the same arithmetic in every process count
    saved = json.loads((Path(run_dir) / "results.json").read_text())["config"]
    cfg = Config(**saved)
    ds = load_movielens(cfg.dataset)
    split = split_dataset(ds)
    model, _ = build("bert4rec", cfg, ds.num_items, rt)
    load_checkpoint(latest_checkpoint(Path(run_dir) / "best"), {"model": model})
    return {k: r.means for k, r in evaluate(model.module.model, split, "test", n_boot=10).items()}


def zch_mapping(out: str, batch_size: int) -> str:
    """A short ZCH (LRU) run on ml-100k in this process group; returns the ID-to-row mapping digest."""
    from zch import main as zch_main

    summary = zch_main.main(
        [
            "--variants",
            "zch_lru",
            "--ratios",
            "0.25",
            "--epochs",
            "1",
            "--limit-batches",
            "30",
            "--batch-size",
            str(batch_size),
            "--out",
            out,
        ]
    )
    return summary["results"][0]["mapping_digest"]


def checkpoint_schedule_answers() -> list[bool]:
    """Two ranks whose own clocks disagree about a timed checkpoint: rank 0's clock decides for both."""
    import time

    from common.checkpoint import CheckpointSchedule
    from common.runtime import init_runtime, shutdown

    rt = init_runtime("cpu")
    schedule = CheckpointSchedule("1h", poll_steps=2)
    if rt.rank == 1:
        schedule.last = time.monotonic() - 7200  # rank 1 alone thinks a save is due
    answers = [schedule.due(1), schedule.due(2)]
    if rt.rank == 0:
        schedule.last = time.monotonic() - 7200
    answers += [schedule.due(3), schedule.due(4)]  # step 3 is not a polling step
    shutdown()
    return answers


class RecordedColumn:
    """An interaction column that records which rows are read, and refuses to be read whole."""

    def __init__(self, a) -> None:
        import numpy as np

        self.a, self.read = np.asarray(a), np.zeros(len(a), dtype=bool)

    def __len__(self) -> int:
        return len(self.a)

    def __getitem__(self, key):
        self.read[key] = True
        return self.a[key]

    def __array__(self, dtype=None, copy=None):
        raise AssertionError("the whole column was read")


def recorded(ds):
    """``ds`` with its interaction columns recording the rows read: (data set, {column: RecordedColumn})."""
    import dataclasses

    cols = {name: RecordedColumn(getattr(ds, name)) for name in ("user", "item", "timestamp", "rating")}
    return dataclasses.replace(ds, **cols).with_known(ds.indptr, ds.fingerprint), cols


def ranker_training_data(eval_users: int) -> dict:
    """What this rank of the ranker's training reads and builds from ml-100k (train_dlrm.rank_data
    and train_examples, as the script calls them): the rows read, the merged counts and sequence
    statistics, and its training positives with their sequence features."""
    import numpy as np

    from common.data.movielens import load_movielens
    from common.runtime import init_runtime, shutdown
    from golden_training import train_dlrm
    from golden_training.ranking_data import train_examples

    rt = init_runtime("cpu")
    cfg = train_dlrm.Config(eval_users=eval_users)
    ds, cols = recorded(load_movielens("ml-100k"))
    share, split, features = train_dlrm.rank_data(ds, cfg, rt)
    examples, _ = train_examples(share, features, cfg, None, eval_users=split.eval_users, rank=rt.rank)
    positives = examples.take(np.flatnonzero(examples.label == 1))
    stats = features.sequence
    out = {
        "read": {name: c.read for name, c in cols.items()},
        "item_counts": features.item_counts,
        "stats": {f: getattr(stats, f) for f in ("pair_keys", "pair_counts", "out_counts", "item_time", "t0", "span")},
        "positives": (positives.user, positives.item, positives.time),
        "sequence": stats.features(positives),
        "negatives": examples.item[examples.label == 0],
        "steps": train_dlrm.steps_per_epoch(len(examples), cfg, rt, own=True),
    }
    shutdown()
    return out
