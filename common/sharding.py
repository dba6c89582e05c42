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
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.fbgemm_qcomm_codec import CommType, QCommsConfig, get_qcomm_codecs_registry
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import (
    HardwareConfig,
    KernelConfig,
    ParameterConstraints,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.train_pipeline import TrainPipelineBase, TrainPipelineSparseDist
from torchrec.distributed.types import ShardingPlan
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from common.runtime import Runtime

SHARDING_TYPES = ("table_wise", "column_wise", "table_column_wise", "row_wise", "table_row_wise")
CUDA_ONLY = ("row_wise", "table_row_wise")
# What the planner keeps free on every device for dense parameters, activations and the framework:
# an explicit share (TorchRec's default heuristic warns that it misjudges dense sizes).
RESERVED_SHARE = 0.15


def topology(
    world_size: int,
    compute_device: str = "cuda",
    hbm_gb: float | None = None,
    ddr_gb: float | None = None,
    local_world_size: int | None = None,
) -> Topology:
    """A planner ``Topology`` for ``world_size`` devices, ``local_world_size`` per host (default: all
    on one), with ``hbm_gb`` of device memory and ``ddr_gb`` of host memory per device in decimal GB
    (TorchRec's defaults when None). Built through ``TopologyFactory``, as TorchRec asks; nothing
    needs to exist, so it also describes hardware you plan for but do not have."""
    trainer = TrainerConfig(world_size=world_size, local_world_size=local_world_size or world_size)
    hardware = HardwareConfig(
        hbm_cap_bytes=None if hbm_gb is None else int(hbm_gb * 10**9),
        ddr_cap_bytes=None if ddr_gb is None else int(ddr_gb * 10**9),
    )
    return TopologyFactory.create_topology(trainer, hardware, KernelConfig(compute_device=compute_device))


def local_shards(state: dict[str, object]) -> list[tuple[str, tuple[int, ...], torch.Tensor]]:
    """(key, offsets, tensor) for every piece of ``state`` (a state dict) held by this rank: each local
    shard of a ShardedTensor at its offsets into the full tensor, a plain tensor (e.g. a data-parallel
    table) at offset 0. The tensors are views: writing into them writes the sharded module's storage."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    out = []
    for key, value in state.items():
        if isinstance(value, ShardedTensor):
            out += [(key, tuple(s.metadata.shard_offsets), s.tensor) for s in value.local_shards()]
        elif isinstance(value, torch.Tensor):
            out.append((key, (0,) * value.dim(), value))
    return out


def qcomms_precisions(device: torch.device) -> tuple[CommType, CommType]:
    """(forward, backward) precision of quantized communication: FP16 forward and BF16 backward,
    except that gloo (CPU) has no BF16 collectives, so TorchRec falls back to FP16 there."""
    return CommType.FP16, (CommType.BF16 if device.type == "cuda" else CommType.FP16)


def table_names(ebcs: Iterable[EmbeddingBagCollection | EmbeddingCollection]) -> list[str]:
    return [
        c.name
        for ebc in ebcs
        for c in (ebc.embedding_bag_configs() if isinstance(ebc, EmbeddingBagCollection) else ebc.embedding_configs())
    ]


def plan_sharding(
    model: nn.Module,
    tables: list[str],
    rt: Runtime,
    sharding_type: str,
    qcomms: bool = False,
    kernels: list[str] | None = None,
) -> tuple[ShardingPlan, list]:
    """TorchRec's planner over ``model`` (built on the meta device): every table of ``tables`` sharded
    ``sharding_type`` across ``rt.world_size`` devices, the same plan on every rank (a collective).
    Returns the plan and the sharders DistributedModelParallel needs for it; ``qcomms`` quantizes the
    embeddings' all-to-all and reduce-scatter (:func:`qcomms_precisions`)."""
    if sharding_type not in (*SHARDING_TYPES, "data_parallel"):
        raise ValueError(f"sharding type must be one of {SHARDING_TYPES}, got {sharding_type!r}")
    if sharding_type in CUDA_ONLY and rt.device.type != "cuda":
        raise ValueError(
            f"{sharding_type} sharding needs CUDA in TorchRec; on CPU use table_wise, column_wise or table_column_wise"
        )
    planner = EmbeddingShardingPlanner(
        topology=topology(rt.world_size, compute_device=rt.device.type, local_world_size=rt.local_world_size),
        constraints={t: ParameterConstraints(sharding_types=[sharding_type], compute_kernels=kernels) for t in tables},
        storage_reservation=FixedPercentageStorageReservation(RESERVED_SHARE),
    )
    sharders = get_default_sharders()
    if qcomms:
        forward, backward = qcomms_precisions(rt.device)
        registry = get_qcomm_codecs_registry(
            QCommsConfig(forward_precision=forward, backward_precision=backward), device=rt.device
        )
        sharders = [EmbeddingBagCollectionSharder(qcomm_codecs_registry=registry)] + [
            s for s in sharders if type(s) is not EmbeddingBagCollectionSharder
        ]
    return planner.collective_plan(model, sharders, torch.distributed.GroupMember.WORLD), sharders


def adam_for_the_rest(dmp: DistributedModelParallel, lr: float, weight_decay: float = 0.0) -> KeyedOptimizerWrapper:
    """Adam over every parameter no optimizer in backward updates: the dense layers."""
    return KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: torch.optim.Adam(params, lr=lr, weight_decay=weight_decay),
    )


def qcomms_settings(enabled: bool, device: torch.device) -> dict[str, str] | None:
    """What --qcomms uses on ``device`` (None without it), as results.json records it."""
    return dict(zip(("forward", "backward"), (p.name for p in qcomms_precisions(device)))) if enabled else None


def shard_model(
    model: nn.Module,
    ebcs: Iterable[EmbeddingBagCollection | EmbeddingCollection],
    rt: Runtime,
    sharding_type: str,
    sparse_lr: float,
    dense_lr: float,
    qcomms: bool = False,
    fused: bool = True,
) -> tuple[DistributedModelParallel, CombinedOptimizer]:
    """The four steps every trainer takes (golden_training/train_dlrm.py's ``build`` shows them one by
    one): a fused RowWiseAdagrad applied in backward to the tables of ``ebcs`` (pooled or sequence
    embedding collections built on the meta device), :func:`plan_sharding` with one sharding type,
    DistributedModelParallel, and Adam for everything else.
    ``fused=False`` is the comparison the guide's "in-backward optimizer fusion" claim is made
    against (bench/optimizer_fusion.py): the tables as plain parameters (TorchRec's dense kernel)
    whose gradients backward materializes, and the same RowWiseAdagrad as a separate optimizer step.
    TorchRec offers that kernel only to data-parallel tables (replicated on every rank), so
    ``sharding_type`` is ignored there: compare in one process, where data-parallel is one table.

    Returns the DMP-wrapped model and a ``CombinedOptimizer`` (fused part + Adam) for
    ``TrainPipelineSparseDist`` and checkpoints.
    """
    ebcs = list(ebcs)
    if fused:
        if sharding_type not in SHARDING_TYPES:
            raise ValueError(f"sharding type must be one of {SHARDING_TYPES}, got {sharding_type!r}")
        apply_optimizer_in_backward(RowWiseAdagrad, [p for ebc in ebcs for p in ebc.parameters()], {"lr": sparse_lr})
        plan, sharders = plan_sharding(model, table_names(ebcs), rt, sharding_type, qcomms)
    else:
        kernels = [EmbeddingComputeKernel.DENSE.value]
        plan, sharders = plan_sharding(model, table_names(ebcs), rt, "data_parallel", qcomms, kernels)
    dmp = DistributedModelParallel(model, device=rt.device, plan=plan, sharders=sharders)
    if not fused:
        weights = {k: p for k, p in dmp.named_parameters() if "embedding" in k}  # the sharded tables
        others = {k: p for k, p in dmp.named_parameters() if k not in weights}
        sparse = KeyedOptimizerWrapper(weights, lambda params: RowWiseAdagrad(params, lr=sparse_lr))
        dense = KeyedOptimizerWrapper(others, lambda params: torch.optim.Adam(params, lr=dense_lr))
        return dmp, CombinedOptimizer([sparse, dense])
    return dmp, CombinedOptimizer([dmp.fused_optimizer, adam_for_the_rest(dmp, dense_lr)])


PIPELINES = ("auto", "sparse-dist", "base")
PIPELINE_HELP = (
    "TorchRec's training pipeline: sparse-dist (TrainPipelineSparseDist: the next batch's input all-to-all "
    "and device copy overlap this step's compute) or base (TrainPipelineBase: the next batch is fetched "
    "ahead); auto: sparse-dist on CUDA or with several processes, base in one CPU process, which has no "
    "comms or copies to overlap and where sparse-dist's own per-step work is a cost (bench.dlrm_throughput) "
    "(default: %(default)s)"
)


def train_pipeline(
    model: nn.Module, optimizer: torch.optim.Optimizer, rt: Runtime, kind: str = "auto"
) -> TrainPipelineBase | TrainPipelineSparseDist:
    """The training pipeline for ``kind`` (see :data:`PIPELINE_HELP`). Both run the same forward,
    backward and optimizer step on the same batches in the same order: the choice changes when
    the next batch's work starts, not what a step computes. Call ``detach()`` on a
    ``TrainPipelineSparseDist`` when done (it rewrites the model's forward), ``reset()`` on the other."""
    if pipeline_kind(kind, rt) == "sparse-dist":
        return TrainPipelineSparseDist(model, optimizer, rt.device, execute_all_batches=True)
    return TrainPipelineBase(model, optimizer, rt.device)


def pipeline_kind(kind: str, rt: Runtime) -> str:
    """ "sparse-dist" or "base" for a --pipeline value (see :data:`PIPELINE_HELP`)."""
    if kind not in PIPELINES:
        raise ValueError(f"pipeline must be one of {PIPELINES}, got {kind!r}")
    if kind == "auto":
        return "sparse-dist" if rt.device.type == "cuda" or rt.world_size > 1 else "base"
    return kind


def release_pipeline(pipeline: TrainPipelineBase | TrainPipelineSparseDist) -> None:
    """Give the model its own forward back (sparse-dist) or drop the batch held ahead (base)."""
    if isinstance(pipeline, TrainPipelineSparseDist):
        pipeline.detach()
    else:
        pipeline.reset()
