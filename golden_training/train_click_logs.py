"""TorchRec's golden DLRM setup on click logs: Criteo (TSV or TorchRec's ``.npy`` days) or random
data, 13 dense and 26 categorical features, measured by AUC, NE and log loss.

    python -m golden_training.train_click_logs --dataset criteo --criteo-path train.txt --max-rows 1000000
    python -m golden_training.train_click_logs --dataset criteo --criteo-path criteo_npy/   # day_{d}_*.npy
    torchrun --nproc_per_node=2 -m golden_training.train_click_logs --dataset random --num-embeddings 1048576
    torchx run -s local_cwd dist.ddp -j 1x2 --script golden_training/train_click_logs.py -- --dataset random
    python -m golden_training.train_click_logs --epochs 1 --limit-batches 20         # smoke run

The model, its sharding and the training loop are golden_training/train_dlrm.py's (``build`` and
``train``): TorchRec's DLRM (``--interaction dcn`` for DCNv2) sharded by DistributedModelParallel, a
fused RowWiseAdagrad for the tables and Adam for the MLPs, TorchRec's training pipeline, DCP
checkpoints under <out>/checkpoints (``--resume``). A logistic regression on the same features is the
baseline. The data (golden_training/ctr_data.py): a Criteo TSV splits 80/10/10 in file order; of
``.npy`` days the last is validation and test; ``random`` has a planted click signal. Each batch is
cut in file order, as Criteo's rows are in time order. Results go to <out>/results.json.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.distributed.model_parallel import DistributedModelParallel

from common.features import FeatureSchema
from common.flags import add_trainer_args
from common.metrics import BinaryMetrics
from common.runtime import Runtime, init_runtime, print0, seed_everything, shutdown, write_results
from common.sharding import qcomms_settings
from golden_training.criteo import CriteoArrays
from golden_training.ctr_data import CLICK_LOGS, criteo_schema, load_ctr
from golden_training.ctr_data import make_batch as ctr_batch
from golden_training.model import add_model_args, check_model_args
from golden_training.train_dlrm import steps_per_epoch, train


@dataclass(frozen=True)
class Config:
    dataset: str = "random"
    on_bad_row: str = "error"
    criteo_path: str | None = None
    num_embeddings: int = 100_000
    num_embeddings_per_feature: tuple[int, ...] | None = None
    random_rows: int = 100_000
    max_rows: int | None = None
    negative_counts: str = "clamp"
    embedding_dim: int = 64
    dense_arch: tuple[int, ...] = (64, 64)
    over_arch: tuple[int, ...] = (128, 64, 1)
    interaction: str = "dot"
    epochs: int = 1
    batch_size: int = 512
    sparse_lr: float = 0.05
    dense_lr: float = 1e-3
    seed: int = 0
    limit_batches: int | None = None
    limit_eval_batches: int | None = None
    device: str = "auto"
    sharding_type: str = "table_wise"
    pipeline: str = "auto"
    qcomms: bool = False
    out: str = "runs/click-logs"
    checkpoint_every: str = "5min"
    resume: bool = False
    log_every: int = 100
    baseline: bool = True
    tensorboard: bool = False


def parse_args(argv: list[str] | None = None) -> Config:
    d = Config()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--dataset", default=d.dataset, choices=CLICK_LOGS, help="criteo (--criteo-path) or random")
    data.add_argument(
        "--on-bad-row",
        default=d.on_bad_row,
        choices=["error", "skip"],
        help="a malformed TSV line: stop there with its file and line (default), or skip and count it",
    )
    data.add_argument(
        "--criteo-path",
        default=None,
        help="a Criteo TSV file (split 80/10/10 in order) or a directory of TorchRec's "
        "day_{d}_{dense,sparse,labels}.npy (last day: valid and test)",
    )
    data.add_argument(
        "--num-embeddings",
        type=int,
        default=d.num_embeddings,
        help=f"rows of every categorical table; IDs are hashed modulo it (default: {d.num_embeddings})",
    )
    data.add_argument(
        "--num-embeddings-per-feature", type=int, nargs=26, default=None, help="26 table sizes instead of one"
    )
    data.add_argument(
        "--random-rows",
        type=int,
        default=d.random_rows,
        help=f"training rows of --dataset random (valid and test get a tenth each) (default: {d.random_rows})",
    )
    data.add_argument("--max-rows", type=int, default=None, help="read only the first N lines of a TSV (default: all)")
    data.add_argument(
        "--negative-counts",
        default=d.negative_counts,
        choices=["clamp", "bad_line"],
        help="negative Criteo counts (int_1 has them in the real logs): set to 0 and counted, as DLRM's "
        "preprocessing does, or treated as a malformed line (default: clamp)",
    )
    add_model_args(p, d)
    groups = add_trainer_args(p, d)
    groups["training"].add_argument(
        "--limit-eval-batches",
        type=int,
        default=None,
        help="evaluate on the first N batches of 8192 rows of valid and test (default: all)",
    )
    groups["training"].add_argument(
        "--no-baseline", dest="baseline", action="store_false", help="skip the logistic-regression baseline"
    )
    groups["distributed"].add_argument(
        "--qcomms", action="store_true", help="quantized embedding communication (FP16 forward, BF16 backward)"
    )
    a = vars(p.parse_args(argv))
    a["dense_arch"], a["over_arch"] = tuple(a["dense_arch"]), tuple(a["over_arch"])
    if a["num_embeddings_per_feature"] is not None:
        a["num_embeddings_per_feature"] = tuple(a["num_embeddings_per_feature"])
    cfg = Config(**a)
    check_model_args(p, cfg)
    return cfg


@torch.no_grad()
def evaluate_click_logs(model: nn.Module, schema: FeatureSchema, data: CriteoArrays, cfg: Config) -> dict[str, float]:
    """AUC / NE / log loss on ``data`` in file order. Every rank scores the same rows."""
    net = (model.module if isinstance(model, DistributedModelParallel) else model).model
    device = next(iter(model.parameters())).device
    n = len(data) if cfg.limit_eval_batches is None else min(len(data), cfg.limit_eval_batches * 8192)
    model.eval()
    bm = BinaryMetrics()
    for lo in range(0, n, 8192):
        b = ctr_batch(schema, data, slice(lo, min(lo + 8192, n)))
        logits = net(b.dense_features.to(device), b.sparse_features.to(device)).reshape(-1)
        bm.update(torch.sigmoid(logits).cpu(), b.labels)
    model.train()
    return bm.compute(gather=False)


def train_click_logs(cfg: Config, rt: Runtime) -> dict[str, object]:
    sizes = list(cfg.num_embeddings_per_feature) if cfg.num_embeddings_per_feature else cfg.num_embeddings
    data = load_ctr(
        cfg.dataset,
        cfg.criteo_path,
        sizes,
        cfg.seed,
        cfg.random_rows,
        cfg.max_rows,
        cfg.on_bad_row,
        cfg.negative_counts,
    )
    schema = criteo_schema(sizes)
    steps = steps_per_epoch(len(data.train), cfg, rt)
    print0(
        f"{data.name}: {len(data.train)} training rows ({data.train.labels.mean():.3f} clicks), "
        f"{len(data.valid)} valid, {len(data.test)} test; {rt.world_size} x {rt.device.type} ({rt.backend})"
        + (f"; skipped malformed lines: {data.skipped}" if data.skipped else "")
        + (f"; negative counts set to 0: {data.clamped}" if data.clamped else "")
    )

    def batches(epoch: int, first: int) -> Iterator[Batch]:
        for step in range(first, steps):  # in order: Criteo's rows are in time order
            lo = step * cfg.batch_size * rt.world_size + rt.rank * cfg.batch_size
            yield ctr_batch(schema, data.train, slice(lo, lo + cfg.batch_size))

    results: dict[str, object] = {
        "dataset": data.name,
        "data_fingerprint": data.fingerprint,
        "world_size": rt.world_size,
        "nodes": rt.nodes,
        "config": asdict(cfg),
        "qcomms": qcomms_settings(cfg.qcomms, rt.device),
        "skipped_lines": data.skipped,
        "clamped_negative_counts": data.clamped,
    }
    for kind in ["dlrm", "lr"] if cfg.baseline else ["dlrm"]:
        model, history, info = train(
            kind,
            cfg,
            rt,
            schema,
            steps,
            batches,
            lambda m: evaluate_click_logs(m, schema, data.valid, cfg),
            Path(cfg.out),
            data.fingerprint,
        )
        results[kind] = {"valid_per_epoch": history, "test": evaluate_click_logs(model, schema, data.test, cfg), **info}
    print0(f"{'test':<22} | {'AUC':>7} | {'NE':>7} | {'log loss':>8}")
    for kind, name in (("lr", "logistic regression"), ("dlrm", f"DLRM ({cfg.interaction})")):
        if kind in results:
            t = results[kind]["test"]
            print0(f"{name:<22} | {t['auc']:>7.4f} | {t['ne']:>7.4f} | {t['logloss']:>8.4f}")
    write_results(Path(cfg.out), results)
    return results


def main(argv: list[str] | None = None) -> dict[str, object]:
    cfg = parse_args(argv)
    rt = init_runtime(cfg.device)
    seed_everything(cfg.seed)
    if q := qcomms_settings(cfg.qcomms, rt.device):
        print0(f"quantized communication: {q['forward']} forward, {q['backward']} backward")
    results = train_click_logs(cfg, rt)
    shutdown()
    return results


if __name__ == "__main__":
    main()
