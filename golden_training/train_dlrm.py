"""Train the DLRM ranker on MovieLens and measure what it adds on top of retrieval; or train
DLRM on click logs (Criteo, random data: golden_training/ctr_data.py).

    python -m golden_training.train_dlrm --retrieval-export runs/retrieval/export   # ranker for the pipeline
    python -m golden_training.train_dlrm                                            # popularity negatives only
    torchrun --nproc_per_node=2 -m golden_training.train_dlrm --retrieval-export runs/retrieval/export
    torchx run -s local_cwd dist.ddp -j 1x2 --script golden_training/train_dlrm.py -- --dataset random
    python -m golden_training.train_dlrm --dataset criteo --criteo-path train.txt --max-rows 1000000
    python -m golden_training.train_dlrm --epochs 1 --limit-batches 20              # smoke run

The task (golden_training/ranking_data.py): given a user, their history and a candidate item,
predict whether the user interacted with it next. TorchRec's DLRM (``--interaction dcn`` for
DCNv2) with its tables sharded by DistributedModelParallel, a fused RowWiseAdagrad applied in
backward for the embeddings, Adam for the MLPs, and TorchRec's training pipeline
(TrainPipelineSparseDist with several processes or on CUDA, TrainPipelineBase in one CPU process,
where there is nothing to overlap; ``--pipeline``). A logistic regression on the same features is
trained the same way as the baseline.

Measured on validation each epoch and on test at the end (shared split; ``--no-test`` ends on
validation instead and never scores test):
- AUC, NE and log loss (torchrec.metrics) on each user's target against 100 popularity-sampled
  negatives;
- re-ranking: each user's 100 candidates (retrieval's, given an export; else the popularity
  top 100), re-ordered by the ranker; NDCG@10 and HR@10 of the re-ordered list against the
  candidates' own order. A target outside the candidates counts as a miss for both.
Click logs are measured by AUC, NE and log loss on their valid and test rows. Results go to
<out>/results.json; DCP checkpoints to <out>/checkpoints (rerun with --resume to continue).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.datasets.utils import Batch
from torchrec.distributed.fbgemm_qcomm_codec import CommType
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain
from tqdm import tqdm

from common.checkpoint import CheckpointSchedule, checkpoint_interval, resume_if_possible, run_config, save_checkpoint
from common.data.criteo import CriteoArrays
from common.data.dataset import InteractionData
from common.data.load import add_dataset_args, load_dataset
from common.data.split import Split, rank_splits
from common.data.tables import FeatureTables
from common.features import FeatureSchema
from common.metrics import MAX_K, BinaryMetrics, RankingReport, paired_difference, report_from_ranks
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
    PIPELINE_HELP,
    PIPELINES,
    SHARDING_TYPES,
    qcomms_precisions,
    release_pipeline,
    shard_model,
    train_pipeline,
)
from golden_training.ctr_data import criteo_schema, load_ctr
from golden_training.ctr_data import make_batch as ctr_batch
from golden_training.ranking_data import (
    Examples,
    RankingFeatures,
    concat,
    popularity_sampler,
    reference_time,
)

CLICK_LOGS = ("criteo", "random")


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
    sequence_features: bool = True
    history_match: bool = False
    trend_days: float = 30.0
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
    epochs: int = 1  # more epochs overfit: valid re-ranked NDCG@10 0.091, 0.088, 0.078 after 1, 2, 3
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
    add_dataset_args(
        data, CLICK_LOGS, "; or criteo (--criteo-path) or random, click logs with 13 dense and 26 categorical features"
    )
    data.add_argument(
        "--history-len",
        type=int,
        default=d.history_len,
        help=f"items of history per example (default: {d.history_len})",
    )
    data.add_argument(
        "--retrieval-export",
        default=None,
        help="two-tower export: adds the retrieval score feature, hard negatives and retrieval's candidates for re-ranking (default: none)",
    )
    data.add_argument(
        "--train-retrieval-export",
        default=None,
        help="two-tower export used for the training examples' retrieval scores and hard negatives, e.g. one trained with --holdout-last N so it has not seen the ranker's positives (default: --retrieval-export)",
    )
    data.add_argument(
        "--candidates-export",
        default=None,
        help="a sequential export (sasrec/ or bert4rec/ <out>/export): its top 100 are the hard negatives and the candidates re-ranked in evaluation, instead of retrieval's, so the ranker learns the source it will re-rank; needs --retrieval-export for the retrieval_score feature (default: none)",
    )
    data.add_argument(
        "--train-last",
        type=int,
        default=d.train_last,
        help="train on each user's last N training interactions only (0 = all) (default: 0)",
    )
    data.add_argument(
        "--train-users",
        type=int,
        default=d.train_users,
        help="train on a fixed random sample of N users' interactions only, for large data sets; it includes "
        "the --eval-users sample, as a production ranker trains on the users it serves (0 = all) (default: 0)",
    )
    data.add_argument(
        "--negatives",
        type=int,
        default=d.negatives,
        help=f"popularity-sampled negatives per positive (default: {d.negatives})",
    )
    data.add_argument(
        "--hard-negatives",
        type=int,
        default=d.hard_negatives,
        help=f"negatives per positive from retrieval's candidates; needs --retrieval-export (default: {d.hard_negatives})",
    )
    data.add_argument(
        "--no-sequence-features",
        dest="sequence_features",
        action="store_false",
        help="set the after_last_k, item_trend and history-match (last_<col>_match, recent_<col>_share) "
        "features to zero (an ablation)",
    )
    data.add_argument(
        "--history-match",
        action="store_true",
        help="add last_<col>_match and recent_<col>_share per single-valued item categorical (off: on the "
        "synthetic logs they cost NDCG@10 at 1e5 and 1e6, README At scale)",
    )
    data.add_argument(
        "--trend-days",
        type=float,
        default=d.trend_days,
        help=f"window of the item_trend feature, in days (default: {d.trend_days:g})",
    )
    logs = p.add_argument_group("click logs (--dataset criteo or random)")
    logs.add_argument(
        "--criteo-path",
        default=None,
        help="a Criteo TSV file (split 80/10/10 in order) or a directory of TorchRec's day_{d}_{dense,sparse,labels}.npy (last day: valid and test)",
    )
    logs.add_argument(
        "--num-embeddings",
        type=int,
        default=d.num_embeddings,
        help=f"rows of every categorical table; IDs are hashed modulo it (default: {d.num_embeddings})",
    )
    logs.add_argument(
        "--num-embeddings-per-feature",
        type=int,
        nargs=26,
        default=None,
        help="26 table sizes instead of one --num-embeddings",
    )
    logs.add_argument(
        "--random-rows",
        type=int,
        default=d.random_rows,
        help=f"training rows of --dataset random (valid and test get a tenth each) (default: {d.random_rows})",
    )
    logs.add_argument(
        "--max-rows", type=int, default=None, help="read only the first N lines of a Criteo TSV file (default: all)"
    )
    logs.add_argument(
        "--negative-counts",
        default=d.negative_counts,
        choices=["clamp", "bad_line"],
        help="negative Criteo counts (int_1 has them in the real logs): set to 0 and counted, as DLRM's preprocessing does, or treated as a malformed line (default: clamp)",
    )
    model = p.add_argument_group("model")
    model.add_argument(
        "--embedding-dim",
        type=int,
        default=d.embedding_dim,
        help=f"dimension of every table (DLRM needs one) (default: {d.embedding_dim})",
    )
    model.add_argument(
        "--dense-arch",
        type=int,
        nargs="+",
        default=list(d.dense_arch),
        help="dense MLP sizes; the last must equal --embedding-dim (default: 64 64)",
    )
    model.add_argument(
        "--over-arch",
        type=int,
        nargs="+",
        default=list(d.over_arch),
        help="over-arch MLP sizes, ending in 1 (default: 128 64 1)",
    )
    model.add_argument(
        "--interaction",
        default=d.interaction,
        choices=["dot", "dcn"],
        help="DLRM's dot interaction, or DCNv2 (DLRM_DCN) (default: dot)",
    )
    train = p.add_argument_group("training")
    train.add_argument(
        "--epochs", type=int, default=d.epochs, help=f"passes over the training examples (default: {d.epochs})"
    )
    train.add_argument(
        "--batch-size", type=int, default=d.batch_size, help=f"examples per rank per step (default: {d.batch_size})"
    )
    train.add_argument(
        "--sparse-lr", type=float, default=d.sparse_lr, help=f"RowWiseAdagrad learning rate (default: {d.sparse_lr})"
    )
    train.add_argument("--dense-lr", type=float, default=d.dense_lr, help=f"Adam learning rate (default: {d.dense_lr})")
    train.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help=f"seed for initialization, negatives and data order (default: {d.seed})",
    )
    train.add_argument(
        "--limit-batches", type=int, default=None, help="stop each epoch after this many steps (default: all)"
    )
    train.add_argument(
        "--limit-eval-batches",
        type=int,
        default=None,
        help="click logs: evaluate on the first N batches of 8192 rows of valid and test (default: all)",
    )
    train.add_argument(
        "--checkpoint-every",
        type=checkpoint_interval,
        default=d.checkpoint_every,
        help="DCP checkpoints mid-epoch every N steps (200) or every interval of wall time (30s, 5min, 1h); "
        f"0 = epoch ends only (default: {d.checkpoint_every})",
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint under --out, if there is one, exactly where it stopped (without it, an --out holding checkpoints is refused)",
    )
    train.add_argument(
        "--log-every",
        type=int,
        default=d.log_every,
        help=f"steps between log lines and metrics.jsonl entries (default: {d.log_every})",
    )
    train.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write the curves as TensorBoard events under <out>/tensorboard (pip install tensorboard)",
    )
    train.add_argument(
        "--no-baseline", dest="baseline", action="store_false", help="skip the logistic-regression baseline"
    )
    dist = p.add_argument_group("distributed")
    dist.add_argument(
        "--device", default=d.device, choices=["auto", "cpu", "cuda"], help="auto: cuda if available (default: auto)"
    )
    dist.add_argument(
        "--qcomms",
        action="store_true",
        help="quantized embedding communication (QCommsConfig): FP16 forward, BF16 backward; gloo has no BF16, so on CPU the backward is FP16 (TorchRec's fallback)",
    )
    dist.add_argument(
        "--sharding-type",
        default=d.sharding_type,
        choices=SHARDING_TYPES,
        help="embedding sharding; row-wise kinds need CUDA (default: table_wise)",
    )
    dist.add_argument("--pipeline", default=d.pipeline, choices=PIPELINES, help=PIPELINE_HELP)
    out = p.add_argument_group("evaluation and output")
    out.add_argument("--out", default=d.out, help=f"run directory (default: {d.out})")
    out.add_argument(
        "--eval-negatives",
        type=int,
        default=d.eval_negatives,
        help=f"popularity negatives per user for AUC / NE (default: {d.eval_negatives})",
    )
    out.add_argument("--n-boot", type=int, default=d.n_boot, help=f"bootstrap resamples for CIs (default: {d.n_boot})")
    out.add_argument(
        "--no-test",
        action="store_true",
        help="never evaluate on test (model selection runs): the final table is on validation",
    )
    a = vars(p.parse_args(argv))
    a["dense_arch"], a["over_arch"] = tuple(a["dense_arch"]), tuple(a["over_arch"])
    if a["num_embeddings_per_feature"] is not None:
        a["num_embeddings_per_feature"] = tuple(a["num_embeddings_per_feature"])
    cfg = Config(**a)
    if cfg.dense_arch[-1] != cfg.embedding_dim:
        p.error(f"--dense-arch must end in --embedding-dim ({cfg.embedding_dim}), got {cfg.dense_arch[-1]}")
    if cfg.over_arch[-1] != 1:
        p.error(f"--over-arch must end in 1, got {cfg.over_arch[-1]}")
    if cfg.candidates_export and not cfg.retrieval_export:
        p.error("--candidates-export needs --retrieval-export (the ranker's retrieval_score feature)")
    return cfg


# ------------------------------------------------------------------------------------------
# Retrieval: the two-tower export supplies a score feature, hard negatives and candidates.


class RetrievalScorer:
    """Query embeddings from the exported query tower (fp32) and the catalog's item embeddings."""

    def __init__(self, export_dir: str, fingerprint: str, features: RankingFeatures) -> None:
        from retrieval.modules.feature_processor import TwoTowerFeatures
        from retrieval.two_tower_retrieval import load_query_tower, read_manifest

        manifest = read_manifest(export_dir)
        if manifest["data_fingerprint"] != fingerprint:
            raise ValueError(
                f"{export_dir} was trained on other data (fingerprint {manifest['data_fingerprint'][:16]}, "
                f"here {fingerprint[:16]}); retrain retrieval on this data set"
            )
        self.tower = load_query_tower(export_dir, manifest, quantize="none")
        self.items = np.load(Path(export_dir) / "item_embeddings.npy")
        self.index = None  # the export's approximate index, if it has one (see serving_top_k)
        if manifest["index"]["type"] != "flat":
            import faiss

            from retrieval.modules.index import set_search_params

            self.index = faiss.read_index(str(Path(export_dir) / "index.faiss"))
            set_search_params(self.index, manifest["index"]["params"])
        shared = {f.name: getattr(features, f.name) for f in dataclasses.fields(FeatureTables) if f.init}
        self.tt = TwoTowerFeatures(**shared, history_len=manifest["config"]["history_len"])

    @torch.no_grad()
    def queries(self, users: np.ndarray, hist_items: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        from common.data.tables import last_n

        out = []
        for lo in range(0, len(users), 4096):
            sl = slice(lo, lo + 4096)
            hist = last_n(hist_items, starts[sl], ends[sl], self.tt.history_len)
            out.append(self.tower(self.tt.query_batch(users[sl], hist).sparse).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.items.shape[1]), np.float32)

    def top_k(self, queries: np.ndarray, exclude: list[np.ndarray], k: int = 100) -> np.ndarray:
        """The ``k`` best items per query, best first (ties by lower index), ``exclude``'d items left
        out; in chunks of about 0.5 GB of scores."""
        chunk = max(64, min(4096, (1 << 27) // max(1, len(self.items))))
        parts = [
            self._top_k(queries[lo : lo + chunk], exclude[lo : lo + chunk], k) for lo in range(0, len(queries), chunk)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, min(k, len(self.items))), np.int64)

    def serving_top_k(self, queries: np.ndarray, exclude: list[np.ndarray], k: int = 100) -> np.ndarray:
        """The ``k`` candidates serving retrieves for each query, ``exclude``'d items left out: the
        export's FAISS index when it is approximate (IVF, for large catalogs), else :meth:`top_k`.
        The hard negatives come from here: they are what the ranker re-ranks in production, and an
        IVF search over 200,000 items costs a tenth of the exact scan (1M queries: minutes, not
        twenty). Rows the index returns too few items for fall back to the exact top-k."""
        if self.index is None:
            return self.top_k(queries, exclude, k)
        extra = max((len(e) for e in exclude), default=0)
        _, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k + extra, len(self.items)))
        out = np.empty((len(queries), k), dtype=np.int64)
        short = []
        for r, seen in enumerate(exclude):
            row = ids[r][(ids[r] >= 0) & ~np.isin(ids[r], seen)][:k]
            if len(row) < k:
                short.append(r)
            else:
                out[r] = row
        if short:
            out[short] = self.top_k(queries[short], [exclude[r] for r in short], k)
        return out

    def _top_k(self, queries: np.ndarray, exclude: list[np.ndarray], k: int) -> np.ndarray:
        # A partial selection, then a sort of the k: the same order as a full stable sort.
        scores = queries @ self.items.T
        for r, seen in enumerate(exclude):
            scores[r, seen] = -np.inf
        k = min(k, scores.shape[1])
        if k < scores.shape[1]:
            # torch.topk selects the same set as np.argpartition, 26x faster over 200,000 items. It
            # takes k + 1: when the (k+1)-th score equals the k-th, which items make the top k is a
            # tie, settled by a stable sort (lowest indices first); otherwise the top k are the k + 1
            # less the lowest, and finding that out needs no second pass over the scores.
            vals, part = torch.topk(torch.from_numpy(scores), k + 1, dim=1, sorted=False)
            vals, part = vals.numpy(), part.numpy()
            two = np.partition(vals, 1, axis=1)[:, :2]
            if (two[:, 0] == two[:, 1]).any():
                return np.argsort(-scores, axis=1, kind="stable")[:, :k]
            keep = np.argsort(vals, axis=1, kind="stable")[:, 1:]  # drop the lowest of the k + 1
            part = np.take_along_axis(part, keep, 1)
        else:
            part = np.broadcast_to(np.arange(k), scores.shape).copy()
        top = np.take_along_axis(scores, part, 1)
        order = np.lexsort((part, -top), axis=1)
        return np.take_along_axis(part, order, 1)


class SequenceCandidates:
    """A sequential model's export (sasrec/, bert4rec/) as the ranker's candidate source: the top
    ``k`` next items for a history, from the same scorer the pipeline serves."""

    def __init__(self, export_dir: str, fingerprint: str) -> None:
        from common.sequential import NextItemScorer

        self.scorer = NextItemScorer(export_dir)
        if self.scorer.data_fingerprint != fingerprint:
            raise ValueError(
                f"{export_dir} was trained on other data (fingerprint {self.scorer.data_fingerprint[:16]}, "
                f"here {fingerprint[:16]}); retrain it on this data set"
            )
        self.name = {"sasrec": "SASRec", "bert4rec": "BERT4Rec"}[self.scorer.name]

    def top_k(self, histories: list[np.ndarray], exclude: list[np.ndarray], k: int = 100) -> np.ndarray:
        scores = self.scorer.score_indices(histories)
        for r, seen in enumerate(exclude):
            scores[r, seen] = -np.inf
        return np.argsort(-scores, axis=1, kind="stable")[:, :k]


# ------------------------------------------------------------------------------------------
# Examples


def sample_train_users(num_users: int, eval_users: np.ndarray | None, n: int, seed: int) -> np.ndarray:
    """``n`` users to train on (seeded), the evaluation sample among them when there is one: a
    production ranker trains on every user it serves, and a user left out of training meets the
    ranker with an untrained ``user_id`` embedding. Only their training interactions are used."""
    rng = np.random.default_rng([seed, 5])
    if eval_users is None or len(eval_users) >= n:
        return rng.choice(num_users, n, replace=False)
    others = np.setdiff1d(np.arange(num_users), eval_users)
    return np.concatenate([eval_users, rng.choice(others, n - len(eval_users), replace=False)])


def rank_seed(*key: int, rank: int) -> list[int]:
    """The seed of ``key``'s draws on ``rank``: rank 0 keeps the single process's, the others add their rank."""
    return [*key, rank] if rank else list(key)


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


def train_examples(
    split: Split,
    features: RankingFeatures,
    cfg: Config,
    retr: RetrievalScorer | None,
    source: SequenceCandidates | None = None,
    show_progress: bool = False,
    eval_users: np.ndarray | None = None,
    rank: int = 0,
) -> tuple[Examples, np.ndarray | None]:
    """Positives (``split``'s training interactions, this rank's share under torchrun; with
    --train-last N only each user's last N; with --train-users N only those of N users, the
    evaluated ``eval_users`` among them) and their negatives, with the retrieval query of each
    positive (its user and history at that time). Hard negatives come from the candidates of
    ``source`` (else retrieval's, as served) for each positive's history, the positive itself left out."""
    n_all = len(split.train_user)
    user_start = np.searchsorted(split.train_user, np.arange(split.num_users))
    user_end = np.r_[user_start[1:], n_all]
    rows = np.arange(n_all)
    if cfg.train_last:
        rows = rows[rows >= user_end[split.train_user] - cfg.train_last]
    if 0 < cfg.train_users < split.num_users:
        chosen = sample_train_users(split.num_users, eval_users, cfg.train_users, cfg.seed)
        rows = rows[np.isin(split.train_user[rows], chosen)]
    n = len(rows)
    users = split.train_user[rows]
    # "now" for a training positive: the time of the user's previous interaction (its own if first)
    now = split.train_time[np.where(rows > user_start[users], rows - 1, rows)]
    pos = Examples(
        users,
        split.train_item[rows],
        np.ones(n, np.float32),
        user_start[users],
        rows,
        np.arange(n),
        now,
        split.train_item,
        own=True,
    )
    sample = popularity_sampler(features.item_counts, rank_seed(cfg.seed, 1, rank=rank))
    parts = [pos]
    for _ in range(cfg.negatives):
        parts.append(
            Examples(
                pos.user,
                sample(n),
                np.zeros(n, np.float32),
                pos.hist_start,
                pos.hist_end,
                pos.query,
                pos.time,
                pos.hist_items,
                own=True,
            )
        )
    queries = None
    if retr is not None:
        queries = retr.queries(pos.user, pos.hist_items, pos.hist_start, pos.hist_end)
        if cfg.hard_negatives:
            # Retrieval's candidates for each positive's query, as of that time, minus the history.
            rng = np.random.default_rng(rank_seed(cfg.seed, 2, rank=rank))
            picks = np.empty((n, cfg.hard_negatives), dtype=np.int64)
            bar = tqdm(total=n, desc="hard negatives", unit="query", leave=False, disable=not show_progress or None)
            for lo in range(0, n, 4096):
                sl = slice(lo, min(lo + 4096, n))
                seen = [pos.hist_items[a:b] for a, b in zip(pos.hist_start[sl], pos.hist_end[sl])]
                drop = [np.append(h, i) for h, i in zip(seen, pos.item[sl])]  # the positive is no negative
                cands = retr.serving_top_k(queries[sl], drop) if source is None else source.top_k(seen, drop)
                picks[sl] = np.take_along_axis(
                    cands, rng.integers(0, cands.shape[1], size=(len(seen), cfg.hard_negatives)), 1
                )
                bar.update(len(seen))
            bar.close()
            for j in range(cfg.hard_negatives):
                parts.append(
                    Examples(
                        pos.user,
                        picks[:, j],
                        np.zeros(n, np.float32),
                        pos.hist_start,
                        pos.hist_end,
                        pos.query,
                        pos.time,
                        pos.hist_items,
                        own=True,
                    )
                )
    return concat(parts), queries


@dataclass
class EvalSet:
    """One stage's evaluation rows: AUC rows (target + sampled negatives) and candidate lists."""

    stage: str
    users: np.ndarray
    targets: np.ndarray
    auc: Examples
    candidates: np.ndarray  # [users, 100] item indices in the candidate source's order
    candidate_source: str
    queries: np.ndarray | None  # retrieval query embedding per user
    hist_start: np.ndarray  # per user: history is auc.hist_items[hist_start:hist_end]
    hist_end: np.ndarray
    time: np.ndarray  # per user: "now" (ranking_data.reference_time)


def eval_set(
    split: Split,
    features: RankingFeatures,
    stage: str,
    cfg: Config,
    retr: RetrievalScorer | None,
    source: SequenceCandidates | None = None,
) -> EvalSet:
    users, targets = split.targets(stage)
    indptr, hist = split.history(stage)
    seen = [hist[indptr[u] : indptr[u + 1]] for u in users]
    starts, ends = indptr[users], indptr[users + 1]
    sample = popularity_sampler(features.item_counts, [cfg.seed, 3, 0 if stage == "valid" else 1])
    negs = sample(len(users) * cfg.eval_negatives).reshape(len(users), cfg.eval_negatives)
    m = cfg.eval_negatives + 1
    items = np.concatenate([targets[:, None], negs], axis=1).reshape(-1)
    labels = np.tile(np.r_[1.0, np.zeros(cfg.eval_negatives)], len(users)).astype(np.float32)
    qidx = np.repeat(np.arange(len(users)), m)
    now = reference_time(split, stage, users)
    auc = Examples(
        np.repeat(users, m), items, labels, np.repeat(starts, m), np.repeat(ends, m), qidx, np.repeat(now, m), hist
    )
    bad = (auc.label == 0) & (auc.item == np.repeat(targets, m))  # a negative that is the target: drop it
    auc = auc.take(np.where(~bad)[0])
    queries = None
    if retr is not None:
        queries = retr.queries(users, hist, starts, ends)
    if source is not None:
        cands, name = source.top_k(seen, seen), source.name
    elif retr is not None:
        cands, name = retr.top_k(queries, seen), "retrieval"
    else:
        order = np.argsort(-features.item_counts, kind="stable")
        cands = np.stack([order[~np.isin(order, s)][:MAX_K] for s in seen])
        name = "popularity"
    return EvalSet(stage, users, targets, auc, cands, name, queries, starts, ends, now)


def candidate_rows(ev: EvalSet) -> Examples:
    """One row per (user, candidate) of ``ev``, users in order, each with the user's history and "now"."""
    k = ev.candidates.shape[1]
    return Examples(
        np.repeat(ev.users, k),
        ev.candidates.reshape(-1),
        np.zeros(ev.candidates.size, np.float32),
        np.repeat(ev.hist_start, k),
        np.repeat(ev.hist_end, k),
        np.repeat(np.arange(len(ev.users)), k),
        np.repeat(ev.time, k),
        ev.auc.hist_items,
    )


def make_batch(
    features: RankingFeatures, ex: Examples, queries: np.ndarray | None, retr: RetrievalScorer | None, history_len: int
) -> Batch:
    score = None if retr is None else np.einsum("nd,nd->n", queries[ex.query], retr.items[ex.item])
    seq = None if features.sequence is None else features.sequence.features(ex)
    return features.batch(ex.user, ex.item, ex.history(history_len), score, ex.label, seq)


# ------------------------------------------------------------------------------------------
# Models


class LogisticRegression(nn.Module):
    """A linear model on the same features: one weight per ID (the sum of a 4-wide embedding row,
    since FBGEMM's kernels need dims divisible by 4) plus a linear layer on the dense features."""

    def __init__(self, schema: FeatureSchema, device: torch.device) -> None:
        super().__init__()
        self.embedding_bag_collection = EmbeddingBagCollection(tables=schema.embedding_bag_configs(4), device=device)
        self.feature_names = schema.sparse_names
        self.dense = nn.Linear(len(schema.dense), 1)

    def forward(self, dense_features: torch.Tensor, sparse_features) -> torch.Tensor:
        pooled = self.embedding_bag_collection(sparse_features).to_dict()
        return sum(pooled[f].sum(dim=1, keepdim=True) for f in self.feature_names) + self.dense(dense_features)


def build(
    kind: str, cfg: Config, schema: FeatureSchema, rt: Runtime
) -> tuple[DistributedModelParallel, torch.optim.Optimizer]:
    meta = torch.device("meta")
    if kind == "lr":
        net: nn.Module = LogisticRegression(schema, meta)
        ebc = net.embedding_bag_collection
    else:
        ebc = EmbeddingBagCollection(tables=schema.embedding_bag_configs(cfg.embedding_dim), device=meta)
        common = dict(
            embedding_bag_collection=ebc,
            dense_in_features=len(schema.dense),
            dense_arch_layer_sizes=list(cfg.dense_arch),
            over_arch_layer_sizes=list(cfg.over_arch),
        )
        net = DLRM_DCN(**common, dcn_num_layers=2, dcn_low_rank_dim=16) if cfg.interaction == "dcn" else DLRM(**common)
    return shard_model(DLRMTrain(net), [ebc], rt, cfg.sharding_type, cfg.sparse_lr, cfg.dense_lr, cfg.qcomms)


# ------------------------------------------------------------------------------------------
# Training and evaluation


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
        pipeline = train_pipeline(model, optimizer, rt, cfg.pipeline)
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
        release_pipeline(pipeline)
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


@torch.no_grad()
def scores(
    model: nn.Module,
    features: RankingFeatures,
    ex: Examples,
    queries: np.ndarray | None,
    retr: RetrievalScorer | None,
    cfg: Config,
    device: torch.device,
) -> np.ndarray:
    """Click probabilities for every row. Every rank scores every row: the sharded tables need
    all ranks in each forward."""
    net = (model.module if isinstance(model, DistributedModelParallel) else model).model
    model.eval()
    out = []
    for lo in range(0, len(ex), 8192):
        b = make_batch(features, ex.take(np.arange(lo, min(lo + 8192, len(ex)))), queries, retr, cfg.history_len)
        out.append(torch.sigmoid(net(b.dense_features.to(device), b.sparse_features.to(device))).reshape(-1).cpu())
    model.train()
    return torch.cat(out).numpy()


def evaluate(
    model: nn.Module, features: RankingFeatures, ev: EvalSet, retr: RetrievalScorer | None, cfg: Config
) -> dict[str, object]:
    device = next(iter(model.parameters())).device
    probs = scores(model, features, ev.auc, ev.queries, retr, cfg, device)
    bm = BinaryMetrics()
    bm.update(torch.from_numpy(probs), torch.from_numpy(ev.auc.label))
    k = ev.candidates.shape[1]
    cand_scores = scores(model, features, candidate_rows(ev), ev.queries, retr, cfg, device).reshape(len(ev.users), k)
    reranked = np.take_along_axis(ev.candidates, np.argsort(-cand_scores, axis=1, kind="stable"), axis=1)
    # Every rank scored every row, so the rows are already global: no gathering.
    return {"binary": bm.compute(gather=False), "rerank": _report(ev, reranked, cfg)}


def _report(ev: EvalSet, lists: np.ndarray, cfg: Config) -> RankingReport:
    hit = lists == ev.targets[:, None]
    ranks = np.where(hit.any(axis=1), hit.argmax(axis=1), MAX_K)
    return report_from_ranks(ev.stage, ev.users, ranks, n_boot=cfg.n_boot)


def train_movielens(cfg: Config, rt: Runtime) -> dict[str, object]:
    out = Path(cfg.out)
    ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.source, cfg.on_bad_row)
    # This rank's share of the users to train on, and the evaluated users (the same on every rank).
    # (With --eval-users 0, every user is evaluated, so every rank also reads every user's rows.)
    share, split, features = rank_data(ds, cfg, rt)
    retr = RetrievalScorer(cfg.retrieval_export, ds.fingerprint, features) if cfg.retrieval_export else None
    if retr is None and cfg.hard_negatives:
        print0(
            "note: no --retrieval-export, so no hard negatives and no retrieval score; candidates come from popularity"
        )
    retr_train = (
        RetrievalScorer(cfg.train_retrieval_export, ds.fingerprint, features) if cfg.train_retrieval_export else retr
    )
    source = SequenceCandidates(cfg.candidates_export, ds.fingerprint) if cfg.candidates_export else None
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
        "config": asdict(cfg),
        "qcomms": _qcomms(cfg, rt),
        "candidate_source": test.candidate_source,
    }
    original = _report(test, test.candidates, cfg)
    valid_original = _report(valid, valid.candidates, cfg)
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
    print0(f"{final:<30} | {'AUC':>7} | {'NE':>7} | {'NDCG@10':>8} | {'HR@10':>7}")
    print0(
        f"{test.candidate_source + ' order':<30} | {'':>7} | {'':>7} | {original.means['NDCG@10']:>8.4f} | "
        f"{original.means['HR@10']:>7.4f}"
    )
    for kind, name in (("lr", "logistic regression"), ("dlrm", f"DLRM ({cfg.interaction})")):
        if kind in results:
            r = results[kind]
            print0(
                f"{name + ' re-ranked':<30} | {r[final]['auc']:>7.4f} | {r[final]['ne']:>7.4f} | "
                f"{r[f'{final}_reranked']['NDCG@10']:>8.4f} | {r[f'{final}_reranked']['HR@10']:>7.4f}"
            )
    gain = results["dlrm"][f"{final}_gain_over_candidates_order"]
    lo, hi = gain["NDCG@10_ci95"]
    print0(
        f"DLRM re-ranking minus {test.candidate_source} order, {final} NDCG@10: {gain['NDCG@10']:+.4f} "
        f"(95% CI over users [{lo:+.4f}, {hi:+.4f}])"
    )
    write_results(out, results)
    return results


# ------------------------------------------------------------------------------------------
# Click logs: Criteo and random data (golden_training/ctr_data.py)


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
        "config": asdict(cfg),
        "qcomms": _qcomms(cfg, rt),
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


def _qcomms(cfg: Config, rt: Runtime) -> dict[str, str] | None:
    return dict(zip(("forward", "backward"), (p.name for p in qcomms_precisions(rt.device)))) if cfg.qcomms else None


def main(argv: list[str] | None = None) -> dict[str, object]:
    cfg = parse_args(argv)
    rt = init_runtime(cfg.device)
    seed_everything(cfg.seed)
    if cfg.qcomms:
        fwd, bwd = qcomms_precisions(rt.device)
        print0(
            f"quantized communication: {fwd.name} forward, {bwd.name} backward"
            + ("" if bwd == CommType.BF16 else " (BF16 asked for, but gloo has no BF16: TorchRec falls back to FP16)")
        )
    results = train_click_logs(cfg, rt) if cfg.dataset in CLICK_LOGS else train_movielens(cfg, rt)
    shutdown()
    return results


if __name__ == "__main__":
    main()
