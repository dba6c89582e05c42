"""The score fusion of integration/ensemble.py on planted data: the ranks it fuses, what its
grid holds, and that the weights it fits recover two independent noisy views of one truth."""

from __future__ import annotations

import numpy as np
import pytest

from candidates.sources import EnsembleSource, reciprocal_ranks, unseen_mask
from integration.ensemble import cross_fitted, fit_from_grid, fit_weights, grid_ndcg, simplex


class Planted:
    """A source whose catalog scores are a fixed matrix (rows: users)."""

    def __init__(self, name: str, scores: np.ndarray) -> None:
        self.name, self.table = name, scores

    def scores(self, users: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
        return self.table[users].copy()


def planted(num_users: int = 400, num_items: int = 300, seed: int = 0):
    """Two sources, each the truth plus its own noise (one on a 100x larger scale), histories of
    20 items, and each user's target: the truth's best unseen item."""
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=(num_users, num_items))
    hists = [rng.choice(num_items, 20, replace=False) for _ in range(num_users)]
    masked = truth.copy()
    for r, h in enumerate(hists):
        masked[r, h] = -np.inf
    targets = masked.argmax(axis=1)
    a = Planted("a", 100.0 * (truth + 1.0 * rng.normal(size=truth.shape)) + 7.0)
    b = Planted("b", truth + 1.0 * rng.normal(size=truth.shape))
    return [a, b], np.arange(num_users), hists, targets


def test_reciprocal_ranks_order_the_unseen_items_only() -> None:
    s = np.array([[0.5, 3.0, 3.0, -1.0, 9.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    hists = [np.array([4]), np.array([], dtype=np.int64)]
    r = reciprocal_ranks(s, unseen_mask(s.shape, hists), offset=10)
    # row 0: item 4 is seen (last); items 1 and 2 tie at the top, the lower index first
    np.testing.assert_allclose(r[0], 1.0 / (10 + np.array([2, 0, 1, 3, 4])))
    np.testing.assert_allclose(r[1], 1.0 / (10 + np.array([4, 3, 2, 1, 0])))
    # only the order counts: any increasing map of the scores leaves them as they are
    np.testing.assert_array_equal(
        reciprocal_ranks(np.exp(3 * s), unseen_mask(s.shape, hists)), reciprocal_ranks(s, unseen_mask(s.shape, hists))
    )


def test_the_grid_covers_the_simplex() -> None:
    assert len(simplex(["a", "b"])) == 11 and len(simplex(["a", "b", "c"])) == 66
    for w in simplex(["a", "b", "c"], 0.25):
        assert sum(w.values()) == pytest.approx(1.0) and min(w.values()) >= 0
    assert {"a": 1.0, "b": 0.0} in simplex(["a", "b"]) and {"a": 0.0, "b": 1.0} in simplex(["a", "b"])


def test_fitted_weights_fuse_two_noisy_views_better_than_either() -> None:
    sources, users, hists, targets = planted()
    weights, grid = fit_weights(sources, users, hists, targets)
    by = {tuple(g["weights"].values()): g["NDCG@10"] for g in grid}
    # equal noise: the best weights are near equal whatever the sources' scales, and beat each alone
    assert 0.3 <= weights["a"] <= 0.7, weights
    assert grid[0]["NDCG@10"] > max(by[(1.0, 0.0)], by[(0.0, 1.0)]) + 0.05, (grid[0], by)
    # the fit's ranks are the ensemble's own order: its top 10 holds the target for HR@10 of the users
    ens = EnsembleSource(sources, weights)
    top, scores = ens.top_k(users, hists, 10)
    assert np.mean((top == targets[:, None]).any(axis=1)) == pytest.approx(grid[0]["HR@10"])
    assert not any(set(t) & set(h) for t, h in zip(top.tolist(), hists))  # nothing seen
    assert np.all(np.diff(scores, axis=1) <= 0)


def test_bad_weights_are_refused() -> None:
    sources, *_ = planted(num_users=2, num_items=30)
    with pytest.raises(ValueError, match=r"sources \['c'\]"):
        EnsembleSource(sources, {"a": 0.5, "c": 0.5})
    with pytest.raises(ValueError, match="at least one must be positive"):
        EnsembleSource(sources, {"a": 0.0, "b": 0.0})


def test_the_cross_fitted_estimate_scores_weights_on_users_they_were_not_fitted_on() -> None:
    sources, users, hists, targets = planted()
    # a third source of pure noise: the in-sample best point may lean on it by chance, the held-out folds pay
    rng = np.random.default_rng(5)
    sources.append(Planted("noise", rng.normal(size=sources[0].table.shape)))
    points, ndcg = grid_ndcg(sources, users, hists, targets)
    weights, grid = fit_from_grid(points, ndcg)
    honest = cross_fitted(points, ndcg)
    assert honest["NDCG@10"] <= grid[0]["NDCG@10"]  # never above the in-sample maximum
    assert set(honest["sources_alone"]) == {"a", "b", "noise"} and honest["best_source"] in ("a", "b")
    assert honest["gain_over_best_source"] > 0.03, honest  # two noisy views fused still beat either, held out
    assert all(w["noise"] <= 0.2 for w in honest["weights_per_fold"])
    # by hand: fold 0's users scored with the point fitted on fold 1's, and the other way round
    fold = np.random.default_rng(0).permutation(len(users)) % 2
    expect = np.empty(len(users))
    for f in (0, 1):
        expect[fold == f] = ndcg[np.argmax(ndcg[:, fold != f].mean(axis=1)), fold == f]
    assert honest["NDCG@10"] == pytest.approx(expect.mean())


@pytest.mark.parametrize("repeats", [False, True])
def test_the_shortlisted_grid_equals_full_ranking(repeats: bool) -> None:
    """grid_ndcg ranks each point over the sources' shortlists only; every NDCG@10 must equal the
    full ranking's, over a catalog several times the shortlist, with ties and weak targets."""
    from candidates.sources import excluded, reciprocal_ranks, unseen_mask
    from integration import ensemble

    rng = np.random.default_rng(1)
    users, items = 120, 1500
    truth = rng.normal(size=(users, items))
    sources = [
        Planted(n, np.round(truth + rng.normal(size=truth.shape) * noise, 1))
        for n, noise in (("a", 1), ("b", 3), ("c", 8))
    ]
    for src in sources:
        src.repeats = repeats
    hists = [rng.choice(items, 30, replace=False) for _ in range(users)]
    targets = np.where(np.arange(users) % 2, rng.integers(0, items, users), truth.argmax(axis=1))  # half far down
    if not repeats:
        targets = np.array([t if t not in h else (t + 1) % items for t, h in zip(targets, hists)])
    points, got = ensemble.grid_ndcg(sources, np.arange(users), hists, targets, step=0.25, chunk=50)
    unseen = unseen_mask((users, items), excluded(hists, repeats))
    z = {s.name: reciprocal_ranks(s.table, unseen) for s in sources}
    rows = np.arange(users)
    before = np.arange(items)[None, :] < targets[:, None]
    for n, weights in enumerate(points):
        s = sum(w * z[name] for name, w in weights.items())
        at = s[rows, targets][:, None]
        rank = ((s > at) & unseen).sum(axis=1) + ((s == at) & unseen & before).sum(axis=1)
        np.testing.assert_array_equal(got[n], np.where(rank < 10, 1.0 / np.log2(rank + 2.0), 0.0))
    assert (got > 0).mean() > 0.05 and (got == 0).mean() > 0.3  # hits and misses both


def test_sequential_flag_names_the_exports_and_refuses_unknown_sources() -> None:
    """``--sequential`` of integration.ensemble and integration.union_ranker: "both" is both models
    (it used to be read as a directory named "both"), a misspelt one is refused naming the choices."""
    from integration.loader import sequential_exports

    assert sequential_exports("auto") == "auto" and sequential_exports("none") == []
    assert sequential_exports("both") == sequential_exports("sasrec,bert4rec") == ["sasrec/export", "bert4rec/export"]
    assert sequential_exports("bert4rec") == ["bert4rec/export"]
    with pytest.raises(ValueError, match="sasrek is not a sequential source; give sasrec, bert4rec, both"):
        sequential_exports("sasrek")
