"""FAISS indexes over the candidate tower's item embeddings (inner product on unit vectors).

Types: ``flat`` (exact), ``ivf_flat`` (inverted lists, exact vectors), ``ivf_pq`` (inverted
lists, product-quantized vectors), ``ivf_pq_refine`` (inverted lists scanned with 4-bit
"fast-scan" PQ codes, one 4-bit code per 1 or 2 dimensions, whose best ``k_factor`` x k are then
re-ranked with the exact vectors), ``hnsw`` (graph). ``auto`` picks by catalog size: exact search
up to 100k items (at 64 dims a brute-force scan of 100k items is still well under a millisecond
per query batch row), IVF with PQ fast-scan and exact re-ranking above. bench/faiss_indexes.py
measures the choice on a 1M-item catalog.
"""

from __future__ import annotations

import math
from typing import Any

import faiss
import numpy as np

INDEX_TYPES = ("auto", "flat", "ivf_flat", "ivf_pq", "ivf_pq_refine", "hnsw")


def default_index_type(num_items: int) -> str:
    return "flat" if num_items <= 100_000 else "ivf_pq_refine"


def default_params(kind: str, num_items: int, dim: int) -> dict[str, Any]:
    """Sensible parameters by catalog size: nlist ~ 4 sqrt(N); IVF-Flat and IVF-PQ probe 1/16 of
    the lists; IVF-PQ with re-ranking probes 1/20 from 1M items (more below: :func:`refine_nprobe`)
    and re-ranks the best 4 x k of its PQ scores exactly (each kind's recall@100 and speed against the
    exact search: bench/faiss_indexes.py, retrieval/README.md)."""
    nlist = max(1, min(num_items // 39, int(4 * math.sqrt(num_items))))  # FAISS wants >= 39 points per list
    if kind == "flat":
        return {}
    if kind == "ivf_flat":
        return {"nlist": nlist, "nprobe": min(nlist, max(8, nlist // 16))}
    if kind == "ivf_pq":
        m = next(m for m in (dim // 2, dim // 4, 16, 8, 4, 2, 1) if m >= 1 and dim % m == 0)
        return {"nlist": nlist, "nprobe": min(nlist, max(8, nlist // 16)), "m": m, "nbits": 8}
    if kind == "ivf_pq_refine":
        m = dim if dim <= 64 else next(m for m in range(dim // 2, 0, -1) if dim % m == 0 and m <= 64)
        return {"nlist": nlist, "nprobe": refine_nprobe(nlist, num_items), "m": m, "k_factor": 4}
    if kind == "hnsw":
        return {"M": 16, "ef_construction": 100, "ef_search": 128}
    raise ValueError(f"index type must be one of {INDEX_TYPES}, got {kind!r}")


def refine_nprobe(nlist: int, num_items: int) -> int:
    """Lists ``ivf_pq_refine`` probes: 1/20 of them from 1M items up, more below, where a query's top
    100 spreads over more (smaller) lists: 1/20 x (1M / N)^0.6. Fitted on bench/faiss_indexes.py's
    synthetic catalog to keep recall@100 near 0.95 at every size (retrieval/README.md)."""
    scale = max(1.0, (1_000_000 / max(1, num_items)) ** 0.6)
    return min(nlist, max(8, round(nlist / 20 * scale)))


def build_index(
    kind: str, embeddings: np.ndarray, params: dict[str, Any] | None = None, seed: int = 0
) -> tuple[faiss.Index, str, dict[str, Any]]:
    """Build an inner-product index over ``embeddings``; returns (index, type, parameters used)."""
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, d = x.shape
    if kind == "auto":
        kind = default_index_type(n)
    p = {**default_params(kind, n, d), **(params or {})}
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind in ("ivf_flat", "ivf_pq"):
        quantizer = faiss.IndexFlatIP(d)
        if kind == "ivf_flat":
            index = faiss.IndexIVFFlat(quantizer, d, p["nlist"], faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFPQ(quantizer, d, p["nlist"], p["m"], p["nbits"], faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.cp.max_points_per_centroid = 64  # k-means on a 64-per-list sample: faster, the same lists in practice
        index.train(x)
    elif kind == "ivf_pq_refine":
        index = faiss.index_factory(d, f"IVF{p['nlist']},PQ{p['m']}x4fs,RFlat", faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = seed
        ivf.cp.max_points_per_centroid = 64
        index.train(x)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, p["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = p["ef_construction"]
    else:
        raise ValueError(f"index type must be one of {INDEX_TYPES}, got {kind!r}")
    index.add(x)
    set_search_params(index, p)
    return index, kind, p


def set_search_params(index: faiss.Index, params: dict[str, Any]) -> None:
    """The search-time parameters (``nprobe``, ``k_factor``, ``ef_search``) on an index as built
    or as read back from disk."""
    space = faiss.ParameterSpace()
    for name, faiss_name in (("nprobe", "nprobe"), ("k_factor", "k_factor_rf"), ("ef_search", "efSearch")):
        if name in params:
            space.set_index_parameter(index, faiss_name, params[name])


def to_gpu_if_available(index: faiss.Index) -> faiss.Index:
    """Move the index to GPU 0 when faiss-gpu and a GPU are present; otherwise return it as is.
    An index type faiss-gpu cannot hold stays on the CPU, with a message."""
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        try:
            return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        except RuntimeError as e:  # e.g. PQ fast-scan, HNSW: CPU-only in faiss-gpu
            print(f"FAISS index {type(index).__name__} stays on the CPU (faiss-gpu: {str(e).splitlines()[0]})")
    return index


def recall_against_exact(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean share of the exact top-K that the approximate top-K found."""
    k = exact_ids.shape[1]
    hits = [len(set(a[:k].tolist()) & set(e.tolist()) - {-1}) for a, e in zip(approx_ids, exact_ids)]
    return float(np.mean(hits) / k)
