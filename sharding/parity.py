"""Shard a small EmbeddingBagCollection across real gloo processes and check that every rank's
pooled embeddings equal the unsharded module's, feature by feature.

Used by ``sharding/sharding.ipynb`` (the workers must live in a module: they are spawned), and
runnable on its own:

    python -m sharding.parity                       # every CPU sharding type, 2 processes
    python -m sharding.parity --sharding-type column_wise --nproc 2
    torchrun --nproc_per_node=2 -m sharding.parity --sharding-type table_wise
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings
from dataclasses import asdict, dataclass

import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.sharding_plan import get_default_sharders

from common.runtime import init_runtime, launch_local, shutdown
from common.sharding import local_shards as common_local_shards
from sharding.planning import RESERVED_SHARE, topology

CPU_SHARDING_TYPES = ("table_wise", "column_wise", "table_column_wise", "data_parallel")
CUDA_ONLY_SHARDING_TYPES = ("row_wise", "table_row_wise", "grid_shard")
# MovieLens-100k's ID tables (users, movies, occupations, genres) at a width that splits in two.
TABLES = (("user_id", 943, 64), ("item_id", 1682, 64), ("occupation", 21, 64), ("genres", 19, 64))
BATCH_SIZE = 32


@dataclass(frozen=True)
class RankReport:
    """What one rank saw: its shards, their bytes, and how far its output is from the unsharded one."""

    rank: int
    world_size: int
    sharding_type: str
    shards: list[dict]  # {table, rows, cols, bytes} for each shard this rank holds
    table_bytes: int  # bytes of embedding weights held on this rank
    max_abs_diff: float  # max |sharded - unsharded| over this rank's batch, every feature
    features_checked: list[str]
    kernels: dict[str, str]  # table -> compute kernel in the plan (fused, dense, fused_uvm_caching...)
    output_keys: list[str]  # the sharded KeyedTensor's key order
    values_in_feature_order: bool  # whether .values() (no keys) happens to equal the unsharded one


def build_tables() -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name=name, embedding_dim=dim, num_embeddings=rows, feature_names=[name])
        for name, rows, dim in TABLES
    ]


def random_batch(seed: int, batch_size: int = BATCH_SIZE) -> KeyedJaggedTensor:
    """A batch shaped like MovieLens rows: one user, one movie, one occupation, 1-3 genres."""
    g = torch.Generator().manual_seed(seed)
    lengths, values = [], []
    for name, rows, _ in TABLES:
        n = (
            torch.randint(1, 4, (batch_size,), generator=g)
            if name == "genres"
            else torch.ones(batch_size, dtype=torch.long)
        )
        lengths.append(n)
        values.append(torch.randint(0, rows, (int(n.sum()),), generator=g))
    return KeyedJaggedTensor(keys=[name for name, _, _ in TABLES], values=torch.cat(values), lengths=torch.cat(lengths))


def copy_into_shards(sharded: DistributedModelParallel, full: dict[str, torch.Tensor]) -> None:
    """Give the sharded module the unsharded module's weights: each rank copies the slice of each
    table that its local shards cover (at their offsets; a data-parallel table is copied whole)."""
    with torch.no_grad():
        for key, (r0, c0), tensor in common_local_shards(sharded.state_dict()):
            nr, nc = tensor.shape
            tensor.copy_(full[key.removeprefix("module.")][r0 : r0 + nr, c0 : c0 + nc])


def local_shards(sharded: DistributedModelParallel) -> list[dict]:
    """The shards of each table that live on this rank, read from the sharded state dict."""
    return [
        {
            "table": key.split(".")[-2],
            "rows": f"{r0}-{r0 + t.shape[0] - 1}",
            "cols": f"{c0}-{c0 + t.shape[1] - 1}",
            "bytes": t.numel() * t.element_size(),
        }
        for key, (r0, c0), t in common_local_shards(sharded.state_dict())
    ]


def compare_with_unsharded(sharding_type: str, device: str = "cpu", compute_kernel: str | None = None) -> RankReport:
    """One rank's part: shard every table with ``sharding_type`` (and ``compute_kernel``, e.g.
    ``fused_uvm_caching`` on CUDA; the planner's choice when None), load the unsharded weights, run
    this rank's own batch through both modules, and compare the outputs by feature key."""
    # Workers share the caller's terminal (or notebook cell): keep TorchRec's and DDP's advisory
    # warnings (deprecations, "caching params ignored" for data-parallel) out of it.
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore", FutureWarning)
    rt = init_runtime(device)
    try:
        torch.manual_seed(0)  # the same unsharded weights on every rank
        reference = EmbeddingBagCollection(tables=build_tables()).to(rt.device)
        meta = EmbeddingBagCollection(tables=build_tables(), device=torch.device("meta"))
        # min_partition lets column-wise split a 64-wide table into two 32-wide shards (default: 128).
        constraints = {
            name: ParameterConstraints(
                sharding_types=[sharding_type],
                min_partition=32,
                compute_kernels=[compute_kernel] if compute_kernel else None,
            )
            for name, _, _ in TABLES
        }
        planner = EmbeddingShardingPlanner(
            topology=topology(rt.world_size, compute_device=rt.device.type),
            constraints=constraints,
            storage_reservation=FixedPercentageStorageReservation(RESERVED_SHARE),
        )
        plan = planner.collective_plan(meta, get_default_sharders(), torch.distributed.GroupMember.WORLD)
        sharded = DistributedModelParallel(meta, device=rt.device, plan=plan)
        copy_into_shards(sharded, reference.state_dict())

        batch = random_batch(seed=rt.rank).to(rt.device)  # each rank its own batch, as in training
        with torch.no_grad():
            got_kt, want_kt = sharded(batch), reference(batch)
        # Read by key: a sharded KeyedTensor's columns follow the plan, not the feature order.
        got, want = got_kt.to_dict(), want_kt.to_dict()
        diff = max((got[k] - want[k]).abs().max().item() for k in want)
        same_layout = got_kt.values().shape == want_kt.values().shape and torch.equal(got_kt.values(), want_kt.values())
        shards = local_shards(sharded)
        return RankReport(
            rank=rt.rank,
            world_size=rt.world_size,
            sharding_type=sharding_type,
            shards=shards,
            table_bytes=sum(s["bytes"] for s in shards),
            max_abs_diff=diff,
            features_checked=sorted(want),
            kernels={t: p.compute_kernel for t, p in plan.plan[""].items()},
            output_keys=list(got_kt.keys()),
            values_in_feature_order=same_layout,
        )
    finally:
        shutdown()


def run(sharding_type: str, nproc: int = 2, device: str = "cpu", compute_kernel: str | None = None) -> list[dict]:
    """Launch ``nproc`` processes (gloo on CPU, nccl on CUDA: one GPU each) running
    ``compare_with_unsharded``; one report per rank."""
    allowed = CPU_SHARDING_TYPES + (CUDA_ONLY_SHARDING_TYPES if device == "cuda" else ())
    if sharding_type not in allowed:
        raise ValueError(
            f"--sharding-type must be one of {allowed} on {device}, got {sharding_type!r}"
            + ("" if device == "cuda" else " (row-wise, table-row-wise and grid need CUDA in TorchRec)")
        )
    if device == "cuda" and nproc > torch.cuda.device_count():
        raise ValueError(
            f"--nproc {nproc} needs {nproc} GPUs (nccl runs one rank per GPU); this machine has "
            f"{torch.cuda.device_count()}"
        )
    reports = launch_local(compare_with_unsharded, nproc, sharding_type, device, compute_kernel)
    return [asdict(reports[r]) for r in sorted(reports)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--sharding-type",
        choices=CPU_SHARDING_TYPES + CUDA_ONLY_SHARDING_TYPES + ("all",),
        default="all",
        help="sharding type to check (default: all four CPU types; the CUDA-only ones with --device cuda)",
    )
    p.add_argument("--nproc", type=int, default=2, help="processes to launch (default: 2)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu (gloo) or cuda (nccl); default cpu")
    args = p.parse_args(argv)
    if args.device == "cpu" and args.sharding_type in CUDA_ONLY_SHARDING_TYPES:
        p.error(
            f"{args.sharding_type} sharding needs CUDA in TorchRec: add --device cuda on a machine with GPUs, "
            f"or pick one of {CPU_SHARDING_TYPES}"
        )
    return args


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    args = parse_args(argv)
    everything = CPU_SHARDING_TYPES + (CUDA_ONLY_SHARDING_TYPES if args.device == "cuda" else ())
    types = everything if args.sharding_type == "all" else (args.sharding_type,)
    if "LOCAL_RANK" in os.environ:  # already under torchrun: be one of its ranks
        report = asdict(compare_with_unsharded(types[0], args.device))
        print(
            f"rank {report['rank']} | {types[0]} | {report['table_bytes']:,} bytes | "
            f"max |sharded - unsharded| {report['max_abs_diff']:.2e}"
        )
        return {types[0]: [report]}
    results = {}
    for st in types:
        results[st] = run(st, args.nproc, args.device)
        for r in results[st]:
            print(
                f"{st:18s} rank {r['rank']} | {len(r['shards'])} shards | {r['table_bytes']:,} bytes | "
                f"max |sharded - unsharded| {r['max_abs_diff']:.2e}"
            )
    return results


if __name__ == "__main__":
    main()
