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
<out>/results.json; the next-item scorer for the integration pipeline in <out>/export
(bert4rec/scorer.py loads it).

SASRec (sasrec/sasrec_main.py) trains with this same loop: a model (``bert4rec.model.BERT4Rec``,
``sasrec.model.SASRec``) has the same constructor and these members:

- ``item_embedding``: the TorchRec ``EmbeddingCollection`` (sharded by DistributedModelParallel);
- ``hidden(kjt)`` -> ``[batch, longest, dim]`` and ``head`` (a linear layer over every item);
- ``last_scores(kjt)`` -> ``[batch, num_items]``: next-item scores at each sequence's last position;
- ``query_sequences(histories)``: item-index histories as the token sequences to score.

Its task is ``training_batch(cfg, windows, rng, model)`` -> ``(kjt, rows, cols, labels)``: the token
sequences and, for each prediction the loss makes, its (sequence, position) and the item to predict.
The loss is cross-entropy over the whole catalog at those positions (``SequenceTrain``), no sampled
softmax.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torchrec import KeyedJaggedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from tqdm import tqdm

from bert4rec.model import mask_batch
from bert4rec.scorer import make_model
from bert4rec.sequences import sequences_kjt
from common.baselines import popularity_report
from common.checkpoint import (
    gathered_state_dict,
    latest_checkpoint,
    load_checkpoint,
    resume_if_possible,
    run_config,
    save_checkpoint,
)
from common.data.load import add_dataset_args, load_dataset
from common.data.split import STAGES, Split, rank_splits
from common.flags import add_trainer_args
from common.metrics import RankingReport, evaluate_scores, sampled_report
from common.runtime import (
    MetricsLog,
    Runtime,
    all_reduce,
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
class SeqConfig:
    """Settings every sequential stage has; a stage's Config adds its own (and its defaults)."""

    dataset: str = "ml-100k"
    data_dir: str | None = None
    source: str = "auto"
    on_bad_row: str = "error"
    eval_users: int = 0
    max_len: int = 50
    window_step: int = 10
    embedding_dim: int = 64
    num_layers: int = 2
    num_heads: int = 2
    dropout: float = 0.2
    sampled_softmax: int = 0
    epochs: int = 200
    batch_size: int = 64
    sparse_lr: float = 0.1
    dense_lr: float = 2e-3
    eval_every: int = 3
    patience: int = 5
    seed: int = 0
    device: str = "auto"
    sharding_type: str = "table_wise"
    out: str = "runs/seq"
    resume: bool = False
    n_boot: int = 1000
    no_test: bool = False
    tensorboard: bool = False


def parser(d: SeqConfig, doc: str) -> tuple[argparse.ArgumentParser, dict[str, argparse._ArgumentGroup]]:
    """The flags of both sequential stages, with ``d``'s defaults; returns the parser and its groups
    (data, model, training, distributed, output) for the stage's own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    data, model = p.add_argument_group("data"), p.add_argument_group("model")
    add_dataset_args(data)
    data.add_argument("--max-len", type=int, default=d.max_len, help="tokens per sequence (default: %(default)s)")
    data.add_argument(
        "--window-step",
        type=int,
        default=d.window_step,
        help="longer training sequences also give windows ending this many items earlier, and so on "
        "(default: %(default)s)",
    )
    model.add_argument("--embedding-dim", type=int, default=d.embedding_dim, help="(default: %(default)s)")
    model.add_argument("--num-layers", type=int, default=d.num_layers, help="transformer layers (default: %(default)s)")
    model.add_argument("--num-heads", type=int, default=d.num_heads, help="attention heads (default: %(default)s)")
    model.add_argument("--dropout", type=float, default=d.dropout, help="(default: %(default)s)")
    model.add_argument(
        "--sampled-softmax",
        type=int,
        default=d.sampled_softmax,
        help="score each position against its target and this many items drawn uniformly for the step, not "
        "the whole catalog: for catalogs of tens of thousands of items (0: every item; default: %(default)s)",
    )
    groups = add_trainer_args(
        p,
        d,
        sharding_types=SHARDING_TYPES,
        epochs="at most this many passes; early stopping usually ends sooner (default: {default})",
        batch_size="sequences per rank per step (default: {default})",
        sparse_lr="RowWiseAdagrad learning rate of the item embedding (default: {default})",
        dense_lr="Adam learning rate of the transformer (default: {default})",
    )
    train = groups["training"]
    train.add_argument(
        "--eval-every",
        type=int,
        default=d.eval_every,
        help="epochs between validations and checkpoints (default: %(default)s)",
    )
    train.add_argument(
        "--patience",
        type=int,
        default=d.patience,
        help="stop after this many validations without a better NDCG@10 (default: %(default)s)",
    )
    return p, {"data": data, "model": model, **groups}


def check_config(p: argparse.ArgumentParser, cfg: SeqConfig) -> SeqConfig:
    if cfg.max_len < 2:
        p.error("--max-len must be at least 2 (one item and the token the prediction is read at)")
    if cfg.embedding_dim % cfg.num_heads:
        p.error(f"--embedding-dim {cfg.embedding_dim} must be divisible by --num-heads {cfg.num_heads}")
    return cfg


# ------------------------------------------------------------------------------------------
# Training windows


def training_windows(split: Split, max_len: int, step: int) -> list[np.ndarray]:
    """Token windows (item index + 1) over each user's training sequence: the last ``max_len``
    items, then windows ending ``step``, ``2 * step``, ... items earlier while they hold at least 2."""
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


class SequenceTrain(nn.Module):
    """Cross-entropy over every item at the given positions, for DistributedModelParallel; with
    ``sampled`` > 0 over each position's target and ``sampled`` items drawn for the step (sampled
    softmax, Jean et al. 2015): uniformly, or in proportion to ``counts`` + 1 (the training
    interactions) with each logit less the log of its expected draws, so that the softmax still
    estimates the full one. A draw that is the position's target is no negative."""

    def __init__(self, model: nn.Module, sampled: int = 0, counts: np.ndarray | None = None) -> None:
        super().__init__()
        self.model, self.sampled = model, sampled
        q = None if counts is None else torch.as_tensor(np.asarray(counts, np.float64) + 1.0)
        self.register_buffer("q", None if q is None else (q / q.sum()).float(), persistent=False)

    def forward(
        self, seq: KeyedJaggedTensor, rows: torch.Tensor, cols: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        if not 0 < self.sampled < self.model.num_items:
            h = self.model.hidden(seq)
            return F.cross_entropy(self.model.head(h[rows, cols]), labels)
        if self.q is None:
            negatives = torch.randint(self.model.num_items, (self.sampled,), device=labels.device)
        else:
            negatives = torch.multinomial(self.q, self.sampled, replacement=True)
        h = self.model.hidden(seq, torch.cat([labels, negatives]))
        pos, neg = self.model.sampled_logits(h[rows, cols], labels, negatives)
        if self.q is not None:  # logQ: each candidate's expected number of draws
            pos, neg = pos - torch.log(self.q[labels] * self.sampled), neg - torch.log(self.q[negatives] * self.sampled)
        neg = neg.masked_fill(negatives[None, :] == labels[:, None], -torch.inf)
        logits = torch.cat([pos[:, None], neg], dim=1)
        return F.cross_entropy(logits, torch.zeros(len(labels), dtype=torch.int64, device=labels.device))


# ------------------------------------------------------------------------------------------
# Evaluation


class Scorer:
    """Next-item scores for users' histories, every rank running the same forwards (the sharded
    table needs every rank in each lookup)."""

    def __init__(self, model: nn.Module, split: Split, stage: str, batch_size: int = 256) -> None:
        indptr, hist = split.history(stage)
        self.users = split.targets(stage)[0]  # the evaluated users (sorted), on every rank
        seqs = model.query_sequences([hist[indptr[u] : indptr[u + 1]] for u in self.users.tolist()])
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        with torch.no_grad():
            self.scores = torch.cat(
                [
                    model.last_scores(sequences_kjt(seqs[lo : lo + batch_size]).to(device)).cpu()
                    for lo in range(0, len(seqs), batch_size)
                ]
            )
        model.train(was_training)

    def __call__(self, users):
        users = torch.as_tensor(users).cpu().numpy()
        at = np.minimum(np.searchsorted(self.users, users), len(self.users) - 1)
        if len(users) and not np.array_equal(self.users[at], users):
            raise KeyError(f"users {np.setdiff1d(users, self.users)[:5].tolist()} are not evaluated at this stage")
        return self.scores[at]


def evaluate(
    model: nn.Module, split: Split, stage: str, n_boot: int, sampled: bool = True, counts: np.ndarray | None = None
) -> dict[str, RankingReport]:
    """The full-ranking report, and with ``sampled`` the sampled protocols' (popularity from
    ``counts`` where ``split`` holds only the evaluated users, else from ``split``)."""
    score = Scorer(model, split, stage)
    reports = {"full": evaluate_scores(score, split, stage, n_boot=n_boot)}
    if sampled:
        for by in ("popularity", "uniform"):
            reports[f"sampled_{by}"] = sampled_report(
                lambda u: score(u).numpy(), split, stage, by, n_boot=n_boot, counts=counts
            )
    return reports


# ------------------------------------------------------------------------------------------
# Training


def build(
    name: str, cfg: SeqConfig, num_items: int, rt: Runtime, counts: np.ndarray | None = None
) -> tuple[DistributedModelParallel, torch.optim.Optimizer]:
    """The model for training: built on the meta device (seeded), its item table sharded by
    DistributedModelParallel with a fused RowWiseAdagrad, Adam for the rest. ``counts`` (training
    interactions per item): the sampled softmax's draws follow them."""
    torch.manual_seed(cfg.seed)
    net = make_model(name, asdict(cfg), num_items, torch.device("meta"))
    train = SequenceTrain(net, cfg.sampled_softmax, counts)
    return shard_model(train, [net.item_embedding], rt, cfg.sharding_type, cfg.sparse_lr, cfg.dense_lr)


def export(out_dir: Path, name: str, cfg: SeqConfig, model: DistributedModelParallel, ds, reports: dict) -> None:
    """What the integration pipeline needs to score next items (``NextItemScorer``): the unsharded
    weights, the model and its settings, the item ID map and the data fingerprint. Collective."""
    weights = {k.removeprefix("model."): v for k, v in gathered_state_dict(model).items()}
    if torch.distributed.get_rank() != 0:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(weights, out_dir / "weights.pt")
    write_json_atomic(
        out_dir / "manifest.json",
        {
            "model": name,
            "config": asdict(cfg),
            "num_items": ds.num_items,
            "dataset": ds.name,
            "data_fingerprint": ds.fingerprint,
            "repeats": ds.repeats,  # the protocol's: whether a history's own items leave the lists
            "item_raw_ids": ds.item_raw_ids.tolist(),
            "user_raw_ids": ds.user_raw_ids.tolist(),
            "test": reports,
        },
    )


def final_report(name: str, label: str, cfg: SeqConfig, rt: Runtime, model, ds, share: Split, split: Split, run: dict):
    """The best checkpoint on validation and test (validation only with --no-test), beside popularity,
    as results.json holds them (``run``: what the training loop recorded); returns them and the
    final stage. Collective."""
    out, net = Path(cfg.out), model.module.model
    load_checkpoint(latest_checkpoint(out / "best"), {"model": model})
    # Popularity counts every user's interactions before the stage: each rank counts its share's.
    counts = {stage: all_reduce(share.item_counts(stage), "sum") for stage in STAGES}
    valid = evaluate(net, split, "valid", cfg.n_boot, counts=counts["valid"])
    final = "valid" if cfg.no_test else "test"  # --no-test: the final table on validation, test never scored
    test = valid if cfg.no_test else evaluate(net, split, "test", cfg.n_boot, counts=counts["test"])
    pop = popularity_report(split, final, n_boot=cfg.n_boot, counts=counts[final])
    results = {
        "dataset": ds.name,
        "data_fingerprint": ds.fingerprint,
        "model": name,
        "world_size": rt.world_size,
        "nodes": rt.nodes,
        "config": asdict(cfg),
        "num_windows": run["num_windows"],
        "valid_before_training": run["valid_before_training"],
        "best_epoch": run["best_epoch"],
        "epochs_run": run["epochs_run"],
        "train_seconds": run["train_seconds"],
        "valid_per_eval": run["valid_per_eval"],
        "valid": {k: r.to_dict() for k, r in valid.items()},
        **({} if cfg.no_test else {"test": {k: r.to_dict() for k, r in test.items()}}),
        f"{final}_popularity": pop.to_dict(),
    }
    print0(
        f"{final + ' (best epoch ' + str(run['best_epoch']) + ')':<26} | {'HR@10':>7} | {'NDCG@10':>7} | {'Recall@100':>10}"
    )
    print0(
        f"{'popularity, full ranking':<26} | {pop.means['HR@10']:>7.4f} | {pop.means['NDCG@10']:>7.4f} | "
        f"{pop.means['Recall@100']:>10.4f}"
    )
    for row, key in (
        (f"{label}, full ranking", "full"),
        ("popularity-sampled 100", "sampled_popularity"),
        ("uniform-sampled 100", "sampled_uniform"),
    ):
        m = test[key].means
        print0(
            f"{row:<26} | {m['HR@10']:>7.4f} | {m['NDCG@10']:>7.4f} | "
            f"{m['Recall@100'] if key == 'full' else float('nan'):>10.4f}"
        )
    return results, final


def train_and_evaluate(
    name: str,
    label: str,
    cfg: SeqConfig,
    make_batch: Callable[[SeqConfig, list[np.ndarray], np.random.Generator, nn.Module], tuple],
) -> dict[str, object]:
    """The whole run of a sequential stage: data, sharded model, training with validation every
    ``eval_every`` epochs (early stopping, DCP checkpoints, ``--resume``), then the best model on
    test (or validation with ``--no-test``), the export and results.json. ``label`` names the
    model in the printed table."""
    rt = init_runtime(cfg.device)
    seed_everything(cfg.seed)
    out = Path(cfg.out)
    ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.source, cfg.on_bad_row)
    # This rank's share of the users to train on, and the evaluated users (the same on every rank).
    # (With --eval-users 0, every user is evaluated, so every rank also reads every user's rows.)
    share, split = rank_splits(ds, rt.rank, rt.world_size, cfg.eval_users)
    windows = training_windows(share, cfg.max_len, cfg.window_step)
    num_windows = int(all_reduce(len(windows), "sum"))
    counts = all_reduce(share.item_counts("valid"), "sum") if cfg.sampled_softmax else None
    model, optimizer = build(name, cfg, ds.num_items, rt, counts)
    net = model.module.model
    print0(
        f"{ds.name}: {num_windows} training windows from {split.num_users} users, {ds.num_items} items; "
        f"{rt.world_size} x {rt.device.type} ({rt.backend}); item table {cfg.sharding_type}"
    )

    state = {"model": model, "optimizer": optimizer}
    fingerprint = run_config(cfg, ds.fingerprint)
    fresh = {"epoch": 0, "best": -1.0, "best_epoch": -1, "stale": 0, "valid": []}
    meta = resume_if_possible(out / "checkpoints", state, fingerprint, cfg.resume) or fresh
    first_epoch, history = meta["epoch"], meta["valid"]
    best, best_epoch, stale = meta["best"], meta["best_epoch"], meta["stale"]
    if first_epoch:
        print0(f"resumed after epoch {first_epoch - 1} (best valid NDCG@10 {best:.4f} at epoch {best_epoch})")
    per_step = cfg.batch_size * rt.world_size
    steps = int(all_reduce(len(windows) // cfg.batch_size, "min"))  # each rank steps through its own windows
    if steps == 0:
        fewest = int(all_reduce(len(windows), "min"))
        raise ValueError(
            f"{fewest} training windows{' in the smallest rank share' if rt.world_size > 1 else ''} are fewer "
            f"than one step of {cfg.batch_size}; lower --batch-size"
        )

    if "valid_before_training" not in meta:  # the untrained model, for the record (and the tests)
        meta["valid_before_training"] = evaluate(net, split, "valid", n_boot=10, sampled=False)["full"].means
    start = time.perf_counter()
    log = MetricsLog(out, name, cfg.tensorboard)  # the curves: <out>/metrics.jsonl, one train line per epoch
    bar = tqdm(total=cfg.epochs, initial=first_epoch, desc="epochs", disable=not rt.is_rank0 or None)
    epochs_done = first_epoch
    for epoch in range(first_epoch, cfg.epochs):
        if stale >= cfg.patience:
            break
        rng = np.random.default_rng([cfg.seed, epoch, rt.rank])
        order = length_buckets(windows, cfg.batch_size, np.random.default_rng([cfg.seed, epoch]))
        total, epoch_start = 0.0, time.perf_counter()
        for step in range(steps):
            rows = order[step * cfg.batch_size :][: cfg.batch_size]
            seq, at_row, at_col, labels = make_batch(cfg, [windows[i] for i in rows], rng, net)
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

    run = {"num_windows": num_windows, "best_epoch": best_epoch, "epochs_run": epochs_done, "train_seconds": train_s}
    run |= {"valid_per_eval": history, "valid_before_training": meta["valid_before_training"]}
    results, final = final_report(name, label, cfg, rt, model, ds, share, split, run)
    export(out / "export", name, cfg, model, ds, results[final])
    write_results(out, results)
    if rt.is_rank0:
        print0(f"trained {train_s:.0f}s; results in {out / 'results.json'}; scorer export in {out / 'export'}")
    shutdown()
    return json.loads(json.dumps(results, default=float))


# ------------------------------------------------------------------------------------------
# BERT4Rec: the cloze task


@dataclass(frozen=True)
class Config(SeqConfig):
    max_len: int = 50
    window_step: int = 10
    mask_prob: float = 0.4
    last_prob: float = 0.1
    out: str = "runs/bert4rec"


def parse_args(argv: list[str] | None = None) -> Config:
    d = Config()
    p, groups = parser(d, __doc__)
    train = groups["training"]
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
    return check_config(p, Config(**vars(p.parse_args(argv))))


def training_batch(cfg: Config, windows: list[np.ndarray], rng: np.random.Generator, net) -> tuple:
    """The cloze task (model.py) on a step's windows."""
    return mask_batch(windows, cfg.mask_prob, cfg.last_prob, net.mask_token, rng)


def main(argv: list[str] | None = None) -> dict[str, object]:
    return train_and_evaluate("bert4rec", "BERT4Rec", parse_args(argv), training_batch)


if __name__ == "__main__":
    main()
