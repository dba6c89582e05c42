"""Train BERT4Rec on MovieLens with a sharded item embedding, and evaluate it honestly.

    python -m bert4rec.bert4rec_main                                   # ml-100k, about 10 minutes on 2 CPU cores
    torchrun --nproc_per_node=2 -m bert4rec.bert4rec_main
    python -m bert4rec.bert4rec_main --epochs 5 --eval-every 1         # smoke run

The item embedding lives in a TorchRec ``EmbeddingCollection`` sharded by
DistributedModelParallel (table-wise by default) and updated by a fused RowWiseAdagrad in
backward, which runs on CPU as well as CUDA; the transformer is data-parallel, with Adam. Data
and split are the shared ones (common/data): each user's last item is test, the one before it
validation, the rest training, in time order. Training windows are the last ``--max-len`` items
of each user's training sequence plus earlier windows every ``--window-step`` items, with the
cloze task of model.py.

Evaluation, on validation every ``--eval-every`` epochs and on test once with the best model
(``--no-test``: validation only, test never scored):
- the shared full-ranking protocol (HR@10, NDCG@10, Recall@50/100 over every item, history
  excluded), each user counted exactly once whatever the number of ranks;
- the popularity-sampled-100 and uniform-sampled-100 protocols, to compare with papers and
  TorchRec's example (they are easier: read them as such).
Early stopping on validation NDCG@10 (``--patience`` evaluations). Checkpoints (DCP) under
<out>/checkpoints (``--resume`` continues) and the best model under <out>/best; results in
<out>/results.json; the next-item scorer for the integration pipeline in <out>/export.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torchrec.distributed.model_parallel import DistributedModelParallel
from tqdm import tqdm

from bert4rec.model import BERT4Rec, BERT4RecTrain, mask_batch, query_sequences, sequences_kjt
from common.baselines import popularity_report
from common.checkpoint import (
    gathered_state_dict,
    latest_checkpoint,
    load_checkpoint,
    resume_if_possible,
    run_config,
    save_checkpoint,
)
from common.data.movielens import add_dataset_args, load_movielens
from common.data.split import Split, split_dataset
from common.metrics import RankingReport, evaluate_scores, sampled_report
from common.runtime import (
    MetricsLog,
    Runtime,
    init_runtime,
    print0,
    seed_everything,
    shutdown,
    write_json_atomic,
    write_results,
)
from common.sharding import shard_model

SHARDING_TYPES = ("table_wise", "column_wise", "row_wise")  # what TorchRec's EmbeddingCollection sharder offers


@dataclass(frozen=True)
class Config:
    dataset: str = "ml-100k"
    data_dir: str | None = None
    source: str = "auto"
    max_len: int = 50
    window_step: int = 10
    embedding_dim: int = 64
    num_layers: int = 2
    num_heads: int = 2
    dropout: float = 0.2
    mask_prob: float = 0.4
    last_prob: float = 0.1
    epochs: int = 200
    batch_size: int = 64
    sparse_lr: float = 0.1
    dense_lr: float = 2e-3
    eval_every: int = 3
    patience: int = 5
    seed: int = 0
    device: str = "auto"
    sharding_type: str = "table_wise"
    out: str = "runs/bert4rec"
    resume: bool = False
    n_boot: int = 1000
    no_test: bool = False
    tensorboard: bool = False


def parse_args(argv: list[str] | None = None) -> Config:
    d = Config()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    add_dataset_args(data)
    data.add_argument(
        "--max-len",
        type=int,
        default=d.max_len,
        help=f"items per sequence, [MASK] included at prediction (default: {d.max_len})",
    )
    data.add_argument(
        "--window-step",
        type=int,
        default=d.window_step,
        help=f"longer training sequences also give windows ending this many items earlier, and so on (default: {d.window_step})",
    )
    model = p.add_argument_group("model")
    model.add_argument("--embedding-dim", type=int, default=d.embedding_dim, help=f"(default: {d.embedding_dim})")
    model.add_argument(
        "--num-layers", type=int, default=d.num_layers, help=f"transformer layers (default: {d.num_layers})"
    )
    model.add_argument("--num-heads", type=int, default=d.num_heads, help=f"attention heads (default: {d.num_heads})")
    model.add_argument("--dropout", type=float, default=d.dropout, help=f"(default: {d.dropout})")
    train = p.add_argument_group("training")
    train.add_argument(
        "--mask-prob",
        type=float,
        default=d.mask_prob,
        help=f"share of tokens masked in the cloze task (default: {d.mask_prob})",
    )
    train.add_argument(
        "--last-prob",
        type=float,
        default=d.last_prob,
        help=f"share of sequences with only the last item masked (default: {d.last_prob})",
    )
    train.add_argument(
        "--epochs",
        type=int,
        default=d.epochs,
        help=f"at most this many passes; early stopping usually ends sooner (default: {d.epochs})",
    )
    train.add_argument(
        "--batch-size", type=int, default=d.batch_size, help=f"sequences per rank per step (default: {d.batch_size})"
    )
    train.add_argument(
        "--sparse-lr",
        type=float,
        default=d.sparse_lr,
        help=f"RowWiseAdagrad learning rate of the item embedding (default: {d.sparse_lr})",
    )
    train.add_argument(
        "--dense-lr",
        type=float,
        default=d.dense_lr,
        help=f"Adam learning rate of the transformer (default: {d.dense_lr})",
    )
    train.add_argument(
        "--eval-every",
        type=int,
        default=d.eval_every,
        help=f"epochs between validations and checkpoints (default: {d.eval_every})",
    )
    train.add_argument(
        "--patience",
        type=int,
        default=d.patience,
        help=f"stop after this many validations without a better NDCG@10 (default: {d.patience})",
    )
    train.add_argument("--seed", type=int, default=d.seed, help=f"(default: {d.seed})")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint under --out (without it, an --out holding checkpoints is refused)",
    )
    dist = p.add_argument_group("distributed")
    dist.add_argument(
        "--device", default=d.device, choices=["auto", "cpu", "cuda"], help="auto: cuda if available (default: auto)"
    )
    dist.add_argument(
        "--sharding-type",
        default=d.sharding_type,
        choices=SHARDING_TYPES,
        help="item table sharding; row_wise needs CUDA (default: table_wise)",
    )
    out = p.add_argument_group("output")
    out.add_argument("--out", default=d.out, help=f"run directory (default: {d.out})")
    out.add_argument("--n-boot", type=int, default=d.n_boot, help=f"bootstrap resamples for CIs (default: {d.n_boot})")
    out.add_argument(
        "--no-test", action="store_true", help="never evaluate on test (model selection runs: validation only)"
    )
    out.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write the curves as TensorBoard events under <out>/tensorboard (pip install tensorboard)",
    )
    cfg = Config(**vars(p.parse_args(argv)))
    if cfg.max_len < 2:
        p.error("--max-len must be at least 2 (one item and [MASK])")
    if cfg.embedding_dim % cfg.num_heads:
        p.error(f"--embedding-dim {cfg.embedding_dim} must be divisible by --num-heads {cfg.num_heads}")
    return cfg


def training_windows(split: Split, max_len: int, step: int) -> list[np.ndarray]:
    """Token windows over each user's training sequence: the last ``max_len`` items, then
    windows ending ``step``, ``2 * step``, ... items earlier while they hold at least 2 items."""
    starts = np.searchsorted(split.train_user, np.arange(split.num_users))
    ends = np.r_[starts[1:], len(split.train_user)]
    windows = []
    for a, b in zip(starts, ends):
        seq = split.train_item[a:b] + 1
        for end in range(len(seq), 1, -step):
            windows.append(seq[max(0, end - max_len) : end])
    return windows


def length_buckets(windows: list[np.ndarray], per_step: int, rng: np.random.Generator) -> np.ndarray:
    """An epoch's order: windows of similar length share a step (a batch is padded to its
    longest window), with random composition and random step order each epoch."""
    lengths = np.array([len(w) for w in windows], dtype=np.float64)
    by_length = np.argsort(lengths + rng.uniform(0, 0.25 * lengths.max(), len(lengths)), kind="stable")
    steps = len(windows) // per_step
    blocks = by_length[: steps * per_step].reshape(steps, per_step)[rng.permutation(steps)]
    return np.concatenate([blocks.reshape(-1), by_length[steps * per_step :]])


class Scorer:
    """Next-item scores for users' histories, every rank running the same forwards (the sharded
    table needs every rank in each lookup)."""

    def __init__(self, model: BERT4Rec, split: Split, stage: str, batch_size: int = 256) -> None:
        indptr, hist = split.history(stage)
        seqs = query_sequences(
            [hist[indptr[u] : indptr[u + 1]] for u in range(split.num_users)], model.max_len, model.mask_token
        )
        was_training = model.training
        model.eval()
        with torch.no_grad():
            self.scores = torch.cat(
                [
                    model.last_scores(
                        sequences_kjt(seqs[lo : lo + batch_size]).to(next(model.parameters()).device)
                    ).cpu()
                    for lo in range(0, len(seqs), batch_size)
                ]
            )
        model.train(was_training)

    def __call__(self, users):
        return self.scores[torch.as_tensor(users).cpu()]


def evaluate(model: BERT4Rec, split: Split, stage: str, n_boot: int, sampled: bool = True) -> dict[str, RankingReport]:
    score = Scorer(model, split, stage)
    reports = {"full": evaluate_scores(score, split, stage, n_boot=n_boot)}
    if sampled:
        for by in ("popularity", "uniform"):
            reports[f"sampled_{by}"] = sampled_report(lambda u: score(u).numpy(), split, stage, by, n_boot=n_boot)
    return reports


def build(cfg: Config, num_items: int, rt: Runtime) -> tuple[DistributedModelParallel, torch.optim.Optimizer]:
    torch.manual_seed(cfg.seed)
    net = BERT4Rec(
        num_items,
        cfg.max_len,
        cfg.embedding_dim,
        cfg.num_layers,
        cfg.num_heads,
        cfg.dropout,
        device=torch.device("meta"),
    )
    return shard_model(BERT4RecTrain(net), [net.item_embedding], rt, cfg.sharding_type, cfg.sparse_lr, cfg.dense_lr)


def export(out_dir: Path, cfg: Config, model: DistributedModelParallel, ds, reports: dict[str, dict]) -> None:
    """What the integration pipeline needs to score next items (bert4rec/scorer.py): the
    unsharded weights, the settings, the item ID map and the data fingerprint. Collective."""
    weights = {k.removeprefix("model."): v for k, v in gathered_state_dict(model).items()}
    if torch.distributed.get_rank() != 0:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(weights, out_dir / "weights.pt")
    write_json_atomic(
        out_dir / "manifest.json",
        {
            "model": "bert4rec",
            "config": asdict(cfg),
            "num_items": ds.num_items,
            "dataset": ds.name,
            "data_fingerprint": ds.fingerprint,
            "item_raw_ids": ds.item_raw_ids.tolist(),
            "user_raw_ids": ds.user_raw_ids.tolist(),
            "test": reports,
        },
    )


def main(argv: list[str] | None = None) -> dict[str, object]:
    cfg = parse_args(argv)
    rt = init_runtime(cfg.device)
    seed_everything(cfg.seed)
    out = Path(cfg.out)
    ds = load_movielens(cfg.dataset, cfg.data_dir, cfg.source)
    split = split_dataset(ds)
    windows = training_windows(split, cfg.max_len, cfg.window_step)
    model, optimizer = build(cfg, ds.num_items, rt)
    net: BERT4Rec = model.module.model
    print0(
        f"{ds.name}: {len(windows)} training windows from {split.num_users} users, {ds.num_items} items; "
        f"{rt.world_size} x {rt.device.type} ({rt.backend}); item table {cfg.sharding_type}"
    )

    state = {"model": model, "optimizer": optimizer}
    fingerprint = run_config(cfg, ds.fingerprint)
    meta = resume_if_possible(out / "checkpoints", state, fingerprint, cfg.resume) or {
        "epoch": 0,
        "best": -1.0,
        "best_epoch": -1,
        "stale": 0,
        "valid": [],
    }
    first_epoch, history = meta["epoch"], meta["valid"]
    best, best_epoch, stale = meta["best"], meta["best_epoch"], meta["stale"]
    if first_epoch:
        print0(f"resumed after epoch {first_epoch - 1} (best valid NDCG@10 {best:.4f} at epoch {best_epoch})")
    per_step = cfg.batch_size * rt.world_size
    steps = len(windows) // per_step
    if steps == 0:
        raise ValueError(f"{len(windows)} training windows are fewer than one step of {per_step}; lower --batch-size")

    if "valid_before_training" not in meta:  # the untrained model, for the record (and the tests)
        meta["valid_before_training"] = evaluate(net, split, "valid", n_boot=10, sampled=False)["full"].means
    start = time.perf_counter()
    log = MetricsLog(out, "bert4rec", cfg.tensorboard)  # the curves: <out>/metrics.jsonl, one train line per epoch
    bar = tqdm(total=cfg.epochs, initial=first_epoch, desc="epochs", disable=not rt.is_rank0 or None)
    epochs_done = first_epoch
    for epoch in range(first_epoch, cfg.epochs):
        if stale >= cfg.patience:
            break
        rng = np.random.default_rng([cfg.seed, epoch, rt.rank])
        order = length_buckets(windows, per_step, np.random.default_rng([cfg.seed, epoch]))
        total, epoch_start = 0.0, time.perf_counter()
        for step in range(steps):
            rows = order[step * per_step + rt.rank * cfg.batch_size :][: cfg.batch_size]
            seq, at_row, at_col, labels = mask_batch(
                [windows[i] for i in rows], cfg.mask_prob, cfg.last_prob, net.mask_token, rng
            )
            loss = model(seq.to(rt.device), at_row.to(rt.device), at_col.to(rt.device), labels.to(rt.device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.item())
        bar.update(1)
        epochs_done = epoch + 1
        log.log(
            "train",
            (epoch + 1) * steps,
            epoch,
            loss=total / steps,
            examples_per_s=steps * per_step / (time.perf_counter() - epoch_start),
        )
        if (epoch + 1) % cfg.eval_every and epoch + 1 < cfg.epochs:
            continue
        rep = evaluate(net, split, "valid", n_boot=50, sampled=False)["full"]
        ndcg = rep.means["NDCG@10"]
        history.append({"epoch": epoch, "loss": total / steps, **rep.means})
        log.log("valid", (epoch + 1) * steps, epoch, **rep.means)
        if ndcg > best:
            best, best_epoch, stale = ndcg, epoch, 0
            save_checkpoint(
                out / "best", epoch, {"model": model}, keep_last=1, meta={"epoch": epoch, "valid_NDCG@10": ndcg}
            )
        else:
            stale += 1
        print0(
            f"epoch {epoch} | loss {total / steps:.4f} | valid NDCG@10 {ndcg:.4f} | HR@10 {rep.means['HR@10']:.4f}"
            f" | best {best:.4f} (epoch {best_epoch}) | {time.perf_counter() - start:.0f}s"
        )
        save_checkpoint(
            out / "checkpoints",
            epoch + 1,
            state,
            meta={
                "epoch": epoch + 1,
                "best": best,
                "best_epoch": best_epoch,
                "stale": stale,
                "valid": history,
                "valid_before_training": meta["valid_before_training"],
                "run_config": fingerprint,
            },
        )
    bar.close()
    log.close()
    train_s = time.perf_counter() - start

    best_path = latest_checkpoint(out / "best")
    load_checkpoint(best_path, {"model": model})
    valid = evaluate(net, split, "valid", cfg.n_boot)
    final = "valid" if cfg.no_test else "test"  # --no-test: the final table on validation, test never scored
    test = valid if cfg.no_test else evaluate(net, split, "test", cfg.n_boot)
    pop = popularity_report(split, final, n_boot=cfg.n_boot)
    results = {
        "dataset": ds.name,
        "data_fingerprint": ds.fingerprint,
        "world_size": rt.world_size,
        "config": asdict(cfg),
        "valid_before_training": meta["valid_before_training"],
        "best_epoch": best_epoch,
        "epochs_run": epochs_done,
        "train_seconds": train_s,
        "valid_per_eval": history,
        "valid": {k: r.to_dict() for k, r in valid.items()},
        **({} if cfg.no_test else {"test": {k: r.to_dict() for k, r in test.items()}}),
        f"{final}_popularity": pop.to_dict(),
    }
    print0(
        f"{final + ' (best epoch ' + str(best_epoch) + ')':<26} | {'HR@10':>7} | {'NDCG@10':>7} | {'Recall@100':>10}"
    )
    print0(
        f"{'popularity, full ranking':<26} | {pop.means['HR@10']:>7.4f} | {pop.means['NDCG@10']:>7.4f} | "
        f"{pop.means['Recall@100']:>10.4f}"
    )
    for name, key in (
        ("BERT4Rec, full ranking", "full"),
        ("popularity-sampled 100", "sampled_popularity"),
        ("uniform-sampled 100", "sampled_uniform"),
    ):
        m = test[key].means
        print0(
            f"{name:<26} | {m['HR@10']:>7.4f} | {m['NDCG@10']:>7.4f} | "
            f"{m['Recall@100'] if key == 'full' else float('nan'):>10.4f}"
        )
    export(out / "export", cfg, model, ds, results[final])
    write_results(out, results)
    if rt.is_rank0:
        print0(f"trained {train_s:.0f}s; results in {out / 'results.json'}; scorer export in {out / 'export'}")
    shutdown()
    return json.loads(json.dumps(results, default=float))


if __name__ == "__main__":
    main()
