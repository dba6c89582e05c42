"""The shared protocol: leave-last-out split, ranking metrics, bootstrap CIs, AUC / NE,
and the popularity baseline's golden numbers on real ml-100k."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.baselines import main as baselines_main
from common.baselines import popularity_report
from common.data.split import leave_last_out
from common.metrics import (
    BinaryMetrics,
    bootstrap_ci,
    evaluate_scores,
    evaluate_topk,
    per_user_metrics,
)


def test_leave_last_out_orders_by_time_then_item() -> None:
    # user 0: items 5 (t=1), 3 and 4 tie at t=2 -> order 5, 3, 4: test 4, valid 3.
    # user 1: two interactions -> test only. user 2: one -> train only.
    s = leave_last_out(user=[0, 0, 0, 1, 1, 2], item=[4, 3, 5, 7, 6, 1], timestamp=[2, 2, 1, 9, 8, 5])
    assert list(s.test_user) == [0, 1] and list(s.test_item) == [4, 7]
    assert list(s.valid_user) == [0] and list(s.valid_item) == [3]
    assert list(zip(s.train_user, s.train_item)) == [(0, 5), (1, 6), (2, 1)]
    indptr, items = s.history("test")
    assert list(items[indptr[0]:indptr[1]]) == [5, 3]          # train + valid, in time order
    indptr, items = s.history("valid")
    assert list(items[indptr[0]:indptr[1]]) == [5]
    assert s.item_counts("test")[3] == 1 and s.item_counts("valid")[3] == 0
    with pytest.raises(ValueError, match="stage must be one of"):
        s.targets("train")


def test_ml100k_split_sizes(ml100k_split) -> None:
    assert len(ml100k_split.test_user) == len(ml100k_split.valid_user) == 943
    assert len(ml100k_split.train_user) == 100_000 - 2 * 943


def test_per_user_metrics_formulas() -> None:
    m = per_user_metrics(np.array([0, 9, 10, 49, 99, 100]))
    assert list(m["HR@10"]) == [1, 1, 0, 0, 0, 0]
    assert m["NDCG@10"][0] == 1.0 and m["NDCG@10"][1] == pytest.approx(1 / math.log2(11))
    assert list(m["Recall@50"]) == [1, 1, 1, 1, 0, 0] and list(m["Recall@100"]) == [1, 1, 1, 1, 1, 0]


def test_evaluate_scores_excludes_history_and_breaks_ties_by_index() -> None:
    # 2 users, 120 items. User 0's history is item 0 (the best-scored), target item 2.
    s = leave_last_out(user=[0, 0, 0, 1, 1, 1], item=[0, 1, 2, 5, 6, 7], timestamp=[1, 2, 3, 1, 2, 3], num_items=120)
    scores = torch.zeros(2, 120)
    scores[:, 0] = 10.0  # seen by user 0 -> must be skipped
    # All other items tie at 0, so ranking is by index: user 0 sees 2 at rank 0 (items 0, 1 are
    # history); user 1's target 7 comes after 0..4 (items 5, 6 excluded) -> rank 5.
    rep = evaluate_scores(lambda users: scores[users].clone(), s, "test", n_boot=50)
    assert list(rep.ranks) == [0, 5]
    assert rep.means["HR@10"] == 1.0 and rep.means["NDCG@10"] == pytest.approx((1 + 1 / math.log2(7)) / 2)
    with pytest.raises(ValueError, match="expected \\(2, 120\\)"):
        evaluate_scores(lambda users: torch.zeros(len(users), 3), s, "test")


def test_evaluate_topk_matches_evaluate_scores(ml100k_split) -> None:
    counts = torch.as_tensor(ml100k_split.item_counts("test"), dtype=torch.float32)
    dense = popularity_report(ml100k_split, "test", n_boot=10)
    indptr, hist = ml100k_split.history("test")
    order = np.argsort(-counts.numpy(), kind="stable")

    def topk(users: np.ndarray) -> np.ndarray:
        out = []
        for u in users:
            seen = set(hist[indptr[u]:indptr[u + 1]].tolist())
            out.append([i for i in order if i not in seen][:100])
        return np.array(out)

    lists = evaluate_topk(topk, ml100k_split, "test", n_boot=10)
    assert (lists.ranks == dense.ranks).all()


def test_popularity_golden_numbers_on_ml100k(ml100k_split) -> None:
    """The issue's reference: about HR@10 0.050, NDCG@10 0.026, Recall@100 0.234 on test."""
    rep = popularity_report(ml100k_split, "test")
    assert rep.num_users == 943
    assert rep.means["HR@10"] == pytest.approx(0.0498, abs=1e-4)
    assert rep.means["NDCG@10"] == pytest.approx(0.0253, abs=1e-4)
    assert rep.means["Recall@50"] == pytest.approx(0.1432, abs=1e-4)
    assert rep.means["Recall@100"] == pytest.approx(0.2333, abs=1e-4)
    lo, hi = rep.ci95["HR@10"]
    assert lo < rep.means["HR@10"] < hi and hi - lo < 0.04


def test_popularity_matches_an_independent_numpy_implementation(ml100k) -> None:
    """Recompute from raw arrays with no shared code: sort, hold out, count, rank."""
    u, i, t = ml100k.user, ml100k.item, ml100k.timestamp
    o = np.lexsort((i, t, u))
    u, i = u[o], i[o]
    last = np.r_[u[1:] != u[:-1], True]
    cnt = np.bincount(i[~last], minlength=ml100k.num_items).astype(float)
    ranks = []
    for ti in np.where(last)[0]:
        s = cnt.copy()
        s[i[(u == u[ti]) & ~last]] = -np.inf
        order = np.lexsort((np.arange(len(s)), -s))
        ranks.append(int(np.where(order == i[ti])[0][0]))
    ranks = np.array(ranks)
    ours = popularity_report(leave_last_out(ml100k.user, ml100k.item, ml100k.timestamp), "test", n_boot=10)
    assert ours.means["HR@10"] == pytest.approx((ranks < 10).mean())
    assert ours.means["Recall@100"] == pytest.approx((ranks < 100).mean())


def test_baselines_cli_writes_results(tmp_path) -> None:
    res = baselines_main(["--out", str(tmp_path), "--n-boot", "20"])
    assert res["test"]["HR@10"] == pytest.approx(0.0498, abs=1e-4)
    import json
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["model"] == "popularity" and saved["test"]["num_users"] == 943


def test_bootstrap_ci_covers_mean_and_shrinks_with_n() -> None:
    rng = np.random.default_rng(0)
    small, large = rng.random(100) < 0.3, rng.random(10_000) < 0.3
    lo_s, hi_s = bootstrap_ci(small.astype(float))
    lo_l, hi_l = bootstrap_ci(large.astype(float))
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 5


def test_binary_metrics_auc_and_ne() -> None:
    rng = np.random.default_rng(0)
    labels = (rng.random(2000) < 0.3).astype(np.float64)
    logits = labels * 1.5 + rng.normal(size=2000)
    probs = 1 / (1 + np.exp(-logits))
    m = BinaryMetrics()
    for k in range(0, 2000, 500):  # accumulates across updates
        m.update(torch.tensor(probs[k:k + 500]), torch.tensor(labels[k:k + 500]))
    got = m.compute()
    pos, neg = probs[labels == 1], probs[labels == 0]
    pairwise_auc = (pos[:, None] > neg[None, :]).mean()
    assert got["auc"] == pytest.approx(pairwise_auc, abs=1e-6)
    p = np.clip(probs, 1e-12, 1 - 1e-12)
    logloss = -(labels * np.log(p) + (1 - labels) * np.log(1 - p)).mean()
    base = labels.mean()
    base_loss = -(base * np.log(base) + (1 - base) * np.log(1 - base))
    assert got["logloss"] == pytest.approx(logloss, rel=1e-6)
    assert got["ne"] == pytest.approx(logloss / base_loss, rel=1e-6)
    # Predicting the base rate has NE 1 and AUC 0.5.
    m2 = BinaryMetrics()
    m2.update(torch.full((2000,), base), torch.tensor(labels))
    assert m2.compute()["ne"] == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(ValueError, match="before any update"):
        BinaryMetrics().compute()
