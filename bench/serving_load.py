"""Load benchmark of the DLRM service (inference_legacy/dlrm_predict.py) on loopback.

    python -m bench.serving_load                        # 1, 8, 32 clients x 60 s, batching on, then off at 32
    python -m bench.serving_load --duration 10          # shorter
    python -m bench.serving_load --quick                # smoke run (2 s per level)

The service runs in its own process (``python -m inference_legacy.dlrm_predict --port 0``); this
process is the load generator: N clients on one asyncio loop, each with one keep-alive HTTP/1.1
connection, sending requests back to back (closed loop) for the duration. Each request holds ``--rows-per-request``
rows drawn in turn from the artifact's held-out test rows (default 1: one (user, item) pair, the
case dynamic batching exists for). It reports throughput, p50/p99/max latency and errors (any
non-200 answer or failed connection) per level, then the same at the top level with batching
off, and the ratio. During every level a probe thread asks ``GET /health`` every 20 ms: its p50/p99
say whether the service stays responsive while saturated. A last run sends 4 MB bodies (as many
rows as fit, at most 4,096) from 7 clients, the case that used to stall /health while big bodies were
validated on the event loop. Both processes share this machine's cores, so the figures are what one box
does with its own load generator. Results: bench/results/serving_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import threading
import time
from urllib.parse import urlparse

import numpy as np

from common.runtime import write_json_atomic
from inference_legacy.artifact import read_heldout
from inference_legacy.dlrm_client import spawn


def run_load(
    url: str | list[str], path: str, bodies: list[bytes], concurrency: int, duration: float
) -> dict[str, float]:
    """Closed-loop load: ``concurrency`` clients, each one keep-alive connection sending ``bodies``
    in turn, back to back, for ``duration`` seconds (several URLs: client k on URL k mod their number,
    as clients of replicas spread over them). One asyncio loop drives them all (as wrk does), so client
    threads don't queue on the GIL and inflate the measured latencies."""
    urls = [url] if isinstance(url, str) else url
    return asyncio.run(_load([urlparse(u) for u in urls], path, bodies, concurrency, duration))


async def _load(us: list, path: str, bodies: list[bytes], concurrency: int, duration: float) -> dict[str, float]:
    head = f"POST {path} HTTP/1.1\r\nHost: {us[0].hostname}\r\nContent-Type: application/json\r\nContent-Length: "
    requests = [head.encode() + str(len(b)).encode() + b"\r\n\r\n" + b for b in bodies]
    latencies: list[float] = []
    errors = [0]
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + duration

    async def client(k: int) -> None:
        u = us[k % len(us)]
        reader, writer = await asyncio.open_connection(u.hostname, u.port)
        i = k
        while loop.time() < stop_at:
            t = time.perf_counter()
            writer.write(requests[i % len(requests)])
            i += concurrency
            status_line = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            if status_line.split(b" ")[1:2] == [b"200"]:
                latencies.append(time.perf_counter() - t)
            else:
                errors[0] += 1
        writer.close()

    t0 = time.perf_counter()
    results = await asyncio.gather(*(client(k) for k in range(concurrency)), return_exceptions=True)
    elapsed = time.perf_counter() - t0
    errors[0] += sum(isinstance(r, Exception) for r in results)  # a dropped connection ends that client
    lat = np.asarray(latencies) * 1000
    n = len(lat)
    return {
        "concurrency": concurrency,
        "seconds": elapsed,
        "requests": int(n),
        "errors": int(errors[0]),
        "requests_per_s": n / elapsed,
        "p50_ms": float(np.percentile(lat, 50)) if n else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if n else float("nan"),
        "max_ms": float(lat.max()) if n else float("nan"),
    }


def with_health_probe(
    url: str, path: str, bodies: list[bytes], concurrency: int, duration: float, every: float = 0.02
) -> dict[str, float]:
    """``run_load``, with a thread timing ``GET /health`` every ``every`` seconds meanwhile."""
    u, latencies, stop = urlparse(url), [], threading.Event()

    def probe() -> None:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        while not stop.is_set():
            t = time.perf_counter()
            conn.request("GET", "/health")
            conn.getresponse().read()
            latencies.append(time.perf_counter() - t)
            stop.wait(every)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    try:
        r = run_load(url, path, bodies, concurrency, duration)
    finally:
        stop.set()
        thread.join(timeout=60)
    lat = np.asarray(latencies) * 1000
    return {
        **r,
        "health_probes": int(lat.size),
        "health_p50_ms": float(np.percentile(lat, 50)) if lat.size else float("nan"),
        "health_p99_ms": float(np.percentile(lat, 99)) if lat.size else float("nan"),
    }


def big_bodies(artifact: str, max_bytes: int = 4_000_000, max_rows: int = 4096) -> list[bytes]:
    """Bodies just under ``max_bytes`` (the service's default limit), one per rotation of the rows."""
    rows = [r["features"] for r in read_heldout(artifact)]
    per_row = len(json.dumps(rows[0])) + 2
    n = min(max_rows, (max_bytes - 100) // per_row)
    out = []
    for k in range(2):
        picked = [rows[(k * n + i) % len(rows)] for i in range(n)]
        while len(body := json.dumps({"rows": picked}).encode()) > max_bytes:
            picked = picked[:-16]
        out.append(body)
    return out


def request_bodies(artifact: str, rows_per_request: int) -> list[bytes]:
    rows = [r["features"] for r in read_heldout(artifact)]
    return [
        json.dumps({"rows": rows[lo : lo + rows_per_request]}).encode()
        for lo in range(0, len(rows) - rows_per_request + 1, rows_per_request)
    ]


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", default="runs/serving/dlrm-int8", help="(default: %(default)s)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds per level (default: %(default)s)")
    p.add_argument("--concurrency", default="1,8,32", help="client counts (default: %(default)s)")
    p.add_argument("--rows-per-request", type=int, default=1, help="(default: %(default)s)")
    p.add_argument("--server-args", default="", help="extra flags for the server, e.g. '--max-wait-ms 1'")
    p.add_argument("--quick", action="store_true", help="2 s per level (a smoke run)")
    p.add_argument("--out", default="bench/results/serving_load.json", help="(default: %(default)s)")
    a = p.parse_args(argv)
    duration = 2.0 if a.quick else a.duration
    levels = [int(x) for x in a.concurrency.split(",")]
    bodies = request_bodies(a.artifact, a.rows_per_request)
    server = ["-m", "inference_legacy.dlrm_predict", "--artifact", a.artifact, *a.server_args.split()]
    results: dict[str, object] = {
        "artifact": a.artifact,
        "rows_per_request": a.rows_per_request,
        "duration_s": duration,
        "quick": a.quick,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "server_args": a.server_args,
        "batching": [],
        "no_batching": [],
    }
    for mode, extra in (("batching", []), ("no_batching", ["--no-batching"])):
        proc, url = spawn(server + extra)
        try:
            run_load(url, "/predict", bodies, min(levels), min(duration, 2.0))  # warm-up, not reported
            for c in levels if mode == "batching" else [max(levels)]:
                r = with_health_probe(url, "/predict", bodies, c, duration)
                results[mode].append(r)
                print(
                    f"{mode:12s} {c:3d} clients | {r['requests_per_s']:8.0f} req/s | p50 {r['p50_ms']:6.2f} ms | "
                    f"p99 {r['p99_ms']:6.2f} ms | max {r['max_ms']:7.2f} ms | errors {r['errors']} | /health p99 "
                    f"{r['health_p99_ms']:.2f} ms",
                    flush=True,
                )
            if mode == "batching":
                big = big_bodies(a.artifact)
                r = with_health_probe(url, "/predict", big, 7, duration)
                r["body_bytes"] = len(big[0])
                results["big_bodies"] = r
                print(
                    f"{'4 MB bodies':12s} {7:3d} clients | {r['requests_per_s']:8.1f} req/s | p50 {r['p50_ms']:6.1f} ms"
                    f" | errors {r['errors']} | /health p50 {r['health_p50_ms']:.2f} ms, p99 "
                    f"{r['health_p99_ms']:.2f} ms",
                    flush=True,
                )
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    top_on, top_off = results["batching"][-1], results["no_batching"][0]
    results["batching_speedup_at_max_clients"] = top_on["requests_per_s"] / top_off["requests_per_s"]
    results["batch_of_1_p99_ms_at_1_client"] = results["batching"][0]["p99_ms"] if a.rows_per_request == 1 else None
    print(
        f"dynamic batching at {max(levels)} clients: {results['batching_speedup_at_max_clients']:.2f}x the "
        f"throughput of batching off"
    )
    write_json_atomic(a.out, results)
    return results


if __name__ == "__main__":
    main()
