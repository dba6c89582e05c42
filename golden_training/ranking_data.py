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
  sequence statistics from ``SequenceStats``: ``after_last_1..3`` (how often the candidate came
  right after the user's last, second-to-last and third-to-last item, in other users' training
  sequences) and ``item_trend`` (the candidate's training interactions in the days before the
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
from common.runtime import Progress, all_gather, all_reduce

TRANSITION_LAGS = 3
HISTORY_MATCH = (("last", "match"), ("recent", "share"))  # RankingFeatures.history_match, per item categorical
RECENT_ITEMS = 10
SEQUENCE_FEATURES = (*(f"after_last_{k}" for k in range(1, TRANSITION_LAGS + 1)), "item_trend")  # SequenceStats
# On a data set with repeats (SequenceStats.repeat_features): the user's own past with the candidate.
REPEAT_FEATURES = ("times_had", "since_had", "share_had", "item_repurchase")
# With the history's timestamps too (Examples.hist_times; the union ranker's rows): when they had it, in days.
TIMING_FEATURES = ("days_since_had", "days_between_had", "due_had", "item_gap", "due_item")
DAY = 86_400


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


@dataclass
class SequenceStats:
    """What the order of interactions says about a candidate, counted on the training split only.

    - ``after_last_k``: P(candidate | the user's k-th most recent item) over consecutive pairs
      in all users' training sequences, count / (transitions out of that item + 1).
    - ``item_trend``: log1p of the candidate's training interactions in the ``trend_days``
      before the row's time.
    - on a data set with repeats (:data:`REPEAT_FEATURES`), from the row's whole history: ``times_had``
      (log1p of the times the user had the candidate), ``since_had`` (1 / (1 + the user's
      interactions since they last had it), 0 if never: recency counted in the user's own purchases,
      which a history carries at serving too, not in days), ``share_had`` (the share of the user's
      interactions that were it: a basket holds a product once, so about the share of their baskets),
      and ``item_repurchase`` (of the other training users who had the candidate, the share who had
      it again: the row's own user left out, as a training row would otherwise count its own future).
    - on a data set with repeats, where the rows carry their history's timestamps
      (``Examples.hist_times``), :data:`TIMING_FEATURES`, in days: ``days_since_had`` (1 / (1 + days
      from the last time the user had the candidate to the row's "now"), 0 if never),
      ``days_between_had`` (1 / (1 + the mean days between the user's purchases of it), 0 if fewer
      than two) and ``due_had`` (log((days since + 1) / (mean days between + 1)), clipped to [-5, 5],
      0 if fewer than two: above 0 once a household's usual interval for the product has passed),
      ``item_gap`` (1 / (1 + the mean days between a training user's purchases of the candidate,
      over all users), 0 if nobody bought it twice) and ``due_item`` (log((days since + 1) /
      (item_gap's days + 1)), clipped, 0 if never had: how due it is by everyone's cycle, which a
      household that bought it once has no cycle of its own for). Households buy groceries on
      cycles; counted in purchases, a week holds 10 lines for one household and 200 for another.

    Rows built from the user's own training sequence (``Examples.own``) leave that user's own
    transition out of each history item: otherwise a training positive would find its own
    (previous item -> positive) pair in the counts, which a validation or test target never does.
    """

    num_items: int
    pair_keys: np.ndarray  # sorted prev * num_items + next
    pair_counts: np.ndarray
    out_counts: np.ndarray  # [num_items] transitions leaving each item
    train_item: np.ndarray  # the training split, sorted by (user, time)
    same_user_next: np.ndarray  # [n_train] bool: row i + 1 is the same user's next interaction
    item_time: np.ndarray  # sorted item * span + (time - t0)
    t0: int
    span: int
    trend_days: float = 30.0
    had: np.ndarray | None = None  # [num_items] training users who had the item (repeats only)
    had_again: np.ndarray | None = None  # [num_items] of them, those who had it twice or more
    item_gap: np.ndarray | None = None  # [num_items] mean days between a user's purchases of it (0: never again)

    @classmethod
    def build(cls, split: Split, trend_days: float = 30.0, across_ranks: bool = False) -> SequenceStats:
        """The statistics of ``split``'s training part. ``across_ranks``: ``split`` is this rank's share
        of the users (:func:`common.data.split.rank_splits`); each rank counts its share and the counts
        are merged over the ranks (a user's transitions all lie in one share), so that every rank holds
        the whole training split's statistics, with its own rows (``train_item``, ``same_user_next``)
        for the own-transition correction of its own training examples."""
        reduce = all_reduce if across_ranks else lambda a, op: np.asarray(a)
        gather = all_gather if across_ranks else lambda a: [a]
        u, i, t = split.train_user, split.train_item, split.train_time
        n_items = split.num_items
        same = np.r_[u[1:] == u[:-1], False]
        keys, counts = np.unique(i[:-1][same[:-1]] * n_items + i[1:][same[:-1]], return_counts=True)
        lo = int(reduce(t.min() if len(t) else np.iinfo(np.int64).max, "min"))
        hi = int(reduce(t.max() if len(t) else np.iinfo(np.int64).min, "max"))
        t0, span = (lo, hi - lo + 2) if hi >= lo else (0, 2)
        parts = gather((keys, counts, np.sort(i * span + (t - t0))))
        if len(parts) > 1:
            keys, at = np.unique(np.concatenate([p[0] for p in parts]), return_inverse=True)
            counts = np.bincount(at, weights=np.concatenate([p[1] for p in parts])).astype(np.int64)
        had = had_again = gap = None
        if split.repeats:
            pair, times = np.unique(u * n_items + i, return_counts=True)  # (user, item) with its count
            had = reduce(np.bincount(pair % n_items, minlength=n_items), "sum")
            had_again = reduce(np.bincount(pair % n_items, weights=times > 1, minlength=n_items), "sum")
            by = np.lexsort((t, i, u))
            bought = i[by][1:]
            again = (u[by][1:] == u[by][:-1]) & (bought == i[by][:-1])  # the same user's same item again
            days = np.diff(t[by])[again] / DAY
            n_gaps = reduce(np.bincount(bought[again], minlength=n_items), "sum")
            gap = reduce(np.bincount(bought[again], weights=days, minlength=n_items), "sum") / np.maximum(n_gaps, 1)
        return cls(
            n_items,
            keys,
            counts,
            reduce(np.bincount(i[same], minlength=n_items), "sum"),
            i,
            same,
            parts[0][2] if len(parts) == 1 else np.sort(np.concatenate([p[2] for p in parts])),
            t0,
            span,
            trend_days,
            had,
            had_again,
            gap,
        )

    def _pair_count(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        if not len(self.pair_keys):
            return np.zeros(len(prev), np.int64)
        keys = prev * self.num_items + nxt
        at = np.minimum(_searchsorted(self.pair_keys, keys), len(self.pair_keys) - 1)
        return np.where(self.pair_keys[at] == keys, self.pair_counts[at], 0)

    def features(self, ex: Examples) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for k in range(1, TRANSITION_LAGS + 1):
            at = ex.hist_end - k
            has = at >= ex.hist_start
            at = np.where(has, at, 0)
            prev = ex.hist_items[at] if len(ex.hist_items) else np.zeros(len(ex), np.int64)
            num = self._pair_count(prev, ex.item).astype(np.float64)
            den = self.out_counts[prev].astype(np.float64)
            if ex.own:
                own = has & self.same_user_next[at]
                num -= own & (self.train_item[np.minimum(at + 1, len(self.train_item) - 1)] == ex.item)
                den -= own
            out[f"after_last_{k}"] = np.where(has, num / (den + 1.0), 0.0).astype(np.float32)
        lo_t = ex.time - self.t0 - int(self.trend_days * DAY)
        hi_t = ex.time - self.t0
        base = ex.item * self.span
        count = _searchsorted(self.item_time, base + np.clip(hi_t, 0, self.span - 1)) - _searchsorted(
            self.item_time, base + np.clip(lo_t, 0, self.span - 1)
        )
        out["item_trend"] = np.log1p(count).astype(np.float32)
        if self.had is not None:
            out |= self.repeat_features(ex)
        return out

    def repeat_features(self, ex: Examples) -> dict[str, np.ndarray]:
        """:data:`REPEAT_FEATURES` of the rows (see the class docstring)."""
        times, last, first = _occurrences(ex.hist_items, ex.item, ex.hist_start, ex.hist_end)
        length = ex.hist_end - ex.hist_start
        had, again = self.had[ex.item].astype(np.float64), self.had_again[ex.item].astype(np.float64)
        # The item's rate among the other users: the row's own user out (a training row's whole
        # training sequence counted it; at evaluation and serving, their history does).
        mine = times
        if ex.own:
            mine = _occurrences(
                ex.hist_items, ex.item, ex.hist_start, _sequence_end(self.same_user_next, ex.hist_start)
            )[0]
        had, again = np.maximum(had - (mine > 0), 0), np.maximum(again - (mine > 1), 0)
        out = {
            "times_had": np.log1p(times).astype(np.float32),
            "since_had": np.where(times > 0, 1.0 / (ex.hist_end - last), 0.0).astype(np.float32),
            "share_had": (times / np.maximum(length, 1)).astype(np.float32),
            "item_repurchase": np.where(had > 0, again / np.maximum(had, 1), 0.0).astype(np.float32),
        }
        if ex.hist_times is not None:
            out |= timing_features(ex.hist_times, ex.time, times, last, first, self.item_gap[ex.item])
        return out


def timing_features(
    hist_times: np.ndarray,
    now: np.ndarray,
    times: np.ndarray,
    last: np.ndarray,
    first: np.ndarray,
    item_gap: np.ndarray,
) -> dict[str, np.ndarray]:
    """:data:`TIMING_FEATURES` (:class:`SequenceStats`) of rows whose user had the candidate ``times``
    times in their history, first and last at positions ``first`` and ``last`` of ``hist_times``
    (-1 where never), at time ``now``."""
    t = hist_times if len(hist_times) else np.zeros(1, np.int64)
    t_last, t_first = t[np.maximum(last, 0)], t[np.maximum(first, 0)]
    since = np.maximum(now - t_last, 0) / DAY
    between = (t_last - t_first) / DAY / np.maximum(times - 1, 1)
    again = times > 1
    return {
        "days_since_had": np.where(times > 0, 1.0 / (1.0 + since), 0.0).astype(np.float32),
        "days_between_had": np.where(again, 1.0 / (1.0 + between), 0.0).astype(np.float32),
        "due_had": np.where(again, np.clip(np.log((since + 1.0) / (between + 1.0)), -5.0, 5.0), 0.0).astype(np.float32),
        "item_gap": np.where(item_gap > 0, 1.0 / (1.0 + item_gap), 0.0).astype(np.float32),
        "due_item": np.where(
            (times > 0) & (item_gap > 0), np.clip(np.log((since + 1.0) / (item_gap + 1.0)), -5.0, 5.0), 0.0
        ).astype(np.float32),
    }


_ORDER_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _occurrences(
    items: np.ndarray, item: np.ndarray, start: np.ndarray, end: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each row, how many of ``items[start:end]`` are ``item``, and the positions of the last and
    the first (-1 where none): binary searches in ``items``' positions sorted by (item, position), sorted once
    per array (the training split's items are searched by every training batch)."""
    cached = _ORDER_CACHE.get(id(items))
    if cached is None or cached[0] is not items:
        order = np.argsort(items, kind="stable")  # by item, then position
        cached = (items, np.asarray(items, np.int64)[order] * (len(items) + 1) + order)
        if len(items) > 100_000:  # keep the big ones (the training split); a serving batch's are cheap to sort
            _ORDER_CACHE.clear()
            _ORDER_CACHE[id(items)] = cached
    keys = cached[1]
    base = np.asarray(item, np.int64) * (len(items) + 1)
    lo, hi = _searchsorted(keys, base + start), _searchsorted(keys, base + end)
    if not len(keys):
        return hi - lo, np.full(len(item), -1), np.full(len(item), -1)
    last = np.where(hi > lo, keys[np.maximum(hi - 1, 0)] - base, -1)
    first = np.where(hi > lo, keys[np.minimum(lo, len(keys) - 1)] - base, -1)
    return hi - lo, last, first


def _sequence_end(same_user_next: np.ndarray, start: np.ndarray) -> np.ndarray:
    """The end of the user's training sequence that begins at each ``start`` (training split rows)."""
    ends = np.flatnonzero(~same_user_next) + 1  # one past each user's last training row
    return ends[np.searchsorted(ends, start, side="right")]


def _searchsorted(a: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``np.searchsorted(a, v)`` on torch's threads. These binary searches are most of the serving
    features' cost (a batch of 256 users x 100 candidates makes 128,000 of them); numpy's run on one
    core, torch's on all. Under 1,000 keys (one user's candidates) numpy's call costs less than
    torch's overhead (integration/README.md, the serving path's timings)."""
    if len(v) < 1000:
        return np.searchsorted(a, v)
    v = np.ascontiguousarray(v, dtype=a.dtype)
    return torch.searchsorted(torch.from_numpy(a), torch.from_numpy(v)).numpy()


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
