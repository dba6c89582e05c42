"""The column readers behind common/data/logs.py: a log's files read column by column (pyarrow),
each column typed with errors that name the file, the row (1-based, counting data rows) and the
column, and the fix; the users' and items' feature tables."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path
from typing import Any

import numpy as np

from common.data.dataset import Feature

TIME_UNITS = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


class LogError(ValueError):
    """Bad log input; the message names the file, row and column, and the fix."""


def files_of(path: str) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.parquet"))
        if not files:
            raise LogError(f"{p}: a folder with no *.parquet files")
        return files
    if not p.is_file():
        raise LogError(f"{p}: no such file")
    return [p]


def read_file(path: Path, columns: list[str], where: str):
    """A pyarrow table of ``columns`` from one Parquet or CSV file; text stays text for CSV."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    name = path.name.removesuffix(".gz")
    if name.endswith((".csv", ".tsv")):
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as fh:
            header = fh.readline().decode("utf-8", "replace").rstrip("\r\n")
        sep = "\t" if name.endswith(".tsv") else ","
        have = next(csv.reader([header], delimiter=sep)) if header else []
        check_columns(path, columns, have, where)
        table = pcsv.read_csv(
            path,
            parse_options=pcsv.ParseOptions(delimiter=sep),
            convert_options=pcsv.ConvertOptions(
                include_columns=columns,
                column_types={c: pa.string() for c in columns},  # typed below, with row-exact errors
                strings_can_be_null=True,
            ),
        )
        return table
    try:
        schema = pq.read_schema(path)
    except Exception as err:  # noqa: BLE001 (pyarrow raises several types for a non-Parquet file)
        raise LogError(f"{path}: not a Parquet or CSV file ({err}); Parquet, .csv or .tsv (optionally .gz)") from None
    check_columns(path, columns, schema.names, where)
    return pq.read_table(path, columns=columns)


def check_columns(path: Path, want: list[str], have: list[str], where: str) -> None:
    missing = [c for c in want if c not in have]
    if missing:
        raise LogError(f"{path}: no column {missing[0]!r} (named by {where} in the spec); the file has {have}")


class Rows:
    """Row bookkeeping across shards, for errors that name the file and row."""

    def __init__(self) -> None:
        self.files: list[tuple[Path, int]] = []  # (file, rows)

    def locate(self, row: int) -> tuple[Path, int]:
        for f, n in self.files:
            if row < n:
                return f, row + 1
            row -= n
        raise IndexError(row)


def read_columns(files: list[Path], columns: list[str], where: str) -> tuple[dict[str, Any], Rows]:
    import pyarrow as pa

    tables, rows = [], Rows()
    for f in files:
        t = read_file(f, columns, where)
        rows.files.append((f, t.num_rows))
        tables.append(t)
    # Shards may type a column differently (int32 in one, int64 in another): unify, as text if need be.
    out = {}
    for c in columns:
        parts = [t.column(c) for t in tables]
        types = {p.type for p in parts}
        if len(types) > 1:
            try:
                target = pa.int64() if all(pa.types.is_integer(t) for t in types) else pa.string()
                parts = [p.cast(target) for p in parts]
            except pa.ArrowInvalid as err:
                raise LogError(
                    f"{files[0].parent}: column {c!r} has different types across shards ({types}): {err}"
                ) from None
        out[c] = pa.chunked_array([ch for p in parts for ch in p.chunks], type=parts[0].type)
    return out, rows


def bad_row(rows: Rows, row: int, column: str, problem: str, fix: str) -> LogError:
    f, r = rows.locate(int(row))
    return LogError(f"{f}: row {r}, column {column!r}: {problem}; {fix}")


def parse_ids(col, kind: str | None, rows: Rows, column: str, bad: np.ndarray, skip: bool) -> np.ndarray:
    """IDs as int64 or str (object) numpy; empty or non-integer IDs are errors, or marked in ``bad``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    null = np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        null |= np.asarray(pc.equal(pc.utf8_trim_whitespace(col), "").fill_null(True).to_numpy(zero_copy_only=False))
    if null.any():
        if not skip:
            raise bad_row(rows, np.flatnonzero(null)[0], column, "empty ID", "fill it, or pass --on-bad-row skip")
        bad |= null
    if pa.types.is_integer(col.type):
        if kind == "string":
            return np.asarray(col.cast(pa.string()).to_numpy(zero_copy_only=False), dtype=object)
        return col.fill_null(0).to_numpy().astype(np.int64)
    if pa.types.is_floating(col.type) or not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        col = col.cast(pa.string())
    text = col.fill_null("")
    if kind == "string":
        return np.asarray(text.to_numpy(zero_copy_only=False), dtype=object)
    if not null.any():
        try:  # the fast path: every ID is an integer
            return pc.cast(pc.utf8_trim_whitespace(text), pa.int64()).to_numpy()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
    is_int = np.asarray(pc.match_substring_regex(text, r"^\s*[-+]?\d{1,19}\s*$").to_numpy(zero_copy_only=False))
    wrong = ~is_int & ~null
    if kind is None and wrong.any():  # not declared: text IDs
        return np.asarray(text.to_numpy(zero_copy_only=False), dtype=object)
    if wrong.any():
        if not skip:
            first = int(np.flatnonzero(wrong)[0])
            raise bad_row(
                rows,
                first,
                column,
                f"ID {text[first].as_py()!r} is not an integer",
                'declare "id_type": "string" in the spec for text IDs, or fix the row',
            )
        bad |= wrong
    out = np.zeros(len(text), dtype=np.int64)
    ok = ~wrong & ~null
    out[ok] = np.asarray(text.to_numpy(zero_copy_only=False)[ok], dtype=object).astype(np.int64)
    return out


def parse_timestamps(col, unit: str, rows: Rows, column: str, bad: np.ndarray, skip: bool) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    null = np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    if pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
        secs = col.cast(pa.timestamp("s")).cast(pa.int64()).fill_null(0).to_numpy()
        wrong = np.zeros(len(secs), bool)
    elif pa.types.is_integer(col.type):
        secs = col.fill_null(0).to_numpy().astype(np.int64) // TIME_UNITS[unit]
        wrong = np.zeros(len(secs), bool)
    else:
        text = col.cast(pa.string()).fill_null("")
        numeric = np.asarray(pc.match_substring_regex(text, r"^\s*\d{1,19}\s*$").to_numpy(zero_copy_only=False))
        arr = np.asarray(text.to_numpy(zero_copy_only=False), dtype=object)
        secs = np.zeros(len(arr), dtype=np.int64)
        secs[numeric] = arr[numeric].astype(np.int64) // TIME_UNITS[unit]
        wrong = ~numeric & ~null
        if wrong.any():  # ISO 8601 text, with or without a zone (UTC when none)
            rows_ = np.flatnonzero(wrong)
            parsed = iso_seconds(pa.array(arr[rows_].tolist(), type=pa.string()))
            if parsed is None:  # mixed forms: row by row (the slow path, for the odd one out)
                parsed = np.array([iso_one(v) for v in arr[rows_].tolist()], dtype=object)
                good = parsed != None  # noqa: E711 (an object array)
                secs[rows_[good]] = parsed[good].astype(np.int64)
                wrong[rows_[good]] = False
            else:
                secs[rows_] = parsed
                wrong[:] = False
    null &= ~wrong
    for mask, problem in ((null, "empty timestamp"), (wrong, "unparsable timestamp")):
        if mask.any():
            if not skip:
                first = int(np.flatnonzero(mask)[0])
                shown = "" if problem.startswith("empty") else f" {col[first].as_py()!r}"
                raise bad_row(
                    rows,
                    first,
                    column,
                    problem + shown,
                    f"integers in timestamp_unit ({unit}), a Parquet timestamp or ISO 8601 text; or --on-bad-row skip",
                )
            bad |= mask
    return secs


def iso_seconds(text) -> np.ndarray | None:
    """Seconds since the epoch of ISO 8601 strings, all naive (read as UTC) or all zoned; None if
    some do not parse."""
    import pyarrow as pa

    text = pa.compute.utf8_trim_whitespace(text)
    for unit in (pa.timestamp("us"), pa.timestamp("us", tz="UTC")):
        try:
            return text.cast(unit).cast(pa.int64()).to_numpy() // 1_000_000
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue
    return None


def iso_one(value: str) -> int | None:
    import pyarrow as pa

    got = iso_seconds(pa.array([value], type=pa.string()))
    return None if got is None else int(got[0])


def parse_numbers(col, rows: Rows, column: str, what: str, bad: np.ndarray | None = None) -> np.ndarray:
    """Floats (NaN where empty); text that is not a number is an error, or marked in ``bad``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type):
        return col.cast(pa.float64()).fill_null(np.nan).to_numpy()
    text = pc.utf8_trim_whitespace(col.cast(pa.string()))
    try:  # the fast path: every value a number or empty
        return pc.if_else(pc.equal(text, ""), None, text).cast(pa.float64()).fill_null(np.nan).to_numpy()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass  # find the bad value, row by row, to name it
    arr = np.asarray(text.fill_null("").to_numpy(zero_copy_only=False), dtype=object)
    out = np.full(len(arr), np.nan)
    for r, v in enumerate(arr.tolist()):
        if v == "":
            continue
        try:
            out[r] = float(v)
        except ValueError:
            if bad is None:
                raise bad_row(
                    rows, r, column, f"{what} {v!r} is not a number", "fix the value, or leave it empty"
                ) from None
            bad[r] = True
    return out


def parse_feature(col, spec: dict[str, Any], rows: Rows, column: str) -> Feature:
    import pyarrow as pa

    kind = spec["type"]
    if kind == "numeric":
        x = parse_numbers(col, rows, column, "value")
        known = x[~np.isnan(x)]
        center = float(spec.get("center", known.mean() if len(known) else 0.0))
        scale = float(spec.get("scale", known.std() if len(known) > 1 and known.std() > 0 else 1.0))
        if "boundaries" in spec:
            boundaries = tuple(float(b) for b in spec["boundaries"])
        elif "buckets" in spec:
            qs = np.quantile(known, np.linspace(0, 1, int(spec["buckets"]) + 1)[1:-1]) if len(known) else []
            boundaries = tuple(float(b) for b in np.unique(qs))
        else:
            boundaries = None
        return Feature("numeric", x, center=center, scale=scale, boundaries=boundaries)
    if kind == "multi":
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            lists = [[str(v) for v in (row or [])] for row in col.to_pylist()]
        else:
            sep = spec.get("separator", "|")
            lists = [[v for v in (row or "").split(sep) if v] for row in col.cast(pa.string()).to_pylist()]
        values = [v for row in lists for v in row]
        vocab = vocab_of(values, spec, rows, column, [r for r, row in enumerate(lists) for _ in row])
        index = {v: k for k, v in enumerate(vocab)}
        return Feature(
            "multi",
            np.array([index[v] for v in values], dtype=np.int64),
            lengths=np.array([len(row) for row in lists], dtype=np.int64),
            vocab=vocab,
        )
    text = col.cast(pa.string()) if not pa.types.is_string(col.type) else col
    values = ["" if v is None else v for v in text.to_pylist()]
    vocab = vocab_of(values, spec, rows, column, list(range(len(values))))
    index = {v: k for k, v in enumerate(vocab)}
    return Feature("categorical", np.array([index[v] for v in values], dtype=np.int64), vocab=vocab)


def vocab_of(values: list[str], spec: dict[str, Any], rows: Rows, column: str, row_of: list[int]) -> tuple[str, ...]:
    if "vocab" not in spec:
        return tuple(sorted(set(values)))
    vocab = tuple(str(v) for v in spec["vocab"])
    known = set(vocab)
    for n, v in enumerate(values):
        if v not in known:
            raise bad_row(
                rows, row_of[n], column, f"value {v!r} is not in the declared vocab", "add it to the spec's vocab"
            )
    return vocab


def read_table(spec: dict[str, Any], kind_of_id: str | None, where: str):
    """(raw IDs, {name: Feature}, titles or None) of a users or items table."""
    title = spec.get("title") or []
    title = [title] if isinstance(title, str) else list(title)  # one column, or several joined
    columns = [spec["id"], *spec.get("features", {}), *title]
    cols, rows = read_columns(files_of(spec["path"]), list(dict.fromkeys(columns)), where)
    ids = parse_ids(cols[spec["id"]], spec.get("id_type", kind_of_id), rows, spec["id"], np.zeros(0, bool), False)
    features = {name: parse_feature(cols[name], f, rows, name) for name, f in spec.get("features", {}).items()}
    titles = None
    if title:
        parts = [[None if t is None else str(t).strip() for t in cols[c].to_pylist()] for c in title]
        titles = [" · ".join(p for p in row if p) for row in zip(*parts)]
    return ids, features, titles
