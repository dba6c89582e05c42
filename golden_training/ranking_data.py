"""An interaction data set as a ranking task: (user, candidate item) -> did the user interact with it next?

A training example is one training interaction (label 1) or a sampled negative for it (label 0),
with the user's earlier items as history. Negatives are drawn by popularity and, given a
retrieval export, also from retrieval's candidates for the user (hard negatives): the items the
ranker will actually have to re-order.

Features (built from the data set's columns, common/data/tables.py):
- sparse: ``user_id``, ``item_id`` and ``history`` (sharing the item table), the item's
  multi-valued and categorical columns (on MovieLens ``genres``) and the user's categoricals (on
  MovieLens ``age_bucket``, ``gender``, ``occupation``, ``zip_region``);
- dense: ``user_activity`` (log1p of items seen so far), ``item_popularity`` (log1p of training
  interactions), the item's and the user's numeric columns normalised, as ``item_<name>`` and
  ``user_<name>`` (on MovieLens ``item_year`` and ``user_age``), ``retrieval_score`` (the
  two-tower dot product for this user and item, 0 without a retrieval export), and two kinds of
  sequence statistics from ``SequenceStats`` (golden_training/sequence_stats.py): ``after_last_1..3``
  (how often the candidate came right after the user's last, second-to-last and third-to-last item,
  in other users' training sequences) and ``item_trend`` (the candidate's training interactions in the days before the
  user's last interaction); for each single-valued item categorical ``<col>``, ``last_<col>_match``
  and ``recent_<col>_share`` (does the user's latest item, and what share of the last 10, have the
  candidate's value; none on MovieLens, whose genres are multi-valued).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torchrec.datasets.utils import Batch

from candidates.sources import RetrievalScorer, SequenceSource
from common.data.dataset import InteractionData
from common.data.split import Split
from common.data.tables import FeatureTables, last_n
from common.features import DenseFeature, FeatureBatch, FeatureSchema, SparseFeature
from common.metrics import MAX_K, top_unseen
from common.runtime import Progress, all_reduce
from golden_training.sequence_stats import REPEAT_FEATURES, SEQUENCE_FEATURES, TIMING_FEATURES, SequenceStats

HISTORY_MATCH = (("last", "match"), ("recent", "share"))  # RankingFeatures.history_match, per item categorical
RECENT_ITEMS = 10


@dataclass
class RankingFeatures(FeatureTables):
    """The shared tables plus what the ranker's dense features need."""

    history_len: int = 50
    item_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # training interactions
    sequence: SequenceStats | None = None  # None: the sequence features are zeros
    match_features: bool = False  # the history-match features (history_match) exist
    repeat_features: bool = False  # the data set has repeats: REPEAT_FEATURES exist

    @classmethod
    def build(
        cls,
        ds: InteractionData,
        split: Split,
        history_len: int = 50,
        sequence: bool = True,
        trend_days: float = 30.0,
        history_match: bool = False,
        across_ranks: bool = False,
    ) -> RankingFeatures:
        """Features for ``ds``, with popularity and sequence statistics from ``split``'s training part
        (``across_ranks``: ``split`` is this rank's share of the users, and the counts are summed over
        the ranks); ``history_match`` adds the history-match features (:meth:`history_match`)."""
        counts = split.item_counts("valid")
        return cls.from_dataset(
            ds,
            history_len=history_len,
            item_counts=all_reduce(counts, "sum") if across_ranks else counts,
            sequence=SequenceStats.build(split, trend_days, across_ranks) if sequence else None,
            match_features=history_match,
            repeat_features=ds.repeats and sequence,
        )

    @property
    def item_sparse(self) -> list[str]:
        """The item columns the ranker takes as ID features: multi-valued and categorical ones."""
        return [name for name in self.item_order if name in self.item_multi or name in self.item_categorical]

    @property
    def dense_names(self) -> list[str]:
        return [
            "user_activity",
            "item_popularity",
            *(f"item_{name}" for name in self.item_dense),
            *(f"user_{name}" for name in self.user_dense),
            "retrieval_score",
            *SEQUENCE_FEATURES,
            *self.history_match_names,
            *(REPEAT_FEATURES if self.repeat_features else ()),
        ]

    @property
    def history_match_names(self) -> list[str]:
        if not self.match_features:
            return []
        return [f"{kind}_{name}_{what}" for name in self.item_categorical for kind, what in HISTORY_MATCH]

    def history_match(self, items: np.ndarray, history: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
        """For each single-valued item categorical (a shop's brand, a synthetic log's category): whether
        the user's most recent item has the candidate's value (``last_<col>_match``) and the share of the
        last ``RECENT_ITEMS`` items that do (``recent_<col>_share``). Users often stay on what they just
        looked at, which a mean-pooled history blurs; on MovieLens (genres are multi-valued) there are none."""
        values, lengths = history
        n = len(items)
        ends = np.cumsum(lengths)
        recent, recent_len = last_n(values, ends - lengths, ends, RECENT_ITEMS)
        row = np.repeat(np.arange(n), recent_len)
        has = lengths > 0
        last = values[np.where(has, ends - 1, 0)] if len(values) else np.zeros(n, np.int64)
        out = {}
        for name in self.item_categorical:
            col = self.item_columns[name]
            cand = col[items]
            hits = np.bincount(row, weights=col[recent] == cand[row], minlength=n)
            out[f"last_{name}_match"] = (has & (col[last] == cand)).astype(np.float32)
            out[f"recent_{name}_share"] = (hits / np.maximum(recent_len, 1)).astype(np.float32)
        return out

    @cached_property  # built once: every batch (and every served request) converts through it
    def schema(self) -> FeatureSchema:
        user = tuple(SparseFeature(name, self.user_cardinality[name]) for name in self.user_categorical)
        item = tuple(
            SparseFeature(name, self.item_cardinality[name], pooling="mean", max_length=None)
            if name in self.item_multi
            else SparseFeature(name, self.item_cardinality[name])
            for name in self.item_sparse
        )
        return FeatureSchema(
            sparse=(
                SparseFeature("user_id", self.num_users),
                SparseFeature("item_id", self.num_items, pooling="mean", table="item"),
                SparseFeature("history", self.num_items, pooling="mean", max_length=self.history_len, table="item"),
                *item,
                *user,
            ),
            dense=tuple(DenseFeature(n) for n in self.dense_names),
        )

    def batch(
        self,
        users: np.ndarray,
        items: np.ndarray,
        history: tuple[np.ndarray, np.ndarray],
        retrieval_score: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        sequence: dict[str, np.ndarray] | None = None,
        sync: bool = True,
    ) -> Batch:
        """A TorchRec ``Batch`` (dense, KJT, labels) for (user, item) pairs with their histories;
        ``sequence`` holds ``SequenceStats.features`` for the rows (zeros without it); ``sync``: as
        :meth:`FeatureSchema.from_columns` (the serving path, which reads values and lengths, passes False)."""
        cols = self.columns(users, items, history, retrieval_score, sequence)
        fb = self.schema.from_columns(cols, batch_size=len(cols["user_id"]), sync=sync)
        lab = torch.zeros(len(cols["user_id"])) if labels is None else torch.as_tensor(labels, dtype=torch.float32)
        return Batch(dense_features=fb.dense, sparse_features=fb.sparse, labels=lab)

    @property
    def user_features(self) -> list[str]:
        """The sparse features that depend on the user alone (the same in every row of a user's candidates)."""
        return ["user_id", "history", *self.user_categorical]

    def batch_by_user(
        self,
        users: np.ndarray,
        items: np.ndarray,
        row_user: np.ndarray,
        history: tuple[np.ndarray, np.ndarray],
        retrieval_score: np.ndarray,
        sequence: dict[str, np.ndarray] | None = None,
    ) -> tuple[FeatureBatch, FeatureBatch]:
        """The rows of :meth:`batch` split for a ranker that looks up each user's features once
        (``golden_training.model.DLRMByUser``): ``users`` and ``history`` (values, lengths)
        are per user, ``items``, ``row_user`` (each row's index into ``users``), the scores and
        ``sequence`` per row. Returns the rows' batch (the dense features and the item-side IDs) and
        the users' batch (the user-side IDs), in :attr:`by_user_schemas`."""
        users, items = np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64)
        row_user = np.asarray(row_user, dtype=np.int64)
        n, b = len(items), len(users)
        hist_lengths = history[1][row_user]
        if self.sequence is not None and self.match_features:  # per-row histories, only for these features
            ends = np.cumsum(history[1])
            row_history = last_n(history[0], (ends - history[1])[row_user], ends[row_user], self.history_len)
        else:  # the lengths are all the row's dense features read of its history
            row_history = (np.zeros(0, np.int64), hist_lengths)
        cols = self.columns(users[row_user], items, row_history, retrieval_score, sequence)
        row_schema, user_schema = self.by_user_schemas
        rows = row_schema.from_columns(
            {k: v for k, v in cols.items() if k not in self.user_features}, batch_size=n, sync=False
        )
        per_user = {
            "user_id": users,
            "history": history,
            **{name: self.user_columns[name][users] for name in self.user_categorical},
        }
        return rows, user_schema.from_columns(per_user, batch_size=b, sync=False)

    @cached_property
    def by_user_schemas(self) -> tuple[FeatureSchema, FeatureSchema]:
        """:meth:`batch_by_user`'s two halves: the rows' (item-side IDs and the dense features) and the users'."""
        item_side = [name for name in self.schema.sparse_names if name not in self.user_features]
        return self.schema.subset(item_side), self.schema.subset(self.user_features, dense=False)

    def columns(
        self,
        users: np.ndarray,
        items: np.ndarray,
        history: tuple[np.ndarray, np.ndarray],
        retrieval_score: np.ndarray | None = None,
        sequence: dict[str, np.ndarray] | None = None,
    ) -> dict[str, Any]:
        """Every schema column (see :meth:`batch`) for (user, item) rows."""
        users, items = np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64)
        n = len(users)
        cols: dict[str, Any] = {
            "user_id": users,
            "item_id": items,
            "history": history,
            **self.item_id_columns(items, self.item_sparse),
            **{name: self.user_columns[name][users] for name in self.user_categorical},
            "user_activity": np.log1p(history[1]).astype(np.float32),
            "item_popularity": np.log1p(self.item_counts[items]).astype(np.float32),
            **{f"item_{name}": col[items] for name, col in self.item_dense.items()},
            **{f"user_{name}": col[users] for name, col in self.user_dense.items()},
            "retrieval_score": (
                np.zeros(n, np.float32) if retrieval_score is None else np.asarray(retrieval_score, dtype=np.float32)
            ),
            **{name: (np.zeros(n, np.float32) if sequence is None else sequence[name]) for name in SEQUENCE_FEATURES},
            **(
                self.history_match(items, history)
                if self.sequence is not None and self.match_features
                else {name: np.zeros(n, np.float32) for name in self.history_match_names}
            ),
            **({name: sequence[name] for name in REPEAT_FEATURES} if self.repeat_features else {}),
            # the union ranker's, where its rows carried their histories' timestamps
            **{name: sequence[name] for name in TIMING_FEATURES if sequence is not None and name in sequence},
        }
        return cols


@dataclass
class Examples:
    """(user, item, label) rows; each row's history is ``hist_items[hist_start:hist_end]``
    (the last ``history_len`` of it), ``query`` indexes its retrieval query embedding, and
    ``time`` is the row's "now": the time of the user's last interaction before it. ``own``
    marks rows whose history is the user's own training sequence (``hist_items`` is the
    training split's items), whose transitions ``SequenceStats`` must leave out. ``hist_times``:
    each of ``hist_items``' timestamps, where the caller has them (the union ranker's rows: then the
    :data:`TIMING_FEATURES` exist on a data set with repeats)."""

    user: np.ndarray
    item: np.ndarray
    label: np.ndarray
    hist_start: np.ndarray
    hist_end: np.ndarray
    query: np.ndarray
    time: np.ndarray
    hist_items: np.ndarray
    own: bool = False
    hist_times: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.user)

    def take(self, rows: np.ndarray) -> Examples:
        return Examples(
            self.user[rows],
            self.item[rows],
            self.label[rows],
            self.hist_start[rows],
            self.hist_end[rows],
            self.query[rows],
            self.time[rows],
            self.hist_items,
            self.own,
            self.hist_times,
        )

    def history(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        return last_n(self.hist_items, self.hist_start, self.hist_end, n)

    def negatives(self, items: np.ndarray) -> Examples:
        """Rows of ``items`` labelled 0, each in its row's context here (user, history, query, time)."""
        return dataclasses.replace(self, item=items, label=np.zeros(len(items), np.float32))


def reference_time(split: Split, stage: str, users: np.ndarray) -> np.ndarray:
    """Each user's "now" when predicting ``stage``: the time of their last interaction before it
    (the last training one for validation; the validation one, where there is one, for test)."""
    users = np.asarray(users, dtype=np.int64)
    ends = np.searchsorted(split.train_user, users, side="right")
    has = ends > np.searchsorted(split.train_user, users, side="left")
    t = np.zeros(len(users), dtype=np.int64)
    t[has] = split.train_time[ends[has] - 1]
    if stage == "test" and len(split.valid_user):
        at = np.minimum(np.searchsorted(split.valid_user, users), len(split.valid_user) - 1)
        t = np.where(split.valid_user[at] == users, np.maximum(t, split.valid_time[at]), t)
    return t.astype(np.int64)


def popularity_sampler(item_counts: np.ndarray, seed: Any):
    """Draw items with probability proportional to their training count (+1, so every item can be drawn)."""
    p = np.asarray(item_counts, dtype=np.float64) + 1.0
    cdf = np.cumsum(p / p.sum())
    rng = np.random.default_rng(seed)
    return lambda n: np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), len(cdf) - 1)


def concat(parts: list[Examples]) -> Examples:
    first = parts[0]
    return Examples(
        *(
            np.concatenate([getattr(p, f) for p in parts])
            for f in ("user", "item", "label", "hist_start", "hist_end", "query", "time")
        ),
        hist_items=first.hist_items,
        own=first.own,
    )


# ------------------------------------------------------------------------------------------
# Training examples: the ranker's positives and negatives


def sample_train_users(num_users: int, eval_users: np.ndarray | None, n: int, seed: int) -> np.ndarray:
    """``n`` users to train on (seeded), the evaluation sample among them when there is one: a
    production ranker trains on every user it serves, and a user left out of training meets the
    ranker with an untrained ``user_id`` embedding. Only their training interactions are used."""
    rng = np.random.default_rng([seed, 5])
    if eval_users is None or len(eval_users) >= n:
        return rng.choice(num_users, n, replace=False)
    others = np.setdiff1d(np.arange(num_users), eval_users)
    return np.concatenate([eval_users, rng.choice(others, n - len(eval_users), replace=False)])


def rank_seed(*key: int, rank: int) -> list[int]:
    """The seed of ``key``'s draws on ``rank``: rank 0 keeps the single process's, the others add their rank."""
    return [*key, rank] if rank else list(key)


def train_examples(
    split: Split,
    features: RankingFeatures,
    cfg: Any,
    retr: RetrievalScorer | None,
    source: SequenceSource | None = None,
    show_progress: bool = False,
    eval_users: np.ndarray | None = None,
    rank: int = 0,
) -> tuple[Examples, np.ndarray | None]:
    """Positives (``split``'s training interactions, this rank's share under torchrun; with
    --train-last N only each user's last N; with --train-users N only those of N users, the
    evaluated ``eval_users`` among them) and their negatives, with the retrieval query of each
    positive (its user and history at that time). Hard negatives come from the candidates of
    ``source`` (else retrieval's, as served) for each positive's history, the positive itself left out."""
    n_all = len(split.train_user)
    user_start = np.searchsorted(split.train_user, np.arange(split.num_users))
    user_end = np.r_[user_start[1:], n_all]
    rows = np.arange(n_all)
    if cfg.train_last:
        rows = rows[rows >= user_end[split.train_user] - cfg.train_last]
    if 0 < cfg.train_users < split.num_users:
        chosen = sample_train_users(split.num_users, eval_users, cfg.train_users, cfg.seed)
        rows = rows[np.isin(split.train_user[rows], chosen)]
    n = len(rows)
    users = split.train_user[rows]
    # "now" for a training positive: the time of the user's previous interaction (its own if first)
    now = split.train_time[np.where(rows > user_start[users], rows - 1, rows)]
    pos = Examples(
        users,
        split.train_item[rows],
        np.ones(n, np.float32),
        user_start[users],
        rows,
        np.arange(n),
        now,
        split.train_item,
        own=True,
    )
    sample = popularity_sampler(features.item_counts, rank_seed(cfg.seed, 1, rank=rank))
    parts = [pos] + [pos.negatives(sample(n)) for _ in range(cfg.negatives)]
    if split.repeats and getattr(cfg, "again_negatives", 0):
        # A user's own earlier items, drawn by position (the often-had ones most): the candidates the
        # "again" source serves, which a ranker must order among themselves, not only tell from new
        # ones. A draw that is the positive itself becomes a popularity negative.
        rng = np.random.default_rng(rank_seed(cfg.seed, 4, rank=rank))
        length = pos.hist_end - pos.hist_start
        for _ in range(cfg.again_negatives):
            at = pos.hist_start + (rng.random(n) * np.maximum(length, 1)).astype(np.int64)
            drawn = np.where(length > 0, split.train_item[np.minimum(at, n_all - 1)], -1)
            fallback = sample(n)
            parts.append(pos.negatives(np.where((drawn < 0) | (drawn == pos.item), fallback, drawn)))
    queries = None
    if retr is not None:
        queries = retr.queries(pos.user, pos.hist_items, pos.hist_start, pos.hist_end)
        if cfg.hard_negatives:
            # Retrieval's candidates for each positive's query, as of that time, minus the history.
            rng = np.random.default_rng(rank_seed(cfg.seed, 2, rank=rank))
            picks = np.empty((n, cfg.hard_negatives), dtype=np.int64)
            bar = Progress(n, "hard negatives", "queries", enabled=show_progress)
            for lo in range(0, n, 4096):
                sl = slice(lo, min(lo + 4096, n))
                seen = [pos.hist_items[a:b] for a, b in zip(pos.hist_start[sl], pos.hist_end[sl])]
                # the positive is no negative; nor, where each item is had once, is the history
                drop = [np.array([i]) if split.repeats else np.append(h, i) for h, i in zip(seen, pos.item[sl])]
                cands = (
                    retr.serving_top_k(queries[sl], drop)
                    if source is None
                    else top_unseen(source.scores(None, seen), drop, MAX_K)[0]
                )
                picks[sl] = np.take_along_axis(
                    cands, rng.integers(0, cands.shape[1], size=(len(seen), cfg.hard_negatives)), 1
                )
                bar.update(len(seen))
            bar.close()
            parts += [pos.negatives(picks[:, j]) for j in range(cfg.hard_negatives)]
    return concat(parts), queries
