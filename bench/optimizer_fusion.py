"""The guide's claim "in-backward optimizer fusion: ~15% faster training", measured on this machine.

    python -m bench.optimizer_fusion                  # 26 tables x 100,000 rows x 128, batch 512 and 32
    python -m bench.optimizer_fusion --quick          # small tables, few steps (a smoke run)

The same DLRM (TorchRec's golden shape: 26 tables, dense MLP 64-128, over MLP 64-1, random data)
trained two ways from the same weights on the same batches:

- **fused**: what every training script here does (common/sharding.py): the tables in FBGEMM's
  fused kernel, RowWiseAdagrad applied inside backward, so no table gradient is ever materialized;
- **separate**: the tables as plain parameters (TorchRec's dense kernel), backward writes their
  gradients, then ``torchrec.optim.RowWiseAdagrad`` steps as a separate optimizer.

TorchRec offers the dense kernel only to data-parallel tables, so both run in one process (where a
data-parallel table is simply one table). Each run is a fresh process (its peak memory is its own);
the two alternate, ``--rounds`` times, and the median of each is reported with the loss both reach,
which must agree (same model, same updates). Results: bench/results/optimizer_fusion.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

from common.runtime import write_json_atomic

MODES = ("fused", "separate")


def worker(a: argparse.Namespace) -> None:
    """One mode, one batch size, in this process: timed blocks after a warm-up; writes a JSON line."""
    from torchrec import EmbeddingBagCollection
    from torchrec.models.dlrm import DLRM, DLRMTrain

    from common.runtime import init_runtime, shutdown
    from common.sharding import local_shards, shard_model
    from golden_training.criteo import table_sizes
    from golden_training.ctr_data import criteo_schema, make_batch, random_ctr

    rt = init_runtime("cpu")
    schema = criteo_schema(a.rows)
    ebc = EmbeddingBagCollection(tables=schema.embedding_bag_configs(128), device=torch.device("meta"))
    net = DLRM(
        embedding_bag_collection=ebc,
        dense_in_features=len(schema.dense),
        dense_arch_layer_sizes=[64, 128],
        over_arch_layer_sizes=[64, 1],
    )
    model, optimizer = shard_model(DLRMTrain(net), [ebc], rt, "table_wise", 0.1, 1e-3, fused=a.mode == "fused")
    with torch.no_grad():  # the same starting weights in both modes, by parameter name
        for key, _, t in local_shards(model.state_dict()):
            if t.is_floating_point():
                g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
                t.copy_((torch.rand(t.shape, generator=g) - 0.5) * (0.02 if t.dim() > 1 else 0.0))
    blocks = a.blocks + 1  # the first block is a warm-up (optimizer state, caches)
    data = random_ctr(a.batch_size * a.steps * blocks, table_sizes(a.rows), seed=0)
    batches = [
        make_batch(schema, data, slice(i * a.batch_size, (i + 1) * a.batch_size)) for i in range(a.steps * blocks)
    ]
    rates, loss = [], float("nan")
    for b in range(blocks):
        start = time.perf_counter()
        for batch in batches[b * a.steps : (b + 1) * a.steps]:
            loss_t, _ = model(batch)
            loss_t.backward()
            optimizer.step()
            optimizer.zero_grad()
            loss = loss_t.item()
        if b:
            rates.append(a.steps * a.batch_size / (time.perf_counter() - start))
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux
    Path(a.result).write_text(
        json.dumps({"examples_per_s": statistics.median(rates), "final_loss": loss, "peak_rss_gb": peak_gb})
    )
    shutdown()


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000, help="rows per table (default: %(default)s)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[512, 32], help="(default: 512 32)")
    p.add_argument("--steps", type=int, default=20, help="steps per timed block (default: %(default)s)")
    p.add_argument("--blocks", type=int, default=2, help="timed blocks per run (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each mode, alternating (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="5,000-row tables, 5 steps, 1 round")
    p.add_argument("--out", default="bench/results/optimizer_fusion.json", help="(default: %(default)s)")
    p.add_argument("--worker", choices=MODES, default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=512, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.rows, a.steps, a.rounds, a.blocks = 5_000, 5, 1, 1
    if a.worker:
        a.mode = a.worker
        worker(a)
        return {}
    rows = []
    for batch in a.batch_sizes:
        runs: dict[str, list[dict]] = {m: [] for m in MODES}
        for _ in range(a.rounds):
            for mode in MODES:
                with tempfile.TemporaryDirectory() as tmp:
                    result = Path(tmp) / "result.json"
                    cmd = [sys.executable, "-m", "bench.optimizer_fusion", "--worker", mode, "--rows", str(a.rows)]
                    cmd += ["--batch-size", str(batch), "--steps", str(a.steps), "--blocks", str(a.blocks)]
                    subprocess.run(cmd + ["--result", str(result)], check=True, stdout=subprocess.DEVNULL)
                    runs[mode].append(json.loads(result.read_text()))
        row = {"batch_size": batch}
        for mode in MODES:
            row[mode] = {
                "examples_per_s": statistics.median(r["examples_per_s"] for r in runs[mode]),
                "peak_rss_gb": max(r["peak_rss_gb"] for r in runs[mode]),
                "final_loss": runs[mode][0]["final_loss"],
                "runs": [round(r["examples_per_s"]) for r in runs[mode]],
            }
        row["speedup"] = row["fused"]["examples_per_s"] / row["separate"]["examples_per_s"]
        rows.append(row)
        f, s = row["fused"], row["separate"]
        print(
            f"batch {batch}: fused {f['examples_per_s']:.0f} ex/s (peak {f['peak_rss_gb']:.2f} GB) | separate "
            f"{s['examples_per_s']:.0f} ex/s (peak {s['peak_rss_gb']:.2f} GB) | fused {row['speedup']:.2f}x | "
            f"loss after the same steps {f['final_loss']:.5f} vs {s['final_loss']:.5f}",
            flush=True,
        )
    results = {
        "rows_per_table": a.rows,
        "tables": 26,
        "embedding_dim": 128,
        "table_gb": round(26 * a.rows * 128 * 4 / 1e9, 2),
        "steps_per_block": a.steps,
        "blocks": a.blocks,
        "rounds": a.rounds,
        "host": platform.node(),
        "torch": torch.__version__,
        "results": rows,
    }
    write_json_atomic(a.out, results)
    return results


if __name__ == "__main__":
    main()
