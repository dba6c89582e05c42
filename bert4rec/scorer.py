"""BERT4Rec's next-item scorer, loaded from a training run's export: a candidate source for the
integration pipeline, beside (or instead of) the two-tower retriever.

    from bert4rec.scorer import NextItemScorer
    scorer = NextItemScorer("runs/bert4rec/export")
    scorer.recommend([50, 172, 133], k=10)      # raw MovieLens item IDs, oldest first

Defined behaviour for awkward histories: item IDs the model does not know are dropped and
reported; an empty history (or one with only unknown IDs) is scored from [MASK] alone, which
gives a fixed, popularity-like list; a one-item history is an ordinary sequence.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bert4rec.model import BERT4Rec, query_sequences, sequences_kjt


@dataclass
class Scored:
    scores: np.ndarray  # [histories, num_items], index order of the manifest's item_raw_ids
    unknown: list[list[int]]  # per history, the raw IDs that were dropped


class NextItemScorer:
    def __init__(self, export_dir: str | Path) -> None:
        export_dir = Path(export_dir)
        manifest_path = export_dir / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{export_dir} has no manifest.json; train first: python -m bert4rec.bert4rec_main")
        self.manifest = json.loads(manifest_path.read_text())
        cfg = self.manifest["config"]
        self.item_raw_ids = np.asarray(self.manifest["item_raw_ids"])
        self.index_of = {int(r): i for i, r in enumerate(self.item_raw_ids.tolist())}
        self.model = BERT4Rec(
            self.manifest["num_items"],
            cfg["max_len"],
            cfg["embedding_dim"],
            cfg["num_layers"],
            cfg["num_heads"],
            dropout=0.0,
            device=torch.device("cpu"),
        )
        self.model.load_state_dict(
            torch.load(export_dir / "weights.pt", map_location="cpu", weights_only=True), strict=True
        )
        self.model.eval()

    @property
    def data_fingerprint(self) -> str:
        return self.manifest["data_fingerprint"]

    @torch.no_grad()
    def score(self, histories: list[list[int]], batch_size: int = 256) -> Scored:
        """Scores of every item as each history's next one (raw IDs, oldest first)."""
        if isinstance(histories, (str, bytes)) or not isinstance(histories, (list, tuple)):
            raise TypeError("histories must be a list of lists of raw item IDs")
        known, unknown = [], []
        for h in histories:
            if not isinstance(h, (list, tuple, np.ndarray)):
                raise TypeError(f"each history must be a list of raw item IDs, got {type(h).__name__}")
            known.append(np.array([self.index_of[int(i)] for i in h if int(i) in self.index_of], dtype=np.int64))
            unknown.append([int(i) for i in h if int(i) not in self.index_of])
        seqs = query_sequences(known, self.model.max_len, self.model.mask_token)
        parts = [
            self.model.last_scores(sequences_kjt(seqs[lo : lo + batch_size])).numpy()
            for lo in range(0, len(seqs), batch_size)
        ]
        scores = np.concatenate(parts) if parts else np.zeros((0, self.model.num_items), np.float32)
        return Scored(scores, unknown)

    def recommend(self, history: list[int], k: int = 10, exclude_seen: bool = True) -> list[tuple[int, float]]:
        """The top ``k`` (raw item ID, score) for one history, its own items left out."""
        s = self.score([history]).scores[0].copy()
        if exclude_seen:
            seen = [self.index_of[int(i)] for i in history if int(i) in self.index_of]
            s[seen] = -np.inf
        top = np.argsort(-s, kind="stable")[:k]
        return [(int(self.item_raw_ids[i]), float(s[i])) for i in top]
