"""Every candidate source of the project, behind one interface.

A source proposes items for users from their histories (dense data set indices, oldest first):

    source.scores(users, histories)     # [B, num_items]: higher is better, every item scored
    source.top_k(users, histories, k)   # ([B, k] items, [B, k] scores): best first, seen items out

Seen items are left out of the lists unless the source was made with ``repeats=True`` (a data set
where coming back to an item is a valid target, common/data/split.py): then histories are only
inputs, and a source may propose what the user had before.

- :class:`TwoTowerSource`: the two-tower's query tower and FAISS index (retrieval/two_tower_retrieval.py);
- :class:`SequenceSource`: SASRec's or BERT4Rec's next-item scores (their exports);
- :class:`ItemItemSource`: EASE or the item-to-item transitions (retrieval/item_item.py);
- :class:`PopularitySource`: the most interacted-with items;
- ``candidates.again.AgainSource``: each user's own earlier items by recency-weighted frequency (repeats only);
- :class:`EnsembleSource`: the weighted reciprocal ranks of other sources (integration/ensemble.py
  fits the weights);
- :func:`union`: several sources' lists merged.

:class:`RetrievalScorer` is the two-tower export as the ranker's training sees it: fp32 queries for
every training example at its own time, and the same top k (exact, or the export's approximate index
as serving searches it). Every top k goes through :func:`common.metrics.top_unseen`, the protocol's
one ranking rule. The stages below (retrieval/, bert4rec/, sasrec/) never import this room; the
ranker (golden_training/) and the pipeline (integration/) do.
"""

from __future__ import annotations

import dataclasses
from itertools import zip_longest
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from common.data.dataset import id_key
from common.data.tables import FeatureTables, last_n
from common.metrics import stable_order, top_unseen

SEQUENCE_SOURCES = {"sasrec": "SASRec", "bert4rec": "BERT4Rec"}  # export's model -> source name
# Reciprocal rank fusion: a source's item of rank r (0: its best) adds w / (RANK_OFFSET + r).
RANK_OFFSET = 10


class CandidateSource(Protocol):
    """What the pipeline, the ensemble and the ranker's training ask of a source."""

    name: str
    repeats: bool

    def scores(self, users: np.ndarray, histories: list[np.ndarray]) -> np.ndarray: ...

    def top_k(self, users: np.ndarray, histories: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]: ...


def excluded(histories: list[np.ndarray], repeats: bool) -> list[np.ndarray] | None:
    """What a source leaves out of its lists: the histories, or nothing where repeats are valid."""
    return None if repeats else histories


def check_trained_on(what: str, export_dir: str | Path, fingerprint: str, here: str) -> None:
    """Refuse an export trained on other data than the data set in use (by fingerprint)."""
    if fingerprint != here:
        raise ValueError(
            f"{export_dir} ({what}) was trained on other data (fingerprint {fingerprint[:16]}, here "
            f"{here[:16]}); retrain it on this data set"
        )


class TwoTowerSource:
    """Candidates from the two-tower model's FAISS index."""

    name = "two-tower"

    def __init__(
        self, retriever, item_embeddings: np.ndarray, repeats: bool = False, queries: np.ndarray | None = None
    ) -> None:
        self.retriever = retriever  # retrieval.two_tower_retrieval.Retriever
        self.item_embeddings = item_embeddings  # the candidate tower's item vectors (the FAISS index's)
        self.repeats = repeats
        self.queries = queries  # set by with_queries: these users' query embeddings, computed already

    @property
    def ranks_its_scores(self) -> bool:
        """With an exact index, the index's top k is the top k of :meth:`scores` (the same products, up
        to float rounding: NumPy's and torch's kernels may differ in the last bit), so a caller that has
        the scores ranks them (:func:`top_k_of`) instead of running the query tower and the search
        again; an approximate index proposes what it finds, which only its search says."""
        return getattr(self.retriever, "item_vectors", None) is not None

    def with_queries(self, queries: np.ndarray) -> TwoTowerSource:
        """This source for one call's users, whose query embeddings ``[B, dim]`` are already computed
        (the pipeline needs them for several features of a request: one query tower run, not three)."""
        return TwoTowerSource(self.retriever, self.item_embeddings, self.repeats, queries)

    def top_k(self, users: np.ndarray, histories: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.queries is not None:
            hists = None if self.repeats else histories
            return self.retriever.search_unseen(self._queries(users), k, hists)
        return self.retriever.top_k_indices(users, k, exclude_seen=not self.repeats, histories=histories)

    def scores(self, users: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
        """The dot product of each user's query with every item ``[B, num_items]`` (exact, no index)."""
        q = self._queries(users) if self.queries is not None else self.retriever.query_embeddings(users, histories)
        return q @ self.item_embeddings.T

    def _queries(self, users: np.ndarray) -> np.ndarray:
        if len(self.queries) != len(users):
            raise ValueError(f"this two-tower source holds {len(self.queries)} queries, asked for {len(users)} users")
        return self.queries


class SequenceSource:
    """Candidates from a sequential model's next-item scores over the whole catalog (seen items
    excluded): SASRec or BERT4Rec, from its export's scorer (bert4rec's NextItemScorer)."""

    ranks_its_scores = True  # top_k is top_unseen of scores: see top_k_of

    def __init__(self, scorer, item_raw_ids: np.ndarray, repeats: bool = False) -> None:
        self.scorer, self.raw, self.repeats = scorer, np.asarray(item_raw_ids), repeats
        self.name = SEQUENCE_SOURCES[scorer.name]
        self.order = np.array([scorer.index_of[id_key(i)] for i in self.raw])  # data set index -> scorer index
        # trained on this data set, the scorer's indices are the data set's: no reordering copy per call
        self.same_order = bool(np.array_equal(self.order, np.arange(len(self.order))))

    @classmethod
    def load(cls, export_dir: str | Path, ds, compiled: bool = True) -> SequenceSource:
        """A sequential export (sasrec/, bert4rec/) for data set ``ds``, checked against it."""
        from bert4rec.scorer import NextItemScorer

        scorer = NextItemScorer(export_dir, compiled)
        check_trained_on(f"{scorer.name} export", export_dir, scorer.data_fingerprint, ds.fingerprint)
        return cls(scorer, ds.item_raw_ids, ds.repeats)

    def scores(self, users: np.ndarray | None, histories: list[np.ndarray]) -> np.ndarray:
        """Next-item scores of every item ``[B, num_items]`` (data set indices)."""
        if self.same_order:
            return self.scorer.score_indices(histories)
        return self.scorer.score_indices([self.order[h] for h in histories])[:, self.order]

    def top_k(self, users: np.ndarray | None, histories: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
        return top_unseen(self.scores(users, histories), excluded(histories, self.repeats), k)


class ItemItemSource:
    """One of an item-to-item export's sources (EASE or transitions; retrieval.item_item.ItemItem):
    ``scores`` of the whole catalog ``[B, num_items]`` from each user's history alone."""

    ranks_its_scores = True

    def __init__(self, name: str, export, repeats: bool = False) -> None:
        if name not in export.names:
            raise ValueError(f"item-to-item source {name!r}: the export has {export.names}")
        self.name, self.export, self.repeats = name, export, repeats

    def scores(self, users: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
        return self.export.scores(self.name, histories)

    def top_k(self, users: np.ndarray, histories: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
        return top_unseen(self.scores(users, histories), excluded(histories, self.repeats), k)


class PopularitySource:
    """The most interacted-with items, the same for everyone but each user's seen ones (kept with
    repeats)."""

    name = "popularity"
    ranks_its_scores = True

    def __init__(self, item_counts: np.ndarray, repeats: bool = False) -> None:
        self.counts = np.asarray(item_counts, dtype=np.float64)
        self.repeats = repeats

    def scores(self, users: np.ndarray | None, histories: list[np.ndarray]) -> np.ndarray:
        return np.tile(self.counts, (len(histories), 1))

    def top_k(self, users: np.ndarray | None, histories: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
        parts = [
            top_unseen(
                self.scores(None, histories[lo : lo + 1024]), excluded(histories[lo : lo + 1024], self.repeats), k
            )
            for lo in range(0, len(histories), 1024)
        ]
        if not parts:
            return np.zeros((0, min(k, len(self.counts))), np.int64), np.zeros((0, min(k, len(self.counts))))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def top_k_of(
    src: CandidateSource, scores: np.ndarray, users: np.ndarray, histories: list[np.ndarray], k: int
) -> np.ndarray:
    """``src.top_k(users, histories, k)``'s items, from ``scores`` (``src.scores(users, histories)``)
    where a source's top k is the protocol's ranking of its scores (``ranks_its_scores``: every
    source but a two-tower with an approximate index, which searches it), so a caller that needs both
    scores once."""
    if getattr(src, "ranks_its_scores", False):
        hidden = excluded(histories, src.repeats)  # top_unseen writes -inf over these in place: on a copy
        return top_unseen(scores if hidden is None else np.array(scores, copy=True), hidden, k)[0]
    return src.top_k(users, histories, k)[0]


def unseen_mask(shape: tuple[int, int], histories: list[np.ndarray] | None) -> np.ndarray:
    mask = np.ones(shape, dtype=bool)
    for r, h in enumerate(histories or []):
        mask[r, h] = False
    return mask


def order_and_ranks(scores: np.ndarray, unseen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's items in the protocol's order of the unseen ones (ties: the lower index first, as
    everywhere; seen items after every unseen one), and each item's 0-based place in it, ``[B, N]``
    both."""
    order = stable_order(scores if unseen.all() else np.where(unseen, scores, -np.inf))
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(order.shape[1]), order.shape), axis=1)
    return order, rank


def reciprocal_ranks(scores: np.ndarray, unseen: np.ndarray, offset: float = RANK_OFFSET) -> np.ndarray:
    """``1 / (offset + rank)`` per item, its rank the place in :func:`order_and_ranks`' order."""
    return 1.0 / (offset + order_and_ranks(scores, unseen)[1])


class EnsembleSource:
    """Candidates by the weighted sum of the member sources' reciprocal ranks."""

    name = "ensemble"

    def __init__(self, sources: list[CandidateSource], weights: dict[str, float]) -> None:
        names = [src.name for src in sources]
        self.repeats = any(getattr(src, "repeats", False) for src in sources)  # a source without the flag: False
        unknown = [n for n in weights if n not in names]
        if unknown:
            raise ValueError(f"ensemble weights name sources {unknown} the pipeline does not have ({names})")
        self.weights = {n: float(w) for n, w in weights.items()}
        self.members = [(src, self.weights[src.name]) for src in sources if self.weights.get(src.name, 0.0) > 0]
        if not self.members:
            raise ValueError(f"ensemble weights {weights}: at least one must be positive")

    def scores(self, users: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
        unseen = None
        total = None
        for src, w in self.members:
            s = src.scores(users, histories)
            unseen = unseen_mask(s.shape, excluded(histories, self.repeats)) if unseen is None else unseen
            z = w * reciprocal_ranks(s, unseen)
            total = z if total is None else total + z
        return total

    def top_k(self, users: np.ndarray, histories: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
        return top_unseen(self.scores(users, histories), excluded(histories, self.repeats), k)


def union(lists: list[np.ndarray], interleave: bool = False) -> np.ndarray:
    """Per row, the items of every list once (-1 padding dropped): concatenated in list order, or
    taken in turn from each list (``interleave``). Padded with -1 to the longest row."""
    rows = []
    for r in range(lists[0].shape[0]):
        parts = [x[r][x[r] >= 0].tolist() for x in lists]
        order = (
            [i for group in zip_longest(*parts) for i in group if i is not None]
            if interleave
            else [i for part in parts for i in part]
        )
        rows.append(list(dict.fromkeys(order)))
    out = np.full((len(rows), max((len(r) for r in rows), default=0)), -1, dtype=np.int64)
    for r, row in enumerate(rows):
        out[r, : len(row)] = row
    return out


class RetrievalScorer:
    """The two-tower export as the ranker's training reads it: query embeddings from the exported
    query tower (fp32) for any user and history, and the catalog's item embeddings."""

    name = "retrieval"

    def __init__(self, export_dir: str, fingerprint: str, features: FeatureTables) -> None:
        from retrieval.modules.feature_processor import TwoTowerFeatures
        from retrieval.two_tower_retrieval import load_query_tower, read_manifest

        manifest = read_manifest(export_dir)
        check_trained_on("two-tower export", export_dir, manifest["data_fingerprint"], fingerprint)
        self.tower = load_query_tower(export_dir, manifest, quantize="none")
        self.items = np.load(Path(export_dir) / "item_embeddings.npy")
        self.index = None  # the export's approximate index, if it has one (see serving_top_k)
        if manifest["index"]["type"] != "flat":
            import faiss

            from retrieval.modules.index import set_search_params

            self.index = faiss.read_index(str(Path(export_dir) / "index.faiss"))
            set_search_params(self.index, manifest["index"]["params"])
        shared = {f.name: getattr(features, f.name) for f in dataclasses.fields(FeatureTables) if f.init}
        self.tt = TwoTowerFeatures(**shared, history_len=manifest["config"]["history_len"])

    @torch.no_grad()
    def queries(self, users: np.ndarray, hist_items: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        out = []
        for lo in range(0, len(users), 4096):
            sl = slice(lo, lo + 4096)
            hist = last_n(hist_items, starts[sl], ends[sl], self.tt.history_len)
            out.append(self.tower(self.tt.query_batch(users[sl], hist).sparse).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.items.shape[1]), np.float32)

    def top_k(self, queries: np.ndarray, exclude: list[np.ndarray] | None, k: int = 100) -> np.ndarray:
        """The ``k`` best items per query, best first (ties by lower index), ``exclude``'d items left
        out (None: none); in chunks of about 0.5 GB of scores."""
        chunk = max(64, min(4096, (1 << 27) // max(1, len(self.items))))
        parts = [
            top_unseen(
                queries[lo : lo + chunk] @ self.items.T, None if exclude is None else exclude[lo : lo + chunk], k
            )[0]
            for lo in range(0, len(queries), chunk)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, min(k, len(self.items))), np.int64)

    def serving_top_k(self, queries: np.ndarray, exclude: list[np.ndarray], k: int = 100) -> np.ndarray:
        """The ``k`` candidates serving retrieves for each query, ``exclude``'d items left out: the
        export's FAISS index when it is approximate (IVF, for large catalogs), else :meth:`top_k`.
        The hard negatives come from here: they are what the ranker re-ranks in production, and an
        IVF search costs a fraction of the exact scan over a large catalog. Rows the index returns
        too few items for fall back to the exact top k."""
        if self.index is None:
            return self.top_k(queries, exclude, k)
        extra = max((len(e) for e in exclude), default=0)
        _, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k + extra, len(self.items)))
        out = np.empty((len(queries), k), dtype=np.int64)
        short = []
        for r, seen in enumerate(exclude):
            row = ids[r][(ids[r] >= 0) & ~np.isin(ids[r], seen)][:k]
            if len(row) < k:
                short.append(r)
            else:
                out[r] = row
        if short:
            out[short] = self.top_k(queries[short], [exclude[r] for r in short], k)
        return out
