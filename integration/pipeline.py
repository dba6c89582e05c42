"""The two-stage recommender, wired: retrieval's candidates become the ranker's input.

    pipeline = create_pipeline("runs")          # runs/retrieval/export + runs/serving/dlrm-int8
    pipeline.recommend([196, 186])             # raw MovieLens user IDs -> top 10 each, with titles

For each user, ``RecommendationPipeline``:

1. reads the user's features and history (time-ordered item IDs) from the :class:`FeatureStore`;
2. runs the two-tower query tower and the FAISS index: the top 100 items the user has not seen;
3. enriches each candidate with its real item features (genres, year, popularity, trend), the
   user's (demographics, activity, history) and the user x item ones: the retrieval score and
   the transition probabilities from the user's last items;
4. scores the 100 rows with the packaged DLRM (``inference_legacy`` artifact);
5. returns the top 10.

It does one user or a batch (the batch path also writes every user's top K as JSON lines).
``create_pipeline`` loads the exported stages and checks that they fit together before serving
anything: data fingerprints, feature keys and cardinalities, ID maps, embedding dims, the
retrieval model the ranker's ``retrieval_score`` feature came from, and devices. Each mismatch
is an :class:`ArtifactMismatch` that says what to fix.

The feature store is built in memory from the data set the artifacts were trained on (found by
name, checked by fingerprint): per-item and per-user tables, transition counts and each user's
history up to the test interaction. ``add_interaction`` appends to a user's history, which
changes their next candidates and ranking features.
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from candidates.sources import (
    SEQUENCE_SOURCES,
    EnsembleSource,
    ItemItemSource,
    SequenceSource,
    TwoTowerSource,
    union,
)
from common.data.dataset import InteractionData, id_key
from common.data.download import file_digest
from common.data.load import load_dataset
from common.data.split import Split, split_dataset
from common.data.tables import last_n
from common.metrics import RankingReport, evaluate_topk
from common.runtime import retain_freed_memory
from golden_training.ranking_data import Examples, RankingFeatures, reference_time
from inference_legacy.dlrm_predict import DLRMPredictor
from integration.ensemble import choice_file
from retrieval.item_item import ItemItem
from retrieval.two_tower_retrieval import Retriever
from retrieval.two_tower_retrieval import read_manifest as read_retrieval_manifest

CANDIDATES = 100
MAX_HISTORY = 1000  # per user in the feature store, after events (ml-100k's longest history: 737)
# Rows per ranker call: the compiled ranker scored 256 users' 25,600 rows at once at 2,848 users/s
# and 1,600 rows at a time at 6,902 (2 threads; 1,931 and 4,436 on one): its activations stay in cache.
# The per-user program, its inputs built for the whole batch, batched recommend() on ml-100k (2 threads,
# two runs each): 512 rows a call 4,655 / 4,795 users/s, 1,024 5,061 / 5,381, 1,536 5,431 / 5,500,
# 2,048 5,389 / 5,645, 4,096 5,124 / 5,335.
RANK_CHUNK_ROWS = 2048
# Fewer users than this go through the per-row program. recommend() at 1 thread, median us a user in
# three runs, per row against per user: one user a call 1,220-1,292 / 1,294-1,316; 2 users 780-800 /
# 761-786; 4 users 552-561 / 492-496.
BY_USER_MIN_USERS = 2


class ArtifactMismatch(ValueError):
    """The exported stages don't fit together; the message says which part and what to do."""


@dataclass
class Recommendation:
    user_id: int  # raw MovieLens user ID (-1: described by features only)
    item_ids: list[int]  # raw MovieLens item IDs, best first
    scores: list[float]  # ranker probabilities; the source's own scores when not re-ranked
    titles: list[str]
    # "ranked"; "candidates" (the served system is a candidate source's own order, e.g. the
    # ensemble's); "retrieval" (no ranker for this user) or "popular" (cold start)
    stage: str = "ranked"
    candidates: int = 0  # how many candidates the ranker re-ordered (or the source returned)

    def to_dict(self) -> dict[str, object]:
        return {
            "user_id": self.user_id,
            "stage": self.stage,
            "candidates": self.candidates,
            "items": [
                {"item_id": i, "title": t, "score": round(s, 6)}
                for i, t, s in zip(self.item_ids, self.titles, self.scores)
            ],
        }


@dataclass
class FeatureStore:
    """The ranker's feature tables and every user's history, in memory; histories grow online."""

    features: RankingFeatures
    histories: list[list[int]]  # dense item indices per dense user, oldest first
    last_time: np.ndarray  # per user: time of the latest interaction ("now" for features)
    stage: str = "test"  # histories as they stand before this split's targets
    config: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def build(
        cls,
        ds: InteractionData,
        split: Split,
        history_len: int,
        sequence: bool,
        trend_days: float,
        stage: str = "test",
        history_match: bool = False,
    ) -> FeatureStore:
        """Histories up to ``stage``'s targets: training plus validation for "test" (serving),
        training only for "valid" (model selection)."""
        indptr, hist = split.history(stage)
        users = np.arange(ds.num_users)
        return cls(
            RankingFeatures.build(ds, split, history_len, sequence, trend_days, history_match),
            [hist[indptr[u] : indptr[u + 1]].tolist() for u in users],
            reference_time(split, stage, users).astype(np.int64),
            stage,
            {
                "history_len": history_len,
                "sequence": sequence,
                "trend_days": trend_days,
                "history_match": history_match,
            },
        )

    def history(self, user: int) -> np.ndarray:
        with self.lock:  # events append from another thread
            return np.asarray(self.histories[user], dtype=np.int64)

    def add_interaction(self, user: int, item: int, timestamp: int | None = None) -> int:
        """Append an interaction; returns the user's history length, which stays at most
        :data:`MAX_HISTORY` (the oldest items go first: every stage reads only the latest 50)."""
        with self.lock:
            self.histories[user].append(int(item))
            del self.histories[user][:-MAX_HISTORY]
            if timestamp is not None:
                self.last_time[user] = max(int(self.last_time[user]), int(timestamp))
            return len(self.histories[user])

    def _examples(self, users: np.ndarray, items: np.ndarray) -> tuple[Examples, np.ndarray, np.ndarray]:
        """One row per (user, candidate) of ``items [len(users), K]``, rows by user (``query``: each
        row's index into ``users``; ``time``: the user's now), and each user's history bounds in
        ``hist_items`` (start, end)."""
        k = items.shape[1]
        hists = [self.history(u) for u in users]
        lens = np.array([len(h) for h in hists], dtype=np.int64)
        ends = np.cumsum(lens)
        rows = np.repeat(np.arange(len(users)), k)
        ex = Examples(
            np.repeat(users, k),
            items.reshape(-1),
            np.zeros(rows.size, np.float32),
            (ends - lens)[rows],
            ends[rows],
            rows,
            self.last_time[users][rows],
            np.concatenate(hists) if len(hists) else np.zeros(0, np.int64),
        )
        return ex, ends - lens, ends

    def ranking_inputs(
        self, users: np.ndarray, items: np.ndarray, retrieval_scores: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dense, values, lengths) for the DLRM: one row per (user, candidate); ``items`` and
        ``retrieval_scores`` are ``[len(users), K]``."""
        ex, _, _ = self._examples(users, items)
        f = self.features
        seq = None if f.sequence is None else f.sequence.features(ex)
        b = f.batch(ex.user, ex.item, ex.history(f.history_len), retrieval_scores.reshape(-1), None, seq, sync=False)
        return b.dense_features, b.sparse_features.values().long(), b.sparse_features.lengths().long()

    def ranking_inputs_by_user(
        self, users: np.ndarray, items: np.ndarray, retrieval_scores: np.ndarray
    ) -> tuple[torch.Tensor, ...]:
        """The same rows as :meth:`ranking_inputs` for a ranker that looks each user's features up
        once (``DLRMPredictor.by_user``): (dense, row_user, user_values, user_lengths, values, lengths)."""
        ex, starts, ends = self._examples(users, items)
        f = self.features
        seq = None if f.sequence is None else f.sequence.features(ex)
        per_row, per_user = f.batch_by_user(
            users,
            ex.item,
            ex.query,
            last_n(ex.hist_items, starts, ends, f.history_len),
            retrieval_scores.reshape(-1),
            seq,
        )
        return (
            per_row.dense,
            torch.from_numpy(ex.query),
            per_user.sparse.values().long(),
            per_user.sparse.lengths().long(),
            per_row.sparse.values().long(),
            per_row.sparse.lengths().long(),
        )


def rank_chunk(k: int) -> int:
    """Users per ranker call when each has ``k`` candidates (:data:`RANK_CHUNK_ROWS` rows)."""
    return max(1, RANK_CHUNK_ROWS // max(1, k))


def user_chunks(inputs: tuple[torch.Tensor, ...], user_features: int, users_per_chunk: int):
    """The per-user program's inputs (:meth:`FeatureStore.ranking_inputs_by_user`: rows ordered by
    user) as chunks of ``users_per_chunk`` users each, in the same form."""
    dense, row_user, user_values, user_lengths, values, lengths = inputs
    n_users, n_rows = user_lengths.numel() // user_features, dense.shape[0]
    row_features = lengths.numel() // max(1, n_rows)
    at_row = np.searchsorted(row_user.numpy(), np.arange(0, n_users + users_per_chunk, users_per_chunk)).clip(
        max=n_rows
    )

    def jagged(values: torch.Tensor, lengths: torch.Tensor, features: int):
        """A slicer of examples [lo, hi) of feature-major (values, lengths); offsets computed once."""
        lens = lengths.numpy().reshape(features, -1)
        ends = np.cumsum(lens.reshape(-1)).reshape(features, -1)
        starts = ends - lens

        def take(lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
            if hi <= lo:
                return values[:0], lengths[:0]
            v = torch.cat([values[int(starts[f, lo]) : int(ends[f, hi - 1])] for f in range(features)])
            return v, torch.from_numpy(np.ascontiguousarray(lens[:, lo:hi]).reshape(-1))

        return take

    per_user, per_row = jagged(user_values, user_lengths, user_features), jagged(values, lengths, row_features)
    for c, u0 in enumerate(range(0, n_users, users_per_chunk)):
        u1, r0, r1 = min(u0 + users_per_chunk, n_users), int(at_row[c]), int(at_row[c + 1])
        yield (dense[r0:r1], row_user[r0:r1] - u0, *per_user(u0, u1), *per_row(r0, r1))


class RecommendationPipeline:
    """Candidate sources -> enrichment -> DLRM -> top K, for raw MovieLens user IDs."""

    def __init__(
        self,
        retriever: Retriever,
        rankers: dict[str, DLRMPredictor],
        store: FeatureStore,
        dataset: InteractionData,
        split: Split,
        sources: list | None = None,
        item_embeddings: np.ndarray | None = None,
        candidate_source: str = "two-tower",
        identity: str | None = None,
        source_rankers: dict[str, DLRMPredictor] | None = None,
        ensemble_weights: dict[str, float] | None = None,
        rerank: bool = True,
        artifacts_dir: Path | None = None,
        model_digests: dict[str, dict[str, str]] | None = None,
        item_sources: list | None = None,
    ) -> None:
        self.retriever, self.rankers, self.store = retriever, rankers, store
        # each source's own ranker (trained on its candidates), for evaluating "<source> + ranker";
        # the served source is re-ranked by ``rankers`` (its A/B arms)
        self.source_rankers = source_rankers or {}
        self.dataset, self.split = dataset, split
        self.sources = sources or [TwoTowerSource(retriever, item_embeddings)]
        # the item-to-item sources (retrieval/item_item.py: EASE, transitions): no ranker is trained on
        # their candidates, so they are not in the union; they are in the ensemble and served alone
        self.item_sources = item_sources or []
        self.item_embeddings = item_embeddings
        # the weighted fusion of the sources' scores (integration/ensemble.py), when fitted
        self.ensemble = EnsembleSource(self.all_sources, ensemble_weights) if ensemble_weights else None
        names = [src.name for src in self.all_sources] + ["union"] + (["ensemble"] if self.ensemble else [])
        if candidate_source not in names:
            raise ValueError(f"candidate_source {candidate_source!r}: the pipeline has {names}")
        self.candidate_source = candidate_source
        self.rerank = rerank  # False: serve the candidate source's own order
        self.artifacts_dir, self.model_digests = artifacts_dir, model_digests or {}
        # What the candidates depend on besides a user's history: a cache keyed by it never mixes
        # entries from other models, data or settings.
        self.identity = identity or _digest({"data": dataset.fingerprint, "source": candidate_source})
        self.user_index = {id_key(u): n for n, u in enumerate(dataset.user_raw_ids)}
        self.item_index = {id_key(i): n for n, i in enumerate(dataset.item_raw_ids)}
        self.default_arm = next(iter(rankers))

    @property
    def all_sources(self) -> list:
        """Every candidate source: the learned ones (two-tower first), then the item-to-item ones."""
        return self.sources + self.item_sources

    @property
    def served(self) -> str:
        """The served system's name, as in :meth:`evaluate`'s rows."""
        return f"{self.candidate_source} + ranker" if self.rerank else self.candidate_source

    def with_ensemble(self, weights: dict[str, float]) -> RecommendationPipeline:
        """The same pipeline with the sources' scores fused by ``weights`` (an ``ensemble`` source)."""
        p = copy.copy(self)
        p.ensemble = EnsembleSource(self.all_sources, weights)
        return p

    # -- the stages, on dense indices ---------------------------------------------------------

    def candidates(self, users: np.ndarray, k: int = CANDIDATES) -> tuple[np.ndarray, np.ndarray]:
        """Unseen candidate items per user ``[B, k]`` and their scores: the top ``k`` of
        ``candidate_source``, or the union of every source's top ``k``. The scores are the two-tower
        dot products (the ranker's ``retrieval_score`` feature) when the candidates are re-ranked,
        else the source's own."""
        hists = [self.store.history(u) for u in users]
        source = self.candidate_source
        if source == "two-tower":  # the index's scores are the two-tower dot products
            return self.sources[0].top_k(users, hists, k)
        if source == "union":
            items = union([src.top_k(users, hists, k)[0] for src in self.sources], interleave=not self.rerank)
            return items, self.retrieval_scores(users, hists, items)
        src = self.ensemble if source == "ensemble" else next(s for s in self.all_sources if s.name == source)
        items, scores = src.top_k(users, hists, k)
        return (items, self.retrieval_scores(users, hists, items)) if self.rerank else (items, scores)

    def order(
        self, users: np.ndarray, items: np.ndarray, scores: np.ndarray, arm: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The served order of :meth:`candidates`' output: re-ranked by ``arm``'s ranker, or as it is."""
        return self.rank(users, items, scores, arm=arm) if self.rerank else (items, scores)

    @property
    def stage(self) -> str:
        """What a known user's recommendations are (:class:`Recommendation`'s ``stage``)."""
        return "ranked" if self.rerank else "candidates"

    def candidate_key(self, user: int) -> str:
        """A user's candidates are a function of the models (``identity``) and the user's history,
        which also decides what is excluded as seen: keyed by both, a cache entry computed before an
        event can never be read after it, whatever the timing, so no cache has to be invalidated."""
        history = self.store.history(user)
        return f"{self.identity}:{user}:{hashlib.blake2b(history.tobytes(), digest_size=8).hexdigest()}"

    def retrieval_scores(self, users: np.ndarray, hists: list[np.ndarray], items: np.ndarray) -> np.ndarray:
        """The two-tower dot product of each user's query with each item (0 for padding)."""
        q = self.retriever.query_embeddings(users, hists)
        e = self.item_embeddings[np.where(items >= 0, items, 0)]
        return np.where(items >= 0, np.einsum("bd,bkd->bk", q, e), 0.0).astype(np.float32)

    @torch.inference_mode()
    def rank(
        self,
        users: np.ndarray,
        items: np.ndarray,
        scores: np.ndarray,
        arm: str | None = None,
        ranker: DLRMPredictor | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The candidates re-ordered by the ranker (``arm``'s, or ``ranker``): items and
        probabilities ``[B, K]``. Padding (-1, when fewer than K unseen items exist) stays last."""
        ranker = ranker or self.rankers[arm or self.default_arm]
        valid = items >= 0
        safe, scores = np.where(valid, items, 0), np.where(valid, scores, 0.0)
        step = rank_chunk(items.shape[1])
        if ranker.by_user is not None and len(users) >= BY_USER_MIN_USERS:
            # the per-user program looks each user's features (the 50-item history among them) up once,
            # not per row; the inputs are built for the whole batch (fewer, larger NumPy calls: 77 -> 49
            # us a user on ml-100k), the program fed a chunk of users at a time
            inputs = self.store.ranking_inputs_by_user(users, safe, scores)
            parts = [ranker.by_user(*x) for x in user_chunks(inputs, len(self.store.features.user_features), step)]
        else:
            parts = [
                ranker.model(
                    *self.store.ranking_inputs(users[lo : lo + step], safe[lo : lo + step], scores[lo : lo + step])
                )
                for lo in range(0, len(users), step)
            ]
        probs = torch.cat(parts).numpy() if parts else np.zeros(0, np.float32)
        probs = np.where(valid.reshape(-1), probs, -np.inf).reshape(items.shape)
        order = np.argsort(-probs, axis=1, kind="stable")
        return np.take_along_axis(items, order, 1), np.take_along_axis(probs, order, 1)

    # -- raw IDs in, recommendations out ---------------------------------------------------------

    def recommend(self, user_ids: list[int], k: int = 10, arm: str | None = None) -> list[Recommendation]:
        """Top ``k`` per raw user ID. An unknown user gets the most popular items (``stage="popular"``)."""
        known = [(n, self.user_index[id_key(u)]) for n, u in enumerate(user_ids) if id_key(u) in self.user_index]
        out: list[Recommendation | None] = [None] * len(user_ids)
        if known:
            users = np.array([u for _, u in known], dtype=np.int64)
            items, scores = self.order(users, *self.candidates(users), arm=arm)
            for (n, _), row_i, row_s in zip(known, items, scores):
                keep = row_i[:k] >= 0
                out[n] = self.recommendation(
                    id_key(user_ids[n]), row_i[:k][keep], row_s[:k][keep], self.stage, int((row_i >= 0).sum())
                )
        for n, u in enumerate(user_ids):
            if out[n] is None:
                top = self.retriever.popular[:k]
                out[n] = self.recommendation(id_key(u), top, self.retriever.popularity[top], "popular", 0)
        return out  # type: ignore[return-value]

    def recommend_features(self, record: dict, k: int = 10) -> Recommendation:
        """Top ``k`` for a user described by raw features (``age``, ``gender``, ``occupation``,
        ``zip``, ``history`` of raw item IDs): retrieval from those features alone; the ranker
        needs a known user (its user-ID table has no row for a new one), so these lists stay in
        retrieval order (``stage="retrieval"``), or popular items with no history."""
        (rec,) = self.retriever.recommend_features([record], k)
        idx = np.array([self.item_index[id_key(i)] for i in rec.item_ids], dtype=np.int64)
        return self.recommendation(-1, idx, np.asarray(rec.scores), "popular" if rec.cold_start else "retrieval", 0)

    def add_interaction(self, user_id: int | str, item_id: int | str, timestamp: int | None = None) -> int:
        return self.store.add_interaction(self.user_index[id_key(user_id)], self.item_index[id_key(item_id)], timestamp)

    def write_topk(self, path: str | Path, k: int = 10, batch_size: int = 256) -> int:
        """Every known user's top ``k`` as JSON lines: ``{"user_id", "item_ids", "scores"}`` (raw IDs)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        raw = self.dataset.user_raw_ids.tolist()
        with open(tmp, "w") as f:
            for lo in range(0, len(raw), batch_size):
                for r in self.recommend(raw[lo : lo + batch_size], k):
                    f.write(
                        json.dumps(
                            {"user_id": r.user_id, "item_ids": r.item_ids, "scores": [round(s, 6) for s in r.scores]}
                        )
                        + "\n"
                    )
        tmp.replace(path)
        return len(raw)

    def recommendation(
        self, user_id: int, items: np.ndarray, scores: np.ndarray, stage: str, candidates: int
    ) -> Recommendation:
        """A ``Recommendation`` of dense item indices, with raw IDs and titles (raw IDs without titles)."""
        return Recommendation(
            user_id,
            self.dataset.item_raw_ids[items].tolist(),
            [float(s) for s in scores],
            [self.dataset.title(i) for i in items.tolist()],
            stage,
            candidates,
        )

    # -- offline evaluation -------------------------------------------------------------------

    def at_stage(self, stage: str) -> RecommendationPipeline:
        """The same pipeline with histories as they stood before ``stage``'s targets."""
        if stage == self.store.stage:
            return self
        p = copy.copy(self)
        p.store = FeatureStore.build(self.dataset, self.split, **self.store.config, stage=stage)
        return p

    def evaluate(self, stage: str = "test", n_boot: int = 1000, batch_size: int = 256) -> dict[str, RankingReport]:
        """Every system the pipeline can be, under the shared protocol (full ranking, seen items
        excluded): each learned candidate source alone, and with its ranker on top (the one trained
        on its candidates where the pipeline has it); with several, their union (interleaved) and
        the union re-ranked by the served ranker; each item-to-item source alone; the fitted
        ensemble (no ranker has been trained on the candidates of these two). ``stage="valid"`` for
        model selection."""
        p = self.at_stage(stage)
        users_all, _ = p.split.targets(stage)
        lists: dict[str, dict[int, np.ndarray]] = {}

        def keep(name: str, users: np.ndarray, items: np.ndarray) -> None:
            if items.shape[1] < CANDIDATES:
                items = np.pad(items, ((0, 0), (0, CANDIDATES - items.shape[1])), constant_values=-1)
            lists.setdefault(name, {}).update(zip(users.tolist(), items[:, :CANDIDATES]))

        for lo in range(0, len(users_all), batch_size):
            users = users_all[lo : lo + batch_size]
            hists = [p.store.history(u) for u in users]
            found = {src.name: src.top_k(users, hists, CANDIDATES)[0] for src in p.sources}
            for name, items in found.items():
                keep(name, users, items)
                ranker = p.source_rankers.get(name)
                keep(
                    f"{name} + ranker",
                    users,
                    p.rank(users, items, p.retrieval_scores(users, hists, items), ranker=ranker)[0],
                )
            if len(found) > 1:
                keep("union", users, union(list(found.values()), interleave=True))
                items = union(list(found.values()))
                keep("union + ranker", users, p.rank(users, items, p.retrieval_scores(users, hists, items))[0])
            for src in p.item_sources:
                keep(src.name, users, src.top_k(users, hists, CANDIDATES)[0])
            if p.ensemble is not None:
                keep("ensemble", users, p.ensemble.top_k(users, hists, CANDIDATES)[0])
        return {
            name: evaluate_topk(
                lambda u, by=by: np.stack([by[x] for x in u.tolist()]),
                p.split,
                stage,
                batch_size=batch_size,
                n_boot=n_boot,
            )
            for name, by in lists.items()
        }


def create_pipeline(
    artifacts_dir: str | Path = "runs",
    retrieval: str = "retrieval/export",
    ranking: str | dict[str, str] = "auto",
    data_dir: str | None = None,
    device: str = "auto",
    dataset: InteractionData | None = None,
    sequential: str | list[str] | None = "auto",
    candidate_source: str = "auto",
    served: bool = True,
    item_item: str | None = "auto",
    compiled: bool = True,
) -> RecommendationPipeline:
    """Load the exported stages from ``artifacts_dir`` and check that they fit together.

    Candidate sources: the two-tower retriever, plus each sequential export in ``sequential``
    (paths relative to ``artifacts_dir``; "auto": those of ``sasrec/export`` and
    ``bert4rec/export`` that exist; None: none), plus the item-to-item sources EASE and transitions
    of ``item_item`` (retrieval/item_item.py's export; "auto": ``item-item/export`` if it exists).

    The served system: with ``candidate_source="auto"`` and ``ranking="auto"``, the one chosen on
    validation for these sources by ``python -m integration.ensemble`` (``serving/served-<sources>.json``,
    which also holds the ensemble's weights; refused if any model changed since). Without that
    file: SASRec's candidates re-ranked by their ranker when SASRec is there, then BERT4Rec's, else
    the two-tower's. ``candidate_source`` names one: "two-tower", "SASRec", "BERT4Rec", "union" (of
    every source's top 100), re-ranked, "EASE" or "transitions", or "ensemble", served in its own order. ``served=False``
    ignores the choice file (the choice itself is made that way).

    Rankers: each source's own, trained on its candidates, is ``serving/dlrm-int8-<model>`` for a
    sequential source and ``serving/dlrm-int8`` for the two-tower (a source without one falls back
    to the two-tower's). ``ranking`` overrides the served one: an artifact or ``{arm: artifact}``
    for A/B tests ("auto": the served source's own). The ranking artifacts run on CPU; ``device``
    must agree ("auto" does). ``dataset`` passes a data set in memory (e.g. a synthetic one)
    instead of loading it by name. ``compiled``: the query tower, the sequential scorers and the
    rankers run their AOTInductor packages where they have checked-out ones (``python -m inference_legacy.aot_compile``).
    Serving settings for the process: freed memory stays in the heap (:func:`common.runtime.retain_freed_memory`).
    """
    from common.sequential import NextItemScorer

    retain_freed_memory()

    root = Path(artifacts_dir)
    if device not in ("auto", "cpu"):
        raise ArtifactMismatch(
            f"device {device!r}: the packaged rankers run on CPU (FBGEMM's CPU kernels), so the "
            f"pipeline's stages must too; pass device='cpu' or 'auto'"
        )
    r_dir = root / retrieval
    r_manifest = read_retrieval_manifest(r_dir)
    ds = dataset if dataset is not None else load_dataset(r_manifest["dataset"], data_dir)
    if r_manifest["data_fingerprint"] != ds.fingerprint:
        raise ArtifactMismatch(
            f"retrieval export {r_dir} was trained on data with fingerprint {r_manifest['data_fingerprint'][:16]} "
            f"({r_manifest['dataset']}), not {ds.name}'s {ds.fingerprint[:16]}: serve the data set it was trained on"
        )
    if sequential == "auto":
        sequential = [p for p in ("sasrec/export", "bert4rec/export") if (root / p / "manifest.json").is_file()]
    elif isinstance(sequential, str):
        sequential = [sequential]
    scorers = {}
    for path in sequential or []:
        scorer = NextItemScorer(root / path, compiled)
        name = SEQUENCE_SOURCES[scorer.name]
        if scorer.data_fingerprint != ds.fingerprint:
            raise ArtifactMismatch(
                f"{name} export {root / path} was trained on data with fingerprint "
                f"{scorer.data_fingerprint[:16]}, not {ds.name}'s {ds.fingerprint[:16]}: retrain it"
            )
        missing = [id_key(i) for i in ds.item_raw_ids if id_key(i) not in scorer.index_of]
        if missing:
            raise ArtifactMismatch(
                f"{name} export {root / path} lacks {len(missing)} of {ds.name}'s items "
                f"(e.g. {missing[:3]}); retrain it on this data"
            )
        scorers[name] = (path, scorer)
    digests = {name: file_digest(root / path / "weights.pt", "sha256") for name, (path, _) in scorers.items()}
    if item_item == "auto":
        item_item = "item-item/export" if (root / "item-item/export/manifest.json").is_file() else None
    item_model = None
    if item_item:
        item_model = ItemItem.load(root / item_item)
        if item_model.manifest["data_fingerprint"] != ds.fingerprint or item_model.manifest["item_raw_ids"] != [
            id_key(i) for i in ds.item_raw_ids
        ]:
            raise ArtifactMismatch(
                f"item-to-item export {root / item_item} was fitted on other data (fingerprint "
                f"{item_model.manifest['data_fingerprint'][:16]}, not {ds.name}'s {ds.fingerprint[:16]}): fit it "
                f"again with python -m retrieval.item_item --out {(root / item_item).parent}"
            )
        digests.update({name: item_model.digest(name) for name in item_model.names})
    item_sources = [ItemItemSource(name, item_model) for name in (item_model.names if item_model else [])]
    names = ["two-tower", *scorers, *(src.name for src in item_sources)]
    choice_path = choice_file(root, names)
    choice = json.loads(choice_path.read_text()) if served and choice_path.is_file() else None
    fix = (
        f"choose again with python -m integration.ensemble --artifacts {root} "
        f"--sequential {','.join(scorers[n][1].name for n in scorers) or 'none'}"
        + ("" if item_sources else " --item-item none")
    )
    if candidate_source == "ensemble" and choice is None:
        raise ArtifactMismatch(f"no ensemble was fitted for {names} ({choice_path} is missing): {fix}")
    auto = candidate_source == "auto"
    if auto:
        candidate_source = (
            choice["candidate_source"]
            if choice
            else next((n for n in ("SASRec", "BERT4Rec") if n in scorers), "two-tower")
        )
    if candidate_source not in [*names, "union", "ensemble"]:
        raise ArtifactMismatch(
            f"candidate source {candidate_source!r}: this pipeline has {names} (or 'union', 'ensemble')"
        )
    # re-ranked unless serving the ensemble (no ranker is trained on its candidates) or what the
    # choice says; an explicit ranker (A/B arms) always re-ranks
    if ranking != "auto":
        rerank = True
    elif auto and choice:
        rerank = bool(choice["rerank"])
    else:
        rerank = candidate_source not in ("ensemble", *(src.name for src in item_sources))

    def own_ranker(name: str) -> str:
        if name in scorers:
            path = f"serving/dlrm-int8-{scorers[name][1].name}"
            if (root / path / "manifest.json").is_file():
                return path
        return "serving/dlrm-int8"

    if ranking == "auto":
        ranking = own_ranker("two-tower" if candidate_source == "union" else candidate_source)
    arms = {"A": ranking} if isinstance(ranking, str) else dict(ranking)
    rankers = {arm: DLRMPredictor(root / path, compiled) for arm, path in arms.items()}
    loaded = {path: rankers[arm] for arm, path in arms.items()}
    by_source = {}
    for name in ["two-tower", *scorers]:  # the item-to-item sources have no ranker of their own
        path = own_ranker(name)
        if path not in loaded:
            loaded[path] = DLRMPredictor(root / path, compiled)
        by_source[name] = loaded[path]
    for path, p in loaded.items():
        fp = p.manifest["source"]["data_fingerprint"]
        if fp != ds.fingerprint:
            raise ArtifactMismatch(
                f"ranking artifact {root / path} was trained on data with fingerprint {fp[:16]}, but {ds.name} "
                f"here has {ds.fingerprint[:16]}: retrain it on this data, or point --data-dir at the data "
                f"it was trained on"
            )
    if r_manifest["data_fingerprint"] != ds.fingerprint:
        raise ArtifactMismatch(
            f"retrieval export {r_dir} was trained on data with fingerprint {r_manifest['data_fingerprint'][:16]}, "
            f"but {ds.name} here has {ds.fingerprint[:16]}: retrain it on this data, or point --data-dir at the "
            f"data it was trained on"
        )
    for path, p in loaded.items():
        used = p.manifest["source"].get("retrieval_files")
        if used is None:
            raise ArtifactMismatch(
                f"ranking artifact {root / path} was trained without a retrieval export (its "
                f"retrieval_score feature was always 0); train it with "
                f"python -m golden_training.train_dlrm --retrieval-export {r_dir}"
            )
        if used != r_manifest["files"]:
            raise ArtifactMismatch(
                f"ranking artifact {root / path} learned its retrieval_score feature from "
                f"another retrieval model ({p.manifest['source']['retrieval_export']}), not {r_dir}: "
                f"serve the export it was trained with, or retrain the ranker with "
                f"--retrieval-export {r_dir}"
            )
    for name, (path, _) in scorers.items():
        p = by_source[name]
        trained_on = p.manifest["source"].get("candidates_weights")
        if trained_on is not None and trained_on != digests[name]:
            raise ArtifactMismatch(
                f"ranking artifact {root / own_ranker(name)} was trained on the candidates of another {name} "
                f"model ({p.manifest['source']['candidates_export']}), not {root / path}: retrain it with "
                f"python -m golden_training.train_dlrm --candidates-export {root / path}"
            )
    split = split_dataset(ds)
    feats = {json.dumps(p.manifest["features"], sort_keys=True) for p in loaded.values()}
    if len(feats) > 1:
        raise ArtifactMismatch(
            f"the rankers ({', '.join(str(root / x) for x in loaded)}) build their features differently "
            f"({sorted(feats)}); they must share one feature store"
        )
    cfg = next(iter(rankers.values())).manifest["features"]
    # Rankers packaged before --history-match existed had the features whenever the data had the columns.
    store = FeatureStore.build(
        ds,
        split,
        cfg["history_len"],
        cfg["sequence_features"],
        cfg["trend_days"],
        history_match=cfg.get("history_match", True),
    )
    for path, p in loaded.items():
        if p.schema != store.features.schema:
            raise ArtifactMismatch(
                f"ranking artifact {root / path} expects features "
                f"{_describe(p.schema)}, but the feature store builds {_describe(store.features.schema)}: "
                f"repackage the ranker with this checkout"
            )
        dims = {t["dim"] for t in p.manifest["dims"]["tables"].values()}
        if dims != {p.manifest["dims"]["embedding_dim"]}:
            raise ArtifactMismatch(
                f"ranking artifact {root / path}: table dims {sorted(dims)} differ from its "
                f"embedding_dim {p.manifest['dims']['embedding_dim']}; DLRM needs one dim"
            )
    retriever = Retriever(r_dir, device="cpu", k=CANDIDATES, compiled=compiled)
    if not np.array_equal(retriever.user_raw_ids, ds.user_raw_ids) or not np.array_equal(
        retriever.item_raw_ids, ds.item_raw_ids
    ):
        raise ArtifactMismatch(
            f"retrieval export {r_dir} maps raw IDs to indices differently from {ds.name}: its "
            f"features.json is from another data set; export it again"
        )
    item_embeddings = np.load(r_dir / "item_embeddings.npy")
    sources: list = [TwoTowerSource(retriever, item_embeddings)]
    sources += [SequenceSource(sc, ds.item_raw_ids) for _, sc in scorers.values()]
    models = {
        "sources": {"two-tower": _digest(r_manifest["files"]), **digests},
        # the model, not how it runs: AOTInductor packages added later (the manifest's "compiled" and
        # "compiled_by_user" entries) score like the exported programs, so the choice still stands
        "rankers": {
            name: _digest({k: v for k, v in p.manifest.items() if k not in ("compiled", "compiled_by_user")})
            for name, p in by_source.items()
        },
    }
    if choice is not None and choice["models"] != models:
        changed = [
            f"{kind[:-1]} {name}"
            for kind in ("sources", "rankers")
            for name in sorted(set(models[kind]) | set(choice["models"].get(kind, {})))
            if models[kind].get(name) != choice["models"].get(kind, {}).get(name)
        ]
        raise ArtifactMismatch(
            f"{choice_path} chose the served system among other models than these "
            f"({', '.join(changed)} changed since): {fix}"
        )
    weights = choice["weights"] if choice else None
    identity = _digest(
        {
            "data": ds.fingerprint,
            "source": candidate_source,
            "k": CANDIDATES,
            "retrieval": r_manifest["files"],
            "rerank": rerank,
            "weights": weights,
            **digests,
        }
    )
    return RecommendationPipeline(
        retriever,
        rankers,
        store,
        ds,
        split,
        sources,
        item_embeddings,
        candidate_source,
        identity,
        by_source,
        weights,
        rerank,
        root,
        models,
        item_sources,
    )


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _describe(schema) -> str:
    return ", ".join(f"{f.name}[{f.cardinality}]" for f in schema.sparse) + " + " + ", ".join(schema.dense_names)


__all__ = ["ArtifactMismatch", "FeatureStore", "Recommendation", "RecommendationPipeline", "create_pipeline"]
