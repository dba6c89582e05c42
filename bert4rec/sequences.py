"""Token sequences as TorchRec input, shared by the sequential models (bert4rec/model.py,
sasrec/model.py), their training (bert4rec/bert4rec_main.py) and their scorer (bert4rec/scorer.py).

Tokens are item index + 1 (0 pads); each model adds its own special tokens above the catalog
([MASK] for BERT4Rec, [BOS] for SASRec).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torchrec import KeyedJaggedTensor

FEATURE = "item_seq"


def sequences_kjt(seqs: list[np.ndarray]) -> KeyedJaggedTensor:
    """Token sequences (already at most max_len long) as a one-feature KJT."""
    lengths = np.array([len(s) for s in seqs], dtype=np.int32)
    values = np.concatenate(seqs).astype(np.int64) if len(seqs) and lengths.sum() else np.zeros(0, np.int64)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[FEATURE], values=torch.from_numpy(values), lengths=torch.from_numpy(lengths)
    )


def padded_tokens(seqs: list[np.ndarray], min_rows: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences as ``[batch, width]`` (0 after each sequence) and their lengths, for a model's
    ``padded_scores``. At least ``min_rows`` x 2: the batch program's shapes start at 2 x 2 (export
    specializes sizes of 1), so one sequence gets a padding row, scored and dropped; the one-sequence
    program (``min_rows=1``) takes a single row."""
    width = max([2, *(len(s) for s in seqs)])
    tokens = np.zeros((max(min_rows, len(seqs)), width), dtype=np.int64)
    lengths = np.ones(len(tokens), dtype=np.int64)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)], lengths[i] = s, len(s)
    return torch.from_numpy(tokens), torch.from_numpy(lengths)


class Positions(nn.Embedding):
    """Learned position embeddings initialized N(0, 0.02) as in BERT, also when
    DistributedModelParallel materializes a model built on the meta device (it calls each
    module's ``reset_parameters``, which for ``nn.Embedding`` draws N(0, 1): about 50x the scale
    of TorchRec's item embedding init, so the input would be mostly position)."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)
