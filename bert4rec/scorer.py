"""A sequential stage's export (bert4rec/, sasrec/) as a next-item scorer: what the candidate
sources (candidates/sources.py), the ranker's training and the pipeline load.

    scorer = NextItemScorer("runs/sasrec/export")
    scorer.recommend([50, 172, 133], k=10)     # raw item IDs, oldest first -> [(item ID, score), ...]

``python -m inference_legacy.aot_compile <export>`` compiles an export's scores with AOTInductor
(``compile_scorer`` there); the scorer serves them compiled when the package checks out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bert4rec.model import BERT4Rec
from bert4rec.sequences import padded_tokens, sequences_kjt
from common.compiled import load_package
from common.data.dataset import id_key, raw_ids
from common.export import MANIFEST, ExportError, read_manifest
from common.metrics import top_unseen
from sasrec.model import SASRec

MODELS: dict[str, type[nn.Module]] = {"bert4rec": BERT4Rec, "sasrec": SASRec}  # an export's "model" -> class


def make_model(
    name: str, cfg: dict, num_items: int, device: torch.device | None = None, dropout: float | None = None
) -> nn.Module:
    return MODELS[name](
        num_items,
        cfg["max_len"],
        cfg["embedding_dim"],
        cfg["num_layers"],
        cfg["num_heads"],
        cfg["dropout"] if dropout is None else dropout,
        device=device,
    )


COMPILED_SCORER = "scorer.aoti.pt2"
COMPILED_ONE = "scorer_one.aoti.pt2"  # the same scores for one history: no padding row (aot_compile)


@dataclass
class Scored:
    scores: np.ndarray  # [histories, num_items], index order of the manifest's item_raw_ids
    unknown: list[list[int]]  # per history, the raw IDs that were dropped


class NextItemScorer:
    """A sequential stage's export (bert4rec/, sasrec/) as a next-item scorer of raw-ID histories.

    Defined behaviour for awkward histories: item IDs the model does not know are dropped and
    reported; an empty history (or one with only unknown IDs) is scored from the model's start
    token alone ([MASK] for BERT4Rec, [BOS] for SASRec), which gives a fixed, popularity-like
    list; a one-item history is an ordinary sequence.
    """

    def __init__(self, export_dir: str | Path, compiled: bool = True) -> None:
        """``compiled``: score with the export's AOTInductor package (``scorer.aoti.pt2``,
        ``python -m inference_legacy.aot_compile``) when it is there and checks out."""
        export_dir = Path(export_dir)
        self.manifest = read_manifest(
            export_dir,
            f"train first: python -m sasrec.sasrec_main (or bert4rec.bert4rec_main) --out {export_dir.parent}",
        )
        self.name = self.manifest.get("model", "bert4rec")
        if self.name not in MODELS:
            raise ExportError(f"{export_dir / MANIFEST}: model {self.name!r} is none of {sorted(MODELS)}")
        self.item_raw_ids = raw_ids(self.manifest["item_raw_ids"])
        self.index_of = {id_key(r): i for i, r in enumerate(self.item_raw_ids.tolist())}
        self.model = make_model(
            self.name, self.manifest["config"], self.manifest["num_items"], torch.device("cpu"), dropout=0.0
        )
        self.model.load_state_dict(
            torch.load(export_dir / "weights.pt", map_location="cpu", weights_only=True), strict=True
        )
        self.model.eval()
        self.export_dir, self.compiled, self.compiled_one, self.runtime = export_dir, None, None, "eager"
        if compiled:
            how = f"python -m inference_legacy.aot_compile {export_dir}"
            entry = self.manifest.get("compiled")
            self.compiled, why = load_package(
                export_dir, entry, self.token_guard, self.model.padded_scores, self.check_inputs, how
            )
            self.runtime = "AOTInductor" if self.compiled else f"eager: {why}"
            one = self.manifest.get("compiled_one")  # none in an export compiled before it: the batch program serves
            if self.compiled is not None and one:
                self.compiled_one, _ = load_package(
                    export_dir, one, self.token_guard, self.model.padded_scores, self.check_one, how
                )

    def token_guard(self, tokens: torch.Tensor, lengths: torch.Tensor) -> None:
        """What the compiled program leaves unchecked: tokens within the table, lengths within the width."""
        rows = self.model.num_items + 2
        if bool(((tokens < 0) | (tokens >= rows)).any()) or bool(((lengths < 1) | (lengths > tokens.shape[1])).any()):
            raise ValueError(f"tokens must lie in [0, {rows}) and lengths in [1, {tokens.shape[1]}]")

    def check_inputs(self, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded tokens of ``n`` seeded random histories of every length up to ``max_len`` (the
        inputs a compiled scorer is checked on against the eager model)."""
        rng = np.random.default_rng(0)
        lengths = np.linspace(0, self.model.max_len + 5, n).astype(int)
        return padded_tokens(self.model.query_sequences([rng.integers(0, self.model.num_items, k) for k in lengths]))

    def check_one(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One seeded history of the longest width (the one-sequence program's check input)."""
        rng = np.random.default_rng(0)
        return padded_tokens(self.model.query_sequences([rng.integers(0, self.model.num_items, self.model.max_len)]), 1)

    @property
    def data_fingerprint(self) -> str:
        return self.manifest["data_fingerprint"]

    @torch.no_grad()
    def score_indices(self, histories: list[np.ndarray], batch_size: int = 256) -> np.ndarray:
        """Scores ``[len(histories), num_items]`` for histories of the export's item indices."""
        seqs = self.model.query_sequences(histories)

        def scores(part: list[np.ndarray]) -> torch.Tensor:
            if self.compiled is None:
                return self.model.last_scores(sequences_kjt(part))
            if len(part) == 1 and self.compiled_one is not None:
                return self.compiled_one(*padded_tokens(part, 1))
            return self.compiled(*padded_tokens(part))[: len(part)]  # less the padding row of a lone sequence

        parts = [scores(seqs[lo : lo + batch_size]).numpy() for lo in range(0, len(seqs), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, self.model.num_items), np.float32)

    def score(self, histories: list[list[int]], batch_size: int = 256) -> Scored:
        """Scores of every item as each history's next one (raw IDs, oldest first)."""
        if isinstance(histories, (str, bytes)) or not isinstance(histories, (list, tuple)):
            raise TypeError("histories must be a list of lists of raw item IDs")
        known, unknown = [], []
        for h in histories:
            if not isinstance(h, (list, tuple, np.ndarray)):
                raise TypeError(f"each history must be a list of raw item IDs, got {type(h).__name__}")
            known.append(np.array([self.index_of[id_key(i)] for i in h if id_key(i) in self.index_of], dtype=np.int64))
            unknown.append([id_key(i) for i in h if id_key(i) not in self.index_of])
        return Scored(self.score_indices(known, batch_size), unknown)

    def recommend(self, history: list[int], k: int = 10, exclude_seen: bool | None = None) -> list[tuple[int, float]]:
        """The top ``k`` (raw item ID, score) for one history, its own items left out (``None``: unless
        the export's data set has repeats, where coming back to an item is a valid answer)."""
        if exclude_seen is None:
            exclude_seen = not self.manifest.get("repeats", False)
        seen = [self.index_of[id_key(i)] for i in history if id_key(i) in self.index_of] if exclude_seen else []
        top, scores = top_unseen(self.score([history]).scores[:1].copy(), [np.array(seen, np.int64)], k)
        return [(int(self.item_raw_ids[i]), float(s)) for i, s in zip(top[0], scores[0])]
