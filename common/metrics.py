"""Metrics shared by every stage, implemented once.

Ranking (retrieval, sequential models, the full pipeline) uses the protocol of
:mod:`common.data.split`: full ranking over all items, the user's history excluded (kept on a
data set with repeats, with repeat and new-item targets also reported apart), one held-out target
per user, so HR@K = Recall@K and NDCG@K = 1 / log2(rank + 2) for a hit at 0-based rank.
Means come with a percentile bootstrap confidence interval over users (ml-100k has only 943 test
users, so differences under about 0.01 HR@10 are noise). In a distributed run every rank scores
a slice of the users and the per-user results are gathered, so each user counts exactly once.

Binary classification (the ranker) reports AUC and normalized entropy (NE, He et al. 2014) using
TorchRec's own metric functions.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torchrec.metrics.auc import compute_auc
from torchrec.metrics.ne import compute_logloss, compute_ne, get_ne_states

from common.data.split import Split
from common.runtime import all_gather

# The project's reported ranking metrics: (name, kind, K).
RANKING_METRICS: tuple[tuple[str, str, int], ...] = (
    ("HR@10", "hr", 10),
    ("NDCG@10", "ndcg", 10),
    ("Recall@50", "hr", 50),
    ("Recall@100", "hr", 100),
)
MAX_K = max(k for _, _, k in RANKING_METRICS)


@dataclass
class RankingReport:
    """Per-user results and their means with bootstrap CIs."""

    stage: str
    users: np.ndarray  # dense user indices, sorted
    ranks: np.ndarray  # 0-based rank of the target, MAX_K where not in top MAX_K
    means: dict[str, float] = field(default_factory=dict)
    ci95: dict[str, tuple[float, float]] = field(default_factory=dict)
    group_users: dict[str, int] = field(default_factory=dict)  # repeats: users with a repeat / new target

    @property
    def num_users(self) -> int:
        return len(self.users)

    def to_dict(self) -> dict[str, object]:
        return {
            "stage": self.stage,
            "num_users": self.num_users,
            **self.means,
            **{f"{k}_ci95": list(v) for k, v in self.ci95.items()},
            **{f"users_{g}": n for g, n in self.group_users.items()},
        }

    def line(self) -> str:
        return " | ".join(f"{k} {v:.4f}" for k, v in self.means.items())


def per_user_metrics(ranks: np.ndarray) -> dict[str, np.ndarray]:
    """Per-user values of :data:`RANKING_METRICS` from 0-based target ranks."""
    ranks = np.asarray(ranks)
    out = {}
    for name, kind, k in RANKING_METRICS:
        hit = ranks < k
        out[name] = hit.astype(np.float64) if kind == "hr" else np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)
    return out


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``values`` (resampling users)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0 or n_boot <= 0:  # no users, or no interval asked for
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, 2_000_000 // len(values))  # bound memory on large user sets
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, len(values), size=(stop - start, len(values)))
        means[start:stop] = values[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


# On a data set with repeats, the metrics also reported apart on repeat and on new-item targets.
GROUP_METRICS = ("HR@10", "NDCG@10")


def report_from_ranks(
    stage: str, users: np.ndarray, ranks: np.ndarray, n_boot: int = 1000, repeat: np.ndarray | None = None
) -> RankingReport:
    """The report of per-user target ranks. ``repeat`` (bool per user, where the data set has
    repeats: whether the target is in the user's history) adds ``"HR@10 repeat"``, ``"NDCG@10
    new"`` and so on, each with its CI and user count, so that a system that only recommends again
    what a user had is visible as such."""
    order = np.argsort(users, kind="stable")
    users, ranks = np.asarray(users)[order], np.asarray(ranks)[order]
    values = per_user_metrics(ranks)
    rep = RankingReport(stage=stage, users=users, ranks=ranks)
    for name, v in values.items():
        rep.means[name] = float(v.mean()) if len(v) else math.nan
        rep.ci95[name] = bootstrap_ci(v, n_boot=n_boot)
    if repeat is not None:
        repeat = np.asarray(repeat, dtype=bool)[order]
        for group, rows in (("repeat", repeat), ("new", ~repeat)):
            rep.group_users[group] = int(rows.sum())
            for name in GROUP_METRICS:
                v = values[name][rows]
                rep.means[f"{name} {group}"] = float(v.mean()) if len(v) else math.nan
                rep.ci95[f"{name} {group}"] = bootstrap_ci(v, n_boot=n_boot)
    return rep


def repeat_mask(split: Split, stage: str, users: np.ndarray) -> np.ndarray | None:
    """Whether each of ``users``' ``stage`` targets is a repeat; ``None`` where the data set has none."""
    if not split.repeats:
        return None
    all_users, targets = split.targets(stage)  # sorted by user
    users = np.asarray(users, dtype=np.int64)
    return split.is_repeat(stage, users, targets[np.searchsorted(all_users, users)])


def paired_difference(a: RankingReport, b: RankingReport, n_boot: int = 1000) -> dict[str, object]:
    """Per metric, mean of (a - b) over the same users with a bootstrap CI: whether ``a`` beats
    ``b`` beyond noise. Tighter than comparing the two CIs, since both lists share each user."""
    if not np.array_equal(a.users, b.users):
        raise ValueError(f"paired_difference needs the same users: {a.num_users} vs {b.num_users}")
    va, vb = per_user_metrics(a.ranks), per_user_metrics(b.ranks)
    out: dict[str, object] = {}
    for name in va:
        d = va[name] - vb[name]
        out[name] = float(d.mean()) if len(d) else math.nan
        out[f"{name}_ci95"] = list(bootstrap_ci(d, n_boot=n_boot))
    return out


def target_ranks(topk: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0-based position of ``target[u]`` in ``topk[u]``; ``topk.shape[1]`` where absent."""
    hit = topk == target.view(-1, 1)
    pos = torch.where(hit.any(dim=1), hit.float().argmax(dim=1), torch.full_like(target, topk.shape[1]))
    return pos.to(torch.int64)


def stable_order(scores: np.ndarray) -> np.ndarray:
    """Each row's indices best first, ties to the lower index: ``np.argsort(-scores, axis=1,
    kind="stable")``, the same array, 2-4x faster. NumPy's stable sort has no SIMD path; its
    quicksort has, but leaves equal scores in no set order. So the sort is given keys that are
    unique: for float32, one 64-bit key per item, the score's bits made to order descending in the
    high half and the index in the low half (:func:`_float32_keys`); for other types, the
    quicksort's order sorted again by (group of equal scores, index)."""
    scores = np.atleast_2d(scores)
    n = scores.shape[1]
    if scores.dtype == np.float32 and n < 2**32:
        keys = _float32_keys(scores)
        keys.sort(axis=1)
        return (keys & np.uint64(0xFFFFFFFF)).astype(np.int64)
    order = np.argsort(-scores, axis=1)
    v = np.take_along_axis(-scores, order, axis=1)
    key = np.zeros(scores.shape, dtype=np.int64)
    differ = v[:, 1:] != v[:, :-1]
    if v.dtype.kind == "f":
        differ &= ~(np.isnan(v[:, 1:]) & np.isnan(v[:, :-1]))  # NaN, sorted last, is one group
    np.cumsum(differ, axis=1, out=key[:, 1:])  # the group: how many distinct scores before
    key *= n
    key += order
    key.sort(axis=1)
    return key % n


def _float32_keys(scores: np.ndarray) -> np.ndarray:
    """``[B, N]`` uint64 keys whose ascending order is the scores' descending order, ties (-0.0 and 0.0
    among them) by index, NaN last: the high 32 bits the score's bits, flipped so that they order
    descending (a positive float's bits order as its value, so all but the sign bit are flipped; a
    negative's order against its value, so they stay), the low 32 bits the index."""
    rows, n = scores.shape
    s = scores + np.float32(0.0)  # -0.0 becomes 0.0: equal scores, equal bits
    keys = np.empty((rows, n), dtype=np.uint64)
    halves = keys.view(np.uint32).reshape(rows, n, 2)
    lo, hi = (0, 1) if sys.byteorder == "little" else (1, 0)
    halves[..., lo] = np.arange(n, dtype=np.uint32)
    flip = s.view(np.int32) >> 31  # 0 for a positive score, -1 for a negative
    np.invert(flip, out=flip)
    np.bitwise_xor(s.view(np.uint32), flip.view(np.uint32) >> np.uint32(1), out=halves[..., hi])
    nan = np.isnan(s)
    if nan.any():
        halves[..., hi][nan] = np.uint32(0xFFFFFFFF)
    return keys


def top_unseen(scores, histories: list[np.ndarray] | None, k: int):
    """The ``k`` best-scored items of each row that are not in its ``histories`` entry, best first,
    and their scores: the protocol's ranking (seen items out, ties to the lower item index). The one
    implementation of "top k without the user's seen items": every candidate source, scorer and
    evaluation goes through it.

    ``scores`` ``[B, N]`` is a tensor (any device) or a NumPy array, and its seen entries are set to
    -inf in place (history IDs outside ``[0, N)`` are skipped); the result is ``(items, scores)``
    ``[B, min(k, N)]`` of the same kind. A row with
    fewer than ``k`` unseen items ends in seen ones, scored -inf (callers that pad, pad those).
    ``torch.topk`` selects ``k + 1``: when the ``k``-th and ``k + 1``-th scores differ, the top ``k``
    are a set that needs no full sort, ordered here by (score, index); a row tied there takes the
    items above the tied score, then the tied ones by index (:func:`_top_tied`), which decides the tie
    as the protocol does.
    """
    as_numpy = isinstance(scores, np.ndarray)
    s = torch.from_numpy(scores) if as_numpy else scores
    if histories is not None and len(histories):
        lengths = np.array([len(h) for h in histories], dtype=np.int64)
        if lengths.sum():
            rows = np.repeat(np.arange(len(histories)), lengths)
            cols = np.concatenate(histories).astype(np.int64)
            ok = (cols >= 0) & (cols < s.shape[1])  # an item the scores do not cover (a newer one) is not there to drop
            s[torch.from_numpy(rows[ok]).to(s.device), torch.from_numpy(cols[ok]).to(s.device)] = -math.inf
    k = min(k, s.shape[1])
    if k < s.shape[1]:
        vals, items = torch.topk(s, k + 1, dim=1)
        tied = vals[:, k - 1] == vals[:, k]
        items, by_index = items[:, :k].sort(dim=1)
        vals, by_score = vals[:, :k].gather(1, by_index).sort(dim=1, descending=True, stable=True)
        items = items.gather(1, by_score)
        for r in tied.nonzero().flatten().tolist():
            vals[r], items[r] = _top_tied(s[r], vals[r, k - 1], k)
    else:
        vals, items = torch.sort(s, dim=1, descending=True, stable=True)
    return (items.numpy(), vals.numpy()) if as_numpy else (items, vals)


def _top_tied(row: torch.Tensor, v: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``k`` of a row whose ``k``-th and ``k + 1``-th scores are both ``v``: every item above
    ``v`` by (score, index), then the items at ``v`` by index (``nonzero`` lists them in index
    order), as a stable full sort would give them but in two passes over the row (a sparse source's
    row, mostly one value, is tied at ``k`` for most users)."""
    above = (row > v).nonzero().flatten()
    above = above[torch.sort(row[above], descending=True, stable=True).indices]
    at = (row == v).nonzero().flatten()[: k - len(above)]
    items = torch.cat([above, at])
    if len(items) != k:  # NaN scores compare false with everything: the full sort places them
        full = torch.sort(row, descending=True, stable=True)
        return full.values[:k], full.indices[:k]
    return row[items], items


class RowOrder:
    """One row of scores in the protocol's order, from a single sort of its values: its top ``k``
    (:func:`top_unseen`'s items) and the 0-based rank of any item in it (ties to the lower index), for
    a caller that needs both (the union ranker's provenance features: each source's list, then every
    candidate's place in that source's order) without ranking the whole row. ``row`` is one 1-D
    NumPy row with whatever the caller hides already -inf; it is not copied."""

    def __init__(self, row: np.ndarray) -> None:
        self.row = row
        self.ordered = np.sort(row)  # ascending; NumPy's SIMD sort of values, not an argsort

    def top(self, k: int) -> np.ndarray:
        """The ``k`` best items, best first: the items above the ``k``-th best score by (score,
        index), then the items at that score by index, as :func:`_top_tied` decides a tie."""
        row, n = self.row, len(self.row)
        k = min(k, n)
        if k == 0:
            return np.zeros(0, dtype=np.int64)
        if np.isnan(self.ordered[-1]):  # NaN sorts last: let top_unseen place it
            return top_unseen(np.array(row[None], copy=True), None, k)[0][0]
        v = self.ordered[n - k]
        above = np.flatnonzero(row > v)
        above = above[np.argsort(-row[above], kind="stable")]  # flatnonzero's index order breaks ties
        return np.concatenate([above, np.flatnonzero(row == v)[: k - len(above)]])

    def ranks(self, items: np.ndarray) -> np.ndarray:
        """Each of ``items``' (valid indices) rank: the count of scores above its own, plus the equal
        scores at a lower index, found only for values that occur more than once."""
        row, ordered = self.row, self.ordered
        n, v = len(row), row[items]
        above = np.searchsorted(ordered, v, side="right")
        out = n - above
        equal = above - np.searchsorted(ordered, v, side="left")  # how many items share the item's score
        common = equal > n // 2  # at most one score holds most of the row (a sparse source's zeros)
        others = None
        if common.any():  # count the other items below the item instead
            others = row != v[common][0]
            out[common] += items[common] - np.searchsorted(np.flatnonzero(others), items[common])
        few = (equal > 1) & ~common
        if few.any():  # the other tied scores: one pass for the items between the least and the greatest of them
            between = (row >= v[few].min()) & (row <= v[few].max())
            span = np.flatnonzero(between if others is None else between & others)  # in index order
            inside = row[span]
            for tied in np.unique(v[few]).tolist():
                at = v == tied
                out[at] += np.searchsorted(span[inside == tied], items[at])
        return out


def _gather(local: np.ndarray) -> np.ndarray:
    parts = all_gather(local)
    return local if len(parts) == 1 else np.concatenate(parts)


def _my_users(users: np.ndarray) -> np.ndarray:
    if dist.is_initialized() and dist.get_world_size() > 1:
        return users[dist.get_rank() :: dist.get_world_size()]
    return users


def evaluate_scores(
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    split: Split,
    stage: str,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    n_boot: int = 1000,
) -> RankingReport:
    """Full-ranking evaluation of a model that scores every item for a batch of users.

    ``score_fn(users)`` gets a 1-D tensor of dense user indices and returns scores of shape
    ``[len(users), num_items]`` (higher is better). Items in the user's history for ``stage``
    are excluded; ties are broken by item index (lower first), so results are deterministic.
    Collective in a distributed run: every rank must call it.
    """
    users_all, targets_all = split.targets(stage)
    target_of = dict(zip(users_all.tolist(), targets_all.tolist()))
    mine = _my_users(users_all)
    ranks = np.empty(len(mine), dtype=np.int64)
    k = min(MAX_K, split.num_items)
    for start in range(0, len(mine), batch_size):
        batch = mine[start : start + batch_size]
        with torch.no_grad():
            scores = score_fn(torch.as_tensor(batch, device=device)).float()
        if scores.shape != (len(batch), split.num_items):
            raise ValueError(
                f"score_fn returned shape {tuple(scores.shape)}, expected "
                f"({len(batch)}, {split.num_items}) = (users in batch, num_items)"
            )
        topk, top_scores = top_unseen(scores, split.excluded(stage, batch), k)
        target = torch.as_tensor([target_of[u] for u in batch.tolist()], device=topk.device)
        rank = target_ranks(topk, target)
        # an excluded item fills a list only where fewer than k are left (a tiny catalog): never a hit
        excluded = top_scores.gather(1, rank.clamp(max=k - 1).view(-1, 1)).view(-1) == -math.inf
        ranks[start : start + len(batch)] = torch.where(excluded, k, rank).cpu().numpy()
    ranks = np.where(ranks >= k, MAX_K, ranks)
    users = _gather(mine)
    return report_from_ranks(stage, users, _gather(ranks), n_boot, repeat_mask(split, stage, users))


def evaluate_topk(
    topk_fn: Callable[[np.ndarray], np.ndarray], split: Split, stage: str, batch_size: int = 512, n_boot: int = 1000
) -> RankingReport:
    """Evaluation of a model that returns ranked item lists (e.g. a FAISS index).

    ``topk_fn(users)`` returns an int array ``[len(users), >= 100]`` of item indices, best first,
    already excluding what the protocol excludes (:meth:`Split.excluded`). Collective.
    """
    users_all, targets_all = split.targets(stage)
    target_of = dict(zip(users_all.tolist(), targets_all.tolist()))
    mine = _my_users(users_all)
    ranks = np.empty(len(mine), dtype=np.int64)
    for start in range(0, len(mine), batch_size):
        batch = mine[start : start + batch_size]
        topk = torch.as_tensor(np.asarray(topk_fn(batch))[:, :MAX_K])
        target = torch.as_tensor([target_of[u] for u in batch.tolist()])
        ranks[start : start + len(batch)] = target_ranks(topk, target).numpy()
    ranks = np.where(ranks >= MAX_K, MAX_K, ranks)
    users = _gather(mine)
    return report_from_ranks(stage, users, _gather(ranks), n_boot, repeat_mask(split, stage, users))


SAMPLED_NEGATIVES = 100


def sampled_report(
    score_fn: Callable[[np.ndarray], np.ndarray],
    split: Split,
    stage: str,
    by: str,
    n_negatives: int = SAMPLED_NEGATIVES,
    seed: int = 0,
    batch_size: int = 512,
    n_boot: int = 1000,
    counts: np.ndarray | None = None,
) -> RankingReport:
    """The sampled protocol of many papers (and TorchRec's BERT4Rec example): the target ranked
    among ``n_negatives`` items the user has not seen, drawn uniformly (``by="uniform"``) or in
    proportion to training popularity (``by="popularity"``), instead of among all items. Ties
    count against the target. Easier than full ranking, often several-fold, and it can reorder
    models (Krichene & Rendle, KDD 2020); reported beside the full protocol, never instead.

    ``score_fn(users)`` returns scores ``[len(users), num_items]``. Every user's negatives depend
    only on ``seed`` and the user, so any batching or number of ranks gives the same result.
    Popularity is ``split``'s interactions before ``stage``, or ``counts`` where the split holds
    only some users.
    """
    if by not in ("uniform", "popularity"):
        raise ValueError(f"by must be 'uniform' or 'popularity', got {by!r}")
    users_all, targets_all = split.targets(stage)
    indptr, hist = split.history(stage)
    if by == "uniform":
        p = np.ones(split.num_items)
    else:
        p = np.asarray(split.item_counts(stage) if counts is None else counts, dtype=np.float64)
    cdf = np.cumsum(p / p.sum())
    target_of = dict(zip(users_all.tolist(), targets_all.tolist()))
    mine = _my_users(users_all)
    ranks = np.empty(len(mine), dtype=np.int64)
    for start in range(0, len(mine), batch_size):
        batch = mine[start : start + batch_size]
        scores = np.asarray(score_fn(batch))
        for row, u in enumerate(batch.tolist()):
            target = target_of[u]
            # Negatives are items the user has not had, or (with repeats, where a seen item is a fair
            # answer) any item but the target.
            banned = ({target} if split.repeats else set(hist[indptr[u] : indptr[u + 1]].tolist())) | {target}
            if split.num_items - len(banned) < n_negatives:
                raise ValueError(
                    f"user {u} has seen all but {split.num_items - len(banned)} items; "
                    f"cannot draw {n_negatives} unseen negatives"
                )
            rng = np.random.default_rng([seed, u])
            negs: list[int] = []
            while len(negs) < n_negatives:  # rejection sampling: without replacement, never seen
                for i in np.minimum(
                    np.searchsorted(cdf, rng.random(2 * n_negatives), side="right"), split.num_items - 1
                ).tolist():
                    if i not in banned:
                        banned.add(i)
                        negs.append(i)
                        if len(negs) == n_negatives:
                            break
            ranks[start + row] = int((scores[row, negs] >= scores[row, target]).sum())
    users = _gather(mine)
    return report_from_ranks(f"{stage}/sampled-{by}", users, _gather(ranks), n_boot, repeat_mask(split, stage, users))


class BinaryMetrics:
    """Accumulates (probability, label) pairs; ``compute()`` returns AUC, NE and log loss over
    every rank's examples, using TorchRec's metric functions."""

    def __init__(self) -> None:
        self._preds: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def update(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        if probs.shape != labels.shape:
            raise ValueError(f"probs {tuple(probs.shape)} and labels {tuple(labels.shape)} differ in shape")
        self._preds.append(probs.detach().reshape(-1).double().cpu())
        self._labels.append(labels.detach().reshape(-1).double().cpu())

    def compute(self, gather: bool = True) -> dict[str, float]:
        """Metrics over every rank's examples; ``gather=False`` when each rank already holds all
        of them (e.g. every rank scored the same rows)."""
        preds = torch.cat(self._preds).numpy() if self._preds else np.zeros(0)
        labels = torch.cat(self._labels).numpy() if self._labels else np.zeros(0)
        if gather:
            preds, labels = _gather(preds), _gather(labels)
        preds, labels = torch.as_tensor(preds), torch.as_tensor(labels)
        if preds.numel() == 0:
            raise ValueError("BinaryMetrics.compute() called before any update()")
        weights = torch.ones_like(preds)
        auc = compute_auc(1, [preds.view(1, -1)], [labels.view(1, -1)], [weights.view(1, -1)])
        states = get_ne_states(labels, preds, weights, eta=1e-12)
        ne = compute_ne(
            states["cross_entropy_sum"],
            states["weighted_num_samples"],
            states["pos_labels"],
            states["neg_labels"],
            eta=1e-12,
        )
        logloss = compute_logloss(states["cross_entropy_sum"], states["pos_labels"], states["neg_labels"], eta=1e-12)
        return {
            "auc": float(auc.item()),
            "ne": float(ne.item()),
            "logloss": float(logloss.item()) * math.log(2),  # torchrec uses log2; report nats
            "num_examples": int(preds.numel()),
            "positive_rate": float(labels.mean().item()),
        }

    def reset(self) -> None:
        self._preds.clear()
        self._labels.clear()
