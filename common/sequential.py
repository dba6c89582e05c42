"""What the sequential stages (bert4rec/, sasrec/) share: training windows over each user's
ordered history, the training loop with DCP checkpoints and early stopping, the full-ranking
evaluation, the export, and the next-item scorer that loads an export.

A stage supplies a model and its task. The model (``bert4rec.model.BERT4Rec``,
``sasrec.model.SASRec``) has the same constructor and these members:

- ``item_embedding``: the TorchRec ``EmbeddingCollection`` (sharded by DistributedModelParallel);
- ``hidden(kjt)`` -> ``[batch, longest, dim]`` and ``head`` (a linear layer over every item);
- ``last_scores(kjt)`` -> ``[batch, num_items]``: next-item scores at each sequence's last position;
- ``query_sequences(histories)``: item-index histories as the token sequences to score.

Its task is ``training_batch(cfg, windows, rng, model)`` -> ``(kjt, rows, cols, labels)``: the token sequences
and, for each prediction the loss makes, its (sequence, position) and the item to predict. The
loss is cross-entropy over the whole catalog at those positions (``SequenceTrain``), no sampled
softmax.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.export import Dim
from torch.nn import functional as F
from torchrec import KeyedJaggedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from tqdm import tqdm

from common.baselines import popularity_report
from common.checkpoint import (
    gathered_state_dict,
    latest_checkpoint,
    load_checkpoint,
    resume_if_possible,
    run_config,
    save_checkpoint,
)
from common.compiled import compile_program, export_program, load_package, write_entry
from common.data.dataset import id_key, raw_ids
from common.data.load import add_dataset_args, load_dataset
from common.data.split import STAGES, Split, rank_splits
from common.metrics import RankingReport, evaluate_scores, sampled_report, top_unseen
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

FEATURE = "item_seq"
SHARDING_TYPES = ("table_wise", "column_wise", "row_wise")  # what TorchRec's EmbeddingCollection sharder offers
# model name in an export's manifest -> "module:class"
MODELS = {"bert4rec": "bert4rec.model:BERT4Rec", "sasrec": "sasrec.model:SASRec"}


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
    """The shared flags, with ``d``'s defaults; returns the parser and its groups for the stage's own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {name: p.add_argument_group(name) for name in ("data", "model", "training", "distributed", "output")}
    data, model, train = groups["data"], groups["model"], groups["training"]
    add_dataset_args(data)
    data.add_argument("--max-len", type=int, default=d.max_len, help=f"tokens per sequence (default: {d.max_len})")
    data.add_argument(
        "--window-step",
        type=int,
        default=d.window_step,
        help=f"longer training sequences also give windows ending this many items earlier, and so on (default: {d.window_step})",
    )
    model.add_argument("--embedding-dim", type=int, default=d.embedding_dim, help=f"(default: {d.embedding_dim})")
    model.add_argument(
        "--num-layers", type=int, default=d.num_layers, help=f"transformer layers (default: {d.num_layers})"
    )
    model.add_argument("--num-heads", type=int, default=d.num_heads, help=f"attention heads (default: {d.num_heads})")
    model.add_argument("--dropout", type=float, default=d.dropout, help=f"(default: {d.dropout})")
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
    dist = groups["distributed"]
    dist.add_argument(
        "--device", default=d.device, choices=["auto", "cpu", "cuda"], help="auto: cuda if available (default: auto)"
    )
    dist.add_argument(
        "--sharding-type",
        default=d.sharding_type,
        choices=SHARDING_TYPES,
        help="item table sharding; row_wise needs CUDA (default: table_wise)",
    )
    out = groups["output"]
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
    return p, groups


def check_config(p: argparse.ArgumentParser, cfg: SeqConfig) -> SeqConfig:
    if cfg.max_len < 2:
        p.error("--max-len must be at least 2 (one item and the token the prediction is read at)")
    if cfg.embedding_dim % cfg.num_heads:
        p.error(f"--embedding-dim {cfg.embedding_dim} must be divisible by --num-heads {cfg.num_heads}")
    return cfg


# ------------------------------------------------------------------------------------------
# Tokens and windows


def sequences_kjt(seqs: list[np.ndarray]) -> KeyedJaggedTensor:
    """Token sequences (already at most max_len long) as a one-feature KJT."""
    lengths = np.array([len(s) for s in seqs], dtype=np.int32)
    values = np.concatenate(seqs).astype(np.int64) if len(seqs) and lengths.sum() else np.zeros(0, np.int64)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[FEATURE], values=torch.from_numpy(values), lengths=torch.from_numpy(lengths)
    )


def padded_tokens(seqs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences as ``[batch, width]`` (0 after each sequence) and their lengths, for a model's
    ``padded_scores``. At least 2 x 2: the exported program's shapes start there (export
    specializes sizes of 1), so one sequence gets a padding row, scored and dropped."""
    width = max([2, *(len(s) for s in seqs)])
    tokens = np.zeros((max(2, len(seqs)), width), dtype=np.int64)
    lengths = np.ones(len(tokens), dtype=np.int64)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)], lengths[i] = s, len(s)
    return torch.from_numpy(tokens), torch.from_numpy(lengths)


COMPILED_SCORER = "scorer.aoti.pt2"


def compile_scorer(export_dir: str | Path) -> dict:
    """Export the sequential model's ``padded_scores`` and compile it with AOTInductor to
    ``scorer.aoti.pt2`` (checked against the eager model on seeded histories of every length); adds
    the manifest's ``compiled`` entry and returns it."""
    export_dir = Path(export_dir)
    scorer = NextItemScorer(export_dir, compiled=False)
    model, inputs = scorer.model, scorer.check_inputs()

    class Program(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            return self.model.padded_scores(tokens, lengths)

    batch = Dim("batch", min=2, max=1 << 20)
    program = export_program(
        Program(), inputs, {"tokens": {0: batch, 1: Dim("width", min=2, max=model.max_len)}, "lengths": {0: batch}}
    )
    entry, _ = compile_program(
        program, inputs, export_dir / COMPILED_SCORER, scorer.token_guard, model.padded_scores, inputs
    )
    write_entry(export_dir / "manifest.json", entry)
    return entry


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


class Positions(nn.Embedding):
    """Learned position embeddings initialized N(0, 0.02) as in BERT, also when
    DistributedModelParallel materializes a model built on the meta device (it calls each
    module's ``reset_parameters``, which for ``nn.Embedding`` draws N(0, 1): about 50x the scale
    of TorchRec's item embedding init, so the input would be mostly position)."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)


class SequenceTrain(nn.Module):
    """Cross-entropy over every item at the given positions, for DistributedModelParallel."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, seq: KeyedJaggedTensor, rows: torch.Tensor, cols: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        h = self.model.hidden(seq)
        return F.cross_entropy(self.model.head(h[rows, cols]), labels)


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


def model_class(name: str) -> type[nn.Module]:
    module, cls = MODELS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_model(
    name: str, cfg: dict, num_items: int, device: torch.device | None = None, dropout: float | None = None
) -> nn.Module:
    return model_class(name)(
        num_items,
        cfg["max_len"],
        cfg["embedding_dim"],
        cfg["num_layers"],
        cfg["num_heads"],
        cfg["dropout"] if dropout is None else dropout,
        device=device,
    )


def build(
    name: str, cfg: SeqConfig, num_items: int, rt: Runtime
) -> tuple[DistributedModelParallel, torch.optim.Optimizer]:
    """The model for training: built on the meta device (seeded), its item table sharded by
    DistributedModelParallel with a fused RowWiseAdagrad, Adam for the rest."""
    torch.manual_seed(cfg.seed)
    net = make_model(name, asdict(cfg), num_items, torch.device("meta"))
    return shard_model(SequenceTrain(net), [net.item_embedding], rt, cfg.sharding_type, cfg.sparse_lr, cfg.dense_lr)


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
            "item_raw_ids": ds.item_raw_ids.tolist(),
            "user_raw_ids": ds.user_raw_ids.tolist(),
            "test": reports,
        },
    )


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
    model, optimizer = build(name, cfg, ds.num_items, rt)
    net = model.module.model
    print0(
        f"{ds.name}: {num_windows} training windows from {split.num_users} users, {ds.num_items} items; "
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
        "config": asdict(cfg),
        "num_windows": num_windows,
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
    export(out / "export", name, cfg, model, ds, results[final])
    write_results(out, results)
    if rt.is_rank0:
        print0(f"trained {train_s:.0f}s; results in {out / 'results.json'}; scorer export in {out / 'export'}")
    shutdown()
    return json.loads(json.dumps(results, default=float))


# ------------------------------------------------------------------------------------------
# Serving: an export as a next-item scorer


@dataclass
class Scored:
    scores: np.ndarray  # [histories, num_items], index order of the manifest's item_raw_ids
    unknown: list[list[int]]  # per history, the raw IDs that were dropped


class NextItemScorer:
    """A sequential stage's export (bert4rec/, sasrec/) as a next-item scorer of raw-ID histories.

    Defined behaviour for awkward histories: item IDs the model does not know are dropped and
    reported; an empty history (or one with only unknown IDs) is scored from the model's start
    token alone ([MASK] for BERT4Rec, [BOS] for SASRec), which gives a fixed, popularity-like
    list; a one-item history is an ordinary sequence.
    """

    def __init__(self, export_dir: str | Path, compiled: bool = True) -> None:
        """``compiled``: score with the export's AOTInductor package (``scorer.aoti.pt2``,
        ``python -m inference_legacy.aot_compile``) when it is there and checks out."""
        export_dir = Path(export_dir)
        manifest_path = export_dir / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{export_dir} has no manifest.json; train first: python -m sasrec.sasrec_main "
                f"(or bert4rec.bert4rec_main) --out {export_dir.parent}"
            )
        self.manifest = json.loads(manifest_path.read_text())
        self.name = self.manifest.get("model", "bert4rec")
        if self.name not in MODELS:
            raise ValueError(f"{manifest_path}: model {self.name!r} is none of {sorted(MODELS)}")
        self.item_raw_ids = raw_ids(self.manifest["item_raw_ids"])
        self.index_of = {id_key(r): i for i, r in enumerate(self.item_raw_ids.tolist())}
        self.model = make_model(
            self.name, self.manifest["config"], self.manifest["num_items"], torch.device("cpu"), dropout=0.0
        )
        self.model.load_state_dict(
            torch.load(export_dir / "weights.pt", map_location="cpu", weights_only=True), strict=True
        )
        self.model.eval()
        self.export_dir, self.compiled, self.runtime = export_dir, None, "eager"
        if compiled:
            self.compiled, why = load_package(
                export_dir,
                self.manifest.get("compiled"),
                self.token_guard,
                self.model.padded_scores,
                self.check_inputs,
                f"python -m inference_legacy.aot_compile {export_dir}",
            )
            self.runtime = "AOTInductor" if self.compiled else f"eager: {why}"

    def token_guard(self, tokens: torch.Tensor, lengths: torch.Tensor) -> None:
        """What the compiled program leaves unchecked: tokens within the table, lengths within the width."""
        rows = self.model.num_items + 2
        if bool(((tokens < 0) | (tokens >= rows)).any()) or bool(((lengths < 1) | (lengths > tokens.shape[1])).any()):
            raise ValueError(f"tokens must lie in [0, {rows}) and lengths in [1, {tokens.shape[1]}]")

    def check_inputs(self, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded tokens of ``n`` seeded random histories of every length up to ``max_len`` (the
        inputs a compiled scorer is checked on against the eager model)."""
        rng = np.random.default_rng(0)
        lengths = np.linspace(0, self.model.max_len + 5, n).astype(int)
        return padded_tokens(self.model.query_sequences([rng.integers(0, self.model.num_items, k) for k in lengths]))

    @property
    def data_fingerprint(self) -> str:
        return self.manifest["data_fingerprint"]

    @torch.no_grad()
    def score_indices(self, histories: list[np.ndarray], batch_size: int = 256) -> np.ndarray:
        """Scores ``[len(histories), num_items]`` for histories of the export's item indices."""
        seqs = self.model.query_sequences(histories)

        def scores(part: list[np.ndarray]) -> torch.Tensor:
            if self.compiled is None:
                return self.model.last_scores(sequences_kjt(part))
            return self.compiled(*padded_tokens(part))[: len(part)]  # less the padding row of a lone sequence

        parts = [scores(seqs[lo : lo + batch_size]).numpy() for lo in range(0, len(seqs), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, self.model.num_items), np.float32)

    def score(self, histories: list[list[int]], batch_size: int = 256) -> Scored:
        """Scores of every item as each history's next one (raw IDs, oldest first)."""
        if isinstance(histories, (str, bytes)) or not isinstance(histories, (list, tuple)):
            raise TypeError("histories must be a list of lists of raw item IDs")
        known, unknown = [], []
        for h in histories:
            if not isinstance(h, (list, tuple, np.ndarray)):
                raise TypeError(f"each history must be a list of raw item IDs, got {type(h).__name__}")
            known.append(np.array([self.index_of[id_key(i)] for i in h if id_key(i) in self.index_of], dtype=np.int64))
            unknown.append([id_key(i) for i in h if id_key(i) not in self.index_of])
        return Scored(self.score_indices(known, batch_size), unknown)

    def recommend(self, history: list[int], k: int = 10, exclude_seen: bool = True) -> list[tuple[int, float]]:
        """The top ``k`` (raw item ID, score) for one history, its own items left out."""
        seen = [self.index_of[id_key(i)] for i in history if id_key(i) in self.index_of] if exclude_seen else []
        top, scores = top_unseen(self.score([history]).scores[:1].copy(), [np.array(seen, np.int64)], k)
        return [(int(self.item_raw_ids[i]), float(s)) for i, s in zip(top[0], scores[0])]
