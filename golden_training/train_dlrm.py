"""Train the DLRM ranker on an interaction data set (MovieLens, or a log of one's own) and measure
what it adds on top of the candidates it re-orders.

    python -m golden_training.train_dlrm --retrieval-export runs/retrieval/export   # ranker for the pipeline
    python -m golden_training.train_dlrm                                            # popularity negatives only
    torchrun --nproc_per_node=2 -m golden_training.train_dlrm --retrieval-export runs/retrieval/export
    torchx run -s local_cwd dist.ddp -j 1x2 --script golden_training/train_dlrm.py -- --retrieval-export runs/retrieval/export
    python -m golden_training.train_dlrm --epochs 1 --limit-batches 20              # smoke run

The task (golden_training/ranking_data.py): given a user, their history and a candidate item,
predict whether the user interacted with it next. The story below: the data set is split and this
rank's share of the users read (``rank_data``); training examples are each training interaction
and its negatives, sampled by popularity and from the candidates the ranker will re-order
(``train_examples``); TorchRec's DLRM (``--interaction dcn`` for DCNv2, golden_training/model.py) is
built on the meta device, its tables given an optimizer fused into the backward, placed by the
sharding planner and wrapped in DistributedModelParallel (``build``); TorchRec's training pipeline
steps through the batches with DCP checkpoints along the way (``train``). A logistic regression on
the same features is trained the same way as the baseline. Click logs (Criteo, random data) have
their own script with the same model and loop: golden_training/train_click_logs.py.

Measured on validation each epoch and on test at the end (shared split; ``--no-test`` ends on
validation instead and never scores test; golden_training/evaluation.py):
- AUC, NE and log loss (torchrec.metrics) on each user's target against 100 popularity-sampled
  negatives;
- re-ranking: each user's 100 candidates (retrieval's, given an export; a sequential model's with
  ``--candidates-export``; else the popularity top 100), re-ordered by the ranker; NDCG@10 and HR@10
  of the re-ordered list against the candidates' own order. A target outside the candidates counts
  as a miss for both.
Results go to <out>/results.json; DCP checkpoints to <out>/checkpoints (rerun with --resume to continue).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineBase, TrainPipelineSparseDist
from torchrec.models.dlrm import DLRMTrain
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad
from tqdm import tqdm

from candidates.sources import RetrievalScorer, SequenceSource
from common.checkpoint import CheckpointSchedule, resume_if_possible, run_config, save_checkpoint
from common.data.dataset import InteractionData
from common.data.load import add_dataset_args, load_dataset
from common.data.split import Split, rank_splits
from common.features import FeatureSchema
from common.flags import add_trainer_args
from common.metrics import paired_difference
from common.runtime import (
    MetricsLog,
    Runtime,
    all_reduce,
    init_runtime,
    print0,
    seed_everything,
    shutdown,
    write_results,
)
from common.sharding import (
    adam_for_the_rest,
    pipeline_kind,
    plan_sharding,
    qcomms_settings,
    release_pipeline,
    table_names,
)
from golden_training.evaluation import eval_set, evaluate, make_batch, print_table, rerank_report
from golden_training.model import LogisticRegression, add_model_args, check_model_args, dlrm
from golden_training.ranking_data import RankingFeatures, train_examples


@dataclass(frozen=True)
class Config:
    dataset: str = "ml-100k"
    data_dir: str | None = None
    source: str = "auto"
    on_bad_row: str = "error"
    eval_users: int = 0
    history_len: int = 50
    retrieval_export: str | None = None
    train_retrieval_export: str | None = None
    candidates_export: str | None = None
    train_last: int = 0
    train_users: int = 0
    negatives: int = 4
    hard_negatives: int = 4
    again_negatives: int = 0
    sequence_features: bool = True
    history_match: bool = False
    trend_days: float = 30.0
    embedding_dim: int = 64
    dense_arch: tuple[int, ...] = (64, 64)
    over_arch: tuple[int, ...] = (128, 64, 1)
    interaction: str = "dot"
    epochs: int = 1  # more epochs overfit (golden_training/README.md)
    batch_size: int = 512
    sparse_lr: float = 0.05
    dense_lr: float = 1e-3
    seed: int = 0
    limit_batches: int | None = None
    device: str = "auto"
    sharding_type: str = "table_wise"
    pipeline: str = "auto"
    qcomms: bool = False
    out: str = "runs/ranking"
    checkpoint_every: str = "5min"
    resume: bool = False
    log_every: int = 100
    eval_negatives: int = 100
    baseline: bool = True
    n_boot: int = 1000
    no_test: bool = False
    tensorboard: bool = False


def parse_args(argv: list[str] | None = None) -> Config:
    d = Config()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    add_dataset_args(data)
    flag = data.add_argument
    flag("--history-len", type=int, default=d.history_len, help="items of history per example (default: %(default)s)")
    flag(
        "--retrieval-export",
        help="two-tower export: the retrieval score feature, hard negatives and the candidates re-ranked",
    )
    flag(
        "--train-retrieval-export",
        help="two-tower export for the training examples' retrieval scores and hard negatives, e.g. one trained "
        "with --holdout-last N so it has not seen the ranker's positives (default: --retrieval-export)",
    )
    flag(
        "--candidates-export",
        help="a sequential export (sasrec/ or bert4rec/ <out>/export): its top 100 are the hard negatives and "
        "the candidates re-ranked, instead of retrieval's; needs --retrieval-export for the score feature",
    )
    flag("--train-last", type=int, default=0, help="train on each user's last N training interactions (0: all)")
    flag(
        "--train-users",
        type=int,
        default=0,
        help="train on a seeded sample of N users (with the --eval-users sample among them) (0: all)",
    )
    flag("--negatives", type=int, default=d.negatives, help="popularity negatives per positive (default: %(default)s)")
    flag(
        "--hard-negatives",
        type=int,
        default=d.hard_negatives,
        help="negatives per positive from the candidates; needs --retrieval-export (default: %(default)s)",
    )
    flag(
        "--again-negatives",
        type=int,
        default=d.again_negatives,
        help="on a data set with repeats, negatives per positive drawn from the user's own earlier interactions "
        '(what the "again" source proposes; none elsewhere) (default: %(default)s)',
    )
    flag(
        "--no-sequence-features",
        dest="sequence_features",
        action="store_false",
        help="zero the after_last_k, item_trend and history-match features (an ablation)",
    )
    flag(
        "--history-match",
        action="store_true",
        help="add last_<col>_match and recent_<col>_share per single-valued item categorical (README: At scale)",
    )
    flag("--trend-days", type=float, default=d.trend_days, help="item_trend's window in days (default: %(default)s)")
    add_model_args(p, d)
    groups = add_trainer_args(p, d, seed="seed for initialization, negatives and data order (default: {default})")
    groups["training"].add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the LR baseline")
    groups["distributed"].add_argument(
        "--qcomms", action="store_true", help="quantized embedding communication (FP16 forward, BF16 backward)"
    )
    groups["output"].add_argument(
        "--eval-negatives", type=int, default=d.eval_negatives, help="negatives per user for AUC (default: %(default)s)"
    )
    a = vars(p.parse_args(argv))
    cfg = Config(**{**a, "dense_arch": tuple(a["dense_arch"]), "over_arch": tuple(a["over_arch"])})
    check_model_args(p, cfg)
    if cfg.candidates_export and not cfg.retrieval_export:
        p.error("--candidates-export needs --retrieval-export (the ranker's retrieval_score feature)")
    return cfg


# ------------------------------------------------------------------------------------------
# Data: this rank's share, and the candidates the ranker learns to re-order


def rank_data(ds: InteractionData, cfg: Config, rt: Runtime) -> tuple[Split, Split, RankingFeatures]:
    """What this rank reads: its share of the users to train on, the evaluated users' split (the
    same on every rank; :func:`common.data.split.rank_splits`), and the features, whose counts
    (popularity, sequence statistics) are summed over every rank's share. In one process: the
    whole split, twice the same."""
    share, split = rank_splits(ds, rt.rank, rt.world_size, cfg.eval_users)
    features = RankingFeatures.build(
        ds, share, cfg.history_len, cfg.sequence_features, cfg.trend_days, cfg.history_match, across_ranks=True
    )
    return share, split, features


# ------------------------------------------------------------------------------------------
# The model, sharded: TorchRec's recipe for tables too large for one device


def build(kind: str, cfg, schema: FeatureSchema, rt: Runtime) -> tuple[DistributedModelParallel, CombinedOptimizer]:
    """The DLRM (``kind="dlrm"``) or its logistic-regression baseline (``"lr"``), sharded for training."""
    # 1. Built on the meta device: the tables take no memory until the plan places their shards.
    meta = torch.device("meta")
    if kind == "lr":
        net: nn.Module = LogisticRegression(schema, meta)
        ebc = net.embedding_bag_collection
    else:
        net = dlrm(schema, cfg.embedding_dim, cfg.dense_arch, cfg.over_arch, cfg.interaction, meta)
        ebc = net.sparse_arch.embedding_bag_collection
    model = DLRMTrain(net)  # a Batch in, (loss, (loss, logits, labels)) out: what the pipeline steps on
    # 2. The tables' optimizer, fused into the backward: FBGEMM updates each row as its gradient is
    #    computed, so no table-sized gradient is ever materialised.
    apply_optimizer_in_backward(RowWiseAdagrad, ebc.parameters(), {"lr": cfg.sparse_lr})
    # 3. The planner: where every table goes, one sharding type here (table-wise: whole tables on
    #    ranks), the same plan on every rank.
    plan, sharders = plan_sharding(model, table_names([ebc]), rt, cfg.sharding_type, cfg.qcomms)
    # 4. DistributedModelParallel shards the tables by the plan and wraps the dense layers in DDP.
    dmp = DistributedModelParallel(model, device=rt.device, plan=plan, sharders=sharders)
    # 5. One optimizer for the pipeline and the checkpoints: the fused one, and Adam for the rest.
    return dmp, CombinedOptimizer([dmp.fused_optimizer, adam_for_the_rest(dmp, cfg.dense_lr)])


# ------------------------------------------------------------------------------------------
# Training


def steps_per_epoch(num_examples: int, cfg: Config, rt: Runtime, own: bool = False) -> int:
    """Steps of ``cfg.batch_size`` examples per rank: over ``num_examples`` that all ranks share
    (each takes its slice of every step), or, ``own``, over each rank's own ``num_examples`` (as
    many steps as the rank with the fewest has)."""
    steps = (
        int(all_reduce(num_examples // cfg.batch_size, "min"))
        if own
        else num_examples // (cfg.batch_size * rt.world_size)
    )
    if steps == 0:
        fewest = int(all_reduce(num_examples, "min")) if own else num_examples
        raise ValueError(
            f"batch size {cfg.batch_size} x {rt.world_size} ranks exceeds the {fewest} "
            f"training examples{' of the smallest rank share' if own else ''}; lower --batch-size"
        )
    return steps if cfg.limit_batches is None else min(steps, cfg.limit_batches)


def train(
    kind: str,
    cfg: Config,
    rt: Runtime,
    schema: FeatureSchema,
    steps: int,
    batches: Callable[[int, int], Iterator[Batch]],
    validate: Callable[[nn.Module], dict[str, float]],
    out: Path,
    fingerprint: str,
) -> tuple[DistributedModelParallel, list[dict[str, float]], dict[str, int]]:
    """Train one model ("dlrm" or "lr") for ``cfg.epochs`` epochs of ``steps`` steps, with DCP
    checkpoints under ``out/checkpoints/<kind>``. ``batches(epoch, first_step)`` yields this
    rank's batches from ``first_step`` on (so a resumed run sees the same ones); ``validate``
    runs after each epoch."""
    model, optimizer = build(kind, cfg, schema, rt)
    if kind == "dlrm":
        print0(str(model.plan))
    state = {"model": model, "optimizer": optimizer}
    ckpt = out / "checkpoints" / kind
    meta = resume_if_possible(ckpt, state, run_config(cfg, fingerprint), cfg.resume) or {
        "epoch": 0,
        "step": 0,
        "global_step": 0,
        "valid": [],
    }
    first_epoch, start_step, global_step, history = meta["epoch"], meta["step"], meta["global_step"], meta["valid"]
    resumed_from, last_loss = global_step, float("nan")
    if resumed_from:
        print0(f"{kind}: resumed from step {global_step} (epoch {first_epoch}, step {start_step})")
    per_step = cfg.batch_size * rt.world_size
    log = MetricsLog(out, kind, cfg.tensorboard)  # the curves: <out>/metrics.jsonl
    loop_seconds, trained = 0.0, 0  # the training loop alone (no validation), for throughput

    def checkpoint(ep: int, st: int) -> None:
        save_checkpoint(
            ckpt,
            global_step,
            state,
            meta={
                "epoch": ep,
                "step": st,
                "global_step": global_step,
                "valid": history,
                "run_config": run_config(cfg, fingerprint),
            },
        )

    schedule = CheckpointSchedule(cfg.checkpoint_every)
    for epoch in range(first_epoch, cfg.epochs):
        # TorchRec's training pipeline: TrainPipelineSparseDist starts the next batch's input all-to-all
        # (and its copy to the device) while this step computes; TrainPipelineBase only fetches it ahead
        # (one CPU process has nothing to overlap: common/sharding.py's PIPELINE_HELP).
        if pipeline_kind(cfg.pipeline, rt) == "sparse-dist":
            pipeline = TrainPipelineSparseDist(model, optimizer, rt.device, execute_all_batches=True)
        else:
            pipeline = TrainPipelineBase(model, optimizer, rt.device)
        it = batches(epoch, start_step)
        bar = tqdm(
            total=steps, initial=start_step, desc=f"{kind} epoch {epoch}", leave=False, disable=not rt.is_rank0 or None
        )
        step, t0, seen = start_step, time.perf_counter(), 0
        epoch_start, first_step = time.perf_counter(), start_step
        while True:
            try:
                loss, _, _ = pipeline.progress(it)
            except StopIteration:
                break
            step, global_step, seen = step + 1, global_step + 1, seen + per_step
            last_loss = float(loss.item())
            bar.update(1)
            if step % cfg.log_every == 0 or step == steps:
                rate = seen / (time.perf_counter() - t0)
                print0(
                    f"{kind} | epoch {epoch} | step {step}/{steps} | loss {loss.item():.4f} | {rate / 1000:.1f}k ex/s"
                )
                log.log("train", global_step, epoch, loss=loss.item(), examples_per_s=rate)
                t0, seen = time.perf_counter(), 0
            if schedule.due(step) and step < steps:
                checkpoint(epoch, step)
                schedule.saved()
        bar.close()
        release_pipeline(pipeline)  # the model's own forward back (sparse-dist), or the batch held ahead dropped
        loop_seconds += time.perf_counter() - epoch_start
        trained += (step - first_step) * per_step
        metrics = validate(model)
        history.append({"epoch": epoch, **metrics})
        log.log("valid", global_step, epoch, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        print0(
            f"{kind} | epoch {epoch} | valid | "
            + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k in ("auc", "ne", "logloss", "rerank_NDCG@10"))
        )
        start_step = 0
        checkpoint(epoch + 1, 0)
    log.close()
    rate = trained / loop_seconds if loop_seconds else None
    return (
        model,
        history,
        {
            "resumed_from_step": resumed_from,
            "steps": global_step,
            "final_loss": last_loss,
            "train_examples_per_s": rate,
        },
    )


def train_movielens(cfg: Config, rt: Runtime) -> dict[str, object]:
    out = Path(cfg.out)
    ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.source, cfg.on_bad_row)
    # This rank's share of the users to train on, and the evaluated users (the same on every rank).
    # (With --eval-users 0, every user is evaluated, so every rank also reads every user's rows.)
    share, split, features = rank_data(ds, cfg, rt)
    retr = RetrievalScorer(cfg.retrieval_export, ds.fingerprint, features) if cfg.retrieval_export else None
    if retr is None and cfg.hard_negatives:
        print0("note: no --retrieval-export: no hard negatives, no retrieval score; popularity's candidates")
    train_export = cfg.train_retrieval_export
    retr_train = RetrievalScorer(train_export, ds.fingerprint, features) if train_export else retr
    source = SequenceSource.load(cfg.candidates_export, ds) if cfg.candidates_export else None
    examples, queries = train_examples(share, features, cfg, retr_train, source, rt.is_rank0, split.eval_users, rt.rank)
    valid = eval_set(split, features, "valid", cfg, retr, source)
    # --no-test: the end-of-run table is on validation and test is never scored (model selection).
    test = valid if cfg.no_test else eval_set(split, features, "test", cfg, retr, source)
    final = test.stage
    num_examples, positives = all_reduce([len(examples), int(examples.label.sum())], "sum")
    print0(
        f"{ds.name}: {num_examples} training examples ({positives / num_examples:.3f} positive), "
        f"{rt.world_size} x {rt.device.type} ({rt.backend}); candidates from {test.candidate_source}"
    )

    results: dict[str, object] = {
        "dataset": ds.name,
        "data_fingerprint": ds.fingerprint,
        "world_size": rt.world_size,
        "nodes": rt.nodes,
        "config": asdict(cfg),
        "qcomms": qcomms_settings(cfg.qcomms, rt.device),
        "candidate_source": test.candidate_source,
    }
    original = rerank_report(test, test.candidates, cfg)
    valid_original = rerank_report(valid, valid.candidates, cfg)
    results[f"{final}_candidates_order"] = original.to_dict()
    results["valid_candidates_order"] = valid_original.to_dict()
    print0(
        f"valid | {valid.candidate_source} order | NDCG@10 {valid_original.means['NDCG@10']:.4f} | "
        f"HR@10 {valid_original.means['HR@10']:.4f} (what re-ranking must beat)"
    )
    steps = steps_per_epoch(len(examples), cfg, rt, own=True)

    def batches(epoch: int, first: int) -> Iterator[Batch]:
        perm = np.random.default_rng([cfg.seed, 10, epoch]).permutation(len(examples))
        for step in range(first, steps):  # each rank's batches from its own examples
            lo = step * cfg.batch_size
            yield make_batch(
                features, examples.take(perm[lo : lo + cfg.batch_size]), queries, retr_train, cfg.history_len
            )

    def validate(model: nn.Module) -> dict[str, float]:
        m = evaluate(model, features, valid, retr, cfg)
        return {**m["binary"], "rerank_NDCG@10": m["rerank"].means["NDCG@10"]}

    for kind in ["dlrm", "lr"] if cfg.baseline else ["dlrm"]:
        model, history, info = train(kind, cfg, rt, features.schema, steps, batches, validate, out, ds.fingerprint)
        metrics = evaluate(model, features, test, retr, cfg)
        results[kind] = {
            "valid_per_epoch": history,
            final: metrics["binary"],
            f"{final}_reranked": metrics["rerank"].to_dict(),
            f"{final}_gain_over_candidates_order": paired_difference(metrics["rerank"], original, cfg.n_boot),
            **info,
        }
    print_table(results, final, test.candidate_source, original, cfg.interaction)
    write_results(out, results)
    return results


def main(argv: list[str] | None = None) -> dict[str, object]:
    cfg = parse_args(argv)
    rt = init_runtime(cfg.device)
    seed_everything(cfg.seed)
    if q := qcomms_settings(cfg.qcomms, rt.device):
        print0(f"quantized communication: {q['forward']} forward, {q['backward']} backward")
    results = train_movielens(cfg, rt)
    shutdown()
    return results


if __name__ == "__main__":
    main()
