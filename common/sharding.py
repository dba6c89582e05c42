"""TorchRec's sharded-training setup, which every stage repeats: a fused sparse optimizer on the
embedding tables, a plan, DistributedModelParallel, and a dense optimizer for the rest.

CPU (gloo) supports table-wise, column-wise, table-column-wise and data-parallel sharding;
row-wise and table-row-wise need CUDA. Data-parallel tables are left out of the choices: their
in-backward optimizer state lives outside ``model.fused_optimizer`` and so outside checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from common.runtime import Runtime

SHARDING_TYPES = ("table_wise", "column_wise", "table_column_wise", "row_wise", "table_row_wise")
CUDA_ONLY = ("row_wise", "table_row_wise")


def shard_model(model: nn.Module, ebcs: Iterable[EmbeddingBagCollection], rt: Runtime, sharding_type: str,
                sparse_lr: float, dense_lr: float) -> tuple[DistributedModelParallel, CombinedOptimizer]:
    """Shard ``model``'s tables (those of ``ebcs``, built on the meta device) with one sharding
    type, updating them with a fused RowWiseAdagrad applied in backward; Adam for everything else.

    Returns the DMP-wrapped model and a ``CombinedOptimizer`` (fused part + Adam) for
    ``TrainPipelineSparseDist`` and checkpoints.
    """
    if sharding_type not in SHARDING_TYPES:
        raise ValueError(f"sharding type must be one of {SHARDING_TYPES}, got {sharding_type!r}")
    if sharding_type in CUDA_ONLY and rt.device.type != "cuda":
        raise ValueError(f"{sharding_type} sharding needs CUDA in TorchRec; on CPU use table_wise, column_wise "
                         f"or table_column_wise")
    ebcs = list(ebcs)
    apply_optimizer_in_backward(RowWiseAdagrad, [p for ebc in ebcs for p in ebc.parameters()], {"lr": sparse_lr})
    tables = [c.name for ebc in ebcs for c in ebc.embedding_bag_configs()]
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=rt.world_size, compute_device=rt.device.type),
        constraints={t: ParameterConstraints(sharding_types=[sharding_type]) for t in tables})
    plan = planner.collective_plan(model, get_default_sharders(), torch.distributed.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=rt.device, plan=plan)
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                  lambda params: torch.optim.Adam(params, lr=dense_lr))
    return dmp, CombinedOptimizer([dmp.fused_optimizer, dense])
