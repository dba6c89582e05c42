"""DLRM training throughput in TorchRec's golden configuration, against the compute-only limit.

    python -m bench.dlrm_throughput                       # 1 and 2 processes x batch 512 and 32
    python -m bench.dlrm_throughput --quick               # small tables, few steps (a smoke run)
    python -m bench.dlrm_throughput --pipeline sparse-dist  # TrainPipelineSparseDist in every configuration

TorchRec's golden example (examples/golden_training/train_dlrm.py): random data, 26 tables of
1,048,576 rows x 128 (about 14 GB of fp32 tables), dense MLP 64-128, over MLP 64-1, fused
RowWiseAdagrad in backward, TrainPipelineSparseDist. Each configuration is measured two ways
on the same sharded model, in alternating blocks (the median of each is reported):

- **pipeline**: what ``golden_training/train_click_logs.py --dataset random`` runs, batches cut from
  arrays in memory by ``golden_training/ctr_data.py`` (with its ID checks) and fed through
  the pipeline ``--pipeline`` picks, as the training script does (auto: ``TrainPipelineSparseDist``
  with several processes or on CUDA, ``TrainPipelineBase`` in one CPU process), also fed
  the batches built beforehand (its own per-step cost);
- **compute only**: the same model's forward, backward and optimizer step on batches built
  beforehand and held in memory, with no data loading and no pipeline.

The overhead is 1 - pipeline / compute only, the median over adjacent pairs of blocks (this
machine's timings drift by tens of percent from minute to minute, so only paired ratios are
stable); the target is under 10%. Results go to bench/results/dlrm_throughput.json. Each
process count runs under ``torchrun``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common.runtime import torchrun_command, write_json_atomic
from common.sharding import PIPELINE_HELP, PIPELINES

GOLDEN = {"num_embeddings": 1024**2, "embedding_dim": 128, "dense_arch": (64, 128), "over_arch": (64, 1)}
QUICK = {"num_embeddings": 10_000, "embedding_dim": 128, "dense_arch": (64, 128), "over_arch": (64, 1)}


def worker(a: argparse.Namespace) -> None:
    """One configuration, in every process of a torchrun job; rank 0 writes the result."""
    from common.runtime import init_runtime, shutdown
    from common.sharding import release_pipeline, train_pipeline
    from golden_training.criteo import table_sizes
    from golden_training.ctr_data import criteo_schema, make_batch, random_ctr
    from golden_training.train_click_logs import Config
    from golden_training.train_dlrm import build

    shape = QUICK if a.quick else GOLDEN
    rt = init_runtime("auto")
    torch.manual_seed(0)
    cfg = Config(dataset="random", batch_size=a.batch_size, sparse_lr=0.1, dense_lr=1e-3, **shape)
    schema = criteo_schema(shape["num_embeddings"])
    t0 = time.perf_counter()
    model, optimizer = build("dlrm", cfg, schema, rt)
    init_s = time.perf_counter() - t0
    per_step = a.batch_size * rt.world_size
    data = random_ctr(per_step * a.steps, table_sizes(shape["num_embeddings"]), seed=0)

    def my_batch(step: int):
        lo = (step % a.steps) * per_step + rt.rank * a.batch_size
        return make_batch(schema, data, slice(lo, lo + a.batch_size))

    prebuilt = [my_batch(s) for s in range(a.steps)]
    pipeline = train_pipeline(model, optimizer, rt, a.pipeline)  # as train_dlrm.py --pipeline picks it

    def run_pipeline(prebuilt_batches: bool = False) -> float:
        """One pass over the steps; the first step (which fills the pipeline and, after a detach,
        rewrites the model) is left out of the timing. ``prebuilt_batches``: fed the batches built
        beforehand, so the difference to the compute-only loop is the pipeline's own cost."""
        it = iter(prebuilt) if prebuilt_batches else (my_batch(s) for s in range(a.steps))
        pipeline.progress(it)
        torch.distributed.barrier()
        start, done = time.perf_counter(), 0
        while True:
            try:
                pipeline.progress(it)
            except StopIteration:
                break
            done += 1
        torch.distributed.barrier()
        elapsed = time.perf_counter() - start
        release_pipeline(pipeline)  # give the model its own forward back for the compute-only loop
        return per_step * done / elapsed

    def run_compute() -> float:
        torch.distributed.barrier()
        start = time.perf_counter()
        for batch in prebuilt:
            loss, _ = model(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        torch.distributed.barrier()
        return per_step * a.steps / (time.perf_counter() - start)

    def build_ms() -> float:
        start = time.perf_counter()
        for s in range(a.steps):
            my_batch(s)
        return (time.perf_counter() - start) / a.steps * 1e3

    run_compute()  # warm-up: first steps allocate optimizer state and caches
    pipeline_rates, compute_rates, prebuilt_rates, build = [], [], [], []
    for _ in range(a.repeats):
        pipeline_rates.append(run_pipeline())
        compute_rates.append(run_compute())
        prebuilt_rates.append(run_pipeline(prebuilt_batches=True))
        build.append(build_ms())
    if rt.is_rank0:
        p, c = statistics.median(pipeline_rates), statistics.median(compute_rates)
        overhead = statistics.median(1 - x / y for x, y in zip(pipeline_rates, compute_rates))
        table_bytes = 26 * shape["num_embeddings"] * shape["embedding_dim"] * 4
        Path(a.result).write_text(
            json.dumps(
                {
                    "processes": rt.world_size,
                    "batch_size_per_rank": a.batch_size,
                    "pipeline": type(pipeline).__name__,
                    "steps_per_block": a.steps,
                    "repeats": a.repeats,
                    "model_init_s": round(init_s, 1),
                    "table_gb": round(table_bytes / 1e9, 2),
                    "pipeline_ex_per_s": round(p),
                    "compute_only_ex_per_s": round(c),
                    "overhead": round(overhead, 4),
                    # where the overhead goes: the pipeline fed pre-built batches (its own per-step cost,
                    # paired with the compute-only blocks) and building a batch alone
                    "pipeline_prebuilt_ex_per_s": round(statistics.median(prebuilt_rates)),
                    "pipeline_own_overhead": round(
                        statistics.median(1 - x / y for x, y in zip(prebuilt_rates, compute_rates)), 4
                    ),
                    "batch_build_ms": round(statistics.median(build), 3),
                    "step_ms_compute_only": round(per_step / c * 1e3, 3),
                    "pipeline_runs": [round(x) for x in pipeline_rates],
                    "compute_runs": [round(x) for x in compute_rates],
                }
            )
        )
    shutdown()


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="10,000-row tables and few steps, a smoke run (default: off)")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts (default: 1 2)")
    p.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[512, 32], help="batch sizes per rank (default: 512 32)"
    )
    p.add_argument("--steps", type=int, default=None, help="steps per timed block (default: 200, or 20 with --quick)")
    p.add_argument(
        "--repeats", type=int, default=5, help="timed blocks of each mode, alternating (default: %(default)s)"
    )
    p.add_argument("--pipeline", default="auto", choices=PIPELINES, help=PIPELINE_HELP)
    p.add_argument("--out", default="bench/results/dlrm_throughput.json", help="results file (default: %(default)s)")
    p.add_argument("--worker-result", default=None, help=argparse.SUPPRESS)  # internal: run one configuration
    p.add_argument("--batch-size", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.steps = a.steps or (20 if a.quick else 200)
    if a.worker_result:
        a.result = a.worker_result
        worker(a)
        return {}
    rows = []
    for nproc in a.processes:
        for batch in a.batch_sizes:
            with tempfile.TemporaryDirectory() as tmp:
                result = Path(tmp) / "result.json"
                args = ["--worker-result", str(result), "--batch-size", str(batch), "--steps", str(a.steps)]
                args += ["--repeats", str(a.repeats), "--pipeline", a.pipeline] + (["--quick"] if a.quick else [])
                cmd = torchrun_command("bench.dlrm_throughput", args, nproc)
                env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"{nproc} x batch {batch} failed:\n{proc.stderr[-4000:]}")
                row = json.loads(result.read_text())
            rows.append(row)
            print(
                f"{nproc} process(es), batch {batch:>4}, {row['pipeline']}: {row['pipeline_ex_per_s']:>8,} ex/s | "
                f"compute only {row['compute_only_ex_per_s']:>8,} ex/s | overhead {row['overhead']:+.1%} "
                f"(the pipeline on pre-built batches {row['pipeline_own_overhead']:+.1%}, building a batch "
                f"{row['batch_build_ms']:.2f} ms of a {row['step_ms_compute_only']:.2f} ms step) "
                f"(tables {row['table_gb']} GB, init {row['model_init_s']} s)",
                flush=True,
            )
    results = {
        "quick": a.quick,
        "shape": {k: list(v) if isinstance(v, tuple) else v for k, v in (QUICK if a.quick else GOLDEN).items()},
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "rows": rows,
        "max_overhead": max(r["overhead"] for r in rows),
        "target_overhead": 0.10,
        "numpy": np.__version__,
    }
    write_json_atomic(a.out, results)
    return results


if __name__ == "__main__":
    main()
