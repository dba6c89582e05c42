"""MovieLens feature tables shared by the stages: per-user and per-item columns, built once
from the canonical :class:`~common.data.movielens.MovieLens` and saved with exports.

User columns (where the set has them): ``age_bucket`` (ml-1m's 7 buckets), ``gender``,
``occupation``, ``zip_region`` (first zip digit). Item columns: ``genres`` (jagged) and
``year_bucket`` (5-year bins). Each stage builds its own schema from these tables.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.data.movielens import AGE_BUCKETS, MovieLens
from common.features import FeatureError

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
class MovieLensTables:
    """Per-user and per-item feature columns, indexed by dense user / item index."""

    num_users: int
    num_items: int
    user_columns: dict[str, np.ndarray]  # feature name -> int64 [num_users]; empty without user features
    user_cardinality: dict[str, int]
    item_genre_values: np.ndarray  # jagged genres of every item
    item_genre_lengths: np.ndarray
    num_genres: int
    item_year_bucket: np.ndarray  # int64 [num_items]
    occupation_vocab: list[str] = field(default_factory=list)

    @classmethod
    def from_dataset(cls, ds: MovieLens, **extra: Any):
        """Build the tables from a data set; ``extra`` fills a subclass's own fields."""
        columns: dict[str, np.ndarray] = {}
        cardinality: dict[str, int] = {}
        if ds.has_user_features:
            columns = {
                "age_bucket": ds.age_bucket(),
                "gender": ds.user_gender,
                "occupation": ds.user_occupation,
                "zip_region": zip_region(ds.user_zip),
            }
            cardinality = {
                "age_bucket": len(AGE_BUCKETS),
                "gender": 2,
                "occupation": len(ds.occupation_vocab),
                "zip_region": 11,
            }
        lengths = np.array([len(g) for g in ds.item_genres], dtype=np.int64)
        values = np.array([g for gs in ds.item_genres for g in gs], dtype=np.int64)
        return cls(
            num_users=ds.num_users,
            num_items=ds.num_items,
            user_columns=columns,
            user_cardinality=cardinality,
            item_genre_values=values,
            item_genre_lengths=lengths,
            num_genres=max(1, len(ds.genre_vocab)),
            item_year_bucket=year_bucket(ds.item_year),
            occupation_vocab=list(ds.occupation_vocab),
            **extra,
        )

    def item_genres(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The genres of ``items`` as jagged (values, lengths)."""
        items = np.asarray(items, dtype=np.int64)
        starts = np.r_[0, np.cumsum(self.item_genre_lengths)[:-1]]
        return last_n(self.item_genre_values, starts[items], starts[items] + self.item_genre_lengths[items], 1 << 30)

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
                raise FeatureError(
                    f"record {r}: missing user field(s) {missing}; a new user needs age, gender, occupation and zip"
                )
            if rec["gender"] not in ("M", "F"):
                raise FeatureError(f"record {r}: gender must be 'M' or 'F', got {rec['gender']!r}")
            if rec["occupation"] not in occupation:
                raise FeatureError(
                    f"record {r}: unknown occupation {rec['occupation']!r}; one of {self.occupation_vocab}"
                )
            if not isinstance(rec["age"], (int, np.integer)) or not 0 < rec["age"] < 130:
                raise FeatureError(f"record {r}: age must be a whole number of years, got {rec['age']!r}")
            cols["age_bucket"].append(int(np.searchsorted(np.array(AGE_BUCKETS), rec["age"], side="right") - 1))
            cols["gender"].append(int(rec["gender"] == "M"))
            cols["occupation"].append(occupation[rec["occupation"]])
            cols["zip_region"].append(int(zip_region([str(rec["zip"])])[0]))
        return {k: np.asarray(v, dtype=np.int64) for k, v in cols.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (for exports); :meth:`from_dict` inverts it, for subclasses too."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = (
                {k: c.tolist() for k, c in v.items()}
                if f.name == "user_columns"
                else v.tolist()
                if isinstance(v, np.ndarray)
                else v
            )
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        kw["user_columns"] = {k: np.asarray(v, dtype=np.int64) for k, v in d["user_columns"].items()}
        for name in ("item_genre_values", "item_genre_lengths", "item_year_bucket"):
            kw[name] = np.asarray(d[name], dtype=np.int64)
        return cls(**kw)
