"""End-to-end latency of the two-stage pipeline (integration/pipeline.py) on this machine.

    python -m bench.pipeline_latency                  # runs/ artifacts; about 3 minutes
    python -m bench.pipeline_latency --quick          # smoke run

Three measurements, on the ml-100k artifacts of the demo (``python -m integration.demo``):

- **single user**: ``pipeline.recommend([user])`` for users one at a time: the query tower, the
  FAISS top 100 excluding seen items, feature enrichment of the 100 candidates, the INT8 DLRM
  over them, the top 10. p50 / p99 over every user, and each stage's median share.
- **batched**: ``pipeline.recommend(users)`` in batches of 256, users per second.
- **HTTP**: ``integration.service`` in its own process, 8 concurrent clients (one keep-alive
  connection each) posting ``{"user_id": ...}`` back to back for 60 s, with the candidate cache
  off (``--cache-ttl 0``: every request runs both stages) and on; errors and p50 / p99.

Torch runs one intra-op thread, as the service does. Results: bench/results/pipeline_latency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from bench.serving_load import run_load
from common.runtime import write_json_atomic
from inference_legacy.server import spawn


def percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max()),
            "n": int(len(a))}


def single_user(pipeline, users: list[int], repeats: int) -> dict[str, object]:
    total, parts = [], {"retrieval": [], "enrichment + DLRM": []}
    for _ in range(repeats):
        for u in users:
            t0 = time.perf_counter()
            dense = np.array([pipeline.user_index[u]])
            cands = pipeline.candidates(dense)
            t1 = time.perf_counter()
            pipeline.rank(dense, *cands)
            t2 = time.perf_counter()
            parts["retrieval"].append((t1 - t0) * 1000)
            parts["enrichment + DLRM"].append((t2 - t1) * 1000)
    for u in users:  # the public path, with ID mapping and titles, as the service calls it
        t = time.perf_counter()
        pipeline.recommend([u])
        total.append((time.perf_counter() - t) * 1000)
    for _ in range(repeats - 1):
        for u in users:
            t = time.perf_counter()
            pipeline.recommend([u])
            total.append((time.perf_counter() - t) * 1000)
    return {**percentiles(total), "stages_median_ms": {k: float(np.median(v)) for k, v in parts.items()}}


def batched(pipeline, users: list[int], batch_size: int, repeats: int) -> dict[str, float]:
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for lo in range(0, len(users), batch_size):
            pipeline.recommend(users[lo:lo + batch_size])
        rates.append(len(users) / (time.perf_counter() - t))
    return {"users_per_s": float(np.median(rates)), "batch_size": batch_size, "users": len(users)}


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default="runs", help="(default: %(default)s)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of HTTP load per run (default: %(default)s)")
    p.add_argument("--clients", type=int, default=8, help="(default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="passes over every user (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="100 users, 1 pass, 3 s of HTTP load")
    p.add_argument("--out", default="bench/results/pipeline_latency.json", help="(default: %(default)s)")
    a = p.parse_args(argv)
    from integration.pipeline import create_pipeline

    torch.set_num_threads(1)
    pipeline = create_pipeline(a.artifacts)
    users = pipeline.dataset.user_raw_ids.tolist()[: 100 if a.quick else None]
    repeats, duration = (1, 3.0) if a.quick else (a.repeats, a.duration)
    pipeline.recommend(users[:8])  # warm-up
    results: dict[str, object] = {"artifacts": a.artifacts, "quick": a.quick, "machine": platform.machine(),
                                  "cpus": os.cpu_count(), "torch_threads": 1}
    results["single_user"] = s = single_user(pipeline, users, repeats)
    print(f"single user: p50 {s['p50_ms']:.2f} ms | p99 {s['p99_ms']:.2f} ms | max {s['max_ms']:.2f} ms over "
          f"{s['n']} requests (median retrieval {s['stages_median_ms']['retrieval']:.2f} ms, enrichment + DLRM "
          f"{s['stages_median_ms']['enrichment + DLRM']:.2f} ms)", flush=True)
    results["batched"] = b = batched(pipeline, users, 256, repeats)
    print(f"batched: {b['users_per_s']:.0f} users/s (batches of {b['batch_size']})", flush=True)
    del pipeline
    bodies = [json.dumps({"user_id": u}).encode() for u in users]
    results["http"] = {}
    for mode, ttl in (("cache off", "0"), ("cache on", "300")):
        proc, url = spawn(["-m", "integration.service", "--artifacts", a.artifacts, "--cache-ttl", ttl])
        try:
            run_load(url, "/recommend", bodies, a.clients, min(duration, 2.0))  # warm-up, not reported
            r = run_load(url, "/recommend", bodies, a.clients, duration)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        results["http"][mode] = r
        print(f"HTTP, {a.clients} clients, {mode}: {r['requests_per_s']:.0f} req/s | p50 {r['p50_ms']:.2f} ms | "
              f"p99 {r['p99_ms']:.2f} ms | errors {r['errors']}", flush=True)
    write_json_atomic(a.out, results)
    return results


if __name__ == "__main__":
    main()
