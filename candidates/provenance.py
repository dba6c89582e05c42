"""Where a candidate came from: the union of every source's lists, and what each source thinks of
each candidate in it (the union ranker's provenance features, integration/union_ranker.py).

    lists = union_lists(sources, weights, users, histories, k=100)
    lists.items      # [B, L] the union of each source's top k, in source order (-1 padding)
    lists.features   # [B, L, F] float32, named by lists.names

For each source ``s`` (a source's rank ``r`` is its 0-based place among the items it may propose,
over the whole catalog, ties to the lower index: the protocol's order, :func:`common.metrics.top_unseen`):

- ``<s>_rr``: ``1 / (RANK_OFFSET + r)``, the source's reciprocal rank as the ensemble fuses it;
- ``<s>_in``: 1 if the candidate is in the source's top ``k`` (it proposed it), else 0;
- ``<s>_z``: the source's score, standardised over the items it may propose for this user (its
  scale says how sure it is, which a rank hides);

and over the sources: ``fused``, the ensemble's score with ``weights`` (``sum_s w_s * <s>_rr``:
:class:`candidates.sources.EnsembleSource`'s, exactly), and ``n_sources``, how many proposed it.
A candidate a source did not propose still has that source's rank and score (every source scores
the whole catalog), and its ``_in`` flag says it was not proposed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from candidates.sources import (
    RANK_OFFSET,
    CandidateSource,
    excluded,
    order_and_ranks,
    top_k_of,
    union,
    unseen_mask,
)
from common.metrics import RowOrder

PER_SOURCE = ("rr", "in", "z")
# Up to this many items, each source's rows are ordered for the whole batch at once (one sort of 64-bit
# keys, :func:`candidates.sources.order_and_ranks`); above it, a row at a time by value (RowOrder), which
# sorts half the bytes and ranks only the candidates: measured equal at about 4,096 items
# (integration/README.md, "The union ranker, served").
BATCH_ORDER_MAX_ITEMS = 4096


@dataclass
class UnionLists:
    users: np.ndarray  # [B]
    items: np.ndarray  # [B, L] int64, -1 padding at the end of a row
    features: np.ndarray  # [B, L, F] float32, zeros on padding
    names: list[str]  # the F feature names

    def column(self, name: str) -> np.ndarray:
        return self.features[..., self.names.index(name)]


def feature_names(sources: list[CandidateSource]) -> list[str]:
    return [f"{src.name}_{what}" for src in sources for what in PER_SOURCE] + ["fused", "n_sources"]


def union_lists(
    sources: list[CandidateSource],
    weights: dict[str, float],
    users: np.ndarray,
    histories: list[np.ndarray],
    k: int,
) -> UnionLists:
    """The union of ``sources``' top ``k`` for each user (as :func:`candidates.sources.union` merges
    them, in source order) and the provenance features of every candidate; ``weights`` are the
    ensemble's (a source not named weighs 0)."""
    users = np.asarray(users, dtype=np.int64)
    # The lists are each source's own top k, the very call the pipeline serves (the two-tower's through
    # its index; the others' from the scores computed once: top_k_of); the features read each
    # source's scores of the whole catalog.
    raw = [src.scores(users, histories) for src in sources]
    # what the ensemble leaves out of every source's ranks (EnsembleSource): seen items, unless any
    # source may propose them
    repeats = any(getattr(src, "repeats", False) for src in sources)
    unseen = unseen_mask((len(users), raw[0].shape[1]), excluded(histories, repeats)) if raw else None
    scores = [np.asarray(r, dtype=np.float32) for r in raw]
    # A source whose top k is top_unseen of its own float32 scores, hiding what the ensemble hides, has
    # its list at the head of the order its ranks count in: one sort gives both.
    shared = [
        getattr(src, "ranks_its_scores", False) and s is r and bool(getattr(src, "repeats", False)) == repeats
        for src, s, r in zip(sources, scores, raw)
    ]
    tops = [
        np.empty((len(users), min(k, s.shape[1])), np.int64) if share else top_k_of(src, r, users, histories, k)
        for src, s, r, share in zip(sources, scores, raw, shared)
    ]
    # NaN: top_unseen places it first, the stable order last; RowOrder defers to top_unseen
    if raw[0].shape[1] <= BATCH_ORDER_MAX_ITEMS and not any(np.isnan(s).any() for s in scores):
        items, at = _batch_ranks(scores, unseen, tops, shared)
    else:
        items, at = _row_ranks(scores, unseen, tops, shared)
    safe = np.where(items >= 0, items, 0)
    cols = []
    fused = np.zeros(items.shape, np.float32)
    proposed = np.zeros(items.shape, np.float32)
    for src, top, s, rank in zip(sources, tops, scores, at):
        rr = 1.0 / (RANK_OFFSET + rank)  # reciprocal_ranks' values, at the candidates only
        member = np.zeros(s.shape, dtype=bool)  # the source's list as a mask over the catalog
        member[np.nonzero(top >= 0)[0], top[top >= 0]] = True
        inside = (np.take_along_axis(member, safe, axis=1) & (items >= 0)).astype(np.float32)
        cols += [rr, inside, _standardised(s, unseen, safe)]
        fused += weights.get(src.name, 0.0) * rr
        proposed += inside
    features = np.stack([*cols, fused, proposed], axis=-1).astype(np.float32)
    features[items < 0] = 0.0
    return UnionLists(users, items, features, feature_names(sources))


def _batch_ranks(
    scores: list[np.ndarray], unseen: np.ndarray, tops: list[np.ndarray], shared: list[bool]
) -> tuple[np.ndarray, np.ndarray]:
    """The union of the lists (filling the ``shared`` sources' ``tops``) and each source's rank of each
    candidate ``[S, B, L]``, from one stable order of each source's rows for the whole batch: the
    protocol's order itself, so its head is the source's top k and an item's place in it its rank."""
    ranks = []
    for s, top, share in zip(scores, tops, shared):
        order, rank = order_and_ranks(s, unseen)
        if share:
            top[:] = order[:, : top.shape[1]]
        ranks.append(rank)
    items = union(tops)
    safe = np.where(items >= 0, items, 0)
    at = np.stack([np.take_along_axis(rank, safe, axis=1) for rank in ranks])
    return items, np.where(items >= 0, at, 0)


def _row_ranks(
    scores: list[np.ndarray], unseen: np.ndarray, tops: list[np.ndarray], shared: list[bool]
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_batch_ranks`, a row at a time: one row's sorted scores in memory, not the batch's, and
    each row sorted by value only (:class:`common.metrics.RowOrder`), for a large catalog."""
    rows, ranks = [], []
    for b in range(unseen.shape[0]):
        hide = not unseen[b].all()  # nothing to hide (a log with repeats): the rows themselves, no copies
        orders = [RowOrder(np.where(unseen[b], s[b], -np.inf) if hide else s[b]) for s in scores]
        for top, order, share in zip(tops, orders, shared):
            if share:
                top[b] = order.top(top.shape[1])
        rows.append(union([top[b : b + 1] for top in tops])[0])
        ranks.append([order.ranks(rows[-1]) for order in orders])
    items = np.full((unseen.shape[0], max((len(r) for r in rows), default=0)), -1, dtype=np.int64)
    at = np.zeros((len(scores), *items.shape), dtype=np.int64)
    for b, row in enumerate(rows):
        items[b, : len(row)] = row
        at[:, b, : len(row)] = ranks[b]
    return items, at


def _standardised(s: np.ndarray, unseen: np.ndarray, at: np.ndarray) -> np.ndarray:
    """At the items ``at`` ``[B, L]``: each row's scores minus the mean over its ``unseen`` items, over
    their standard deviation (1 where they are all equal); 0 at -inf and seen entries. The moments
    read the whole row; the quotient is formed at ``at`` only."""
    ok = unseen & np.isfinite(s)
    n = np.maximum(unseen.sum(axis=1, keepdims=True), 1)
    every = bool(ok.all())  # (repeats, finite scores) the masks change nothing: the same sums, fewer passes
    x = s.astype(np.float64) if every else np.where(ok, s, 0.0).astype(np.float64)
    mean = x.sum(axis=1, keepdims=True) / n
    dev = x - mean
    np.square(dev, out=dev)  # in place: a 68,260-wide row's float64 copy is 0.5 MB
    var = (dev if every else np.where(unseen, dev, 0.0)).sum(axis=1, keepdims=True) / n
    sd = np.sqrt(var)
    z = (np.take_along_axis(x, at, axis=1) - mean) / np.where(sd > 0, sd, 1.0)
    return np.where(np.take_along_axis(ok, at, axis=1), z, 0.0).astype(np.float32)
