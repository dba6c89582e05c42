"""Criteo click logs: the Kaggle / Terabyte TSV format, TorchRec's ``.npy`` format, and a
generator of files in the TSV format for tests and benchmarks.

TSV rows are ``label, I1..I13, C1..C26`` separated by tabs: 13 integer counts (may be negative
or missing) and 26 categorical values as 8-hex-digit hashes (may be missing). Missing values
become 0 (as in TorchRec's ``tsv_to_npys``). Dense features get DLRM's transform
``log(1 + max(x, 0))`` (facebookresearch/dlrm ``data_utils.py``); categorical hashes are taken
modulo each feature's table size. A malformed line (also: a count that is not a finite integer
below 2**53, such as ``inf`` or ``1e400``; a category wider than 64 bits; bytes that are not ASCII)
is an error naming the file and line, or, with ``on_bad_line="skip"``, dropped and counted, never
silently. Negative counts are a real
feature of the logs (int_1 holds -1, -2 and -3 in the Kaggle and Terabyte files), so by default
(``negatives="clamp"``) they are set to 0 as DLRM's reference preprocessing does, and counted
per column; ``negatives="bad_line"`` treats a line with one as malformed instead (an error, or
skipped and counted under ``on_bad_line="skip"``).

TorchRec's preprocessed format has three arrays per day: ``day_{d}_dense.npy`` (float32
``[N, 13]``, already log-transformed by TorchRec's own preprocessing), ``day_{d}_sparse.npy``
(``[N, 26]`` raw hashes, or contiguous IDs) and ``day_{d}_labels.npy`` (int32 ``[N, 1]``).
"""

from __future__ import annotations

import io
import itertools
import re
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

NUM_DENSE = 13
NUM_SPARSE = 26
DENSE_NAMES = [f"int_{i}" for i in range(NUM_DENSE)]
SPARSE_NAMES = [f"cat_{i}" for i in range(NUM_SPARSE)]
MAX_COUNT = 1 << 53  # larger "counts" (1e300, 1e400 = inf) are not counts, and lose integer precision
MAX_ID = 1 << 64  # categorical hashes are at most 64 bits
# A well-formed chunk holds digits, hex letters, '-', tabs and newlines only: anything else ("inf",
# "nan", "1.5", bytes that are not ASCII) sends the chunk to the line-by-line check, which names it.
_FOREIGN = re.compile(r"[^0-9a-fA-F\t\n\r-]")


@dataclass
class CriteoArrays:
    dense: np.ndarray  # float32 [N, 13], log-transformed
    sparse: np.ndarray  # int64 [N, 26], in [0, table size) per column
    labels: np.ndarray  # float32 [N]

    def __len__(self) -> int:
        return len(self.labels)


def table_sizes(num_embeddings: int | Sequence[int]) -> np.ndarray:
    sizes = (
        np.full(NUM_SPARSE, num_embeddings, dtype=np.int64)
        if isinstance(num_embeddings, int)
        else np.asarray(num_embeddings, dtype=np.int64)
    )
    if sizes.shape != (NUM_SPARSE,) or (sizes < 1).any():
        raise ValueError(f"num_embeddings must be one positive int or {NUM_SPARSE} of them; got {num_embeddings}")
    return sizes


def dense_transform(raw: np.ndarray) -> np.ndarray:
    """DLRM's dense transform: negatives and missing to 0, then log(1 + x)."""
    return np.log1p(np.maximum(np.nan_to_num(raw, nan=0.0), 0)).astype(np.float32)


def _line_problem(line: str, ncols: int, has_label: bool, negative_is_bad: bool = False) -> str | None:
    """Why one TSV line is malformed, or None if it is fine."""
    if not line.isascii():
        return "has bytes that are not ASCII text (Criteo lines are tab-separated digits and hex)"
    fields = line.rstrip("\n").split("\t")
    if len(fields) != ncols:
        return (
            f"has {len(fields)} fields, expected {ncols} ({'label, ' if has_label else ''}13 integers, "
            f"26 hex categories, tab-separated)"
        )
    if has_label and fields[0] not in ("0", "1"):
        return f"label must be 0 or 1, got {fields[0]!r}"
    offset = int(has_label)
    for j, value in enumerate(fields[offset : offset + NUM_DENSE]):
        if value:
            try:
                number = int(value)
            except ValueError:
                return f"{DENSE_NAMES[j]} must be an integer, got {value!r}"
            if abs(number) >= MAX_COUNT:
                return f"{DENSE_NAMES[j]} is out of range for a count (|x| < 2**53), got {value!r}"
            if negative_is_bad and number < 0:
                return f"{DENSE_NAMES[j]} is a negative count, got {value!r}"
    for j, value in enumerate(fields[offset + NUM_DENSE :]):
        if value:
            try:
                wide = int(value, 16) >= MAX_ID
            except ValueError:
                return f"{SPARSE_NAMES[j]} must be a hex hash, got {value!r}"
            if wide or value.startswith("-"):
                return f"{SPARSE_NAMES[j]} must be a hex hash of at most 64 bits, got {value!r}"
    return None


def iter_criteo_tsv(
    path: str | Path,
    num_embeddings: int | Sequence[int],
    chunk_rows: int = 1 << 18,
    has_label: bool = True,
    max_rows: int | None = None,
    on_bad_line: str = "error",
    skipped: Counter[str] | None = None,
    negatives: str = "clamp",
    clamped: Counter[str] | None = None,
) -> Iterator[CriteoArrays]:
    """Read a Criteo TSV file in chunks of ``chunk_rows`` lines.

    ``has_label=False`` reads the Kaggle test file, which has no label column (labels are -1).
    A malformed line (wrong number of fields, a label other than 0/1, a non-integer count, a
    non-hex category) raises ``ValueError`` naming the file, the line and the problem; with
    ``on_bad_line="skip"`` it is dropped instead, counted by problem in ``skipped``, and the
    count is reported on stderr at the end. Negative counts are clamped to 0 and counted per
    column in ``clamped`` (``negatives="clamp"``), or make the line malformed
    (``negatives="bad_line"``).
    """
    if on_bad_line not in ("error", "skip"):
        raise ValueError(f"on_bad_line must be 'error' or 'skip', got {on_bad_line!r}")
    if negatives not in ("clamp", "bad_line"):
        raise ValueError(f"negatives must be 'clamp' or 'bad_line', got {negatives!r}")
    bad_negative = negatives == "bad_line"
    n_clamped: Counter[str] = clamped if clamped is not None else Counter()
    sizes = table_sizes(num_embeddings)
    ncols = NUM_DENSE + NUM_SPARSE + int(has_label)
    names = (["label"] if has_label else []) + DENSE_NAMES + SPARSE_NAMES
    counts: Counter[str] = skipped if skipped is not None else Counter()
    line = 0
    # Bytes that are not ASCII become lone surrogates instead of a UnicodeDecodeError without a line
    # number: the line check then names the line (or counts it under on_bad_line="skip").
    with open(path, encoding="ascii", errors="surrogateescape") as f:
        while max_rows is None or line < max_rows:
            want = chunk_rows if max_rows is None else min(chunk_rows, max_rows - line)
            lines = list(itertools.islice(f, want))
            if not lines:
                break
            try:
                yield _parse_chunk(lines, names, ncols, has_label, sizes, bad_negative, n_clamped)
            except _MalformedChunk:
                # Slow path, only for chunks with a bad line: check every line, then parse the good ones.
                problems = [_line_problem(x, ncols, has_label, bad_negative) for x in lines]
                bad = [i for i, p in enumerate(problems) if p is not None]
                if on_bad_line == "error":
                    raise ValueError(
                        f"{path}: line {line + bad[0] + 1}: {problems[bad[0]]}; fix the file or "
                        f"pass on_bad_line='skip' to drop and count such lines"
                    ) from None
                for i in bad:
                    counts[problems[i].split(",")[0].split(" got ")[0]] += 1
                good = [x for x, p in zip(lines, problems) if p is None]
                if good:
                    yield _parse_chunk(good, names, ncols, has_label, sizes, bad_negative, n_clamped)
            line += len(lines)
    if counts and skipped is None:
        print(f"warning: {path}: skipped {sum(counts.values())} malformed lines: {dict(counts)}", file=sys.stderr)
    if n_clamped and clamped is None:
        print(f"note: {path}: clamped negative counts to 0: {dict(n_clamped)}", file=sys.stderr)


class _MalformedChunk(Exception):
    pass


def _parse_chunk(
    lines: list[str],
    names: list[str],
    ncols: int,
    has_label: bool,
    sizes: np.ndarray,
    bad_negative: bool,
    clamped: Counter[str],
) -> CriteoArrays:
    """Vectorized parse of well-formed lines; raises _MalformedChunk at the first sign of a bad one."""
    # pandas pads short rows with "" (indistinguishable from missing values), so count fields.
    text = "".join(lines)
    if any(x.count("\t") + 1 != ncols for x in lines) or _FOREIGN.search(text):
        raise _MalformedChunk
    try:
        chunk = pd.read_csv(
            io.StringIO(text),
            sep="\t",
            header=None,
            names=names,
            dtype={**{n: str for n in names}, **{n: np.float64 for n in DENSE_NAMES}},
            keep_default_na=False,
            na_values={n: [""] for n in DENSE_NAMES},
        )
    except ValueError:
        raise _MalformedChunk from None
    labels = np.full(len(chunk), -1, np.float32)
    if has_label:
        if not chunk["label"].isin(["0", "1"]).all():
            raise _MalformedChunk
        labels = chunk["label"].to_numpy(np.float32)
    dense = chunk[DENSE_NAMES].to_numpy(np.float64)
    if (np.abs(np.nan_to_num(dense)) >= MAX_COUNT).any():
        raise _MalformedChunk  # e.g. "1e400" (inf): not a count
    negative = np.nan_to_num(dense) < 0
    if negative.any():
        if bad_negative:
            raise _MalformedChunk
        for j in np.flatnonzero(negative.any(axis=0)):
            clamped[DENSE_NAMES[j]] += int(negative[:, j].sum())
    sparse = np.empty((len(chunk), NUM_SPARSE), dtype=np.int64)
    for j, name in enumerate(SPARSE_NAMES):
        codes, uniques = pd.factorize(chunk[name].to_numpy())  # hashes repeat: parse each once
        try:
            ids = [int(u, 16) if u else 0 for u in uniques]
        except ValueError:
            raise _MalformedChunk from None
        top = max(ids, default=0)
        if top >= MAX_ID or min(ids, default=0) < 0:
            raise _MalformedChunk  # wider than 64 bits (or negative): not a 64-bit hash
        if top < 1 << 63:
            parsed = np.array(ids, dtype=np.int64) % sizes[j]
        else:  # 64-bit hashes beyond int64: reduce them in Python first
            parsed = np.array([i % int(sizes[j]) for i in ids], dtype=np.int64)
        sparse[:, j] = parsed[codes]
    return CriteoArrays(dense=dense_transform(dense), sparse=sparse, labels=labels)


def read_criteo_tsv(
    path: str | Path,
    num_embeddings: int | Sequence[int],
    has_label: bool = True,
    max_rows: int | None = None,
    on_bad_line: str = "error",
    skipped: Counter[str] | None = None,
    negatives: str = "clamp",
    clamped: Counter[str] | None = None,
) -> CriteoArrays:
    """The whole file (or its first ``max_rows`` lines) as one :class:`CriteoArrays`."""
    parts = list(
        iter_criteo_tsv(
            path,
            num_embeddings,
            has_label=has_label,
            max_rows=max_rows,
            on_bad_line=on_bad_line,
            skipped=skipped,
            negatives=negatives,
            clamped=clamped,
        )
    )
    if not parts:
        raise ValueError(f"{path}: no rows")
    return CriteoArrays(
        dense=np.concatenate([p.dense for p in parts]),
        sparse=np.concatenate([p.sparse for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
    )


def read_criteo_npy(
    directory: str | Path, day: int, num_embeddings: int | Sequence[int], mmap: bool = True
) -> CriteoArrays:
    """Read TorchRec's preprocessed arrays for one day; sparse hashes are taken modulo table sizes."""
    directory = Path(directory)
    paths = {k: directory / f"day_{day}_{k}.npy" for k in ("dense", "sparse", "labels")}
    for p in paths.values():
        if not p.is_file():
            raise FileNotFoundError(
                f"{p} not found: TorchRec's format has day_{day}_dense.npy, "
                f"day_{day}_sparse.npy and day_{day}_labels.npy in one directory"
            )
    mode = "r" if mmap else None
    dense = np.load(paths["dense"], mmap_mode=mode)
    sparse = np.load(paths["sparse"], mmap_mode=mode)
    labels = np.load(paths["labels"], mmap_mode=mode)
    if (
        dense.shape[1:] != (NUM_DENSE,)
        or sparse.shape[1:] != (NUM_SPARSE,)
        or len({len(dense), len(sparse), len(labels)}) != 1
    ):
        raise ValueError(
            f"{directory} day {day}: shapes dense {dense.shape}, sparse {sparse.shape}, labels "
            f"{labels.shape}; expected [N, 13], [N, 26], [N, 1]"
        )
    return CriteoArrays(
        dense=np.asarray(dense, dtype=np.float32),
        sparse=np.asarray(sparse, dtype=np.int64) % table_sizes(num_embeddings),
        labels=np.asarray(labels, dtype=np.float32).reshape(-1),
    )


def generate_criteo_tsv(
    path: str | Path,
    num_rows: int,
    seed: int = 0,
    missing_rate: float = 0.05,
    cardinality: int = 10_000,
    has_label: bool = True,
) -> Path:
    """Write ``num_rows`` rows in the Criteo TSV format with a learnable click signal.

    Each categorical column draws from ``cardinality`` hex hashes with Zipf-like frequencies;
    the click probability depends on a hidden score from two categorical columns and one dense
    column, so a model trained on the file can beat AUC 0.5. Values go missing at
    ``missing_rate``, and dense column 1 has negative values, as in the real logs.
    """
    rng = np.random.default_rng(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    vocab = rng.integers(0, 2**32, size=(NUM_SPARSE, cardinality), dtype=np.uint64)
    item_effect = rng.normal(0, 1.0, size=(NUM_SPARSE, cardinality))
    popularity = 1.0 / np.arange(1, cardinality + 1) ** 1.05
    popularity /= popularity.sum()
    with open(path, "w") as out:
        for start in range(0, num_rows, 100_000):
            n = min(100_000, num_rows - start)
            idx = np.stack([rng.choice(cardinality, size=n, p=popularity) for _ in range(NUM_SPARSE)], axis=1)
            dense = rng.poisson(lam=np.linspace(1, 50, NUM_DENSE), size=(n, NUM_DENSE)).astype(np.int64)
            dense[:, 1] -= rng.integers(0, 3, size=n)  # int_1 has small negatives in the real data
            score = item_effect[0, idx[:, 0]] + item_effect[1, idx[:, 1]] + 0.05 * (dense[:, 2] - 3)
            label = (rng.random(n) < 1 / (1 + np.exp(-(score - 1.0)))).astype(np.int64)
            dense_missing = rng.random((n, NUM_DENSE)) < missing_rate
            sparse_missing = rng.random((n, NUM_SPARSE)) < missing_rate
            for r in range(n):
                fields = [str(label[r])] if has_label else []
                fields += ["" if dense_missing[r, j] else str(dense[r, j]) for j in range(NUM_DENSE)]
                fields += ["" if sparse_missing[r, j] else f"{int(vocab[j, idx[r, j]]):08x}" for j in range(NUM_SPARSE)]
                out.write("\t".join(fields) + "\n")
    return path
