"""Per-user and per-item feature tables, built once from a data set's canonical columns
(common/data/dataset.py) and saved with exports. Each stage builds its schema from them.

What each kind of column becomes:
- categorical: an ID feature (``user_columns`` / ``item_columns``) for every model;
- multi-valued (items): a jagged ID feature (``item_multi``), mean-pooled;
- numeric: a dense value ``(x - center) / scale`` for models with dense inputs (the ranker:
  ``user_dense`` / ``item_dense``) and, when the column declares bucket boundaries, an ID feature
  ``<name>_bucket`` for the ID-only models (the two towers).

Nothing here knows which data set it came from: MovieLens's genres and years, a shop's brands and
prices and a synthetic log's topics all arrive as such columns.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.data.dataset import MISSING, Feature, InteractionData
from common.features import FeatureError


def last_n(items: np.ndarray, starts: np.ndarray, ends: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """For each row, ``items[max(start, end - n):end]`` as jagged (values, lengths)."""
    begin = np.maximum(starts, ends - n)
    lengths = (ends - begin).astype(np.int64)
    total = int(lengths.sum())
    offsets = np.repeat(begin - np.r_[0, np.cumsum(lengths)[:-1]], lengths) + np.arange(total)
    return items[offsets], lengths


def _id_columns(features: dict[str, Feature]) -> tuple[dict[str, np.ndarray], dict[str, int], list[str]]:
    """(single-valued ID columns, cardinality of every ID feature, names of the categoricals)."""
    columns: dict[str, np.ndarray] = {}
    cardinality: dict[str, int] = {}
    categorical: list[str] = []
    for name, f in features.items():
        if f.kind == "categorical":
            columns[name], cardinality[name] = np.asarray(f.values, np.int64), f.cardinality
            categorical.append(name)
        elif f.kind == "numeric" and f.boundaries is not None:
            columns[f"{name}_bucket"], cardinality[f"{name}_bucket"] = f.buckets(), f.cardinality
        elif f.kind == "multi":
            cardinality[name] = f.cardinality
    return columns, cardinality, categorical


def _numeric_spec(f: Feature) -> dict[str, Any]:
    return {"center": f.center, "scale": f.scale, "boundaries": list(f.boundaries) if f.boundaries else None}


@dataclass
class FeatureTables:
    """Per-user and per-item feature columns, indexed by dense user / item index."""

    num_users: int
    num_items: int
    user_columns: dict[str, np.ndarray]  # ID features of users: categoricals and numeric buckets, int64
    user_cardinality: dict[str, int]
    item_columns: dict[str, np.ndarray] = field(default_factory=dict)  # single-valued ID features of items
    item_multi: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # (values, lengths)
    item_cardinality: dict[str, int] = field(default_factory=dict)  # of item_columns and item_multi
    item_order: list[str] = field(default_factory=list)  # item ID features in the data set's column order
    user_dense: dict[str, np.ndarray] = field(default_factory=dict)  # normalised numeric columns, float32
    item_dense: dict[str, np.ndarray] = field(default_factory=dict)
    user_categorical: list[str] = field(default_factory=list)  # the categoricals among user_columns
    item_categorical: list[str] = field(default_factory=list)
    user_vocab: dict[str, list[str]] = field(default_factory=dict)  # raw value of each ID, per categorical
    user_numeric: dict[str, dict[str, Any]] = field(default_factory=dict)  # center / scale / boundaries
    _starts: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_dataset(cls, ds: InteractionData, **extra: Any):
        """Build the tables from a data set; ``extra`` fills a subclass's own fields."""
        user_columns, user_card, user_cat = _id_columns(ds.user_features)
        item_columns, item_card, item_cat = _id_columns(ds.item_features)
        item_order = []
        for name, f in ds.item_features.items():
            if f.kind in ("categorical", "multi"):
                item_order.append(name)
            elif f.boundaries is not None:
                item_order.append(f"{name}_bucket")
        return cls(
            num_users=ds.num_users,
            num_items=ds.num_items,
            user_columns=user_columns,
            user_cardinality=user_card,
            item_columns=item_columns,
            item_multi={n: (f.values, f.lengths) for n, f in ds.item_features.items() if f.kind == "multi"},
            item_cardinality=item_card,
            item_order=item_order,
            user_dense={n: f.dense() for n, f in ds.user_features.items() if f.kind == "numeric"},
            item_dense={n: f.dense() for n, f in ds.item_features.items() if f.kind == "numeric"},
            user_categorical=user_cat,
            item_categorical=item_cat,
            user_vocab={n: list(f.vocab) for n, f in ds.user_features.items() if f.kind == "categorical"},
            user_numeric={n: _numeric_spec(f) for n, f in ds.user_features.items() if f.kind == "numeric"},
            **extra,
        )

    def item_multi_rows(self, name: str, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Multi-valued item feature ``name`` of ``items`` as jagged (values, lengths)."""
        values, lengths = self.item_multi[name]
        items = np.asarray(items, dtype=np.int64)
        starts = self._starts.get(name)
        if starts is None:  # once per column, not per batch
            starts = self._starts[name] = np.r_[0, np.cumsum(lengths)[:-1]].astype(np.int64)
        return last_n(values, starts[items], starts[items] + lengths[items], 1 << 30)

    def item_id_columns(self, items: np.ndarray, names: list[str] | None = None) -> dict[str, Any]:
        """The item ID features ``names`` (default: all, in column order) of ``items``."""
        return {
            name: self.item_multi_rows(name, items) if name in self.item_multi else self.item_columns[name][items]
            for name in (self.item_order if names is None else names)
        }

    def raw_user_columns(self, records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        """ID feature columns of new users from their raw values ``{feature: value}`` (a categorical's
        value as the data set spells it, a number for a numeric column); errors name the record and
        field. Missing fields of a categorical that has a missing value take it."""
        cols: dict[str, list[int]] = {name: [] for name in self.user_columns}
        vocab = {name: {v: k for k, v in enumerate(vs)} for name, vs in self.user_vocab.items()}
        for r, rec in enumerate(records):
            for name in self.user_categorical:
                value = rec.get(name, MISSING if MISSING in vocab[name] else None)
                if value is None:
                    raise FeatureError(
                        f"record {r}: missing user field {name!r}; a new user needs {sorted(self.user_vocab)}"
                    )
                if str(value) not in vocab[name]:
                    shown = self.user_vocab[name][:20]
                    raise FeatureError(
                        f"record {r}: unknown {name} {value!r}; one of {shown}{' ...' if len(vocab[name]) > 20 else ''}"
                    )
                cols[name].append(vocab[name][str(value)])
            for name, spec in self.user_numeric.items():
                if spec["boundaries"] is None:
                    continue
                value = rec.get(name)
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float, np.number))):
                    raise FeatureError(f"record {r}: {name} must be a number, got {value!r}")
                x = np.array([np.nan if value is None else float(value)])
                f = Feature("numeric", x, boundaries=tuple(spec["boundaries"]))
                cols[f"{name}_bucket"].append(int(f.buckets()[0]))
        return {k: np.asarray(v, dtype=np.int64) for k, v in cols.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (for exports); :meth:`from_dict` inverts it, for subclasses too."""
        out: dict[str, Any] = {"format": "feature-tables/1"}
        for f in dataclasses.fields(self):
            if f.init:
                out[f.name] = _jsonable(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        if d.get("format") != "feature-tables/1":
            raise ValueError(
                "these feature tables were written by an older version (before the canonical data form); "
                "export the model again"
            )
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.init and f.name in d}
        ints = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
        kw["user_columns"] = {k: ints(v) for k, v in d["user_columns"].items()}
        kw["item_columns"] = {k: ints(v) for k, v in d["item_columns"].items()}
        kw["item_multi"] = {k: (ints(v[0]), ints(v[1])) for k, v in d["item_multi"].items()}
        for name in ("user_dense", "item_dense"):
            kw[name] = {k: np.asarray(v, dtype=np.float32) for k, v in d[name].items()}
        return cls(**kw)


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v
