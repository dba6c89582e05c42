"""The union ranker's provenance features (candidates/provenance.py) against a direct computation."""

from __future__ import annotations

import numpy as np
import pytest

import candidates.provenance
from candidates.provenance import union_lists
from candidates.sources import RANK_OFFSET, EnsembleSource, excluded, union
from common.metrics import top_unseen


class TableSource:
    """A source whose scores are a fixed table, one row per user."""

    def __init__(self, name: str, table: np.ndarray, repeats: bool, ranks_its_scores: bool = False) -> None:
        self.name, self.table, self.repeats = name, table, repeats
        self.ranks_its_scores = ranks_its_scores  # union_lists may take its list from its own order

    def scores(self, users, histories):
        return self.table[users].copy()

    def top_k(self, users, histories, k):
        return top_unseen(self.scores(users, histories), excluded(histories, self.repeats), k)


def fixture(repeats: bool, seed: int = 0, shared: bool = False):
    rng = np.random.default_rng(seed)
    num_users, num_items = 6, 40
    # coarse scores, so that ties occur and must be broken toward the lower index
    sources = [
        TableSource(name, rng.integers(0, 12, size=(num_users, num_items)).astype(np.float32), repeats, shared)
        for name in ("a", "b", "c")
    ]
    histories = [rng.choice(num_items, size=rng.integers(0, 9), replace=False) for _ in range(num_users)]
    return sources, histories, np.arange(num_users)


@pytest.mark.parametrize("repeats", [False, True])
@pytest.mark.parametrize("shared", [False, True], ids=["own-top-k", "top-k-from-the-order"])
@pytest.mark.parametrize("path", ["batch", "row"])
def test_provenance_features_equal_a_direct_computation(repeats: bool, shared: bool, path: str, monkeypatch) -> None:
    """Both ways to the ranks (a small catalog's batch order, a large one's row by row), with each
    source's list from its own top_k or from the order the ranks come from."""
    monkeypatch.setattr(candidates.provenance, "BATCH_ORDER_MAX_ITEMS", 40 if path == "batch" else 39)
    sources, histories, users = fixture(repeats, shared=shared)
    weights = {"a": 0.5, "b": 0.3}  # "c" unweighted: it counts in n_sources, not in fused
    k = 7
    lists = union_lists(sources, weights, users, histories, k)
    for r, u in enumerate(users):
        allowed = [i for i in range(40) if repeats or i not in set(histories[r].tolist())]
        row_items = [i for i in lists.items[r].tolist() if i >= 0]
        expected_items = []
        for src in sources:
            ordered = sorted(allowed, key=lambda i: (-src.table[u, i], i))
            expected_items += [i for i in ordered[:k] if i not in expected_items]
        assert row_items == expected_items
        for j, item in enumerate(row_items):
            fused = proposed = 0.0
            for src in sources:
                ordered = sorted(allowed, key=lambda i: (-src.table[u, i], i))
                rank = ordered.index(item)
                vals = np.array([src.table[u, i] for i in allowed], dtype=np.float64)
                sd = vals.std()
                z = (src.table[u, item] - vals.mean()) / (sd if sd > 0 else 1.0)
                assert lists.column(f"{src.name}_rr")[r, j] == pytest.approx(1.0 / (RANK_OFFSET + rank))
                assert lists.column(f"{src.name}_in")[r, j] == float(rank < k)
                assert lists.column(f"{src.name}_z")[r, j] == pytest.approx(z, abs=1e-5)
                fused += weights.get(src.name, 0.0) / (RANK_OFFSET + rank)
                proposed += rank < k
            assert lists.column("fused")[r, j] == pytest.approx(fused)
            assert lists.column("n_sources")[r, j] == proposed
        assert not lists.features[r, len(row_items) :].any()  # padding is zeros


def test_the_lists_are_the_pipelines_union_and_fused_is_the_ensembles_score() -> None:
    sources, histories, users = fixture(False, seed=1)
    weights = {"a": 0.2, "b": 0.5, "c": 0.3}
    lists = union_lists(sources, weights, users, histories, 5)
    assert np.array_equal(lists.items, union([src.top_k(users, histories, 5)[0] for src in sources]))
    ensemble = EnsembleSource(sources, weights).scores(users, histories)
    safe = np.where(lists.items >= 0, lists.items, 0)
    np.testing.assert_allclose(
        np.where(lists.items >= 0, np.take_along_axis(ensemble, safe, 1), 0), lists.column("fused"), rtol=1e-6
    )


def test_the_listwise_loss_is_each_lists_softmax_cross_entropy() -> None:
    import torch

    from integration.union_model import pad_lists
    from integration.union_ranker import list_loss

    sizes = np.array([3, 1, 2])
    logits = torch.tensor([0.5, -1.0, 2.0, 0.3, 1.0, 0.0])
    labels = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 0.0])  # the third list has no target: it teaches nothing
    padded, mask = pad_lists(logits, sizes)
    assert mask.tolist() == [[True, True, True], [True, False, False], [True, True, False]]
    assert padded[2, :2].tolist() == [1.0, 0.0]
    expected = -torch.log_softmax(logits[:3], 0)[1]  # the first list, target at its second row
    assert torch.isclose(list_loss(logits, labels, sizes, "listwise"), expected)
    labels[3] = 1.0  # now the second list (one row, its target) adds -log 1 = 0 to the mean
    assert torch.isclose(list_loss(logits, labels, sizes, "listwise"), expected / 2)
    assert list_loss(logits, torch.zeros(6), sizes, "listwise") is None
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
    assert torch.isclose(list_loss(logits, labels, sizes, "pointwise"), bce)


def test_target_attention_against_a_loop() -> None:
    """The union ranker's target attention (integration/union_model.py) against a per-row computation:
    softmax over the latest n items' similarities with the candidate, their weighted mean, the largest
    and the mean; zeros for a user without history."""
    from integration.union_model import ATTENTION_TEMPERATURE, target_attention

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((30, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    histories = [rng.integers(0, 30, 12), np.zeros(0, np.int64), rng.integers(0, 30, 3)]
    at = np.array([0, 0, 1, 2, 2, 2])
    items = rng.integers(0, 30, len(at))
    got = target_attention(vectors, histories, at, items, 5)
    for r, (u, i) in enumerate(zip(at, items)):
        recent = histories[u][-5:]
        if not len(recent):
            assert got["attention_sim"][r] == got["recent_max_sim"][r] == got["recent_mean_sim"][r] == 0
            continue
        sims = np.array([vectors[i] @ vectors[h] for h in recent])
        w = np.exp(sims / ATTENTION_TEMPERATURE - (sims / ATTENTION_TEMPERATURE).max())
        assert got["attention_sim"][r] == pytest.approx((w / w.sum()) @ sims, abs=1e-5)
        assert got["recent_max_sim"][r] == pytest.approx(sims.max(), abs=1e-5)
        assert got["recent_mean_sim"][r] == pytest.approx(sims.mean(), abs=1e-5)


def test_one_sort_of_a_row_gives_the_protocols_top_k_and_every_rank() -> None:
    """common.metrics.RowOrder: its ranks are the ranks reciprocal_ranks gives and its top k is
    top_unseen's, with ties (few values, a run of zeros over most of the row), -inf scores and seen
    items, with and without exclusion, k below, at and above the row's unseen items."""
    from candidates.sources import RANK_OFFSET, reciprocal_ranks
    from common.metrics import RowOrder, top_unseen

    rng = np.random.default_rng(0)
    for trial in range(12):
        s = rng.standard_normal((3, 2000)).astype(np.float32)
        if trial % 3 == 0:
            s = rng.integers(0, 4, (3, 2000)).astype(np.float32)
        if trial % 3 == 1:
            s[:, :1500] = 0
        s[0, :5] = -np.inf
        unseen = rng.random(s.shape) > 0.1 if trial % 2 else np.ones(s.shape, bool)
        items = np.stack([rng.choice(2000, 150, replace=False) for _ in range(3)])
        want = np.take_along_axis(reciprocal_ranks(s, unseen), items, axis=1)
        hidden = [np.flatnonzero(~u) for u in unseen]
        for r in range(3):
            order = RowOrder(np.where(unseen[r], s[r], -np.inf))
            assert np.array_equal(1.0 / (RANK_OFFSET + order.ranks(items[r])), want[r]), trial
            assert order.top(0).shape == (0,)
            for k in (1, 100, 1999, 2000, 2500):
                expected = top_unseen(s[r : r + 1].copy(), hidden[r : r + 1], k)[0][0]
                assert np.array_equal(order.top(k), expected), (trial, r, k)
