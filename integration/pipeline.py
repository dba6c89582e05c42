"""The two-stage recommender, wired: retrieval's candidates become the ranker's input.

    from integration.loader import create_pipeline
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
``integration.loader.create_pipeline`` loads the exported stages and checks that they fit together
before serving anything (integration/compatibility.py: data fingerprints, feature keys and
cardinalities, ID maps, embedding dims, the retrieval model the ranker's ``retrieval_score`` feature
came from, and devices); each mismatch is an ``ArtifactMismatch`` that says what to fix.

The feature store (integration/feature_store.py) is built in memory from the data set the artifacts
were trained on (found by name, checked by fingerprint): per-item and per-user tables, transition
counts and each user's history up to the test interaction. ``add_interaction`` appends to a user's
history, which changes their next candidates and ranking features.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torchrec.datasets.utils import Batch

from candidates.provenance import UnionLists, union_lists
from candidates.sources import CandidateSource, EnsembleSource, TwoTowerSource, union
from common.data.dataset import InteractionData, id_key
from common.data.split import Split
from common.metrics import RankingReport, evaluate_topk, repeat_mask, report_from_ranks
from inference_legacy.dlrm_predict import DLRMPredictor
from integration.compatibility import digest
from integration.feature_store import FeatureStore, rank_chunk, user_chunks
from integration.union_model import NAME as UNION_RANKER
from integration.union_model import UnionRanker, list_batch
from retrieval.two_tower_retrieval import Retriever

CANDIDATES = 100
# Fewer users than this a call go through the per-row program, as fast there for one user
# (integration/README.md, "Tuning").
BY_USER_MIN_USERS = 2


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
    # on a data set with repeats: whether each item is one the user had before (else empty)
    again: list[bool] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "user_id": self.user_id,
            "stage": self.stage,
            "candidates": self.candidates,
            "items": [
                {"item_id": i, "title": t, "score": round(s, 6), **({"again": a} if a is not None else {})}
                for i, t, s, a in zip(
                    self.item_ids, self.titles, self.scores, self.again or [None] * len(self.item_ids)
                )
            ],
        }


class RecommendationPipeline:
    """Candidate sources -> enrichment -> DLRM -> top K, for raw MovieLens user IDs."""

    def __init__(
        self,
        retriever: Retriever,
        rankers: dict[str, DLRMPredictor],
        store: FeatureStore,
        dataset: InteractionData,
        split: Split,
        sources: list[CandidateSource] | None = None,
        item_embeddings: np.ndarray | None = None,
        candidate_source: str = "two-tower",
        identity: str | None = None,
        source_rankers: dict[str, DLRMPredictor] | None = None,
        ensemble_weights: dict[str, float] | None = None,
        rerank: bool = True,
        artifacts_dir: Path | None = None,
        model_digests: dict[str, dict[str, str]] | None = None,
        item_sources: list[CandidateSource] | None = None,
        union_ranker: UnionRanker | None = None,
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
        # one DLRM over the union of every source's lists (integration/union_model.py), when trained for these
        self.union_ranker = union_ranker
        names = [src.name for src in self.all_sources] + ["union"] + (["ensemble"] if self.ensemble else [])
        names += [UNION_RANKER] if union_ranker is not None else []
        if candidate_source not in names:
            raise ValueError(f"candidate_source {candidate_source!r}: the pipeline has {names}")
        self.candidate_source = candidate_source
        self.rerank = rerank  # False: serve the candidate source's own order
        self.artifacts_dir, self.model_digests = artifacts_dir, model_digests or {}
        # What the candidates depend on besides a user's history: a cache keyed by it never mixes
        # entries from other models, data or settings.
        self.identity = identity or digest({"data": dataset.fingerprint, "source": candidate_source})
        self.user_index = {id_key(u): n for n, u in enumerate(dataset.user_raw_ids)}
        self.item_index = {id_key(i): n for n, i in enumerate(dataset.item_raw_ids)}
        self.default_arm = next(iter(rankers))

    @property
    def all_sources(self) -> list:
        """Every candidate source: the learned ones (two-tower first), then the item-to-item ones."""
        return self.sources + self.item_sources

    @property
    def union_sources(self) -> list:
        """The sources the union merges and the rankers re-order: the learned ones, and a source that
        asks to be (``in_union``: "again", so that a ranker sees a user's own past items as
        candidates on a data set with repeats)."""
        return self.sources + [src for src in self.item_sources if getattr(src, "in_union", False)]

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
        source = self.candidate_source
        if source == UNION_RANKER and self.union_ranker.reads_times:
            hists, times = zip(*(self.store.timed_history(u) for u in users))  # read together: events append
            return self.union_ranked(users, list(hists), times=list(times))
        hists = [self.store.history(u) for u in users]
        if source == "two-tower":  # the index's scores are the two-tower dot products
            return self.sources[0].top_k(users, hists, k)
        if source == "union":
            items = union([src.top_k(users, hists, k)[0] for src in self.union_sources], interleave=not self.rerank)
            return items, self.retrieval_scores(users, hists, items)
        if source == UNION_RANKER:  # its whole list, ranked (about 300 on ml-100k)
            return self.union_ranked(users, hists)
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
        return "ranked" if self.rerank or self.candidate_source == UNION_RANKER else "candidates"

    def union_ranked(
        self, users: np.ndarray, hists: list[np.ndarray], k: int | None = None, times: list[np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each user's union of every source's top 100 in the union ranker's order: the first ``k``
        items (None: all) and their logits ``[B, k]`` (-1 / -inf padding). The lists, their rows and
        their order are the calls its training makes (integration/union_ranker.py), on the store's
        histories (``times``: their timestamps, :meth:`union_batch`)."""
        lists, rows, batch = self.union_batch(users, hists, times)
        items, scores = self.union_ranker.order(lists, rows, batch)
        if k is None:
            return items, scores
        if items.shape[1] < k:
            pad = ((0, 0), (0, k - items.shape[1]))
            return np.pad(items, pad, constant_values=-1), np.pad(scores, pad, constant_values=-np.inf)
        return items[:, :k], scores[:, :k]

    def union_batch(
        self, users: np.ndarray, hists: list[np.ndarray], times: list[np.ndarray] | None = None
    ) -> tuple[UnionLists, np.ndarray, Batch]:
        """The users' union lists and the union ranker's rows of them (list by list). ``times``: each
        history's timestamps (None: the store's, which must then be ``hists``: no event in between)."""
        ranker = self.union_ranker
        users = np.asarray(users, dtype=np.int64)
        queries = self.retriever.query_embeddings(users, hists)  # once: the two-tower's list, scores and features
        sources = [s.with_queries(queries) if isinstance(s, TwoTowerSource) else s for s in self.all_sources]
        lists = union_lists(sources, ranker.manifest["weights"], users, hists, CANDIDATES)
        rows = np.arange(len(users))
        two_tower = (queries, self.item_embeddings)
        now = self.store.last_time[users]
        attention = ranker.manifest["config"]["attention"]
        if times is None and ranker.reads_times:
            times = [self.store.timed_history(u)[1] for u in users.tolist()]
        return (
            lists,
            rows,
            list_batch(self.store.features, ranker.schema, lists, rows, hists, now, two_tower, None, attention, times),
        )

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
        """A ``Recommendation`` of dense item indices, with raw IDs and titles (raw IDs without titles);
        on a data set with repeats each item says whether the user had it before."""
        again = []
        if self.dataset.repeats:
            user = self.user_index.get(id_key(user_id)) if user_id != -1 else None
            had = set(self.store.history(user).tolist()) if user is not None else set()
            again = [i in had for i in items.tolist()]
        return Recommendation(
            user_id,
            self.dataset.item_raw_ids[items].tolist(),
            [float(s) for s in scores],
            [self.dataset.title(i) for i in items.tolist()],
            stage,
            candidates,
            again,
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
        ensemble (no ranker has been trained on the candidates of these two); the union ranker, on
        validation by its cross-fitted ranks (it was trained there). ``stage="valid"`` for model
        selection."""
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
            found = {src.name: src.top_k(users, hists, CANDIDATES)[0] for src in p.union_sources}
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
                if src.name not in found:
                    keep(src.name, users, src.top_k(users, hists, CANDIDATES)[0])
            if p.ensemble is not None:
                keep("ensemble", users, p.ensemble.top_k(users, hists, CANDIDATES)[0])
            # on validation, its training lists: its figure there is the cross-fitted one, below
            if p.union_ranker is not None and stage != "valid":
                keep(UNION_RANKER, users, p.union_ranked(users, hists, CANDIDATES)[0])
        reports = {
            name: evaluate_topk(
                lambda u, by=by: np.stack([by[x] for x in u.tolist()]),
                p.split,
                stage,
                batch_size=batch_size,
                n_boot=n_boot,
            )
            for name, by in lists.items()
        }
        if p.union_ranker is not None and stage == "valid":
            # each user's target ranked by a model trained on the other folds' lists (integration/union_ranker.py)
            crossed = p.union_ranker.manifest["valid_cross_fitted_ranks"]
            users = np.asarray(crossed["users"], dtype=np.int64)
            reports[UNION_RANKER] = report_from_ranks(
                "valid", users, np.asarray(crossed["ranks"]), n_boot, repeat_mask(p.split, "valid", users)
            )
        return reports
