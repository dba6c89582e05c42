"""SASRec (Kang & McAuley, ICDM 2018): a causal transformer over a user's item sequence, here
trained with full cross-entropy over the catalog at every position (Klenitskiy & Vasilev,
RecSys 2023) instead of the paper's one sampled negative, with the item embedding in a TorchRec
``EmbeddingCollection``.

Tokens: item index ``i`` is token ``i + 1``; 0 is unused and ``num_items + 1`` is [BOS], the
start of a window. A window of items ``w`` is the input ``[BOS] + w[:-1]``, and position ``t``
predicts ``w[t]`` having seen only ``w[:t]`` (the causal mask). To predict a user's next item,
feed ``[BOS]`` plus the last ``max_len - 1`` items and read the scores at the last position; an
empty history is ``[BOS]`` alone, the model's unconditional (popularity-like) guess.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor

from bert4rec.sequences import FEATURE, Positions, sequences_kjt


class SASRec(nn.Module):
    def __init__(
        self,
        num_items: int,
        max_len: int,
        dim: int,
        num_layers: int,
        num_heads: int,
        dropout: float,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.num_items, self.max_len = num_items, max_len
        self.bos_token = num_items + 1
        self.item_embedding = EmbeddingCollection(
            tables=[
                EmbeddingConfig(name="item", embedding_dim=dim, num_embeddings=num_items + 2, feature_names=[FEATURE])
            ],
            device=device,
        )
        self.position = Positions(max_len, dim, device=device)
        self.input_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(
            dim, num_heads, 4 * dim, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        layer.self_attn.dropout = 0.0  # as in BERT4Rec: attention-weight dropout costs much on CPU
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(dim)
        # Scores are the output state's dot product with the item's own embedding (tied, as in
        # SASRec) plus a per-item bias; the catalog's rows come from the same (sharded) table.
        self.bias = nn.Parameter(torch.zeros(num_items, device=device))
        self.catalog = torch.arange(1, num_items + 1)
        self._items: torch.Tensor | None = None

    def reset_parameters(self) -> None:
        """What DistributedModelParallel calls when it materializes this module's own parameters."""
        nn.init.zeros_(self.bias)

    def hidden(self, seq: KeyedJaggedTensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """[batch, longest sequence, dim] causal states: position t has seen tokens 0..t only.
        Sequences are left-aligned, so padding comes after every real token and the causal mask
        alone keeps it out of every real position. Also looks up every item's row (one more
        sequence in the same lookup, so one fused update per step) for ``head``, or only the rows
        of ``items`` (item indices) for :meth:`sampled_logits`."""
        catalog = self.catalog if items is None else items + 1
        n = len(catalog)
        values, lengths = seq.values(), seq.lengths()
        both = KeyedJaggedTensor.from_lengths_sync(
            keys=[FEATURE],
            values=torch.cat([values, catalog.to(values.device)]),
            lengths=torch.cat([lengths, torch.tensor([n], dtype=lengths.dtype, device=lengths.device)]),
        )
        emb = self.item_embedding(both)[FEATURE].values()
        self._items = emb[-n:]
        width = max(int(lengths.max()), 1) if lengths.numel() else 1
        x = torch.ops.fbgemm.jagged_to_padded_dense(
            emb[:-n], [torch.ops.fbgemm.asynchronous_complete_cumsum(lengths)], [width], 0.0
        )
        return self.encode(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``[batch, width, dim]`` (left-aligned, padded after) -> causal states."""
        width = x.shape[1]
        x = self.dropout(self.input_norm(x + self.position.weight[None, :width]))
        causal = nn.Transformer.generate_square_subsequent_mask(width, device=x.device, dtype=x.dtype)
        return self.final_norm(self.encoder(x, mask=causal, is_causal=True))

    def padded_scores(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """:meth:`last_scores` from tokens padded to ``[batch, width]``: the form torch.export and
        AOTInductor compile (no shape depends on the data; see ``inference_legacy.aot_compile.compile_scorer``)."""
        weight = self.item_embedding.embeddings["item"].weight
        h = self.encode(F.embedding(tokens, weight))
        last = h[torch.arange(h.shape[0], device=h.device), (lengths - 1).clamp(min=0)]
        return last @ weight[1 : self.num_items + 1].T + self.bias

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Scores of every item for output states ``h`` of the last ``hidden`` call."""
        return h @ self._items.T + self.bias

    def sampled_logits(
        self, h: torch.Tensor, labels: torch.Tensor, negatives: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each state's score of its label ``[P]`` and of every negative ``[P, m]``, after a
        ``hidden(seq, cat([labels, negatives]))`` call (its looked-up rows, in that order)."""
        rows = self._items
        pos = (h * rows[: len(labels)]).sum(-1) + self.bias[labels]
        return pos, h @ rows[len(labels) :].T + self.bias[negatives]

    def last_scores(self, seq: KeyedJaggedTensor) -> torch.Tensor:
        """[batch, num_items] next-item scores at each sequence's last position."""
        h = self.hidden(seq)
        last = (seq.lengths() - 1).clamp(min=0)
        return self.head(h[torch.arange(h.shape[0], device=h.device), last])

    def query_sequences(self, histories: list[np.ndarray]) -> list[np.ndarray]:
        """Each history of item indices as tokens: [BOS] plus its last ``max_len - 1`` items."""
        keep = self.max_len - 1
        return [
            np.r_[self.bos_token, np.asarray(h[len(h) - keep :] if len(h) > keep else h, dtype=np.int64) + 1]
            for h in histories
        ]


def shift_batch(
    windows: list[np.ndarray], bos_token: int
) -> tuple[KeyedJaggedTensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-item prediction at every position of each window of tokens: the input is
    ``[BOS] + w[:-1]``, the labels are ``w``'s items. Returns the KJT, every (sequence, position)
    and its label."""
    inputs = [np.r_[bos_token, w[:-1]] for w in windows]
    lengths = np.array([len(w) for w in windows])
    rows = np.repeat(np.arange(len(windows)), lengths)
    cols = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    labels = np.concatenate(windows).astype(np.int64) - 1
    return sequences_kjt(inputs), torch.from_numpy(rows), torch.from_numpy(cols), torch.from_numpy(labels)
