"""Interaction logs of one's own: Parquet or CSV files described by a small spec, read into the
canonical form (common/data/dataset.py) and cached as memory-mappable arrays.

A spec (JSON, or TOML) names the files and columns; paths are relative to the spec's folder::

    {
      "name": "shop",
      "interactions": {"path": "clicks/", "user": "customer", "item": "sku", "timestamp": "ts",
                       "timestamp_unit": "ms", "rating": "quantity"},
      "users": {"path": "customers.csv", "id": "customer",
                "features": {"segment": {"type": "categorical"}, "age": {"type": "numeric", "buckets": 8}}},
      "items": {"path": "products.parquet", "id": "sku", "title": "name",
                "features": {"brand": {"type": "categorical"},
                             "tags": {"type": "multi", "separator": "|"},
                             "price": {"type": "numeric", "boundaries": [5, 10, 20, 50, 100]}}}
    }

- ``path``: a Parquet file, a folder of Parquet shards (``*.parquet``, read in name order), or a
  CSV file (``.csv``, ``.tsv``, optionally gzipped); ``users`` and ``items`` are optional.
- IDs: ``"id_type": "int64"`` or ``"string"`` per table (interactions: ``user_type``,
  ``item_type``); by default integers where the column holds integers, strings otherwise.
- ``timestamp``: integers in ``timestamp_unit`` (``s`` default, ``ms``, ``us``, ``ns``), a Parquet
  timestamp, or ISO 8601 text; stored as whole seconds.
- ``rating`` (optional): a number per interaction (a rating, a quantity); 1 without it. With
  ``"drop_nonpositive_rating": true`` rows whose rating is 0 or less (a purchase log's returns) are
  left out and counted.
- ``repeats`` (top level, default false): whether coming back to an item is a valid target (a
  purchase or play log). The protocol then keeps seen items in every list (common/data/split.py).
- ``title`` (items): a column, or a list of columns joined with " · " (empty parts left out).
- A key the reader does not know, at any level, is an error that lists the keys allowed there.
- Features: ``categorical`` (any value, kept as text; ``vocab`` fixes the order of the IDs,
  else sorted), ``multi`` (a Parquet list, or text split on ``separator``), ``numeric`` (``center``
  and ``scale`` default to the column's mean and standard deviation; ``boundaries`` or ``buckets``
  (quantiles) give the ID-only models a bucketed copy).

Bad input stops with the file, row (1-based, counting data rows) and column, and the fix: a
missing file or column, an empty ID, a non-integer ID where integers were declared, an empty or
unparsable timestamp, a non-numeric rating or numeric feature. With ``on_bad_row="skip"``
(``--on-bad-row skip``) a bad interaction row is left out and counted instead.

The column readers (files, IDs, timestamps, numbers, feature tables) are common/data/log_columns.py.

Prepared data is cached under ``<data dir>/logs/<name>-<fingerprint>/``: the fingerprint hashes the
spec and every input file's bytes, so a changed file is read again and an unchanged one is
memory-mapped in a fraction of a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from common.data.dataset import Feature, InteractionData, build_dataset
from common.data.log_columns import (
    TIME_UNITS,
    LogError,
    Rows,
    bad_row,
    files_of,
    parse_ids,
    parse_numbers,
    parse_timestamps,
    read_columns,
    read_table,
)

READER_VERSION = "logs/1"
ID_TYPES = ("int64", "string")


# ---------------------------------------------------------------------------------------------
# The spec


def read_spec(path: str | Path) -> dict[str, Any]:
    """The spec at ``path`` (JSON or TOML), checked, with paths resolved against its folder."""
    path = Path(path)
    if not path.is_file():
        raise LogError(f"{path}: no such dataset spec file; --dataset takes a MovieLens name or a spec path")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            import tomllib

            spec = tomllib.loads(text)
        else:
            spec = json.loads(text)
    except ValueError as err:
        raise LogError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {err}") from None
    where = str(path)
    _check_keys(spec, SPEC_KEYS, where)
    _require(spec, "interactions", where)
    inter = spec["interactions"]
    for key in ("path", "user", "item", "timestamp"):
        _require(inter, key, f"{where}: interactions")
    unit = inter.get("timestamp_unit", "s")
    if unit not in TIME_UNITS:
        raise LogError(f"{where}: interactions.timestamp_unit must be one of {sorted(TIME_UNITS)}, got {unit!r}")
    for key in ("user_type", "item_type"):
        if inter.get(key, "int64") not in ID_TYPES:
            raise LogError(f"{where}: interactions.{key} must be one of {ID_TYPES}, got {inter[key]!r}")
    for table in ("users", "items"):
        if table in spec:
            _require(spec[table], "path", f"{where}: {table}")
            _require(spec[table], "id", f"{where}: {table}")
            for name, f in spec[table].get("features", {}).items():
                kind = f.get("type")
                if kind not in ("categorical", "multi", "numeric"):
                    raise LogError(
                        f"{where}: {table}.features.{name}.type must be categorical, multi or numeric, got {kind!r}"
                    )
                if kind == "multi" and table == "users":
                    raise LogError(f"{where}: users.features.{name}: multi-valued features are for items only")
    spec = json.loads(json.dumps(spec))  # a plain copy
    spec.setdefault("name", path.stem)
    base = path.resolve().parent
    for table in ("interactions", "users", "items"):
        if table in spec:
            spec[table]["path"] = str((base / spec[table]["path"]).resolve())
    return spec


# Every key a spec may hold, per level: a misspelt key ("repets") is an error, never ignored.
SPEC_KEYS = {
    "": ("name", "repeats", "interactions", "users", "items"),
    "interactions": (
        "path", "user", "item", "timestamp", "timestamp_unit", "rating", "user_type", "item_type",
        "drop_nonpositive_rating",
    ),
    "users": ("path", "id", "id_type", "features"),
    "items": ("path", "id", "id_type", "features", "title"),
    "feature": ("type", "vocab", "separator", "center", "scale", "boundaries", "buckets"),
}  # fmt: skip


def _check_keys(spec: dict[str, Any], allowed: dict[str, tuple[str, ...]], where: str) -> None:
    """Every key of ``spec`` (and of its tables and features) is one the reader knows."""

    def check(d: Any, level: str, at: str) -> None:
        if not isinstance(d, dict):
            raise LogError(f"{where}: {at or 'the spec'} must be an object, got {type(d).__name__}")
        for key in d:
            if key not in allowed[level]:
                raise LogError(
                    f"{where}: unknown key {key!r} in {at or 'the top level'}; the keys allowed there: "
                    f"{', '.join(allowed[level])}"
                )

    check(spec, "", "")
    if not isinstance(spec.get("repeats", False), bool):
        raise LogError(
            f"{where}: repeats must be true or false, got {spec['repeats']!r}; true where coming back to an "
            f"item is a valid target (purchases, plays), false where each item is consumed once (ratings)"
        )
    for table in ("interactions", "users", "items"):
        if table in spec:
            check(spec[table], table, table)
    for table in ("users", "items"):
        for name, f in (spec.get(table, {}).get("features") or {}).items():
            check(f, "feature", f"{table}.features.{name}")


def _require(d: dict, key: str, where: str) -> None:
    if not isinstance(d, dict) or key not in d:
        raise LogError(f"{where}: missing {key!r}; see common/data/logs.py for the spec's fields")


def fingerprint_inputs(spec: dict[str, Any], on_bad_row: str) -> str:
    """SHA-256 of the spec, the reader version and every input file's name and bytes."""
    h = hashlib.sha256(json.dumps([READER_VERSION, on_bad_row, spec], sort_keys=True).encode())
    for table in ("interactions", "users", "items"):
        if table in spec:
            for f in files_of(spec[table]["path"]):
                h.update(f.name.encode())
                with open(f, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 22), b""):
                        h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# The whole log


def _ratings(spec_path, inter: dict[str, Any], cols, rows: Rows, bads: dict[str, np.ndarray], skip: bool):
    """The rating column as floats (None without one); marks bad rows, and with
    ``drop_nonpositive_rating`` the rows rated 0 or less, in ``bads``."""
    if not inter.get("rating"):
        if inter.get("drop_nonpositive_rating"):
            raise LogError(
                f"{spec_path}: drop_nonpositive_rating needs a rating column; name it in interactions.rating"
            )
        return None
    n = len(cols[inter["rating"]])
    bads["rating"] = np.zeros(n, bool)
    rating = parse_numbers(cols[inter["rating"]], rows, inter["rating"], "rating", bads["rating"] if skip else None)
    empty = np.isnan(rating) & ~bads["rating"]
    if empty.any() and not skip:
        raise bad_row(rows, np.flatnonzero(empty)[0], inter["rating"], "empty rating", "fill it, or --on-bad-row skip")
    bads["rating"] |= empty
    if inter.get("drop_nonpositive_rating"):
        # Not interactions (a purchase log's returns and adjustments): left out and counted, so that
        # anyone's scorer reading the raw file builds the same split.
        bads["not_positive"] = ~(rating > 0) & ~bads["rating"]
    return rating


def read_log(spec_path: str | Path, on_bad_row: str = "error") -> tuple[InteractionData, dict[str, Any]]:
    """Read a log through its spec into the canonical form (no cache); also return a report of
    what was read and skipped."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    skip = on_bad_row == "skip"
    spec = read_spec(spec_path)
    inter = spec["interactions"]
    names = [inter["user"], inter["item"], inter["timestamp"], *([inter["rating"]] if inter.get("rating") else [])]
    cols, rows = read_columns(files_of(inter["path"]), list(dict.fromkeys(names)), "interactions")
    n = len(cols[inter["user"]])
    if n == 0:
        raise LogError(f"{inter['path']}: the interaction log has no rows")
    skipped: dict[str, int] = {}
    bads = {}
    bads["user"] = np.zeros(n, bool)
    user = parse_ids(cols[inter["user"]], inter.get("user_type"), rows, inter["user"], bads["user"], skip)
    bads["item"] = np.zeros(n, bool)
    item = parse_ids(cols[inter["item"]], inter.get("item_type"), rows, inter["item"], bads["item"], skip)
    bads["timestamp"] = np.zeros(n, bool)
    ts = parse_timestamps(
        cols[inter["timestamp"]], inter.get("timestamp_unit", "s"), rows, inter["timestamp"], bads["timestamp"], skip
    )
    rating = _ratings(spec_path, inter, cols, rows, bads, skip)
    bad = np.zeros(n, bool)
    for what, mask in bads.items():
        if mask.any():
            skipped[what] = int((mask & ~bad).sum())
            bad |= mask
    if bad.any():
        keep = ~bad
        user, item, ts = user[keep], item[keep], ts[keep]
        rating = rating[keep] if rating is not None else None
        print(f"note: left out {int(bad.sum()):,} interaction rows of {n:,} ({skipped})", file=sys.stderr)
        if not keep.any():
            raise LogError(f"{inter['path']}: every interaction row is bad ({skipped})")

    # Dense IDs: sorted unique raw IDs. Integers by numpy; text through Arrow's dictionary encoding.
    def dense(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if raw.dtype.kind in "iu":
            ids, index = np.unique(raw, return_inverse=True)
            return ids, index.astype(np.int64)
        enc = pc.dictionary_encode(pa.array(raw, type=pa.string()))
        uniq = np.asarray(enc.dictionary.to_numpy(zero_copy_only=False), dtype=object)
        order = np.argsort(uniq.astype(str), kind="stable")
        rank = np.empty(len(order), np.int64)
        rank[order] = np.arange(len(order))
        return uniq[order], rank[enc.indices.to_numpy()]

    tables: dict[str, Any] = {}
    for table, raw in (("users", user), ("items", item)):
        if table in spec:
            declared = spec[table].get("id_type") or ("string" if raw.dtype == object else "int64")
            ids, features, titles = read_table(spec[table], declared, table)
            if (ids.dtype == object) != (raw.dtype == object):
                raise LogError(
                    f"{spec[table]['path']}: its IDs are {'text' if ids.dtype == object else 'integers'} but the "
                    f"interactions' are {'text' if raw.dtype == object else 'integers'}; declare the same id_type"
                )
            tables[table] = (ids, features, titles)
    items_table = tables.get("items")
    ds = build_dataset(
        spec["name"],
        f"log:{spec_path}",
        user,
        item,
        ts,
        rating,
        users=(tables["users"][0], tables["users"][1]) if "users" in tables else None,
        items=(items_table[0], items_table[1]) if items_table else None,
        item_title=(items_table[0], items_table[2]) if items_table and items_table[2] is not None else None,
        dense=(dense(user), dense(item)),
        repeats=bool(spec.get("repeats", False)),
    )
    report = {"rows": n, "skipped": skipped, "kept": int(n - bad.sum())}
    return ds, report


# ---------------------------------------------------------------------------------------------
# The cache


def load_log(
    spec_path: str | Path, data_dir: str | Path | None = None, on_bad_row: str = "error", cache: bool = True
) -> InteractionData:
    """The log described by ``spec_path`` in canonical form, from the cache when its inputs are
    unchanged (arrays memory-mapped), else read and cached."""
    from common.data.download import default_data_dir

    spec = read_spec(spec_path)
    if not cache:
        return read_log(spec_path, on_bad_row)[0]
    key = fingerprint_inputs(spec, on_bad_row)
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    folder = root / "logs" / f"{_safe(spec['name'])}-{key[:16]}"
    if (folder / "meta.json").is_file():
        return _load_cached(folder, spec_path)
    if int(os.environ.get("WORLD_SIZE") or 1) > 1 and int(os.environ.get("LOCAL_RANK") or 0) != 0:
        # Under torchrun the first process on this host prepares the log; the others wait for its
        # cache instead of each reading the whole log (torchrun stops them if it fails).
        limit = float(os.environ.get("RECSYS_PREPARE_WAIT_S") or 7200)
        print(f"waiting for local rank 0 to prepare {spec_path} into {folder}", file=sys.stderr)
        deadline = time.monotonic() + limit
        while not (folder / "meta.json").is_file():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{folder}: local rank 0 has not prepared {spec_path} in {limit:.0f} s "
                    f"(RECSYS_PREPARE_WAIT_S); prepare it first with python -m common.prepare_data "
                    f"--dataset {spec_path}, or check rank 0's output"
                )
            time.sleep(1.0)
        return _load_cached(folder, spec_path)
    t0 = time.perf_counter()
    ds, report = read_log(spec_path, on_bad_row)
    _save_cached(ds, folder, {**report, "inputs_fingerprint": key, "read_s": round(time.perf_counter() - t0, 2)})
    return ds


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:64] or "log"


def _save_ids(path: Path, ids: np.ndarray) -> None:
    np.save(path, ids.astype(str) if ids.dtype == object else ids, allow_pickle=False)


def _save_cached(ds: InteractionData, folder: Path, report: dict[str, Any]) -> None:
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("user", "item", "rating", "timestamp", "indptr"):
        np.save(tmp / f"{name}.npy", getattr(ds, name), allow_pickle=False)
    _save_ids(tmp / "user_raw_ids.npy", ds.user_raw_ids)
    _save_ids(tmp / "item_raw_ids.npy", ds.item_raw_ids)
    features: dict[str, Any] = {}
    for side, fs in (("user", ds.user_features), ("item", ds.item_features)):
        for name, f in fs.items():
            stem = f"{side}.{_safe(name)}"
            np.save(tmp / f"{stem}.values.npy", f.values, allow_pickle=False)
            if f.lengths is not None:
                np.save(tmp / f"{stem}.lengths.npy", f.lengths, allow_pickle=False)
            features.setdefault(side, {})[name] = {
                "file": stem,
                "kind": f.kind,
                "vocab": list(f.vocab),
                "center": f.center,
                "scale": f.scale,
                "boundaries": list(f.boundaries) if f.boundaries is not None else None,
            }
    if ds.item_title is not None:
        (tmp / "titles.json").write_text(json.dumps(ds.item_title))
    meta = {
        "format": READER_VERSION,
        "name": ds.name,
        "string_ids": {"user": ds.user_raw_ids.dtype == object, "item": ds.item_raw_ids.dtype == object},
        "features": features,
        "report": report,
        "fingerprint": ds.fingerprint,
    }
    if ds.repeats:
        meta["repeats"] = True
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    # Whole or not at all: a crash mid-write leaves only the .tmp folder. Under torchrun every rank may
    # prepare the same log at once; the first rename wins and the others drop their copy.
    try:
        tmp.rename(folder)
    except OSError:
        if not (folder / "meta.json").is_file():
            raise
    shutil.rmtree(tmp, ignore_errors=True)


def _load_cached(folder: Path, spec_path: str | Path) -> InteractionData:
    meta = json.loads((folder / "meta.json").read_text())

    def arr(name: str) -> np.ndarray:
        return np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)

    def ids(side: str) -> np.ndarray:
        a = np.load(folder / f"{side}_raw_ids.npy", allow_pickle=False)
        return a.astype(object) if meta["string_ids"][side] else a

    features: dict[str, dict[str, Feature]] = {"user": {}, "item": {}}
    for side, fs in meta["features"].items():
        for name, f in fs.items():
            features[side][name] = Feature(
                f["kind"],
                np.load(folder / f"{f['file']}.values.npy", allow_pickle=False),
                lengths=np.load(folder / f"{f['file']}.lengths.npy") if f["kind"] == "multi" else None,
                vocab=tuple(f["vocab"]),
                center=f["center"],
                scale=f["scale"],
                boundaries=tuple(f["boundaries"]) if f["boundaries"] is not None else None,
            )
    titles = folder / "titles.json"
    ds = InteractionData(
        name=meta["name"],
        source=f"log:{spec_path}",
        user=arr("user"),
        item=arr("item"),
        rating=arr("rating"),
        timestamp=arr("timestamp"),
        user_raw_ids=ids("user"),
        item_raw_ids=ids("item"),
        item_title=json.loads(titles.read_text()) if titles.is_file() else None,
        user_features=features["user"],
        item_features=features["item"],
        repeats=bool(meta.get("repeats", False)),
    )
    # A cache from before the offsets were saved computes them once, from the user column.
    return ds.with_known(arr("indptr") if (folder / "indptr.npy").is_file() else None, meta["fingerprint"])


# ---------------------------------------------------------------------------------------------
# Writing a data set as a log (the exactness check, the synthetic generator's output)


def write_log(ds: InteractionData, folder: str | Path, fmt: str = "parquet", shards: int = 1) -> Path:
    """Write ``ds`` as an interaction log with users / items tables and a spec that reads it back
    into the same canonical form (vocab orders, numeric scaling and buckets declared); return the
    spec's path. ``fmt``: ``parquet`` (``shards`` files in a folder when > 1) or ``csv``."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    string_ids = ds.user_raw_ids.dtype == object

    def ids(raw: np.ndarray, index: np.ndarray):
        return pa.array(
            raw[index].astype(str) if raw.dtype == object else raw[index],
            type=pa.string() if raw.dtype == object else pa.int64(),
        )

    def write(table, stem: str) -> str:
        if fmt == "csv":
            pcsv.write_csv(table, folder / f"{stem}.csv")
            return f"{stem}.csv"
        if shards > 1 and stem == "interactions":
            (folder / stem).mkdir(exist_ok=True)
            bounds = np.linspace(0, table.num_rows, shards + 1).astype(int)
            for s in range(shards):
                pq.write_table(
                    table.slice(bounds[s], bounds[s + 1] - bounds[s]), folder / stem / f"part-{s:05d}.parquet"
                )
            return stem
        pq.write_table(table, folder / f"{stem}.parquet")
        return f"{stem}.parquet"

    inter = pa.table(
        {
            "user_id": ids(ds.user_raw_ids, np.asarray(ds.user)),
            "item_id": ids(ds.item_raw_ids, np.asarray(ds.item)),
            "timestamp": pa.array(np.asarray(ds.timestamp), type=pa.int64()),
            "rating": pa.array(np.asarray(ds.rating), type=pa.float32()),
        }
    )
    spec: dict[str, Any] = {
        "name": ds.name,
        **({"repeats": True} if ds.repeats else {}),
        "interactions": {
            "path": write(inter, "interactions"),
            "user": "user_id",
            "item": "item_id",
            "timestamp": "timestamp",
            "rating": "rating",
            "user_type": "string" if string_ids else "int64",
            "item_type": "string" if ds.item_raw_ids.dtype == object else "int64",
        },
    }
    for side, raw, fs in (("users", ds.user_raw_ids, ds.user_features), ("items", ds.item_raw_ids, ds.item_features)):
        if not fs and not (side == "items" and ds.item_title is not None):
            continue
        cols: dict[str, Any] = {"id": ids(raw, np.arange(len(raw)))}
        fspec: dict[str, Any] = {}
        for name, f in fs.items():
            if f.kind == "numeric":
                cols[name] = pa.array(np.asarray(f.values, np.float64), mask=np.isnan(f.values), type=pa.float64())
                fspec[name] = {"type": "numeric", "center": f.center, "scale": f.scale}
                if f.boundaries is not None:
                    fspec[name]["boundaries"] = list(f.boundaries)
            elif f.kind == "categorical":
                cols[name] = pa.array(np.asarray(f.vocab, dtype=object)[f.values].astype(str))
                fspec[name] = {"type": "categorical", "vocab": list(f.vocab)}
            else:
                vocab = np.asarray(f.vocab, dtype=object)
                starts = np.r_[0, np.cumsum(f.lengths)[:-1]]
                rows = [vocab[f.values[s : s + n]].tolist() for s, n in zip(starts, f.lengths)]
                if fmt == "csv":
                    cols[name] = pa.array(["|".join(r) for r in rows])
                    fspec[name] = {"type": "multi", "vocab": list(f.vocab), "separator": "|"}
                else:
                    cols[name] = pa.array(rows, type=pa.list_(pa.string()))
                    fspec[name] = {"type": "multi", "vocab": list(f.vocab)}
        if side == "items" and ds.item_title is not None:
            cols["title"] = pa.array(list(ds.item_title), type=pa.string())
        spec[side] = {
            "path": write(pa.table(cols), side),
            "id": "id",
            "id_type": "string" if raw.dtype == object else "int64",
            "features": fspec,
            **({"title": "title"} if "title" in cols else {}),
        }
    path = folder / "dataset.json"
    path.write_text(json.dumps(spec, indent=1))
    return path
