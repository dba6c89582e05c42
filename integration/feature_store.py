"""The ranker's features at serving time: every user's history in memory, growing with events, and
the rows the DLRM scores built from it (per row, or per user for the per-user program).

    store = FeatureStore.build(ds, split, history_len=50, sequence=True, trend_days=30.0)
    dense, values, lengths = store.ranking_inputs(users, items, retrieval_scores)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from common.data.dataset import InteractionData
from common.data.split import Split
from common.data.tables import last_n
from golden_training.ranking_data import Examples, RankingFeatures, reference_time

MAX_HISTORY = 1000  # per user in the feature store, after events (longer than ml-100k's longest history)
# Rows per ranker call: a whole batch's rows at once run slower a row than chunks whose activations
# stay in cache; this chunk was the fastest of those measured (integration/README.md, "Tuning").
RANK_CHUNK_ROWS = 2048


@dataclass
class FeatureStore:
    """The ranker's feature tables and every user's history, in memory; histories grow online."""

    features: RankingFeatures
    histories: list[list[int]]  # dense item indices per dense user, oldest first
    last_time: np.ndarray  # per user: time of the latest interaction ("now" for features)
    times: list[list[int]]  # each history item's timestamp (the union ranker's days since and between)
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
        indptr, hist, times = split.timed_history(stage)
        users = np.arange(ds.num_users)
        return cls(
            RankingFeatures.build(ds, split, history_len, sequence, trend_days, history_match),
            [hist[indptr[u] : indptr[u + 1]].tolist() for u in users],
            reference_time(split, stage, users).astype(np.int64),
            [times[indptr[u] : indptr[u + 1]].tolist() for u in users],
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

    def timed_history(self, user: int) -> tuple[np.ndarray, np.ndarray]:
        """The user's history and each item's timestamp, read together."""
        with self.lock:
            return np.asarray(self.histories[user], dtype=np.int64), np.asarray(self.times[user], dtype=np.int64)

    def add_interaction(self, user: int, item: int, timestamp: int | None = None) -> int:
        """Append an interaction at ``timestamp`` (None: the user's latest time); returns the user's
        history length, which stays at most :data:`MAX_HISTORY` (the oldest items go first: every
        stage reads only the latest 50, the union ranker's days since a purchase the latest 1,000)."""
        with self.lock:
            if timestamp is not None:
                self.last_time[user] = max(int(self.last_time[user]), int(timestamp))
            self.histories[user].append(int(item))
            self.times[user].append(int(self.last_time[user] if timestamp is None else timestamp))
            del self.histories[user][:-MAX_HISTORY]
            del self.times[user][:-MAX_HISTORY]
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
