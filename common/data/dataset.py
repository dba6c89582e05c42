"""The canonical interaction data set every stage reads, whatever its source.

An :class:`InteractionData` holds interactions ``(user, item, timestamp)`` (and an optional rating
or weight), the raw IDs behind the dense indices, optional item titles, and optional user and item
feature columns. Three adapters produce it: MovieLens (common/data/movielens.py), interaction logs
of one's own (common/data/logs.py) and the synthetic generator (bench/synthetic.py). The
stages build their features from the columns a data set has (common/data/tables.py), never from
a data set's name.

- Raw IDs are 64-bit integers or strings. Dense indices ``0..N-1`` follow the sorted raw IDs
  (numeric order for integers, code-point order for strings); the maps travel with every artifact.
- The catalog is the set of items with at least one interaction, the users are those with one.
- Interactions are sorted per user by ``(timestamp, tie key)`` (:func:`time_order`): the form owns
  its order, and the split (common/data/split.py) only reads it.
- A feature column is one of three kinds:
  ``categorical`` (one value per row, an index into ``vocab``), ``multi`` (a list of vocab indices
  per row, jagged) or ``numeric`` (a float, NaN where unknown; ``center`` / ``scale`` normalise it
  for models that take dense inputs, and ``boundaries`` bucket it for models that take only IDs).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field

import numpy as np

KINDS = ("categorical", "multi", "numeric")
MISSING = "<missing>"  # vocab entry of a categorical value an entity has no record for


def tie_keys(raw_user: np.ndarray, raw_item: np.ndarray) -> np.ndarray:
    """uint64 tie key of each (raw user ID, raw item ID) pair, as the protocol defines it
    (common/data/split.py's docstring says why a hash)."""
    sha = hashlib.sha256
    digests = b"".join(
        sha(f"{u}:{i}".encode("ascii")).digest()[:8]
        for u, i in zip(np.asarray(raw_user).tolist(), np.asarray(raw_item).tolist())
    )
    return np.frombuffer(digests, dtype=">u8").astype(np.uint64)


def time_order(
    timestamp: np.ndarray, raw_user: np.ndarray, raw_item: np.ndarray, group: np.ndarray | None = None
) -> np.ndarray:
    """The permutation that sorts interactions by ``(group, timestamp, tie_key)``; ``group`` is the
    dense user index for per-user order, ``None`` for one global order. Only rows that share
    ``(group, timestamp)`` with another are hashed: elsewhere the key cannot change the order."""
    timestamp = np.asarray(timestamp, dtype=np.int64)
    group = np.zeros(len(timestamp), np.int64) if group is None else np.asarray(group, dtype=np.int64)
    order = np.lexsort((timestamp, group))
    g, t = group[order], timestamp[order]
    same = (g[1:] == g[:-1]) & (t[1:] == t[:-1])
    tied = np.zeros(len(order), dtype=bool)
    tied[1:] |= same
    tied[:-1] |= same
    rows = order[tied]
    key = np.zeros(len(order), dtype=np.uint64)
    key[rows] = tie_keys(np.asarray(raw_user)[rows], np.asarray(raw_item)[rows])
    return np.lexsort((key, timestamp, group))


@dataclass(frozen=True)
class Feature:
    """One user or item feature column, indexed by dense user / item index. See the module docstring."""

    kind: str
    values: np.ndarray  # categorical: int64 [n]; multi: int64 [sum(lengths)]; numeric: float64 [n]
    lengths: np.ndarray | None = None  # multi: int64 [n]
    vocab: tuple[str, ...] = ()  # categorical / multi: the raw value of each index
    center: float = 0.0  # numeric: dense value = (x - center) / scale, 0 where unknown
    scale: float = 1.0
    boundaries: tuple[float, ...] | None = None  # numeric: bucket = 1 + #boundaries <= x, 0 where unknown

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"feature kind must be one of {KINDS}, got {self.kind!r}")
        if (self.kind == "multi") != (self.lengths is not None):
            raise ValueError("a multi-valued feature needs lengths; other kinds have none")
        if self.kind == "numeric" and self.scale == 0:
            raise ValueError("a numeric feature's scale must not be 0")

    def __len__(self) -> int:
        return len(self.lengths if self.lengths is not None else self.values)

    @property
    def cardinality(self) -> int:
        """Number of IDs an embedding table for this feature needs (buckets for numeric)."""
        if self.kind == "numeric":
            return len(self.boundaries) + 2 if self.boundaries is not None else 0
        return max(1, len(self.vocab))

    def take(self, rows: np.ndarray) -> Feature:
        """The column for ``rows`` (a reindexing: dense order, a subset)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.lengths is None:
            return dataclasses.replace(self, values=self.values[rows])
        starts = np.r_[0, np.cumsum(self.lengths)[:-1]].astype(np.int64)
        lengths = self.lengths[rows]
        begin = np.repeat(starts[rows] - np.r_[0, np.cumsum(lengths)[:-1]], lengths) + np.arange(lengths.sum())
        return dataclasses.replace(self, values=self.values[begin.astype(np.int64)], lengths=lengths)

    def dense(self) -> np.ndarray:
        """Numeric: the normalised float32 column (0 where unknown)."""
        x = (np.asarray(self.values, dtype=np.float64) - self.center) / self.scale
        return np.where(np.isnan(x), 0.0, x).astype(np.float32)

    def buckets(self) -> np.ndarray:
        """Numeric with boundaries: the int64 bucket of each row (0 where unknown)."""
        x = np.asarray(self.values, dtype=np.float64)
        b = 1 + np.searchsorted(np.asarray(self.boundaries, dtype=np.float64), x, side="right")
        return np.where(np.isnan(x), 0, b).astype(np.int64)

    def raw(self) -> list:
        """Every row's value as the data spells it: a vocab entry (categorical), a list of them
        (multi), a float or None (numeric)."""
        if self.kind == "numeric":
            return [None if np.isnan(x) else float(x) for x in np.asarray(self.values, np.float64).tolist()]
        vocab = np.asarray(self.vocab, dtype=object)
        if self.kind == "categorical":
            return vocab[np.asarray(self.values)].tolist()
        ends = np.cumsum(self.lengths)
        return [vocab[self.values[e - n : e]].tolist() for e, n in zip(ends.tolist(), self.lengths.tolist())]


@dataclass
class InteractionData:
    """One data set in canonical form (see the module docstring). Arrays are indexed by dense IDs."""

    name: str
    source: str
    user: np.ndarray  # int64 [n], dense user index, sorted by (user, timestamp, tie key)
    item: np.ndarray  # int64 [n], dense item index
    rating: np.ndarray  # float32 [n]: the rating or weight; 1 where the log has none
    timestamp: np.ndarray  # int64 [n], seconds
    user_raw_ids: np.ndarray  # [num_users]: int64 or str (object) raw ID of each dense index
    item_raw_ids: np.ndarray  # [num_items]
    item_title: list[str] | None = None  # display title of each item, None where the data set has none
    user_features: dict[str, Feature] = field(default_factory=dict)
    item_features: dict[str, Feature] = field(default_factory=dict)
    repeats: bool = False  # coming back to an item is a valid target (common/data/split.py)
    # Known from a prepared cache (common/data/logs.py, :meth:`with_known`), so that a rank need not
    # read every interaction to get them; else computed from the arrays (the offsets once). Not init
    # fields: ``dataclasses.replace`` with other arrays starts without them.
    known_indptr: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    known_fingerprint: str | None = field(default=None, init=False, repr=False, compare=False)

    def with_known(self, indptr: np.ndarray | None, fingerprint: str | None) -> InteractionData:
        """This data set with its user offsets and fingerprint as already computed (a cache's)."""
        self.known_indptr, self.known_fingerprint = indptr, fingerprint
        return self

    @property
    def num_users(self) -> int:
        return len(self.user_raw_ids)

    @property
    def num_items(self) -> int:
        return len(self.item_raw_ids)

    @property
    def num_interactions(self) -> int:
        return len(self.user)

    @property
    def has_user_features(self) -> bool:
        return bool(self.user_features)

    @property
    def indptr(self) -> np.ndarray:
        """int64 [num_users + 1]: user ``u``'s interactions are rows ``indptr[u]:indptr[u + 1]``."""
        if self.known_indptr is None:
            out = np.zeros(self.num_users + 1, dtype=np.int64)
            np.cumsum(np.bincount(self.user, minlength=self.num_users), out=out[1:])
            self.known_indptr = out
        return self.known_indptr

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the interactions (raw IDs, ratings, timestamps) in canonical order.

        Equal for the same data whatever the source, so artifacts trained on one copy can be
        checked against the data they are served with.
        """
        if self.known_fingerprint is not None:
            return self.known_fingerprint
        h = hashlib.sha256(self.name.encode() + (b":repeats" if self.repeats else b""))
        for ids, index in ((self.user_raw_ids, self.user), (self.item_raw_ids, self.item)):
            h.update(raw_id_bytes(ids)[index].tobytes() if ids.dtype.kind in "iu" else _string_digest(ids, index))
        for arr in (np.round(self.rating * 2).astype(np.int64), self.timestamp):
            h.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
        return h.hexdigest()

    def title(self, item: int) -> str:
        """The display title of dense ``item``, or its raw ID where the data set has no titles."""
        return self.item_title[item] if self.item_title is not None else str(self.item_raw_ids[item])

    def stats(self) -> dict[str, object]:
        n_per_user = np.bincount(self.user, minlength=self.num_users)
        return {
            "dataset": self.name,
            "source": self.source,
            "users": self.num_users,
            "items": self.num_items,
            "interactions": self.num_interactions,
            "density": self.num_interactions / (self.num_users * self.num_items),
            "interactions_per_user_min": int(n_per_user.min()),
            "interactions_per_user_median": float(np.median(n_per_user)),
            "user_features": {k: f.kind for k, f in self.user_features.items()},
            "item_features": {k: f.kind for k, f in self.item_features.items()},
            "has_titles": self.item_title is not None,
            "repeats": self.repeats,
            "first_timestamp": int(self.timestamp.min()),
            "last_timestamp": int(self.timestamp.max()),
            "fingerprint": self.fingerprint,
        }


def raw_id_bytes(ids: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(ids, dtype=np.int64)


def _string_digest(ids: np.ndarray, index: np.ndarray) -> bytes:
    # Strings: each raw ID's SHA-256, laid out in interaction order (length-safe, unlike a join).
    per_id = np.frombuffer(b"".join(hashlib.sha256(str(s).encode()).digest() for s in ids), dtype="S32")
    return per_id[index].tobytes()


def raw_ids(values) -> np.ndarray:
    """Raw IDs read back from JSON: int64 where they are integers, else text (object)."""
    a = np.asarray(values)
    return a.astype(np.int64) if a.dtype.kind in "iu" or len(a) == 0 else a.astype(object)


def id_key(x):
    """A raw ID as a lookup key: text stays text, every integer type becomes a Python int."""
    return x if isinstance(x, str) else int(x)


def dense_ids(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique raw IDs, dense index of each row)."""
    ids, index = np.unique(raw, return_inverse=True)
    return ids, index.astype(np.int64)


def build_dataset(
    name: str,
    source: str,
    user_raw: np.ndarray,
    item_raw: np.ndarray,
    timestamp: np.ndarray,
    rating: np.ndarray | None = None,
    *,
    users: tuple[np.ndarray, dict[str, Feature]] | None = None,
    items: tuple[np.ndarray, dict[str, Feature]] | None = None,
    item_title: tuple[np.ndarray, list[str]] | None = None,
    dense: tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
    repeats: bool = False,
) -> InteractionData:
    """Map raw IDs to dense indices, sort the interactions, align feature tables to the indices.

    ``users`` / ``items`` are ``(raw IDs of the table's rows, {name: Feature over those rows})``;
    ``item_title`` is ``(raw IDs, titles)``. Rows for IDs without interactions are dropped. A user
    or item with interactions but no row gets :data:`MISSING` (categorical), no values (multi),
    NaN (numeric), and an empty title. ``dense`` gives ``((user IDs, user index), (item IDs, item
    index))`` where the caller has already mapped them (a columnar reader does it faster).
    """
    if dense is None:
        dense = dense_ids(np.asarray(user_raw)), dense_ids(np.asarray(item_raw))
    (user_ids, user), (item_ids, item) = dense
    order = time_order(timestamp, user_raw, item_raw, group=user)  # per user, by time, ties by tie key
    ds = InteractionData(
        name=name,
        source=source,
        user=user[order],
        item=item[order],
        rating=(np.ones(len(order), np.float32) if rating is None else np.asarray(rating, np.float32)[order]),
        timestamp=np.asarray(timestamp, dtype=np.int64)[order],
        user_raw_ids=user_ids,
        item_raw_ids=item_ids,
        repeats=repeats,
    )
    if users is not None:
        ds.user_features = align_features(user_ids, *users)
    if items is not None:
        ds.item_features = align_features(item_ids, *items)
    if item_title is not None:
        rows, found = _rows_of(item_ids, np.asarray(item_title[0]))
        titles = np.asarray(item_title[1], dtype=object)
        ds.item_title = [str(titles[r]) if ok else "" for r, ok in zip(rows.tolist(), found.tolist())]
    return ds


def _rows_of(ids: np.ndarray, table_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``ids``, its row in ``table_ids`` and whether it has one."""
    s = np.sort(table_ids)
    dup = s[1:][s[1:] == s[:-1]]
    if len(dup):
        raise ValueError(f"a feature table lists ID {dup[0]!r} more than once; keep one row per ID")
    order = np.argsort(table_ids, kind="stable")
    pos = np.clip(np.searchsorted(table_ids[order], ids), 0, max(0, len(table_ids) - 1))
    found = (table_ids[order][pos] == ids) if len(table_ids) else np.zeros(len(ids), bool)
    return order[pos], found


def align_features(ids: np.ndarray, table_ids: np.ndarray, columns: dict[str, Feature]) -> dict[str, Feature]:
    """Reindex feature columns given over ``table_ids`` rows to the dense order of ``ids``."""
    rows, found = _rows_of(ids, np.asarray(table_ids))
    out = {}
    for name, f in columns.items():
        g = f.take(rows)
        if not found.all():
            if f.kind == "categorical":
                vocab = f.vocab if MISSING in f.vocab else (*f.vocab, MISSING)
                g = dataclasses.replace(g, values=np.where(found, g.values, vocab.index(MISSING)), vocab=vocab)
            elif f.kind == "numeric":
                g = dataclasses.replace(g, values=np.where(found, g.values, np.nan))
            else:
                lengths = np.where(found, g.lengths, 0)
                keep = np.repeat(found, g.lengths)
                g = dataclasses.replace(g, values=g.values[keep], lengths=lengths)
        out[name] = g
    return out
