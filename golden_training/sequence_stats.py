"""What the order of interactions says about a ranker's candidate: the sequence statistics of the
training split (transitions, the item's trend) and, on a log with repeats, the user's own past with
the candidate, counted in purchases and, where the rows carry their history's timestamps, in days.

    stats = SequenceStats.build(split, trend_days=30.0)
    columns = stats.features(examples)   # {"after_last_1": ..., "item_trend": ..., "times_had": ...}

golden_training/ranking_data.py builds the ranker's rows with them (``RankingFeatures.sequence``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from common.data.split import Split
from common.runtime import all_gather, all_reduce

if TYPE_CHECKING:
    from golden_training.ranking_data import Examples

TRANSITION_LAGS = 3
SEQUENCE_FEATURES = (*(f"after_last_{k}" for k in range(1, TRANSITION_LAGS + 1)), "item_trend")  # SequenceStats
# On a data set with repeats (SequenceStats.repeat_features): the user's own past with the candidate.
REPEAT_FEATURES = ("times_had", "since_had", "share_had", "item_repurchase")
# With the history's timestamps too (Examples.hist_times; the union ranker's rows): when they had it, in days,
# and the share of their baskets (the lines of one timestamp) that held it.
TIMING_FEATURES = ("days_since_had", "days_between_had", "due_had", "item_gap", "due_item", "basket_share")
DAY = 86_400


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
      interactions that were it),
      and ``item_repurchase`` (of the other training users who had the candidate, the share who had
      it again: the row's own user left out, as a training row would otherwise count its own future).
    - on a data set with repeats, where the rows carry their history's timestamps
      (``Examples.hist_times``), :data:`TIMING_FEATURES`, in days and baskets: ``days_since_had`` (1 / (1 + days
      from the last time the user had the candidate to the row's "now"), 0 if never),
      ``days_between_had`` (1 / (1 + the mean days between the user's purchases of it), 0 if fewer
      than two) and ``due_had`` (log((days since + 1) / (mean days between + 1)), clipped to [-5, 5],
      0 if fewer than two: above 0 once a household's usual interval for the product has passed),
      ``item_gap`` (1 / (1 + the mean days between a training user's purchases of the candidate,
      over all users), 0 if nobody bought it twice) and ``due_item`` (log((days since + 1) /
      (item_gap's days + 1)), clipped, 0 if never had: how due it is by everyone's cycle, which a
      household that bought it once has no cycle of its own for), and ``basket_share`` (the times the
      user had the candidate over their baskets, at most 1: a basket is a run of history lines with one
      timestamp, as all lines of a purchase log's basket share theirs, and holds a product once, so
      this is the share of their baskets that held it). Households buy groceries on cycles; counted in
      purchases, a week holds 10 lines for one household and 200 for another.

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
            out["basket_share"] = basket_share(ex.hist_times, ex.hist_start, ex.hist_end, times)
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


def basket_share(hist_times: np.ndarray, start: np.ndarray, end: np.ndarray, times: np.ndarray) -> np.ndarray:
    """``times`` over the baskets of each row's history ``hist_times[start:end]`` (runs of one
    timestamp), at most 1; 0 for an empty history. A count of the positions where the timestamp
    changes, prefix-summed once: no pass over each history."""
    changes = np.concatenate([[0], np.cumsum(hist_times[1:] != hist_times[:-1])]) if len(hist_times) else np.zeros(1)
    last = np.maximum(end - 1, 0)
    baskets = np.where(end > start, 1 + changes[last] - changes[np.minimum(start, last)], 0)
    return np.minimum(times / np.maximum(baskets, 1), 1.0).astype(np.float32)


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
    torch's overhead (integration/README.md, the serving path's timings); then the keys are searched
    in ascending order, where NumPy starts each search from the previous one's place, so that
    consecutive searches share the cached part of ``a`` (a purchase log's ``a`` is megabytes)."""
    if len(v) < 1000:
        by = np.argsort(v)
        out = np.empty(len(v), dtype=np.int64)
        out[by] = np.searchsorted(a, v[by])
        return out
    v = np.ascontiguousarray(v, dtype=a.dtype)
    return torch.searchsorted(torch.from_numpy(a), torch.from_numpy(v)).numpy()
