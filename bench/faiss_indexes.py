"""FAISS index types on a synthetic 1M-item, 64-dim catalog: build time, memory, recall@100
against exact search, and queries/s single-threaded and batched. Written to
bench/results/faiss_indexes.json.

    python -m bench.faiss_indexes                       # 1M items; ~10 minutes on 2 CPU cores
    python -m bench.faiss_indexes --items 100000 --skip-hnsw   # quick look

The catalog imitates trained item embeddings: unit vectors scattered around 2,000 topic
directions. Queries are drawn the same way. "auto" is the type and parameters that
retrieval/modules/index.py picks for this catalog size; the check printed at the end is the
serving issue's bar: recall@100 >= 0.95 at >= 20x the exact search's queries/s, single-threaded
and batched, both measured in this run. Queries/s are the best of 3 passes (this machine is shared).
"""

from __future__ import annotations

import argparse
import platform
import time

import faiss
import numpy as np

from common.runtime import write_json_atomic
from retrieval.modules.index import (
    build_index,
    default_index_type,
    default_params,
    recall_against_exact,
    set_search_params,
)

SEARCH_PARAMS = ("nprobe", "k_factor", "ef_search")  # set at search time: one built index serves them all


def synthetic_catalog(n: int, dim: int, topics: int, spread: float, seed: int) -> np.ndarray:
    """Unit vectors: a random topic direction plus isotropic noise of expected norm ``spread``."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((topics, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    x = centers[rng.integers(0, topics, size=n)]
    x += spread / np.sqrt(dim) * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _resample(points: np.ndarray, spread: float, seed: int) -> np.ndarray:
    """New points near the given ones (queries that live in the catalog's topics)."""
    rng = np.random.default_rng(seed)
    q = points + spread / np.sqrt(points.shape[1]) * rng.standard_normal(points.shape).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def qps(index: faiss.Index, queries: np.ndarray, k: int, threads: int, batch: bool, repeats: int = 3) -> float:
    """Queries per second, the best of ``repeats`` passes: one batched search, or one query at a time."""
    faiss.omp_set_num_threads(threads)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        if batch:
            index.search(queries, k)
        else:
            for q in queries:
                index.search(q[None, :], k)
        best = max(best, len(queries) / (time.perf_counter() - start))
    return best


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000, help="catalog size (default: %(default)s)")
    p.add_argument("--dim", type=int, default=64, help="embedding dimension (default: %(default)s)")
    p.add_argument(
        "--queries", type=int, default=1000, help="batched queries; single-threaded uses a tenth (default: %(default)s)"
    )
    p.add_argument(
        "--spread",
        type=float,
        default=1.0,
        help="noise norm around each topic direction; larger is harder (default: %(default)s)",
    )
    p.add_argument("--k", type=int, default=100, help="neighbours per query (default: %(default)s)")
    p.add_argument("--skip-hnsw", action="store_true", help="skip HNSW, whose build is the slowest (default: off)")
    p.add_argument("--out", default="bench/results/faiss_indexes.json", help="results file (default: %(default)s)")
    a = p.parse_args(argv)
    threads = faiss.omp_get_max_threads()
    x = synthetic_catalog(a.items, a.dim, 2000, a.spread, seed=0)
    # Queries: new points around catalog items (so they live in the catalog's topics).
    queries = _resample(x[np.random.default_rng(2).choice(a.items, a.queries, replace=False)], a.spread, seed=1)
    single = queries[: max(1, a.queries // 4)]

    auto_kind = default_index_type(a.items)
    nlist = default_params("ivf_flat", a.items, a.dim)["nlist"]
    sweep = sorted({max(1, nlist // f) for f in (64, 32, 16, 8)})
    default_nprobe = default_params("ivf_flat", a.items, a.dim)["nprobe"]
    refine = default_params("ivf_pq_refine", a.items, a.dim)
    refine_sweep = [{"nprobe": max(1, nlist // f), "k_factor": k} for f, k in ((32, 4), (12, 4), (20, 2), (20, 8))]
    configs = (
        [("flat", {}), ("ivf_pq_refine", {})]
        + [("ivf_pq_refine", o) for o in refine_sweep if o != {k: refine[k] for k in o}]
        + [("ivf_flat", {})]
        + [("ivf_flat", {"nprobe": n}) for n in sweep if n != default_nprobe]
        + [
            ("ivf_pq", {}),
            ("ivf_pq", {"m": 16}),
            ("hnsw", {}),
            ("hnsw", {"ef_search": 512}),
            ("hnsw", {"ef_search": 1024}),
        ]
    )
    if a.skip_hnsw:
        configs = [c for c in configs if c[0] != "hnsw"]
    rows, exact_ids, built = [], None, {}
    for kind, override in configs:
        key = (kind, tuple(sorted((k, v) for k, v in override.items() if k not in SEARCH_PARAMS)))
        faiss.omp_set_num_threads(threads)
        if key not in built:
            start = time.perf_counter()
            index, _, params = build_index(kind, x, override)
            build_s = time.perf_counter() - start
            built[key] = (index, build_s)
        index, build_s = built[key]
        params = {**default_params(kind, a.items, a.dim), **override}
        set_search_params(index, params)
        _, ids = index.search(queries, a.k)
        if kind == "flat":
            exact_ids = ids
        row = {
            "type": kind,
            "params": params,
            "build_s": round(build_s, 2),
            "memory_mb": round(faiss.serialize_index(index).nbytes / 1e6, 1),
            "recall_at_k": recall_against_exact(ids, exact_ids),
            "qps_single_thread": qps(index, single, a.k, 1, batch=False),
            "qps_batched": qps(index, queries, a.k, threads, batch=True),
            "is_default": kind == auto_kind and params == default_params(kind, a.items, a.dim),
        }
        rows.append(row)
        print(
            f"{kind:<13} {str(params):<62} build {row['build_s']:>7.1f}s  mem {row['memory_mb']:>7.1f} MB  "
            f"recall@{a.k} {row['recall_at_k']:.4f}  single {row['qps_single_thread']:>8.1f} q/s  "
            f"batched {row['qps_batched']:>8.1f} q/s{'  <- default' if row['is_default'] else ''}",
            flush=True,
        )
    exact = rows[0]
    default = next(r for r in rows if r["is_default"])
    check = {
        "default_type": default["type"],
        "recall_at_k": default["recall_at_k"],
        "speedup_single": default["qps_single_thread"] / exact["qps_single_thread"],
        "speedup_batched": default["qps_batched"] / exact["qps_batched"],
    }
    check["passes"] = bool(
        check["recall_at_k"] >= 0.95 and min(check["speedup_single"], check["speedup_batched"]) >= 20
    )
    verdict = "PASS" if check["passes"] else "FAIL"
    if default["type"] == "flat":  # exact search at this size: the bar is for the approximate default
        check["passes"], verdict = None, "exact search at this size, no bar"
    print(
        f"default {check['default_type']}: recall@{a.k} {check['recall_at_k']:.4f}, "
        f"{check['speedup_single']:.1f}x exact single-threaded, {check['speedup_batched']:.1f}x batched -> "
        f"{verdict} (bar: recall >= 0.95 at >= 20x)"
    )
    results = {
        "items": a.items,
        "dim": a.dim,
        "k": a.k,
        "queries": a.queries,
        "threads": threads,
        "host": platform.node(),
        "faiss": faiss.__version__,
        "rows": rows,
        "default_check": check,
    }
    write_json_atomic(a.out, results)
    return results


if __name__ == "__main__":
    main()
