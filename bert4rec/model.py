"""BERT4Rec (Sun et al., CIKM 2019): a bidirectional transformer over a user's item sequence,
trained to recover masked items, with the item embedding in a TorchRec ``EmbeddingCollection``.

Tokens: item index ``i`` is token ``i + 1``; 0 is padding and ``num_items + 1`` is [MASK].
Sequences are left-aligned (position 0 is the oldest item kept) and at most ``max_len`` long.
To predict a user's next item, append [MASK] to their history and read the scores there.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor

from bert4rec.sequences import FEATURE, Positions, sequences_kjt


class BERT4Rec(nn.Module):
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
        self.mask_token = num_items + 1
        self.item_embedding = EmbeddingCollection(
            tables=[
                EmbeddingConfig(name="item", embedding_dim=dim, num_embeddings=num_items + 2, feature_names=[FEATURE])
            ],
            device=device,
        )
        # BERT's init: N(0, 0.02). nn.Embedding's default N(0, 1) would drown the item embedding
        # (TorchRec initializes it uniformly in +-1/sqrt(rows), about 0.02 here) after the sum.
        self.position = Positions(max_len, dim, device=device)
        self.input_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(
            dim, num_heads, 4 * dim, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        # No dropout on the attention weights: on CPU, drawing a [batch, heads, len, len] mask
        # in every layer took half of the forward time. Hidden states keep their dropout.
        layer.self_attn.dropout = 0.0
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_items)  # scores for real items only (not padding or [MASK])

    def hidden(self, seq: KeyedJaggedTensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """[batch, longest sequence, dim] contextual states; positions past a sequence's end are
        padding. Padding only to the batch's longest sequence saves most of the compute on
        MovieLens, where most histories are far shorter than ``max_len``. (``items``: SASRec's
        rows to look up; the head here is a dense layer, indexed by :meth:`sampled_logits`.)"""
        jt = self.item_embedding(seq)[FEATURE]
        lengths = jt.lengths()
        width = max(int(lengths.max()), 1) if lengths.numel() else 1
        return self.encode(jt.to_padded_dense(width), lengths)

    def encode(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``[batch, width, dim]`` (left-aligned; rows past ``lengths`` are padding,
        masked out of attention) -> contextual states."""
        width = x.shape[1]
        pad = torch.arange(width, device=x.device)[None, :] >= lengths[:, None]
        x = self.dropout(self.input_norm(x + self.position.weight[None, :width]))
        return self.final_norm(self.encoder(x, src_key_padding_mask=pad))

    def padded_scores(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """:meth:`last_scores` from tokens padded to ``[batch, width]``: the form torch.export and
        AOTInductor compile (no shape depends on the data; see ``inference_legacy.aot_compile.compile_scorer``)."""
        h = self.encode(F.embedding(tokens, self.item_embedding.embeddings["item"].weight), lengths)
        return self.head(h[torch.arange(h.shape[0], device=h.device), (lengths - 1).clamp(min=0)])

    def sampled_logits(
        self, h: torch.Tensor, labels: torch.Tensor, negatives: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each state's score of its label ``[P]`` and of every negative ``[P, m]``."""
        w, b = self.head.weight, self.head.bias
        return (h * w[labels]).sum(-1) + b[labels], h @ w[negatives].T + b[negatives]

    def last_scores(self, seq: KeyedJaggedTensor) -> torch.Tensor:
        """[batch, num_items] scores at each sequence's last position (the appended [MASK])."""
        h = self.hidden(seq)
        last = (seq.lengths() - 1).clamp(min=0)
        return self.head(h[torch.arange(h.shape[0], device=h.device), last])

    def query_sequences(self, histories: list[np.ndarray]) -> list[np.ndarray]:
        """Each history of item indices as tokens, its last ``max_len - 1`` items plus [MASK]. An
        empty history is [MASK] alone: the model then scores from position alone (close to
        popularity)."""
        keep = self.max_len - 1
        return [
            np.append(np.asarray(h[len(h) - keep :] if len(h) > keep else h, dtype=np.int64) + 1, self.mask_token)
            for h in histories
        ]


def mask_batch(
    seqs: list[np.ndarray], mask_prob: float, last_prob: float, mask_token: int, rng: np.random.Generator
) -> tuple[KeyedJaggedTensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """BERT4Rec's cloze task on token sequences: each token is replaced by [MASK] with
    probability ``mask_prob`` (at least one per sequence); with probability ``last_prob`` a
    sequence has only its last token masked, as at prediction time. Returns the KJT, the masked
    positions as (sequence, position) index tensors, and their item labels."""
    masked, rows, cols, labels = [], [], [], []
    for b, s in enumerate(seqs):
        if rng.random() < last_prob:
            m = np.zeros(len(s), dtype=bool)
            m[-1] = True
        else:
            m = rng.random(len(s)) < mask_prob
            if not m.any():
                m[rng.integers(len(s))] = True
        idx = np.flatnonzero(m)
        rows.append(np.full(len(idx), b))
        cols.append(idx)
        labels.append(s[idx] - 1)
        masked.append(np.where(m, mask_token, s))
    return (
        sequences_kjt(masked),
        torch.from_numpy(np.concatenate(rows)),
        torch.from_numpy(np.concatenate(cols)),
        torch.from_numpy(np.concatenate(labels).astype(np.int64)),
    )
