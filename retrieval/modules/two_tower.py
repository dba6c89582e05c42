"""The two-tower model: a query (user) tower and a candidate (item) tower whose L2-normalized
outputs meet in a dot product, trained with in-batch sampled softmax.

Loss (Yi et al., "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item
Recommendations", RecSys 2019): each example's positive item is scored against the other
positives in the batch as negatives. Popular items appear as negatives more often, so each
logit is corrected by subtracting log Q(item), the item's sampling probability (its share of
training examples). Another example in the batch with the same item is an "accidental hit", not a
negative, and is masked out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection, KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from common.features import FeatureSchema

# The serving export's layout (retrieval/two_tower_train.py ``export``): /2 keeps the ID maps,
# histories and popularity as .npy files; /1 (read still) had them as JSON lists in features.json.
EXPORT_FORMAT = "two_tower_retrieval/2"
EXPORT_FORMATS = ("two_tower_retrieval/1", EXPORT_FORMAT)
SERVING_ARRAYS = ("user_raw_ids", "item_raw_ids", "history_indptr", "history_items", "item_counts")  # <name>.npy


class Tower(nn.Module):
    """Embedding bags for a schema's sparse features -> concatenated by key -> MLP -> unit vector."""

    def __init__(
        self, schema: FeatureSchema, embedding_dim: int, layer_sizes: list[int], device: torch.device | None = None
    ) -> None:
        super().__init__()
        self.feature_names = schema.sparse_names
        self.ebc = EmbeddingBagCollection(tables=schema.embedding_bag_configs(embedding_dim), device=device)
        layers: list[nn.Module] = []
        in_dim = embedding_dim * len(self.feature_names)
        for k, out_dim in enumerate(layer_sizes):
            layers.append(
                nn.Linear(in_dim, out_dim, device=None if device is None or device.type == "meta" else device)
            )
            if k < len(layer_sizes) - 1:
                layers.append(nn.ReLU())
            in_dim = out_dim
        self.mlp = nn.Sequential(*layers)
        self.output_dim = layer_sizes[-1]

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        # Read pooled embeddings by key: a sharded EBC orders KeyedTensor.values() by its
        # sharding plan, not by feature, so positional slicing would mix features up.
        pooled = self.ebc(features).to_dict()
        x = torch.cat([pooled[name] for name in self.feature_names], dim=1)
        return F.normalize(self.mlp(x), dim=-1)


@dataclass
class TwoTowerBatch(Pipelineable):
    """One training batch: query and candidate features, and the positive items' indices."""

    query: KeyedJaggedTensor
    candidate: KeyedJaggedTensor
    item_ids: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> TwoTowerBatch:
        return TwoTowerBatch(
            self.query.to(device, non_blocking=non_blocking),
            self.candidate.to(device, non_blocking=non_blocking),
            self.item_ids.to(device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.query.record_stream(stream)
        self.candidate.record_stream(stream)
        self.item_ids.record_stream(stream)

    def pin_memory(self) -> TwoTowerBatch:
        return TwoTowerBatch(self.query.pin_memory(), self.candidate.pin_memory(), self.item_ids.pin_memory())


class TwoTower(nn.Module):
    """Both towers plus the training loss; ``forward(batch)`` returns ``(loss, (loss, accuracy))``
    as ``TrainPipelineSparseDist`` expects."""

    def __init__(
        self,
        query_schema: FeatureSchema,
        candidate_schema: FeatureSchema,
        embedding_dim: int,
        layer_sizes: list[int],
        item_counts: np.ndarray,
        temperature: float = 0.05,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.query_tower = Tower(query_schema, embedding_dim, layer_sizes, device)
        self.candidate_tower = Tower(candidate_schema, embedding_dim, layer_sizes, device)
        self.temperature = temperature
        q = np.asarray(item_counts, dtype=np.float64) + 1.0  # +1: items unseen in training stay finite
        self.register_buffer("log_q", torch.tensor(np.log(q / q.sum()), dtype=torch.float32), persistent=False)

    def forward(self, batch: TwoTowerBatch) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        query = self.query_tower(batch.query)
        candidate = self.candidate_tower(batch.candidate)
        loss, accuracy = sampled_softmax_loss(query, candidate, batch.item_ids, self.log_q, self.temperature)
        return loss, (loss.detach(), accuracy.detach())


@torch.fx.wrap  # opaque to the FX tracer that TrainPipelineSparseDist uses to find sharded modules
def sampled_softmax_loss(
    query: torch.Tensor, candidate: torch.Tensor, item_ids: torch.Tensor, log_q: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """In-batch softmax with logQ correction and accidental hits masked; returns (loss, accuracy)."""
    logits = query @ candidate.T / temperature - log_q[item_ids].unsqueeze(0)
    same_item = item_ids.unsqueeze(1) == item_ids.unsqueeze(0)
    accidental = same_item & ~torch.eye(len(item_ids), dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(accidental, float("-inf"))
    target = torch.arange(len(item_ids), device=logits.device)
    return F.cross_entropy(logits, target), (logits.argmax(dim=1) == target).float().mean()


class TwoTowerRetrieval(nn.Module):
    """Serving: query features -> query tower -> FAISS search -> top-K items and scores.

    ``forward(query_kjt, k)`` returns ``(scores [B, k], item_indices [B, k])``; rows with fewer
    than k results are padded with index -1 and score -inf (FAISS's convention).
    """

    def __init__(self, faiss_index, query_tower: Tower, k: int = 100, device: torch.device | None = None) -> None:
        super().__init__()
        if faiss_index.d != query_tower.output_dim:
            raise ValueError(
                f"FAISS index has dimension {faiss_index.d} but the query tower outputs "
                f"{query_tower.output_dim}: the index was built for another model"
            )
        self.faiss_index = faiss_index
        self.query_tower = query_tower
        self.k = k
        self.device = device or torch.device("cpu")

    @torch.no_grad()
    def embed(self, query: KeyedJaggedTensor) -> torch.Tensor:
        return self.query_tower(query.to(self.device)).float()

    @torch.no_grad()
    def forward(self, query: KeyedJaggedTensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.embed(query).cpu().numpy().astype(np.float32)
        scores, items = self.faiss_index.search(q, k or self.k)
        return torch.from_numpy(scores), torch.from_numpy(items)
