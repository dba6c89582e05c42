"""Run every benchmark in bench/, one after another, each in its own process.

    python -m bench.run_all                      # every benchmark, full size: hours; results in bench/results/
    python -m bench.run_all --quick              # each one's smoke run, results in a temporary directory
    python -m bench.run_all --only data_layer faiss_indexes

Full runs write bench/results/<name>.json (what the READMEs quote); quick runs never overwrite
them. A benchmark that needs the demo's artifacts (``python -m integration.demo``) is skipped, with
the reason, when runs/ lacks them; one that fails does not stop the others. The summary at the end
gives each one's status and time, and the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name -> (full-size arguments, quick arguments or None when it has no smoke run, artifact it needs)
BENCHMARKS: dict[str, tuple[list[str], list[str] | None, str | None]] = {
    "data_layer": ([], ["--quick"], None),
    "faiss_indexes": ([], ["--items", "100000", "--queries", "200", "--skip-hnsw"], None),
    "optimizer_fusion": ([], ["--quick"], None),
    "qcomms_bytes": ([], ["--quick"], None),
    "dlrm_throughput": ([], ["--quick"], None),
    "pipeline_latency": ([], ["--quick"], "runs/serving/dlrm-int8"),
    "serving_load": ([], ["--quick"], "runs/serving/dlrm-int8"),
    "service_chaos": ([], None, "runs/serving/dlrm-int8"),
    "scale": ([], None, None),
}


def main(argv: list[str] | None = None) -> dict[str, dict[str, object]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="each benchmark's smoke run, results not kept")
    p.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=None, help="run these (default: all)")
    a = p.parse_args(argv)
    summary: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.only or BENCHMARKS:
            full, quick, needs = BENCHMARKS[name]
            if a.quick and quick is None:
                summary[name] = {"status": "skipped", "why": "no quick mode"}
            elif needs and not Path(needs).exists():
                summary[name] = {"status": "skipped", "why": f"{needs} missing: run python -m integration.demo first"}
            else:
                args = quick + ["--out", str(Path(tmp) / f"{name}.json")] if a.quick else full
                print(f"== bench.{name} {' '.join(args)}", flush=True)
                t0 = time.perf_counter()
                rc = subprocess.run([sys.executable, "-m", f"bench.{name}", *args]).returncode
                summary[name] = {
                    "status": "ok" if rc == 0 else f"failed (exit {rc})",
                    "seconds": time.perf_counter() - t0,
                }
    print("\nbenchmark            status")
    for name, s in summary.items():
        took = f" in {s['seconds']:.0f} s" if "seconds" in s else f": {s['why']}"
        print(f"{name:20s} {s['status']}{took}")
    if any(str(s["status"]).startswith("failed") for s in summary.values()):
        raise SystemExit(1)
    return summary


if __name__ == "__main__":
    main()
