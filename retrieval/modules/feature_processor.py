"""MovieLens -> the two towers' features.

Query (user) tower: ``user_id``, and where the data set has them ``age_bucket``, ``gender``,
``occupation``, ``zip_region`` (first zip digit); plus ``history``, the user's last
``history_len`` items in time order (jagged, mean-pooled). ``user_id`` holds zero IDs for a user
the model has no embedding for (a new user described by features and history), which sum-pools
to a zero vector; training can drop IDs at random so the tower learns to work without them.
Candidate (item) tower: ``item_id``, ``genres`` (jagged, mean-pooled) and ``year_bucket``.

The same code builds training examples, evaluation queries and serving requests, so the towers
always see features made the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.data.movielens import AGE_BUCKETS, MovieLens
from common.features import FeatureBatch, FeatureError, FeatureSchema, SparseFeature

YEAR_BUCKET_START, YEAR_BUCKET_WIDTH, NUM_YEAR_BUCKETS = 1920, 5, 24  # 0 = unknown, then 5-year bins


def year_bucket(year: np.ndarray) -> np.ndarray:
    """0 for unknown years, else 5-year bins from 1920 (earlier years share bin 1)."""
    year = np.asarray(year)
    b = 1 + np.clip((year - YEAR_BUCKET_START) // YEAR_BUCKET_WIDTH, 0, NUM_YEAR_BUCKETS - 2)
    return np.where(year > 0, b, 0).astype(np.int64)


def zip_region(zips: list[str]) -> np.ndarray:
    """First digit of a US zip code (0-9); 10 for anything else (e.g. Canadian postcodes)."""
    return np.array([int(z[0]) if z[:1].isdigit() else 10 for z in zips], dtype=np.int64)


def last_n(items: np.ndarray, starts: np.ndarray, ends: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """For each row, ``items[max(start, end - n):end]`` as jagged (values, lengths)."""
    begin = np.maximum(starts, ends - n)
    lengths = (ends - begin).astype(np.int64)
    total = int(lengths.sum())
    offsets = np.repeat(begin - np.r_[0, np.cumsum(lengths)[:-1]], lengths) + np.arange(total)
    return items[offsets], lengths


@dataclass
class MovieLensFeatures:
    """Per-user and per-item feature tables, and the two towers' schemas."""

    num_users: int
    num_items: int
    history_len: int
    user_columns: dict[str, np.ndarray]   # feature name -> int64 [num_users]; empty without user features
    user_cardinality: dict[str, int]
    item_genre_values: np.ndarray         # jagged genres of every item
    item_genre_lengths: np.ndarray
    num_genres: int
    item_year_bucket: np.ndarray          # int64 [num_items]
    occupation_vocab: list[str] = field(default_factory=list)

    @classmethod
    def from_dataset(cls, ds: MovieLens, history_len: int = 50) -> MovieLensFeatures:
        columns: dict[str, np.ndarray] = {}
        cardinality: dict[str, int] = {}
        if ds.has_user_features:
            columns = {"age_bucket": ds.age_bucket(), "gender": ds.user_gender,
                       "occupation": ds.user_occupation, "zip_region": zip_region(ds.user_zip)}
            cardinality = {"age_bucket": len(AGE_BUCKETS), "gender": 2,
                           "occupation": len(ds.occupation_vocab), "zip_region": 11}
        lengths = np.array([len(g) for g in ds.item_genres], dtype=np.int64)
        values = np.array([g for gs in ds.item_genres for g in gs], dtype=np.int64)
        return cls(num_users=ds.num_users, num_items=ds.num_items, history_len=history_len,
                   user_columns=columns, user_cardinality=cardinality, item_genre_values=values,
                   item_genre_lengths=lengths, num_genres=max(1, len(ds.genre_vocab)),
                   item_year_bucket=year_bucket(ds.item_year), occupation_vocab=list(ds.occupation_vocab))

    # -- schemas ---------------------------------------------------------------------------

    @property
    def query_schema(self) -> FeatureSchema:
        user = tuple(SparseFeature(name, self.user_cardinality[name]) for name in self.user_columns)
        return FeatureSchema(sparse=(SparseFeature("user_id", self.num_users, max_length=None), *user,
                                     SparseFeature("history", self.num_items, pooling="mean",
                                                   max_length=self.history_len)))

    @property
    def candidate_schema(self) -> FeatureSchema:
        return FeatureSchema(sparse=(SparseFeature("item_id", self.num_items),
                                     SparseFeature("genres", self.num_genres, pooling="mean", max_length=None),
                                     SparseFeature("year_bucket", NUM_YEAR_BUCKETS)))

    # -- batches ---------------------------------------------------------------------------

    def query_batch(self, users: np.ndarray, history: tuple[np.ndarray, np.ndarray],
                    user_columns: dict[str, np.ndarray] | None = None) -> FeatureBatch:
        """Query features for dense user indices with their (values, lengths) histories.

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
        return self.query_schema.from_columns(cols, batch_size=len(users))

    def raw_user_columns(self, records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        """Feature columns from raw user records ``{"age": years, "gender": "M"|"F",
        "occupation": name, "zip": code}``; errors name the record and field."""
        if not self.user_columns:
            return {}
        occupation = {o: k for k, o in enumerate(self.occupation_vocab)}
        cols: dict[str, list[int]] = {"age_bucket": [], "gender": [], "occupation": [], "zip_region": []}
        for r, rec in enumerate(records):
            missing = [f for f in ("age", "gender", "occupation", "zip") if f not in rec]
            if missing:
                raise FeatureError(f"record {r}: missing user field(s) {missing}; a new user needs age, gender, "
                                   f"occupation and zip")
            if rec["gender"] not in ("M", "F"):
                raise FeatureError(f"record {r}: gender must be 'M' or 'F', got {rec['gender']!r}")
            if rec["occupation"] not in occupation:
                raise FeatureError(f"record {r}: unknown occupation {rec['occupation']!r}; one of {self.occupation_vocab}")
            if not isinstance(rec["age"], (int, np.integer)) or not 0 < rec["age"] < 130:
                raise FeatureError(f"record {r}: age must be a whole number of years, got {rec['age']!r}")
            cols["age_bucket"].append(int(np.searchsorted(np.array(AGE_BUCKETS), rec["age"], side="right") - 1))
            cols["gender"].append(int(rec["gender"] == "M"))
            cols["occupation"].append(occupation[rec["occupation"]])
            cols["zip_region"].append(int(zip_region([str(rec["zip"])])[0]))
        return {k: np.asarray(v, dtype=np.int64) for k, v in cols.items()}

    def candidate_batch(self, items: np.ndarray) -> FeatureBatch:
        items = np.asarray(items, dtype=np.int64)
        starts = np.r_[0, np.cumsum(self.item_genre_lengths)[:-1]]
        genres = last_n(self.item_genre_values, starts[items], starts[items] + self.item_genre_lengths[items], 1 << 30)
        return self.candidate_schema.from_columns(
            {"item_id": items, "genres": genres, "year_bucket": self.item_year_bucket[items]}, batch_size=len(items))

    def to_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild this object at serving time (JSON-able)."""
        return {"num_users": self.num_users, "num_items": self.num_items, "history_len": self.history_len,
                "user_columns": {k: v.tolist() for k, v in self.user_columns.items()},
                "user_cardinality": self.user_cardinality, "item_genre_values": self.item_genre_values.tolist(),
                "item_genre_lengths": self.item_genre_lengths.tolist(), "num_genres": self.num_genres,
                "item_year_bucket": self.item_year_bucket.tolist(), "occupation_vocab": self.occupation_vocab}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MovieLensFeatures:
        return cls(num_users=d["num_users"], num_items=d["num_items"], history_len=d["history_len"],
                   user_columns={k: np.asarray(v, dtype=np.int64) for k, v in d["user_columns"].items()},
                   user_cardinality=dict(d["user_cardinality"]),
                   item_genre_values=np.asarray(d["item_genre_values"], dtype=np.int64),
                   item_genre_lengths=np.asarray(d["item_genre_lengths"], dtype=np.int64),
                   num_genres=d["num_genres"], item_year_bucket=np.asarray(d["item_year_bucket"], dtype=np.int64),
                   occupation_vocab=list(d.get("occupation_vocab", [])))
