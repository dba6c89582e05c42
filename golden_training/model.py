"""TorchRec's DLRM for this project's ranking features, defined once: for training, for
prediction and for serving.

- :func:`dlrm`: TorchRec's ``DLRM`` (dot interaction) or ``DLRM_DCN`` (DCNv2's cross network) over
  one embedding table per sparse feature of a :class:`common.features.FeatureSchema`. The trainer
  (golden_training/train_dlrm.py) wraps it in ``DLRMTrain`` and shards it; :class:`LogisticRegression`
  is its baseline on the same features.
- :class:`TorchRecDLRM`: the same network unsharded, with the checkpoint's key names, returning
  logits ``[B]`` (prediction/ loads every checkpoint into it).
- :class:`DLRMServing` and :class:`DLRMByUser`: the same network behind plain tensors, per row and
  per user, with :func:`quantize`'d tables (inference_legacy/ exports both).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from typing import Any

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, KeyedJaggedTensor
from torchrec.inference.modules import quantize_embeddings
from torchrec.models.dlrm import DLRM, DLRM_DCN, InteractionArch
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection
from torchrec.quant.embedding_modules import quant_prep_customize_row_alignment

from common.features import FeatureSchema

PRECISIONS = {"int8": torch.qint8, "int4": torch.quint4x2, "fp16": torch.float16, "none": None}
INTERACTIONS = ("dot", "dcn")


def add_model_args(p: argparse.ArgumentParser, d: Any) -> argparse._ArgumentGroup:
    """The DLRM's flags (a "model" group), with the script's ``Config()`` defaults; check the parsed
    config with :func:`check_model_args`."""
    model = p.add_argument_group("model")
    model.add_argument("--embedding-dim", type=int, default=d.embedding_dim, help="every table's dimension")
    model.add_argument("--dense-arch", type=int, nargs="+", default=list(d.dense_arch), help="dense MLP sizes")
    model.add_argument("--over-arch", type=int, nargs="+", default=list(d.over_arch), help="over-arch MLP sizes")
    model.add_argument("--interaction", default=d.interaction, choices=INTERACTIONS, help="DLRM (dot) or DCNv2")
    return model


def check_model_args(p: argparse.ArgumentParser, cfg: Any) -> None:
    if cfg.dense_arch[-1] != cfg.embedding_dim or cfg.over_arch[-1] != 1:
        p.error(f"--dense-arch must end in --embedding-dim ({cfg.embedding_dim}) and --over-arch in 1")


def dlrm(
    schema: FeatureSchema,
    embedding_dim: int,
    dense_arch: list[int] | tuple[int, ...],
    over_arch: list[int] | tuple[int, ...],
    interaction: str = "dot",
    device: torch.device | None = None,
) -> DLRM:
    """TorchRec's DLRM (``interaction="dot"``) or DLRM_DCN (``"dcn"``: 2 cross layers of rank 16) for
    ``schema``: every table ``embedding_dim`` wide (DLRM needs one width), the dense MLP ending in
    ``embedding_dim``, the over-arch ending in 1 (a logit). ``device="meta"`` defers the tables'
    memory to whoever shards them."""
    if interaction not in INTERACTIONS:
        raise ValueError(f"interaction must be one of {INTERACTIONS}, got {interaction!r}")
    ebc = EmbeddingBagCollection(tables=schema.embedding_bag_configs(embedding_dim), device=device)
    kw = dict(
        embedding_bag_collection=ebc,
        dense_in_features=len(schema.dense),
        dense_arch_layer_sizes=list(dense_arch),
        over_arch_layer_sizes=list(over_arch),
    )
    return DLRM_DCN(**kw, dcn_num_layers=2, dcn_low_rank_dim=16) if interaction == "dcn" else DLRM(**kw)


class LogisticRegression(nn.Module):
    """A linear model on the same features: one weight per ID (the sum of a 4-wide embedding row,
    since FBGEMM's kernels need dims divisible by 4) plus a linear layer on the dense features."""

    def __init__(self, schema: FeatureSchema, device: torch.device | None = None) -> None:
        super().__init__()
        self.embedding_bag_collection = EmbeddingBagCollection(tables=schema.embedding_bag_configs(4), device=device)
        self.feature_names = schema.sparse_names
        self.dense = nn.Linear(len(schema.dense), 1)

    def forward(self, dense_features: torch.Tensor, sparse_features) -> torch.Tensor:
        pooled = self.embedding_bag_collection(sparse_features).to_dict()
        return sum(pooled[f].sum(dim=1, keepdim=True) for f in self.feature_names) + self.dense(dense_features)


class TorchRecDLRM(nn.Module):
    """:func:`dlrm` unsharded; ``forward`` returns logits ``[B]``."""

    def __init__(
        self,
        schema: FeatureSchema,
        embedding_dim: int,
        dense_arch: list[int],
        over_arch: list[int],
        interaction: str = "dot",
    ) -> None:
        super().__init__()
        # Same attribute name as DLRMTrain's, so checkpoint keys ("model.sparse_arch...") match.
        self.model = dlrm(schema, embedding_dim, dense_arch, over_arch, interaction)

    def forward(self, dense_features: torch.Tensor, sparse_features) -> torch.Tensor:
        return self.model(dense_features, sparse_features).reshape(-1)


class DLRMServing(nn.Module):
    """(dense, values, lengths) -> click probability: a DLRM behind plain tensors, so the
    exported program needs no TorchRec types at its boundary."""

    def __init__(self, dlrm: nn.Module, keys: list[str]) -> None:
        super().__init__()
        self.dlrm = dlrm
        self.keys = list(keys)

    def forward(self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=self.keys, values=values, lengths=lengths)
        return torch.sigmoid(self.dlrm(dense, kjt))


class DLRMByUser(nn.Module):
    """The same DLRM for many candidates per user: the user-side features (ID, demographics,
    history) are looked up and pooled once per user, not once per candidate row, then gathered to
    the rows. Its own two embedding modules, one per side, hold the tables each side reads (a table
    both read, the item table for item_id and history, is in both), quantized like
    :func:`quantize`'s from the same fp32 weights. Inputs as ``inference_legacy.artifact.by_user_inputs``
    makes them; the same output as :class:`DLRMServing` on the rows they came from (up to float
    summation order).

    DLRM's dot interaction (all pairwise dot products of the dense output and the feature embeddings,
    36 for 8 features) is split the same way: the pairs of two user-side features (15 of 36 on
    MovieLens) once per user, a row's other pairs as the dot products of each of its own vectors (dense
    output, item ID, genres) with all of its vectors: 3 x 9 entries where TorchRec's batched matrix
    product computes all 9 x 9, and written as products summed over the embedding dimension, which the
    compiler fuses into one loop, and which stays fast exported too (the timings of each form are in
    inference_legacy/README.md). DLRM_DCN's cross network keeps TorchRec's forward."""

    def __init__(self, dlrm: TorchRecDLRM, schema: FeatureSchema, user_features: list[str], precision: str) -> None:
        super().__init__()
        m = dlrm.model
        ebc = m.sparse_arch.embedding_bag_collection
        self.user_keys = [n for n in schema.sparse_names if n in user_features]
        self.row_keys = [n for n in schema.sparse_names if n not in user_features]
        sides = nn.Module()
        sides.users, sides.rows = _side(ebc, self.user_keys), _side(ebc, self.row_keys)
        sides = quantize(sides, precision)
        self.users, self.rows = sides.users, sides.rows
        self.dense_arch, self.inter_arch, self.over_arch = m.dense_arch, m.inter_arch, m.over_arch
        self.order = list(m.sparse_arch.sparse_feature_names)
        self.dot = type(m.inter_arch) is InteractionArch
        if self.dot:
            # TorchRec's pairs (i < j) over a row's vectors [dense output, features in self.order]: a pair
            # of two user features read from the users' [U, nu x nu] products, any other from the rows'
            # [B, own x n] products of their own vectors with all n
            n = len(self.order) + 1
            user_at = {1 + f: k for k, f in enumerate(i for i, name in enumerate(self.order) if name in user_features)}
            own = [i for i in range(n) if i not in user_at]
            pairs = [tuple(p) for p in torch.triu_indices(n, n, offset=1).T.tolist()]
            by_user = [(i, j) for i, j in pairs if i in user_at and j in user_at]
            by_row = [(i, j) for i, j in pairs if i in own or j in own]
            self.own = own
            for name, values in (
                ("user_pairs", [user_at[i] * len(user_at) + user_at[j] for i, j in by_user]),
                # (own vector, other vector) of each row pair: i when it is the row's own, else j
                ("row_pairs", [own.index(i) * n + j if i in own else own.index(j) * n + i for i, j in by_row]),
                ("unpermute", [(by_user + by_row).index(p) for p in pairs]),  # back to TorchRec's order
            ):
                self.register_buffer(name, torch.tensor(values, dtype=torch.int64), persistent=False)

    def forward(
        self,
        dense: torch.Tensor,
        row_user: torch.Tensor,
        user_values: torch.Tensor,
        user_lengths: torch.Tensor,
        values: torch.Tensor,
        lengths: torch.Tensor,
    ) -> torch.Tensor:
        # TorchRec DLRM's forward (DLRM_DCN's too), with the lookups split by side
        per_row = self.rows(KeyedJaggedTensor.from_lengths_sync(self.row_keys, values, lengths)).to_dict()
        per_user = self.users(KeyedJaggedTensor.from_lengths_sync(self.user_keys, user_values, user_lengths)).to_dict()
        sparse = torch.stack(
            [per_user[n].index_select(0, row_user) if n in per_user else per_row[n] for n in self.order], dim=1
        )
        d = self.dense_arch(dense)
        if not self.dot:
            return torch.sigmoid(self.over_arch(self.inter_arch(dense_features=d, sparse_features=sparse)).reshape(-1))
        users = torch.stack([per_user[n] for n in self.order if n in per_user], dim=1)
        vectors = torch.cat([d.unsqueeze(1), sparse], dim=1)
        user_dots = torch.bmm(users, users.transpose(1, 2)).flatten(1)[:, self.user_pairs].index_select(0, row_user)
        row_dots = torch.stack([(vectors * vectors[:, i : i + 1]).sum(-1) for i in self.own], 1)
        row_dots = row_dots.flatten(1)[:, self.row_pairs]
        dots = torch.cat([user_dots, row_dots], dim=1)[:, self.unpermute]
        return torch.sigmoid(self.over_arch(torch.cat([d, dots], dim=1)).reshape(-1))


def _side(ebc: EmbeddingBagCollection, features: list[str]) -> EmbeddingBagCollection:
    """An fp32 EmbeddingBagCollection of ``ebc``'s tables that ``features`` read, sharing its weights."""
    configs = []
    for c in ebc.embedding_bag_configs():
        mine = [f for f in c.feature_names if f in features]
        if mine:
            configs.append(dataclasses.replace(c, feature_names=mine))
    side = EmbeddingBagCollection(tables=configs, device=torch.device("meta"))
    for c in configs:
        side.embedding_bags[c.name].weight = ebc.embedding_bags[c.name].weight
    return side


def quantize(dlrm: nn.Module, precision: str) -> nn.Module:
    """A quantized copy (``precision="none"`` keeps fp32). FBGEMM's CPU kernels take rows padded to 4
    bytes; TorchRec's default 16-byte alignment would pad INT8 rows of dim 64 (plus scale and bias) further."""
    model = copy.deepcopy(dlrm)
    if PRECISIONS[precision] is None:
        return model
    quant_prep_customize_row_alignment(model, [EmbeddingBagCollection], 4)
    model = quantize_embeddings(model, dtype=PRECISIONS[precision], inplace=True)
    for qebc in model.modules():
        if isinstance(qebc, QuantEmbeddingBagCollection):
            # The per-table ``weight`` buffers are views of FBGEMM's packed tables, kept for
            # state_dict(). The forward reads the packed tables, which export captures as
            # constants: without this the artifact would hold every table twice.
            for table in qebc.embedding_bags.values():
                for name in ("weight", "weight_qscale", "weight_qbias"):
                    table._buffers.pop(name, None)
    return model
