"""A declarative feature schema and the one converter from raw inputs to TorchRec tensors.

A :class:`FeatureSchema` lists sparse (ID) features and dense (float) features. It converts
either a list of records (dicts, as a request arrives) or columns (arrays, as a data loader
builds them) into a validated :class:`FeatureBatch`: a ``KeyedJaggedTensor`` for the sparse
features, keyed in schema order, and a ``[batch, num_dense]`` float tensor.

Jagged features are first-class: a user's watch history or a movie's genres is a list of IDs of
any length; ``max_length`` keeps the last N (the most recent, for a time-ordered history).
Every problem with the input raises :class:`FeatureError` naming the feature, the record and the
fix, instead of an index error deep inside an embedding kernel.

    schema = FeatureSchema(
        sparse=(SparseFeature("user_id", 943), SparseFeature("history", 1682, max_length=50, pooling="mean")),
        dense=(DenseFeature("age"),),
    )
    batch = schema.from_records([{"user_id": 3, "history": [10, 42], "age": 0.3}])
    batch.sparse["history"].values()   # tensor([10, 42])
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

POOLINGS = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}


class FeatureError(ValueError):
    """Bad input for a feature schema; the message names the feature and the fix."""


@dataclass(frozen=True)
class SparseFeature:
    """An ID feature. ``cardinality``: valid IDs are ``0..cardinality-1``.

    ``max_length=1`` is a single-valued feature (exactly one ID per example); ``None`` allows any
    number of IDs; ``N`` keeps the last N. ``table`` names the embedding table (features sharing
    a table share embeddings, e.g. a history of items and the candidate item); default: ``name``.
    """

    name: str
    cardinality: int
    pooling: str = "sum"
    max_length: int | None = 1
    table: str | None = None

    def __post_init__(self) -> None:
        if self.cardinality < 1:
            raise FeatureError(f"sparse feature {self.name!r}: cardinality must be >= 1, got {self.cardinality}")
        if self.pooling not in POOLINGS:
            raise FeatureError(
                f"sparse feature {self.name!r}: pooling must be one of {sorted(POOLINGS)}, got {self.pooling!r}"
            )
        if self.max_length is not None and self.max_length < 1:
            raise FeatureError(f"sparse feature {self.name!r}: max_length must be >= 1 or None, got {self.max_length}")

    @property
    def table_name(self) -> str:
        return self.table or self.name

    @property
    def single_valued(self) -> bool:
        return self.max_length == 1


@dataclass(frozen=True)
class DenseFeature:
    """A float feature (one value per example)."""

    name: str


@dataclass
class FeatureBatch:
    """Dense ``[B, num_dense]`` float32 tensor and a KJT keyed by the schema's sparse features."""

    dense: torch.Tensor
    sparse: KeyedJaggedTensor

    @property
    def batch_size(self) -> int:
        return self.sparse.stride() if self.sparse.keys() else self.dense.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> FeatureBatch:
        return FeatureBatch(
            self.dense.to(device, non_blocking=non_blocking), self.sparse.to(device, non_blocking=non_blocking)
        )


@dataclass(frozen=True)
class FeatureSchema:
    sparse: tuple[SparseFeature, ...] = ()
    dense: tuple[DenseFeature, ...] = ()

    def __post_init__(self) -> None:
        names = [f.name for f in self.sparse] + [f.name for f in self.dense]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise FeatureError(f"feature names must be unique; repeated: {dupes}")
        by_table: dict[str, int] = {}
        for f in self.sparse:
            if by_table.setdefault(f.table_name, f.cardinality) != f.cardinality:
                raise FeatureError(
                    f"features sharing table {f.table_name!r} disagree on cardinality "
                    f"({by_table[f.table_name]} vs {f.cardinality} for {f.name!r})"
                )

    @property
    def sparse_names(self) -> list[str]:
        return [f.name for f in self.sparse]

    @property
    def dense_names(self) -> list[str]:
        return [f.name for f in self.dense]

    def subset(self, sparse: Collection[str], dense: bool = True) -> FeatureSchema:
        """The schema of the sparse features named in ``sparse`` (in this schema's order), with the
        dense features or without: one side of a split batch (a per-user ranker's users and rows)."""
        return FeatureSchema(tuple(f for f in self.sparse if f.name in sparse), self.dense if dense else ())

    def embedding_bag_configs(self, embedding_dim: int | Mapping[str, int]) -> list[EmbeddingBagConfig]:
        """One ``EmbeddingBagConfig`` per table, listing the features that look it up.

        ``embedding_dim`` is one dim for all tables or a ``{table: dim}`` mapping. Features that
        share a table must share a pooling.
        """
        tables: dict[str, list[SparseFeature]] = {}
        for f in self.sparse:
            tables.setdefault(f.table_name, []).append(f)
        configs = []
        for table, feats in tables.items():
            poolings = {f.pooling for f in feats}
            if len(poolings) > 1:
                raise FeatureError(
                    f"features of table {table!r} use different poolings {sorted(poolings)}; "
                    f"an EmbeddingBagConfig has one pooling per table"
                )
            dim = embedding_dim if isinstance(embedding_dim, int) else embedding_dim[table]
            configs.append(
                EmbeddingBagConfig(
                    name=table,
                    embedding_dim=dim,
                    num_embeddings=feats[0].cardinality,
                    feature_names=[f.name for f in feats],
                    pooling=POOLINGS[feats[0].pooling],
                )
            )
        return configs

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, for artifact manifests."""
        return {"sparse": [asdict(f) for f in self.sparse], "dense": [asdict(f) for f in self.dense]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureSchema:
        return cls(
            sparse=tuple(SparseFeature(**f) for f in d.get("sparse", [])),
            dense=tuple(DenseFeature(**f) for f in d.get("dense", [])),
        )

    # -- records ---------------------------------------------------------------------------

    def from_records(self, records: Sequence[Mapping[str, Any]]) -> FeatureBatch:
        """Convert a list of dicts (feature name -> int, list of ints, or float) to a batch."""
        if isinstance(records, Mapping):
            raise FeatureError("from_records expects a list of records (dicts); got one dict: wrap it in a list")
        known = set(self.sparse_names) | set(self.dense_names)
        for r, rec in enumerate(records):
            if not isinstance(rec, Mapping):
                raise FeatureError(f"record {r}: expected a dict of features, got {type(rec).__name__}")
            unknown = sorted(set(rec) - known)
            if unknown:
                raise FeatureError(
                    f"record {r}: unknown feature(s) {unknown}; the schema has sparse "
                    f"{self.sparse_names} and dense {self.dense_names}"
                )
            missing = [n for n in self.sparse_names + self.dense_names if n not in rec]
            if missing:
                raise FeatureError(
                    f"record {r}: missing feature(s) {missing}; every record needs all of "
                    f"{self.sparse_names + self.dense_names}"
                )
        columns: dict[str, Any] = {}
        for f in self.sparse:
            col = [rec[f.name] for rec in records]
            if all(type(v) is list or type(v) is int for v in col):  # the common case, as JSON decodes
                columns[f.name] = col
                continue
            lists = []
            for r, rec in enumerate(records):
                v = rec[f.name]
                ids = [v] if _is_scalar(v) else v
                if isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, np.ndarray, torch.Tensor)):
                    raise FeatureError(
                        f"sparse feature {f.name!r}, record {r}: expected an integer ID or a "
                        f"list of IDs, got {type(v).__name__} {v!r}"
                    )
                lists.append(ids)
            columns[f.name] = lists
        for f in self.dense:
            columns[f.name] = [rec[f.name] for rec in records]
        return self.from_columns(columns, batch_size=len(records))

    def to_records(self, batch: FeatureBatch) -> list[dict[str, Any]]:
        """The inverse of :meth:`from_records`: one dict per example (an int for a
        single-valued feature, a list of ints otherwise, a float for a dense one)."""
        n = batch.batch_size
        rows: list[dict[str, Any]] = [{} for _ in range(n)]
        for name, jt in batch.sparse.to_dict().items():
            single = self.sparse[self.sparse_names.index(name)].single_valued
            offsets, values = jt.offsets().tolist(), jt.values().tolist()
            for i in range(n):
                ids = values[offsets[i] : offsets[i + 1]]
                rows[i][name] = ids[0] if single else ids
        for j, name in enumerate(self.dense_names):
            for i, v in enumerate(batch.dense[:, j].tolist()):
                rows[i][name] = v
        return rows

    # -- columns ---------------------------------------------------------------------------

    def from_columns(
        self, columns: Mapping[str, Any], batch_size: int | None = None, sync: bool = True
    ) -> FeatureBatch:
        """Convert columns to a batch.

        A sparse column is a 1-D integer array (one ID per example), a list of ID lists, or a
        ``(values, lengths)`` pair of 1-D integer arrays. A dense column is a 1-D float array.
        ``sync``: compute the KJT's offsets and per-key lengths now, on the CPU (what a training
        batch wants before it moves to a GPU); False leaves them to first use, which a model that
        takes only values and lengths (a compiled serving program) never makes.
        """
        unknown = sorted(set(columns) - set(self.sparse_names) - set(self.dense_names))
        if unknown:
            raise FeatureError(
                f"unknown feature(s) {unknown}; the schema has sparse {self.sparse_names} and dense {self.dense_names}"
            )
        missing = [n for n in self.sparse_names + self.dense_names if n not in columns]
        if missing:
            raise FeatureError(f"missing feature(s) {missing}")
        values, lengths = [], []
        for f in self.sparse:
            v, n = self._sparse_column(f, columns[f.name])
            if batch_size is None:
                batch_size = len(n)
            if len(n) != batch_size:
                raise FeatureError(
                    f"sparse feature {f.name!r} has {len(n)} examples, expected {batch_size} "
                    f"(every feature needs one entry per example)"
                )
            values.append(v)
            lengths.append(n)
        dense_cols = []
        for f in self.dense:
            col = self._dense_column(f, columns[f.name])
            if batch_size is None:
                batch_size = len(col)
            if len(col) != batch_size:
                raise FeatureError(f"dense feature {f.name!r} has {len(col)} examples, expected {batch_size}")
            dense_cols.append(col)
        batch_size = batch_size or 0
        dense = (
            torch.from_numpy(np.stack(dense_cols, axis=1))
            if dense_cols
            else torch.zeros(batch_size, 0, dtype=torch.float32)
        )
        kjt = (KeyedJaggedTensor.from_lengths_sync if sync else KeyedJaggedTensor)(
            keys=self.sparse_names,
            values=torch.from_numpy(np.concatenate(values)) if values else torch.zeros(0, dtype=torch.int64),
            lengths=torch.from_numpy(np.concatenate(lengths)) if lengths else torch.zeros(0, dtype=torch.int32),
        )
        return FeatureBatch(dense=dense, sparse=kjt)

    def from_arrays(self, ids: np.ndarray, dense: np.ndarray) -> FeatureBatch:
        """The fast path for schemas of single-valued sparse features (click logs): ``ids`` is
        ``[batch, sparse features]`` and ``dense`` ``[batch, dense features]``, in schema order.
        The same checks as :meth:`from_columns`, vectorized; a failing batch goes through
        ``from_columns`` for the error that names the feature and the example."""
        ids, dense = np.asarray(ids), np.asarray(dense)
        n, k = ids.shape if ids.ndim == 2 else (len(ids), -1)
        if not all(f.single_valued for f in self.sparse):
            raise FeatureError("from_arrays needs single-valued sparse features; use from_columns for lists")
        if k != len(self.sparse) or dense.shape != (n, len(self.dense)):
            raise FeatureError(
                f"from_arrays expects ids [batch, {len(self.sparse)}] and dense [batch, "
                f"{len(self.dense)}], got {ids.shape} and {dense.shape}"
            )
        sizes = np.array([f.cardinality for f in self.sparse], dtype=np.int64)
        if (
            not np.issubdtype(ids.dtype, np.integer)
            or ((ids < 0) | (ids >= sizes)).any()
            or not np.isfinite(dense).all()
        ):
            cols = {f.name: ids[:, j] for j, f in enumerate(self.sparse)}
            cols.update({f.name: dense[:, j] for j, f in enumerate(self.dense)})
            self.from_columns(cols, batch_size=n)  # raises with the details
        total = n * k
        # One ID per example and feature, so lengths, offsets and per-key sizes are known up front
        # (KeyedJaggedTensor would otherwise compute them, with a sync, at first use).
        kjt = KeyedJaggedTensor(
            keys=self.sparse_names,
            values=torch.from_numpy(np.ascontiguousarray(ids.T, dtype=np.int64).reshape(-1)),
            lengths=torch.ones(total, dtype=torch.int32),
            offsets=torch.arange(total + 1),
            stride=n,
            length_per_key=[n] * k,
            offset_per_key=list(range(0, total + 1, n)),
        )
        return FeatureBatch(dense=torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)), sparse=kjt)

    def _sparse_column(self, f: SparseFeature, col: Any) -> tuple[np.ndarray, np.ndarray]:
        fast = _fast_sparse(f, col)
        if fast is not None:
            return fast
        if isinstance(col, tuple) and len(col) == 2:
            vals, lens = _int_array(f, col[0], "values"), _int_array(f, col[1], "lengths")
            if (lens < 0).any():
                raise FeatureError(f"sparse feature {f.name!r}: negative length at example {int(np.argmax(lens < 0))}")
            if int(lens.sum()) != len(vals):
                raise FeatureError(
                    f"sparse feature {f.name!r}: lengths sum to {int(lens.sum())} but "
                    f"{len(vals)} values were given; lengths[i] must count example i's IDs"
                )
        elif isinstance(col, (list, tuple)) and any(not _is_scalar(x) for x in col):
            vals, lens = _flatten_int_lists(col)
            if vals is None:  # something other than lists of ints: check example by example, to name it
                lists = [_int_array(f, [x] if _is_scalar(x) else x, f"example {i}") for i, x in enumerate(col)]
                lens = np.array([len(x) for x in lists], dtype=np.int64)
                vals = np.concatenate(lists) if lists else np.zeros(0, dtype=np.int64)
        else:
            vals = _int_array(f, col, "values")
            lens = np.ones(len(vals), dtype=np.int64)
        if f.single_valued and (lens != 1).any():
            i = int(np.argmax(lens != 1))
            raise FeatureError(
                f"sparse feature {f.name!r} is single-valued but example {i} has {int(lens[i])} "
                f"IDs; give exactly one, or declare max_length=None for a list feature"
            )
        bad = (vals < 0) | (vals >= f.cardinality)
        if bad.any():
            j = int(np.argmax(bad))
            example = int(np.searchsorted(np.cumsum(lens), j, side="right"))
            raise FeatureError(
                f"sparse feature {f.name!r}: ID {int(vals[j])} in example {example} is out of range "
                f"[0, {f.cardinality}); map raw IDs through the dataset's ID map, or raise the "
                f"feature's cardinality"
            )
        if f.max_length is not None and (lens > f.max_length).any():
            vals, lens = _keep_last(vals, lens, f.max_length)
        return vals, lens.astype(np.int32)

    def _dense_column(self, f: DenseFeature, col: Any) -> np.ndarray:
        if isinstance(col, np.ndarray) and col.dtype == np.float32 and col.ndim == 1 and np.isfinite(col).all():
            return col  # the common case, checked in one pass; anything else gets the checks below
        arr = col.detach().cpu().numpy() if isinstance(col, torch.Tensor) else np.asarray(col)
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise FeatureError(
                f"dense feature {f.name!r}: expected numbers, got dtype {arr.dtype} "
                f"(e.g. {arr.reshape(-1)[:1].tolist()})"
            )
        if arr.ndim != 1:
            raise FeatureError(f"dense feature {f.name!r}: expected one value per example (1-D), got shape {arr.shape}")
        arr = arr.astype(np.float32)
        bad = ~np.isfinite(arr)
        if bad.any():
            i = int(np.argmax(bad))
            raise FeatureError(
                f"dense feature {f.name!r}: {arr[i]} in example {i}; impute missing values and "
                f"clip infinities before batching"
            )
        return arr


def _is_int_array(x: Any) -> bool:
    return isinstance(x, np.ndarray) and x.ndim == 1 and x.dtype.kind in "iu"


def _fast_sparse(f: SparseFeature, col: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """The checks of ``_sparse_column`` in as few passes as possible for the common, valid case:
    a 1-D integer array (one ID each) or a ``(values, lengths)`` pair of them, IDs in range. None for
    anything else, or anything wrong: the full checks then run and name the problem."""
    if _is_int_array(col):
        vals, lens = col, None
    elif isinstance(col, tuple) and len(col) == 2 and _is_int_array(col[0]) and _is_int_array(col[1]):
        vals, lens = col
        if len(lens) and (lens.min() < 0 or int(lens.sum()) != len(vals)):
            return None
        if f.single_valued and len(lens) and (lens.min() != 1 or lens.max() != 1):
            return None
    else:
        return None
    if len(vals) and (vals.min() < 0 or vals.max() >= f.cardinality):
        return None
    vals = vals.astype(np.int64, copy=False)
    if lens is None:
        return vals, np.ones(len(vals), dtype=np.int32)
    lens = lens.astype(np.int64, copy=False)
    if f.max_length is not None and len(lens) and lens.max() > f.max_length:
        vals, lens = _keep_last(vals, lens, f.max_length)
    return vals, lens.astype(np.int32)


def _is_scalar(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) or (
        isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim == 0
    )


def _int_array(f: SparseFeature, x: Any, what: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise FeatureError(
            f"sparse feature {f.name!r} ({what}): expected integer IDs, got dtype {arr.dtype} "
            f"(e.g. {arr.reshape(-1)[:1].tolist()}); cast IDs to int64"
        )
    if arr.ndim != 1:
        raise FeatureError(f"sparse feature {f.name!r} ({what}): expected a 1-D array, got shape {arr.shape}")
    return arr.astype(np.int64)


def _flatten_int_lists(col: Sequence[Any]) -> tuple[np.ndarray | None, np.ndarray]:
    """(values, lengths) for a column of Python int lists (and bare ints) in one pass, or
    ``(None, ...)`` when it holds anything else."""
    lens = np.fromiter((len(x) if isinstance(x, list) else 1 for x in col), dtype=np.int64, count=len(col))
    flat: list[Any] = []
    for x in col:
        if isinstance(x, list):
            flat += x
        elif isinstance(x, int) and not isinstance(x, bool):
            flat.append(x)
        else:
            return None, lens
    if not flat:
        return np.zeros(0, dtype=np.int64), lens
    try:
        arr = np.array(flat)
    except (OverflowError, ValueError):
        return None, lens
    if arr.dtype.kind != "i" or arr.ndim != 1:  # floats, bools, strings, nested lists, IDs >= 2**63
        return None, lens
    return arr.astype(np.int64), lens


def _keep_last(vals: np.ndarray, lens: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep each example's last ``n`` IDs (the most recent, for time-ordered lists)."""
    ends = np.cumsum(lens)
    new_lens = np.minimum(lens, n)
    keep = np.zeros(len(vals), dtype=bool)
    for end, k in zip(ends, new_lens):
        keep[end - k : end] = True
    return vals[keep], new_lens


__all__ = ["DenseFeature", "FeatureBatch", "FeatureError", "FeatureSchema", "SparseFeature"]
