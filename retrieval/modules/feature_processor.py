"""A data set's feature tables -> the two towers' features (ID features only).

Query (user) tower: ``user_id``, the user's ID features (categoricals and bucketed numbers; on
MovieLens ``age_bucket``, ``gender``, ``occupation``, ``zip_region``); plus ``history``, the user's
last ``history_len`` items in time order (jagged, mean-pooled). ``user_id`` holds zero IDs for a user
the model has no embedding for (a new user described by features and history), which sum-pools
to a zero vector; training can drop IDs at random so the tower learns to work without them.
Candidate (item) tower: ``item_id`` and the item's ID features in column order (multi-valued ones
mean-pooled; on MovieLens ``genres`` and ``year_bucket``).

The same code builds training examples, evaluation queries and serving requests, so the towers
always see features made the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from common.data.tables import FeatureTables
from common.features import FeatureBatch, FeatureSchema, SparseFeature


@dataclass
class TwoTowerFeatures(FeatureTables):
    """The shared feature tables plus the two towers' schemas and batch builders."""

    history_len: int = 50

    # -- schemas ---------------------------------------------------------------------------

    @property
    def query_schema(self) -> FeatureSchema:
        user = tuple(SparseFeature(name, self.user_cardinality[name]) for name in self.user_columns)
        return FeatureSchema(
            sparse=(
                SparseFeature("user_id", self.num_users, max_length=None),
                *user,
                SparseFeature("history", self.num_items, pooling="mean", max_length=self.history_len),
            )
        )

    @property
    def candidate_schema(self) -> FeatureSchema:
        return FeatureSchema(
            sparse=(
                SparseFeature("item_id", self.num_items),
                *(
                    SparseFeature(name, self.item_cardinality[name], pooling="mean", max_length=None)
                    if name in self.item_multi
                    else SparseFeature(name, self.item_cardinality[name])
                    for name in self.item_order
                ),
            )
        )

    # -- batches ---------------------------------------------------------------------------

    def query_batch(
        self,
        users: np.ndarray,
        history: tuple[np.ndarray, np.ndarray],
        user_columns: dict[str, np.ndarray] | None = None,
        sync: bool = True,
    ) -> FeatureBatch:
        """Query features for dense user indices with their (values, lengths) histories
        (``sync``: as :meth:`FeatureSchema.from_columns`; the serving path passes False).

        A user index of -1 means "no ID embedding" (a new user). User features come from the
        tables unless ``user_columns`` gives them (e.g. from a request's raw features).
        """
        users = np.asarray(users, dtype=np.int64)
        known = users >= 0
        cols: dict[str, Any] = {"user_id": (users[known], known.astype(np.int64)), "history": history}
        if user_columns is None:
            if not known.all():
                raise ValueError("users without an ID (-1) need their features in user_columns")
            user_columns = {name: col[users] for name, col in self.user_columns.items()}
        cols.update(user_columns)
        return self.query_schema.from_columns(cols, batch_size=len(users), sync=sync)

    def candidate_batch(self, items: np.ndarray) -> FeatureBatch:
        items = np.asarray(items, dtype=np.int64)
        return self.candidate_schema.from_columns(
            {"item_id": items, **self.item_id_columns(items)}, batch_size=len(items)
        )
