"""TorchRec's planner on a topology you describe rather than one you own, and its answer as tables.

The planner needs no GPU to plan for GPUs: given a module on the meta device and a ``Topology``
(how many devices, how much HBM and DDR each, the bandwidths between them) it enumerates sharding
options per table, estimates each shard's storage and step time with its cost model, and packs them
onto ranks. ``plan()`` keeps what it chose (through the planner's public ``callbacks`` hook) and turns
it into two DataFrames, so that every number the notebooks state is read from a cell's output.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import ParameterConstraints, ShardingOption, Topology
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import ModuleSharder, ShardingPlan

from common.sharding import RESERVED_SHARE, topology  # noqa: F401  (the notebooks import them from here)

GB = 10**9  # decimal gigabytes, as the seed guide counts them (51.2 GB for 100M x 128 fp32)


@dataclass
class PlanReport:
    """The planner's choice. ``shards``: one row per shard (placement, estimated storage and time);
    ``ranks``: per-rank totals; ``step_ms``: the slowest rank's estimated embedding time per
    iteration, the number the planner minimizes (its ``NoopPerfModel``)."""

    plan: ShardingPlan
    shards: pd.DataFrame
    ranks: pd.DataFrame

    @property
    def step_ms(self) -> float:
        return float(self.ranks["total_ms"].max())

    def tables(self) -> pd.DataFrame:
        """One row per table: how it is sharded, with which kernel, on which ranks."""
        return (
            self.shards.groupby("table", sort=False)
            .agg(
                sharding_type=("sharding_type", "first"),
                kernel=("kernel", "first"),
                shards=("rank", "size"),
                ranks=("rank", lambda r: ",".join(map(str, sorted(set(r))))),
                hbm_gb=("hbm_gb", "sum"),
                ddr_gb=("ddr_gb", "sum"),
            )
            .round(3)
        )


def _shard_rows(options: list[ShardingOption]) -> pd.DataFrame:
    rows = []
    for option in options:
        for shard in option.shards:
            (r0, c0), (nr, nc) = shard.offset, shard.size
            perf, storage = shard.perf, shard.storage
            rows.append(
                {
                    "table": option.name,
                    "sharding_type": option.sharding_type,
                    "kernel": option.compute_kernel,
                    "rank": shard.rank,
                    "rows": f"{r0:,}-{r0 + nr - 1:,}",
                    "cols": f"{c0}-{c0 + nc - 1}",
                    "hbm_gb": storage.hbm / GB,
                    "ddr_gb": storage.ddr / GB,
                    # the planner's estimates, in ms per iteration
                    "fwd_compute_ms": perf.fwd_compute,
                    "bwd_compute_ms": perf.bwd_compute,
                    "input_dist_ms": perf.input_dist_comms,
                    "fwd_comms_ms": perf.fwd_comms,
                    "bwd_comms_ms": perf.bwd_comms,
                    "prefetch_ms": perf.prefetch_compute,
                    "total_ms": perf.total,
                }
            )
    return pd.DataFrame(rows)


def plan(
    module: nn.Module,
    topo: Topology,
    constraints: dict[str, ParameterConstraints] | None = None,
    batch_size: int = 512,
    sharders: list[ModuleSharder] | None = None,
) -> PlanReport:
    """Plan ``module`` (built on the meta device) onto ``topo``. ``batch_size`` is per rank.
    Raises TorchRec's ``PlannerError`` when the tables do not fit."""
    chosen: list[list[ShardingOption]] = []

    def keep(best: list[ShardingOption]) -> list[ShardingOption]:
        chosen.append(best)
        return best

    planner = EmbeddingShardingPlanner(
        topology=topo,
        batch_size=batch_size,
        constraints=constraints,
        storage_reservation=FixedPercentageStorageReservation(RESERVED_SHARE),
        callbacks=[keep],
        debug=False,
    )
    sharding_plan = planner.plan(module, sharders or get_default_sharders())
    shards = _shard_rows(chosen[-1])
    comms = ["input_dist_ms", "fwd_comms_ms", "bwd_comms_ms"]
    compute = ["fwd_compute_ms", "bwd_compute_ms", "prefetch_ms"]
    ranks = (
        shards.assign(comms_ms=shards[comms].sum(axis=1), compute_ms=shards[compute].sum(axis=1))
        .groupby("rank")[["hbm_gb", "ddr_gb", "compute_ms", "comms_ms", "total_ms"]]
        .sum()
        .reindex(range(topo.world_size), fill_value=0.0)
    )
    return PlanReport(plan=sharding_plan, shards=shards, ranks=ranks)


def meta_ebc(tables: list[tuple[str, int, int]], data_type: str = "fp32", optimizer: type | None = None) -> nn.Module:
    """An EmbeddingBagCollection on the meta device (no memory), one feature per table:
    ``tables`` is [(name, rows, dim)]. ``optimizer`` (e.g. torchrec's RowWiseAdagrad or
    torch.optim.Adam) is attached the way training attaches it, so the planner counts its state."""
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.modules.embedding_configs import DataType
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    dtype = {"fp32": DataType.FP32, "fp16": DataType.FP16}[data_type]
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(name=name, embedding_dim=dim, num_embeddings=rows, feature_names=[name], data_type=dtype)
            for name, rows, dim in tables
        ],
        device=torch.device("meta"),
    )
    if optimizer is not None:
        apply_optimizer_in_backward(optimizer, ebc.parameters(), {"lr": 0.01})
    return ebc
