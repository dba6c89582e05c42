"""Criteo click logs: the Kaggle / Terabyte TSV format, TorchRec's ``.npy`` format, and a
generator of files in the TSV format for tests and benchmarks.

TSV rows are ``label, I1..I13, C1..C26`` separated by tabs: 13 integer counts (may be negative
or missing) and 26 categorical values as 8-hex-digit hashes (may be missing). Missing values
become 0 (as in TorchRec's ``tsv_to_npys``). Dense features get DLRM's transform
``log(1 + max(x, 0))`` (facebookresearch/dlrm ``data_utils.py``); categorical hashes are taken
modulo each feature's table size.

TorchRec's preprocessed format has three arrays per day: ``day_{d}_dense.npy`` (float32
``[N, 13]``, already log-transformed by TorchRec's own preprocessing), ``day_{d}_sparse.npy``
(``[N, 26]`` raw hashes, or contiguous IDs) and ``day_{d}_labels.npy`` (int32 ``[N, 1]``).
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

NUM_DENSE = 13
NUM_SPARSE = 26
DENSE_NAMES = [f"int_{i}" for i in range(NUM_DENSE)]
SPARSE_NAMES = [f"cat_{i}" for i in range(NUM_SPARSE)]


@dataclass
class CriteoArrays:
    dense: np.ndarray   # float32 [N, 13], log-transformed
    sparse: np.ndarray  # int64 [N, 26], in [0, table size) per column
    labels: np.ndarray  # float32 [N]

    def __len__(self) -> int:
        return len(self.labels)


def table_sizes(num_embeddings: int | Sequence[int]) -> np.ndarray:
    sizes = np.full(NUM_SPARSE, num_embeddings, dtype=np.int64) if isinstance(num_embeddings, int) \
        else np.asarray(num_embeddings, dtype=np.int64)
    if sizes.shape != (NUM_SPARSE,) or (sizes < 1).any():
        raise ValueError(f"num_embeddings must be one positive int or {NUM_SPARSE} of them; got {num_embeddings}")
    return sizes


def dense_transform(raw: np.ndarray) -> np.ndarray:
    """DLRM's dense transform: negatives and missing to 0, then log(1 + x)."""
    return np.log1p(np.maximum(np.nan_to_num(raw, nan=0.0), 0)).astype(np.float32)


def iter_criteo_tsv(path: str | Path, num_embeddings: int | Sequence[int], chunk_rows: int = 1 << 18,
                    has_label: bool = True, max_rows: int | None = None) -> Iterator[CriteoArrays]:
    """Read a Criteo TSV file in chunks of ``chunk_rows`` rows.

    ``has_label=False`` reads the Kaggle test file, which has no label column (labels are -1).
    Raises ``ValueError`` naming the line for rows with the wrong number of fields.
    """
    sizes = table_sizes(num_embeddings)
    ncols = NUM_DENSE + NUM_SPARSE + int(has_label)
    names = (["label"] if has_label else []) + DENSE_NAMES + SPARSE_NAMES
    line = 0
    with open(path) as f:
        while max_rows is None or line < max_rows:
            want = chunk_rows if max_rows is None else min(chunk_rows, max_rows - line)
            lines = list(itertools.islice(f, want))
            if not lines:
                break
            # pandas pads short rows with "" (indistinguishable from missing values), so count fields.
            fields = np.array([x.count("\t") + 1 for x in lines])
            bad = fields != ncols
            if bad.any():
                i = int(np.argmax(bad))
                raise ValueError(f"{path}: line {line + i + 1} has {fields[i]} fields, expected {ncols} "
                                 f"({'label, ' if has_label else ''}13 integers, 26 hex categories, tab-separated)")
            try:
                chunk = pd.read_csv(io.StringIO("".join(lines)), sep="\t", header=None, names=names,
                                    dtype={**{n: str for n in names}, **{n: np.float64 for n in DENSE_NAMES}},
                                    keep_default_na=False, na_values={n: [""] for n in DENSE_NAMES})
            except ValueError as err:
                raise ValueError(f"{path}: integer features must be integers (lines {line + 1}-"
                                 f"{line + len(lines)}): {err}") from err
            labels = np.full(len(chunk), -1, np.float32)
            if has_label:
                ok = chunk["label"].isin(["0", "1"]).to_numpy()
                if not ok.all():
                    i = int(np.argmax(~ok))
                    raise ValueError(f"{path}: line {line + i + 1}: label must be 0 or 1, got {chunk['label'].iloc[i]!r}")
                labels = chunk["label"].to_numpy(np.float32)
            dense = chunk[DENSE_NAMES].to_numpy(np.float64)
            sparse = np.empty((len(chunk), NUM_SPARSE), dtype=np.int64)
            for j, name in enumerate(SPARSE_NAMES):
                codes, uniques = pd.factorize(chunk[name].to_numpy())  # hashes repeat: parse each once
                try:
                    parsed = np.array([int(u, 16) if u else 0 for u in uniques], dtype=np.int64)
                except ValueError as err:
                    raise ValueError(f"{path}: {name} must hold hex hashes (near line {line + 1}): {err}") from err
                sparse[:, j] = parsed[codes] % sizes[j]
            yield CriteoArrays(dense=dense_transform(dense), sparse=sparse, labels=labels)
            line += len(chunk)


def read_criteo_tsv(path: str | Path, num_embeddings: int | Sequence[int], has_label: bool = True,
                    max_rows: int | None = None) -> CriteoArrays:
    """The whole file (or its first ``max_rows``) as one :class:`CriteoArrays`."""
    parts = list(iter_criteo_tsv(path, num_embeddings, has_label=has_label, max_rows=max_rows))
    if not parts:
        raise ValueError(f"{path}: no rows")
    return CriteoArrays(dense=np.concatenate([p.dense for p in parts]),
                        sparse=np.concatenate([p.sparse for p in parts]),
                        labels=np.concatenate([p.labels for p in parts]))


def read_criteo_npy(directory: str | Path, day: int, num_embeddings: int | Sequence[int],
                    mmap: bool = True) -> CriteoArrays:
    """Read TorchRec's preprocessed arrays for one day; sparse hashes are taken modulo table sizes."""
    directory = Path(directory)
    paths = {k: directory / f"day_{day}_{k}.npy" for k in ("dense", "sparse", "labels")}
    for p in paths.values():
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: TorchRec's format has day_{day}_dense.npy, "
                                    f"day_{day}_sparse.npy and day_{day}_labels.npy in one directory")
    mode = "r" if mmap else None
    dense = np.load(paths["dense"], mmap_mode=mode)
    sparse = np.load(paths["sparse"], mmap_mode=mode)
    labels = np.load(paths["labels"], mmap_mode=mode)
    if dense.shape[1:] != (NUM_DENSE,) or sparse.shape[1:] != (NUM_SPARSE,) or len({len(dense), len(sparse), len(labels)}) != 1:
        raise ValueError(f"{directory} day {day}: shapes dense {dense.shape}, sparse {sparse.shape}, labels "
                         f"{labels.shape}; expected [N, 13], [N, 26], [N, 1]")
    return CriteoArrays(dense=np.asarray(dense, dtype=np.float32),
                        sparse=np.asarray(sparse, dtype=np.int64) % table_sizes(num_embeddings),
                        labels=np.asarray(labels, dtype=np.float32).reshape(-1))


def generate_criteo_tsv(path: str | Path, num_rows: int, seed: int = 0, missing_rate: float = 0.05,
                        cardinality: int = 10_000, has_label: bool = True) -> Path:
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
