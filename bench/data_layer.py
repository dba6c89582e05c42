"""Throughput of the shared data layer, written to bench/results/data_layer.json.

    python -m bench.data_layer            # about a minute on 2 CPU cores
    python -m bench.data_layer --quick    # seconds, smaller inputs

Measures: records -> KJT (the serving path) and columns -> KJT (the training path) in
examples/s; Criteo TSV parsing in rows/s; synthetic generation in interactions/s; full-ranking
evaluation in users/s on ml-100k. Each figure is the median of --repeats runs.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bench.synthetic import generate_interactions
from common.baselines import popularity_report
from common.data.movielens import load_movielens
from common.data.split import split_dataset
from common.features import DenseFeature, FeatureSchema, SparseFeature
from common.runtime import write_json_atomic
from golden_training.criteo import generate_criteo_tsv, read_criteo_tsv


def median_rate(fn: Callable[[], int], repeats: int) -> float:
    """Median of (units processed / seconds) over ``repeats`` calls of ``fn``."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small inputs, for a smoke run (default: off)")
    p.add_argument("--repeats", type=int, default=5, help="runs per measurement; the median is reported (default: 5)")
    p.add_argument(
        "--out", default="bench/results/data_layer.json", help="where to write the results (default: %(default)s)"
    )
    a = p.parse_args(argv)
    scale = 0.1 if a.quick else 1.0
    torch.set_num_threads(max(1, torch.get_num_threads()))

    schema = FeatureSchema(
        sparse=(
            SparseFeature("user_id", 10_000),
            SparseFeature("item_id", 50_000),
            SparseFeature("history", 50_000, max_length=50, pooling="mean", table="items"),
            SparseFeature("genres", 20, max_length=None),
        ),
        dense=(DenseFeature("age"), DenseFeature("popularity")),
    )
    rng = np.random.default_rng(0)
    n = int(4096 * scale) or 1
    hist_len = rng.integers(0, 60, size=n)
    records = [
        {
            "user_id": int(rng.integers(10_000)),
            "item_id": int(rng.integers(50_000)),
            "history": rng.integers(0, 50_000, size=k).tolist(),
            "genres": rng.integers(0, 20, size=3).tolist(),
            "age": float(rng.random()),
            "popularity": float(rng.random()),
        }
        for k in hist_len
    ]
    columns = {
        "user_id": rng.integers(0, 10_000, size=n),
        "item_id": rng.integers(0, 50_000, size=n),
        "history": (rng.integers(0, 50_000, size=int(hist_len.sum())), hist_len),
        "genres": (rng.integers(0, 20, size=3 * n), np.full(n, 3)),
        "age": rng.random(n),
        "popularity": rng.random(n),
    }

    results: dict[str, object] = {
        "host": platform.node(),
        "cpu_count": torch.get_num_threads(),
        "torch": torch.__version__,
        "quick": a.quick,
    }
    results["records_to_kjt_examples_per_s"] = median_rate(lambda: schema.from_records(records).batch_size, a.repeats)
    results["columns_to_kjt_examples_per_s"] = median_rate(lambda: schema.from_columns(columns).batch_size, a.repeats)

    with tempfile.TemporaryDirectory() as tmp:
        rows = int(200_000 * scale)
        tsv = generate_criteo_tsv(Path(tmp) / "day_0.tsv", rows, seed=0)
        results["criteo_tsv_rows_per_s"] = median_rate(lambda: len(read_criteo_tsv(tsv, 1_000_000)), a.repeats)

    users = int(1_000_000 * scale)
    results["synthetic_interactions_per_s"] = median_rate(
        lambda: generate_interactions(
            num_users=users, num_items=users, interactions_per_user=10, num_clusters=1000, seed=0
        ).num_interactions,
        max(1, a.repeats // 2),
    )

    ds = load_movielens("ml-100k")
    split = split_dataset(ds)
    results["ml100k_full_ranking_users_per_s"] = median_rate(
        lambda: popularity_report(split, "test", n_boot=1).num_users, a.repeats
    )

    write_json_atomic(a.out, results)
    for k, v in results.items():
        print(f"{k:<36} {v:,.0f}" if isinstance(v, float) else f"{k:<36} {v}")
    print(f"wrote {a.out}")
    return results


if __name__ == "__main__":
    main()
