"""The union ranker across processes (integration/union_ranker.py under torchrun): its DLRM's tables
sharded by TorchRec's planner, each rank's part of a batch's loss, and the check that every rank
built the same lists."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np
import torch
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from common.runtime import Runtime
from common.sharding import adam_for_the_rest, local_shards, plan_sharding, table_names
from golden_training.model import TorchRecDLRM

if TYPE_CHECKING:
    from integration.union_ranker import Lists


def lists_digest(lists: Lists) -> str:
    """A SHA-256 of the lists, their provenance and every row's features: equal on every rank, or the
    ranks would train on different data."""
    h = hashlib.sha256()
    for a in (lists.union.items, lists.union.features, lists.targets):
        h.update(np.ascontiguousarray(a).tobytes())
    for b in lists.batches:
        h.update(b.dense_features.numpy().tobytes())
        h.update(b.sparse_features.values().numpy().tobytes())
        h.update(b.sparse_features.lengths().numpy().tobytes())
    return h.hexdigest()


def sharded(
    model: TorchRecDLRM, rt: Runtime, sharding_type: str, sparse_lr: float, lr: float, weight_decay: float
) -> tuple[DistributedModelParallel, CombinedOptimizer]:
    """``model`` (built as one process builds it) across the ranks: its tables placed by TorchRec's
    planner (``sharding_type``), its dense layers wrapped in DDP, each rank's shards cut from
    its weights, so both paths start from the same model; Adam with weight decay on what no
    optimizer in the backward updates."""
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ebc = model.model.sparse_arch.embedding_bag_collection
    kernels = None
    if sharding_type == "data_parallel":
        # the tables as plain parameters (TorchRec's dense kernel) that DDP averages and Adam updates
        kernels = [EmbeddingComputeKernel.DENSE.value]
    else:
        # FBGEMM's CPU kernels fuse Adagrad and SGD into the backward, not Adam
        apply_optimizer_in_backward(RowWiseAdagrad, ebc.parameters(), {"lr": sparse_lr})
    plan, sharders = plan_sharding(model, table_names([ebc]), rt, sharding_type, kernels=kernels)
    dmp = DistributedModelParallel(model, device=rt.device, plan=plan, sharders=sharders)
    with torch.no_grad():
        for key, offsets, shard in local_shards(dmp.state_dict()):
            shard.copy_(weights[key][tuple(slice(o, o + n) for o, n in zip(offsets, shard.shape))])
    return dmp, CombinedOptimizer([dmp.fused_optimizer, adam_for_the_rest(dmp, lr, weight_decay)])


def rank_part(loss: torch.Tensor | None, logits: torch.Tensor, here: int, total: int, world_size: int) -> torch.Tensor:
    """This rank's part of a batch's loss: its mean over its ``here`` terms weighted by ``here /
    total`` (the batch's terms on every rank), times the world size, since DDP and TorchRec's
    all-to-all (torchrec/distributed/comm_ops.py, ``GRADIENT_DIVISION``) average the ranks' gradients:
    the average is the whole batch's loss gradient. A rank whose lists hold no target gets a zero
    loss: every rank joins every step's backward."""
    if loss is None:
        return logits.sum() * 0.0
    return loss * (here * world_size / total)
