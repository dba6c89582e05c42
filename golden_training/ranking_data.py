"""MovieLens as a ranking task: (user, candidate item) -> did the user interact with it next?

A training example is one training interaction (label 1) or a sampled negative for it (label 0),
with the user's earlier items as history. Negatives are drawn by popularity and, given a
retrieval export, also from retrieval's candidates for the user (hard negatives): the items the
ranker will actually have to re-order.

Features:
- sparse: ``user_id``, ``item_id`` and ``history`` (sharing the item table), ``genres``
  (jagged), and where the set has them ``age_bucket``, ``gender``, ``occupation``, ``zip_region``;
- dense: ``user_activity`` (log1p of items seen so far), ``item_popularity`` (log1p of training
  interactions), ``item_year`` (scaled), ``user_age`` (scaled), ``retrieval_score`` (the
  two-tower dot product for this user and item, 0 without a retrieval export).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torchrec.datasets.utils import Batch

from common.data.movielens import MovieLens
from common.data.movielens_features import MovieLensTables, last_n
from common.features import DenseFeature, FeatureSchema, SparseFeature

DENSE_FEATURES = ("user_activity", "item_popularity", "item_year", "user_age", "retrieval_score")


@dataclass
class RankingFeatures(MovieLensTables):
    """The shared tables plus what the ranker's dense features need."""

    history_len: int = 50
    item_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # training interactions
    item_year: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    user_age: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @classmethod
    def build(cls, ds: MovieLens, item_counts: np.ndarray, history_len: int = 50) -> RankingFeatures:
        ages = ds.user_age if ds.user_age is not None else np.zeros(ds.num_users, dtype=np.int64)
        return cls.from_dataset(ds, history_len=history_len, item_counts=np.asarray(item_counts, dtype=np.int64),
                                item_year=ds.item_year.astype(np.int64), user_age=ages.astype(np.int64))

    @property
    def schema(self) -> FeatureSchema:
        user = tuple(SparseFeature(name, self.user_cardinality[name]) for name in self.user_columns)
        return FeatureSchema(
            sparse=(SparseFeature("user_id", self.num_users),
                    SparseFeature("item_id", self.num_items, pooling="mean", table="item"),
                    SparseFeature("history", self.num_items, pooling="mean", max_length=self.history_len, table="item"),
                    SparseFeature("genres", self.num_genres, pooling="mean", max_length=None), *user),
            dense=tuple(DenseFeature(n) for n in DENSE_FEATURES))

    def batch(self, users: np.ndarray, items: np.ndarray, history: tuple[np.ndarray, np.ndarray],
              retrieval_score: np.ndarray | None = None, labels: np.ndarray | None = None) -> Batch:
        """A TorchRec ``Batch`` (dense, KJT, labels) for (user, item) pairs with their histories."""
        users, items = np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64)
        n = len(users)
        year = self.item_year[items]
        cols: dict[str, Any] = {
            "user_id": users, "item_id": items, "history": history, "genres": self.item_genres(items),
            **{name: col[users] for name, col in self.user_columns.items()},
            "user_activity": np.log1p(history[1]).astype(np.float32),
            "item_popularity": np.log1p(self.item_counts[items]).astype(np.float32),
            "item_year": np.where(year > 0, (year - 1990) / 20.0, 0.0).astype(np.float32),
            "user_age": (self.user_age[users] / 50.0).astype(np.float32),
            "retrieval_score": (np.zeros(n, np.float32) if retrieval_score is None
                                else np.asarray(retrieval_score, dtype=np.float32)),
        }
        fb = self.schema.from_columns(cols, batch_size=n)
        lab = torch.zeros(n) if labels is None else torch.as_tensor(labels, dtype=torch.float32)
        return Batch(dense_features=fb.dense, sparse_features=fb.sparse, labels=lab)


@dataclass
class Examples:
    """(user, item, label) rows; each row's history is ``hist_items[hist_start:hist_end]``
    (the last ``history_len`` of it) and ``query`` indexes its retrieval query embedding."""

    user: np.ndarray
    item: np.ndarray
    label: np.ndarray
    hist_start: np.ndarray
    hist_end: np.ndarray
    query: np.ndarray
    hist_items: np.ndarray

    def __len__(self) -> int:
        return len(self.user)

    def take(self, rows: np.ndarray) -> Examples:
        return Examples(self.user[rows], self.item[rows], self.label[rows], self.hist_start[rows],
                        self.hist_end[rows], self.query[rows], self.hist_items)

    def history(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        return last_n(self.hist_items, self.hist_start, self.hist_end, n)


def popularity_sampler(item_counts: np.ndarray, seed: Any):
    """Draw items with probability proportional to their training count (+1, so every item can be drawn)."""
    p = (np.asarray(item_counts, dtype=np.float64) + 1.0)
    cdf = np.cumsum(p / p.sum())
    rng = np.random.default_rng(seed)
    return lambda n: np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), len(cdf) - 1)


def concat(parts: list[Examples]) -> Examples:
    first = parts[0]
    return Examples(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                      ("user", "item", "label", "hist_start", "hist_end", "query")), hist_items=first.hist_items)
