"""The guide's claim "quantized comms: 2x bandwidth reduction", measured: the bytes each rank hands
to the collectives in a training step, without and with TorchRec's quantized communication.

    python -m bench.qcomms_bytes                 # 2 gloo processes, 26 tables x 10,000 x 128, batch 512
    python -m bench.qcomms_bytes --quick         # smaller, fewer steps

The DLRM of ``golden_training/train_click_logs.py --dataset random`` (TorchRec's golden shape, smaller
tables), sharded table-wise over 2 gloo processes, trained for ``--steps`` steps with and without
``--qcomms`` (FP16 forward; FP16 backward, because gloo has no BF16). Every call TorchRec makes to
``torch.distributed``'s all-to-all, reduce-scatter and all-gather is counted (the bytes of the tensor
each rank sends), so the figures are what went to the collectives, not a computation from shapes.
The dense layers' gradient all-reduce runs inside DDP's C++ reducer and is not counted (quantized
comms does not touch it either). Results: bench/results/qcomms_bytes.json.
"""

from __future__ import annotations

import argparse
import platform
from collections import defaultdict

import torch

from common.runtime import write_json_atomic

COUNTED = ("all_to_all_single", "reduce_scatter_tensor", "reduce_scatter", "all_gather_into_tensor", "all_gather")
INPUTS = ("input", "input_tensor", "input_list", "tensor")  # the sent tensor's keyword, per collective


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


def _dtype(x) -> str:
    t = x if isinstance(x, torch.Tensor) else next(iter(x), None)
    return str(t.dtype).removeprefix("torch.") if isinstance(t, torch.Tensor) else "?"


def worker(qcomms: bool, rows: int, batch_size: int, steps: int) -> dict[str, object]:
    """In each of the processes: train ``steps`` steps, counting the bytes sent per collective."""
    import torch.distributed as dist

    from common.runtime import init_runtime, shutdown
    from golden_training.criteo import table_sizes
    from golden_training.ctr_data import criteo_schema, make_batch, random_ctr
    from golden_training.train_click_logs import Config
    from golden_training.train_dlrm import build

    sent: dict[str, int] = defaultdict(int)
    calls: dict[str, int] = defaultdict(int)
    for name in COUNTED:
        original = getattr(dist, name)

        def counting(*args, _name=name, _original=original, **kwargs):
            # the tensor a rank sends: all_to_all_single(output, input), reduce_scatter_tensor(output, input),
            # reduce_scatter(output, input_list), all_gather_into_tensor(output, input), all_gather(list, tensor)
            x = args[1] if len(args) > 1 else next(kwargs[k] for k in INPUTS if k in kwargs)
            key = f"{_name} {_dtype(x)}"  # e.g. the ids (int64) apart from the embeddings (float32 / float16)
            sent[key] += _nbytes(x)
            calls[key] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, counting)
    rt = init_runtime("cpu")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = Config(
        dataset="random",
        batch_size=batch_size,
        num_embeddings=rows,
        embedding_dim=128,
        dense_arch=(64, 128),
        over_arch=(64, 1),
        qcomms=qcomms,
        sharding_type="table_wise",
    )
    schema = criteo_schema(rows)
    model, optimizer = build("dlrm", cfg, schema, rt)
    per_step = batch_size * rt.world_size
    data = random_ctr(per_step * (steps + 1), table_sizes(rows), seed=0)
    batches = [
        make_batch(schema, data, slice(s * per_step + rt.rank * batch_size, s * per_step + (rt.rank + 1) * batch_size))
        for s in range(steps + 1)
    ]
    loss, _ = model(batches[0])  # a first step outside the count (plan, buffers)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    sent.clear()
    calls.clear()
    losses = []
    for batch in batches[1:]:
        loss, _ = model(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    out = {
        "bytes_per_step": {k: v / steps for k, v in sent.items()},
        "calls_per_step": {k: v / steps for k, v in calls.items()},
        "total_bytes_per_step": sum(sent.values()) / steps,
        "mean_loss": sum(losses) / len(losses),
    }
    shutdown()
    return out


def _float_bytes(by_key: dict[str, float]) -> float:
    return sum(v for k, v in by_key.items() if "float" in k)


def main(argv: list[str] | None = None) -> dict[str, object]:
    from common.runtime import launch_local

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000, help="rows per table (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=512, help="per rank (default: %(default)s)")
    p.add_argument("--steps", type=int, default=10, help="counted steps (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="1,000-row tables, batch 64, 3 steps")
    p.add_argument("--out", default="bench/results/qcomms_bytes.json", help="(default: %(default)s)")
    a = p.parse_args(argv)
    if a.quick:
        a.rows, a.batch_size, a.steps = 1_000, 64, 3
    runs = {}
    for name, qcomms in (("fp32", False), ("qcomms", True)):
        ranks = launch_local(worker, 2, qcomms, a.rows, a.batch_size, a.steps)
        runs[name] = ranks[0]
        print(
            f"{name:<7} rank 0 sends {ranks[0]['total_bytes_per_step'] / 1e6:.3f} MB a step to the collectives: "
            + ", ".join(f"{k} {v / 1e6:.3f} MB" for k, v in sorted(ranks[0]["bytes_per_step"].items()))
            + f" | mean loss {ranks[0]['mean_loss']:.4f}",
            flush=True,
        )
    results = {
        "processes": 2,
        "rows_per_table": a.rows,
        "batch_size_per_rank": a.batch_size,
        "steps": a.steps,
        "host": platform.node(),
        "runs": runs,
        "reduction_total": runs["fp32"]["total_bytes_per_step"] / runs["qcomms"]["total_bytes_per_step"],
        "float_bytes_per_step": {name: _float_bytes(r["bytes_per_step"]) for name, r in runs.items()},
    }
    floats = results["float_bytes_per_step"]
    results["reduction_floats"] = floats["fp32"] / floats["qcomms"]
    print(
        f"bytes a step: {results['reduction_total']:.2f}x fewer with qcomms in all; the embeddings and their "
        f"gradients (the floating-point payloads) {results['reduction_floats']:.2f}x fewer"
    )
    write_json_atomic(a.out, results)
    return results


if __name__ == "__main__":
    main()
