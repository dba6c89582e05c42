"""Click logs for the DLRM ranker besides MovieLens: Criteo (TSV or TorchRec's ``.npy``) and
random data for throughput runs. Rows live in arrays (memory-mapped for ``.npy``) and are cut
into TorchRec ``Batch``es in order, as Criteo's days are in time order.

- ``criteo`` with a ``.tsv`` / ``.txt`` file: the Kaggle / Terabyte format, read by
  ``golden_training.criteo`` (bad lines are an error naming file and line, or skipped and counted
  with ``--on-bad-row skip``; negative counts are clamped to 0 and counted, or with
  ``--negative-counts bad_line`` treated as bad lines). The first 80% of rows train, the next 10% validate, the last 10%
  test.
- ``criteo`` with a directory: TorchRec's preprocessed ``day_{d}_{dense,sparse,labels}.npy``.
  Every day but the last trains; the last day's first half validates and its second half tests,
  as in TorchRec's DLRM example.
- ``random``: uniform IDs in every table (TorchRec's ``RandomRecDataset`` draws them the same
  way) and a planted click signal from two features, so that AUC says whether training works.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchrec.datasets.utils import Batch

from common.features import DenseFeature, FeatureSchema, SparseFeature
from golden_training.criteo import (
    DENSE_NAMES,
    NUM_DENSE,
    NUM_SPARSE,
    SPARSE_NAMES,
    CriteoArrays,
    read_criteo_npy,
    read_criteo_tsv,
    table_sizes,
)

CLICK_LOGS = ("criteo", "random")  # the --dataset values of train_click_logs.py


def criteo_schema(num_embeddings: int | list[int]) -> FeatureSchema:
    """26 single-valued categorical features, each with its own table, and 13 dense ones."""
    sizes = table_sizes(num_embeddings if isinstance(num_embeddings, int) else list(num_embeddings))
    return FeatureSchema(
        sparse=tuple(SparseFeature(n, int(s)) for n, s in zip(SPARSE_NAMES, sizes)),
        dense=tuple(DenseFeature(n) for n in DENSE_NAMES),
    )


@dataclass
class CTRData:
    name: str
    fingerprint: str  # identifies the data, for checkpoints and results
    train: CriteoArrays
    valid: CriteoArrays
    test: CriteoArrays
    skipped: dict[str, int]  # malformed lines skipped under --on-bad-row skip, by problem
    clamped: dict[str, int]  # negative counts set to 0, by column (--negative-counts clamp)


def load_ctr(
    dataset: str,
    path: str | None,
    num_embeddings: int | list[int],
    seed: int = 0,
    random_rows: int = 100_000,
    max_rows: int | None = None,
    on_bad_line: str = "error",
    negatives: str = "clamp",
) -> CTRData:
    if dataset == "random":
        n_eval = max(random_rows // 10, 1)
        sizes = table_sizes(num_embeddings)
        parts = [random_ctr(n, sizes, [seed, k]) for k, n in enumerate((random_rows, n_eval, n_eval))]
        return CTRData(
            "random", f"random-{seed}-{random_rows}-{hashlib.sha256(sizes.tobytes()).hexdigest()[:16]}", *parts, {}, {}
        )
    if dataset != "criteo":
        raise ValueError(f"unknown click-log data set {dataset!r}; use 'criteo' or 'random'")
    if not path:
        raise ValueError(
            "--dataset criteo needs --criteo-path: a Criteo TSV file (train.txt, day_0) or a "
            "directory of TorchRec's day_{d}_{dense,sparse,labels}.npy files"
        )
    p = Path(path)
    if p.is_dir():
        days = sorted(int(f.name.split("_")[1]) for f in p.glob("day_*_labels.npy"))
        if len(days) < 2:
            raise ValueError(
                f"{p}: found days {days} of day_{{d}}_labels.npy; the .npy layout needs at least 2 "
                f"days (every day but the last trains, the last validates and tests)"
            )
        train_days = [read_criteo_npy(p, d, num_embeddings) for d in days[:-1]]
        last = read_criteo_npy(p, days[-1], num_embeddings)
        half = len(last) // 2
        train = train_days[0] if len(train_days) == 1 else _concat(train_days)
        return CTRData(
            f"criteo-npy({p.name})",
            _fingerprint(sorted(p.glob("day_*.npy"))),
            train,
            _rows(last, slice(0, half)),
            _rows(last, slice(half, len(last))),
            {},
            {},
        )
    if not p.is_file():
        raise FileNotFoundError(f"--criteo-path {p} does not exist")
    skipped: Counter[str] = Counter()
    clamped: Counter[str] = Counter()
    data = read_criteo_tsv(
        p,
        num_embeddings,
        max_rows=max_rows,
        on_bad_line=on_bad_line,
        skipped=skipped,
        negatives=negatives,
        clamped=clamped,
    )
    n = len(data)
    a, b = int(n * 0.8), int(n * 0.9)
    if a == 0 or b == a or b == n:
        raise ValueError(f"{p}: {n} rows are too few to split 80/10/10 into train, valid and test")
    return CTRData(
        f"criteo-tsv({p.name})",
        _fingerprint([p]),
        _rows(data, slice(0, a)),
        _rows(data, slice(a, b)),
        _rows(data, slice(b, n)),
        dict(skipped),
        dict(clamped),
    )


def random_ctr(n: int, sizes: np.ndarray, seed: object) -> CriteoArrays:
    """``n`` rows with uniform IDs; clicks depend on ``cat_0``, ``cat_1`` and ``int_0``."""
    rng = np.random.default_rng(seed)
    effects = np.random.default_rng(12345).normal(0.0, 1.0, size=(2, 1024))  # the same signal in every split
    sparse = (rng.random((n, NUM_SPARSE)) * sizes).astype(np.int64)
    dense = rng.exponential(1.0, size=(n, NUM_DENSE)).astype(np.float32)
    logit = effects[0, sparse[:, 0] % 1024] + effects[1, sparse[:, 1] % 1024] + (dense[:, 0] - 1.0) - 1.0
    labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    return CriteoArrays(dense=dense, sparse=sparse, labels=labels)


def make_batch(schema: FeatureSchema, data: CriteoArrays, rows: slice) -> Batch:
    """Rows ``rows`` of ``data`` as a TorchRec ``Batch``; IDs are checked against the table sizes."""
    fb = schema.from_arrays(data.sparse[rows], data.dense[rows])
    return Batch(
        dense_features=fb.dense,
        sparse_features=fb.sparse,
        labels=torch.from_numpy(np.asarray(data.labels[rows], dtype=np.float32)),
    )


def _rows(data: CriteoArrays, rows: slice) -> CriteoArrays:
    return CriteoArrays(dense=data.dense[rows], sparse=data.sparse[rows], labels=data.labels[rows])


def _concat(parts: list[CriteoArrays]) -> CriteoArrays:
    return CriteoArrays(
        dense=np.concatenate([p.dense for p in parts]),
        sparse=np.concatenate([p.sparse for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
    )


def _fingerprint(paths: list[Path]) -> str:
    """Names, sizes and the first MiB of each file: enough to tell data sets apart cheaply."""
    h = hashlib.sha256()
    for f in paths:
        h.update(f"{f.name}:{f.stat().st_size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
    return h.hexdigest()
