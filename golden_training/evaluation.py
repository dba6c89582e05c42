"""The ranker's evaluation: each evaluated user's target among sampled negatives (AUC, NE, log
loss) and their 100 candidates re-ordered by the ranker (NDCG@10, HR@10 against the candidates'
own order). golden_training/train_dlrm.py measures every epoch with it; prediction/ and
inference_legacy/ score a trained ranker on the same rows.

``cfg`` is the ranker's settings: train_dlrm's ``Config``, or a checkpoint's saved run config
(fields ``seed``, ``eval_negatives``, ``history_len``, ``n_boot``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.distributed.model_parallel import DistributedModelParallel

from candidates.sources import PopularitySource, RetrievalScorer, SequenceSource
from common.data.split import Split
from common.metrics import MAX_K, BinaryMetrics, RankingReport, report_from_ranks
from common.runtime import print0
from golden_training.ranking_data import Examples, RankingFeatures, popularity_sampler, reference_time


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
    repeat: np.ndarray | None = None  # on a data set with repeats: whether each target is one


def eval_set(
    split: Split,
    features: RankingFeatures,
    stage: str,
    cfg: Any,
    retr: RetrievalScorer | None,
    source: SequenceSource | None = None,
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
        cands, name = source.top_k(users, seen, MAX_K)[0], source.name
    elif retr is not None:  # the history left out of the candidates, unless a repeat is a valid target
        cands, name = retr.top_k(queries, None if split.repeats else seen), retr.name
    else:
        popularity = PopularitySource(features.item_counts, split.repeats)
        cands, name = popularity.top_k(users, seen, MAX_K)[0], popularity.name
    repeat = split.is_repeat(stage, users, targets) if split.repeats else None
    return EvalSet(stage, users, targets, auc, cands, name, queries, starts, ends, now, repeat)


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


@torch.no_grad()
def scores(
    model: nn.Module,
    features: RankingFeatures,
    ex: Examples,
    queries: np.ndarray | None,
    retr: RetrievalScorer | None,
    cfg: Any,
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
    model: nn.Module, features: RankingFeatures, ev: EvalSet, retr: RetrievalScorer | None, cfg: Any
) -> dict[str, object]:
    device = next(iter(model.parameters())).device
    probs = scores(model, features, ev.auc, ev.queries, retr, cfg, device)
    bm = BinaryMetrics()
    bm.update(torch.from_numpy(probs), torch.from_numpy(ev.auc.label))
    k = ev.candidates.shape[1]
    cand_scores = scores(model, features, candidate_rows(ev), ev.queries, retr, cfg, device).reshape(len(ev.users), k)
    reranked = np.take_along_axis(ev.candidates, np.argsort(-cand_scores, axis=1, kind="stable"), axis=1)
    # Every rank scored every row, so the rows are already global: no gathering.
    return {"binary": bm.compute(gather=False), "rerank": rerank_report(ev, reranked, cfg)}


def rerank_report(ev: EvalSet, lists: np.ndarray, cfg: Any) -> RankingReport:
    hit = lists == ev.targets[:, None]
    ranks = np.where(hit.any(axis=1), hit.argmax(axis=1), MAX_K)
    return report_from_ranks(ev.stage, ev.users, ranks, cfg.n_boot, ev.repeat)


def print_table(results: dict, final: str, source: str, original: RankingReport, interaction: str) -> None:
    """The run's table on ``final`` (test, or validation with --no-test): the candidates' own order,
    each model re-ranking them, and the DLRM's paired gain (``results`` as train_dlrm.py writes them)."""
    print0(f"{final:<30} | {'AUC':>7} | {'NE':>7} | {'NDCG@10':>8} | {'HR@10':>7}")
    print0(
        f"{source + ' order':<30} | {'':>7} | {'':>7} | {original.means['NDCG@10']:>8.4f} | "
        f"{original.means['HR@10']:>7.4f}"
    )
    for kind, name in (("lr", "logistic regression"), ("dlrm", f"DLRM ({interaction})")):
        if kind in results:
            r = results[kind]
            print0(
                f"{name + ' re-ranked':<30} | {r[final]['auc']:>7.4f} | {r[final]['ne']:>7.4f} | "
                f"{r[f'{final}_reranked']['NDCG@10']:>8.4f} | {r[f'{final}_reranked']['HR@10']:>7.4f}"
            )
    gain = results["dlrm"][f"{final}_gain_over_candidates_order"]
    lo, hi = gain["NDCG@10_ci95"]
    print0(
        f"DLRM re-ranking minus {source} order, {final} NDCG@10: {gain['NDCG@10']:+.4f} "
        f"(95% CI over users [{lo:+.4f}, {hi:+.4f}])"
    )
