"""The shared protocol: leave-last-out split, ranking metrics, bootstrap CIs, AUC / NE,
and the popularity baseline's golden numbers on real ml-100k."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import math

import numpy as np
import pytest
import torch

from common.baselines import main as baselines_main
from common.baselines import popularity_report
from common.data.dataset import tie_keys
from common.data.download import default_data_dir
from common.data.split import (
    STAGES,
    history_before_test,
    leave_last_out,
    rank_splits,
    split_dataset,
    user_share,
)
from common.metrics import (
    BinaryMetrics,
    bootstrap_ci,
    evaluate_scores,
    evaluate_topk,
    per_user_metrics,
    stable_order,
)


def _key(user: object, item: object) -> int:
    """The tie key, written out again here from the rule's words, sharing no code with the split."""
    return int.from_bytes(hashlib.sha256(f"{user}:{item}".encode("ascii")).digest()[:8], "big")


def test_leave_last_out_orders_same_second_ties_by_the_sha256_key() -> None:
    # user 0: item 5 at t=1, items 3 and 4 tie at t=2; user 1: two -> test only; user 2: one -> train.
    s = leave_last_out(user=[0, 0, 0, 1, 1, 2], item=[4, 3, 5, 7, 6, 1], timestamp=[2, 2, 1, 9, 8, 5])
    first, last = sorted([3, 4], key=lambda i: _key(0, i))
    assert list(s.test_user) == [0, 1] and list(s.test_item) == [last, 7]
    assert list(s.valid_user) == [0] and list(s.valid_item) == [first]
    assert list(zip(s.train_user, s.train_item)) == [(0, 5), (1, 6), (2, 1)]
    indptr, items = s.history("test")
    assert list(items[indptr[0] : indptr[1]]) == [5, first]  # train + valid, in split order
    indptr, items = s.history("valid")
    assert list(items[indptr[0] : indptr[1]]) == [5]
    assert s.item_counts("test")[first] == 1 and s.item_counts("valid")[first] == 0
    with pytest.raises(ValueError, match="stage must be one of"):
        s.targets("train")
    # The key hashes raw IDs, not dense indices: swapping two items' raw IDs swaps the targets.
    for raw in ([30, 40, 50], [40, 30, 50]):
        t = leave_last_out(
            user=[0, 0, 0], item=[0, 1, 2], timestamp=[2, 2, 1], user_raw_ids=np.array([7]), item_raw_ids=np.array(raw)
        )
        assert t.test_item[0] == int(np.argmax([_key(7, r) for r in raw[:2]]))
    assert tie_keys(np.array([0]), np.array([3]))[0] == _key(0, 3)


def test_ml100k_tie_rule_pinned_against_the_raw_file(ml100k, ml100k_split) -> None:
    """The tie rule on real ml-100k, recomputed from the raw ratings file: 415 users rated their
    validation and test items in the same second; under the old rule (ties by item ID) the test
    item had the higher raw ID for all of them, under the hash for about half."""
    folder = default_data_dir()
    if ml100k.source == "recbole":
        lines = (folder / "ml-100k-recbole" / "ml-100k.inter").read_text().splitlines()[1:]
    else:
        lines = (folder / "ml-100k" / "ml-100k" / "u.data").read_text().splitlines()
    per_user: dict[str, list[tuple[int, int, str]]] = collections.defaultdict(list)
    for line in lines:
        u, i, _, t = line.split("\t")
        per_user[u].append((int(t), _key(u, i), i))
    expected = {u: sorted(rows) for u, rows in per_user.items()}
    tied = [u for u, rows in expected.items() if rows[-1][0] == rows[-2][0]]
    assert len(tied) == 415
    higher = np.mean([int(expected[u][-1][2]) > int(expected[u][-2][2]) for u in tied])
    assert 0.40 < higher < 0.60, higher  # 0.458 under the hash rule
    # Named users' targets: the raw file against the split.
    raw_user = {int(r): k for k, r in enumerate(ml100k.user_raw_ids)}
    test = dict(zip(ml100k_split.test_user.tolist(), ml100k_split.test_item.tolist()))
    valid = dict(zip(ml100k_split.valid_user.tolist(), ml100k_split.valid_item.tolist()))
    pinned = {
        "1": ("102", "74"),
        "13": ("914", "916"),
        "196": ("94", "110"),
        "186": ("477", "98"),
        "655": ("1268", "131"),
    }
    for u, (want_valid, want_test) in pinned.items():
        assert (expected[u][-2][2], expected[u][-1][2]) == (want_valid, want_test)
        got = ml100k.item_raw_ids[[valid[raw_user[int(u)]], test[raw_user[int(u)]]]].tolist()
        assert got == [int(want_valid), int(want_test)], u
    # And every user, not only the named ones.
    for u, rows in expected.items():
        k = raw_user[int(u)]
        assert ml100k.item_raw_ids[test[k]] == int(rows[-1][2]) and ml100k.item_raw_ids[valid[k]] == int(rows[-2][2])


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
            seen = set(hist[indptr[u] : indptr[u + 1]].tolist())
            out.append([i for i in order if i not in seen][:100])
        return np.array(out)

    lists = evaluate_topk(topk, ml100k_split, "test", n_boot=10)
    assert (lists.ranks == dense.ranks).all()


def test_popularity_golden_numbers_on_ml100k(ml100k_split) -> None:
    """The README's popularity row under the hash tie rule: HR@10 0.0870, NDCG@10 0.0423 on test."""
    rep = popularity_report(ml100k_split, "test")
    assert rep.num_users == 943
    assert rep.means["HR@10"] == pytest.approx(0.0870, abs=1e-4)
    assert rep.means["NDCG@10"] == pytest.approx(0.0423, abs=1e-4)
    assert rep.means["Recall@50"] == pytest.approx(0.2206, abs=1e-4)
    assert rep.means["Recall@100"] == pytest.approx(0.3319, abs=1e-4)
    lo, hi = rep.ci95["HR@10"]
    assert lo < rep.means["HR@10"] < hi and hi - lo < 0.04


def test_sampled_users_are_a_fixed_subset_ranked_against_the_whole_catalog(ml100k, ml100k_split) -> None:
    """--eval-users N: N users with a test target, seed 0, sorted; their per-user results equal the
    full evaluation's for the same users (only the users are sampled, never the items), and training
    and histories do not change."""
    sampled = split_dataset(ml100k, eval_users=200)
    users, items = sampled.targets("test")
    assert len(users) == 200 and (np.diff(users) > 0).all() and np.isin(users, ml100k_split.test_user).all()
    assert np.array_equal(users, split_dataset(ml100k, eval_users=200).eval_users)  # fixed
    assert len(sampled.targets("valid")[0]) == 200  # every ml-100k user has a validation target too
    for stage in ("valid", "test"):
        a, b = sampled.history(stage), ml100k_split.history(stage)
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
    full = popularity_report(ml100k_split, "test", n_boot=10)
    part = popularity_report(sampled, "test", n_boot=10)
    assert part.num_users == 200
    assert np.array_equal(full.ranks[np.isin(full.users, users)], part.ranks)
    assert split_dataset(ml100k, eval_users=0).eval_users is None
    assert split_dataset(ml100k, eval_users=5000).eval_users is None  # more than there are: everyone


def test_popularity_matches_an_independent_numpy_implementation(ml100k) -> None:
    """Recompute from raw arrays with no shared code: sort, hold out, count, rank."""
    u, i, t = ml100k.user, ml100k.item, ml100k.timestamp
    key = np.array([_key(a, b) for a, b in zip(ml100k.user_raw_ids[u], ml100k.item_raw_ids[i])], dtype=np.uint64)
    o = np.lexsort((key, t, u))
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
    ours = popularity_report(split_dataset(ml100k), "test", n_boot=10)
    assert ours.means["HR@10"] == pytest.approx((ranks < 10).mean())
    assert ours.means["Recall@100"] == pytest.approx((ranks < 100).mean())


def test_baselines_cli_writes_results(tmp_path) -> None:
    res = baselines_main(["--out", str(tmp_path), "--n-boot", "20"])
    assert res["test"]["HR@10"] == pytest.approx(0.0870, abs=1e-4)
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
        m.update(torch.tensor(probs[k : k + 500]), torch.tensor(labels[k : k + 500]))
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


# ---------------------------------------------------------------------------------------------
# What each rank of a distributed run reads (common/data/split.py: rank_splits)

SPLIT_FIELDS = ("train_user", "train_item", "train_time", "valid_user", "valid_item", "valid_time")
SPLIT_FIELDS += ("test_user", "test_item", "test_time")


def test_the_split_read_in_place_equals_the_sorting_split(ml100k, ml100k_split) -> None:
    """split_dataset reads the data set's own order; leave_last_out sorts shuffled rows again by the
    rule (time, then tie key): the same split."""
    perm = np.random.default_rng(0).permutation(ml100k.num_interactions)
    sorted_again = leave_last_out(
        ml100k.user[perm],
        ml100k.item[perm],
        ml100k.timestamp[perm],
        ml100k.num_users,
        ml100k.num_items,
        user_raw_ids=ml100k.user_raw_ids,
        item_raw_ids=ml100k.item_raw_ids,
    )
    for f in SPLIT_FIELDS:
        assert np.array_equal(getattr(ml100k_split, f), getattr(sorted_again, f)), f
    backwards = dataclasses.replace(ml100k, timestamp=ml100k.timestamp[::-1].copy())
    with pytest.raises(ValueError, match="not in split order"):
        split_dataset(backwards)


def test_rank_shares_and_the_evaluated_users_split_exactly_as_the_whole(ml100k, ml100k_split) -> None:
    full, indptr = ml100k_split, ml100k.indptr
    for world in (2, 3):
        shares = [user_share(indptr, r, world) for r in range(world)]
        assert shares[0][0] == 0 and shares[-1][1] == ml100k.num_users
        assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
        parts = [rank_splits(ml100k, r, world)[0] for r in range(world)]
        examples = [len(p.train_user) for p in parts]  # balanced by training examples, to one user's
        assert max(examples) - min(examples) <= np.diff(indptr).max(), examples
        held = [user_share(indptr, r, world, holdout_last=5) for r in range(world)]
        left = [int(np.maximum(np.diff(indptr)[lo:hi] - 2 - 5, 0).sum()) for lo, hi in held]
        assert max(left) - min(left) <= np.diff(indptr).max(), left  # ... less --holdout-last's
        for f in SPLIT_FIELDS:
            assert np.array_equal(np.concatenate([getattr(p, f) for p in parts]), getattr(full, f)), f
        for stage in STAGES:
            assert np.array_equal(sum(p.item_counts(stage) for p in parts), full.item_counts(stage))
    sampled = split_dataset(ml100k, eval_users=200)
    for world, rank in ((1, 0), (2, 1)):
        _, ev = rank_splits(ml100k, rank, world, eval_users=200)
        assert np.array_equal(ev.eval_users, sampled.eval_users)
        for stage in STAGES:
            (u, t), (u0, t0) = ev.targets(stage), sampled.targets(stage)
            assert np.array_equal(u, u0) and np.array_equal(t, t0)
            (ip, h), (ip0, h0) = ev.history(stage), full.history(stage)
            for user in u.tolist():
                assert np.array_equal(h[ip[user] : ip[user + 1]], h0[ip0[user] : ip0[user + 1]])
    everyone = rank_splits(ml100k, 1, 2)[1]
    assert everyone.eval_users is None and np.array_equal(everyone.test_item, full.test_item)
    ip, h = history_before_test(ml100k)
    ip0, h0 = full.history("test")
    assert np.array_equal(ip, ip0) and np.array_equal(h, h0)


def test_a_rank_reads_only_its_share_and_the_evaluated_users(ml100k) -> None:
    from tests.dist_workers import recorded

    ds, cols = recorded(ml100k)
    share, ev = rank_splits(ds, 1, 2, eval_users=50)
    lo, hi = user_share(ml100k.indptr, 1, 2)
    mine = np.zeros(ml100k.num_interactions, dtype=bool)
    mine[ml100k.indptr[lo] : ml100k.indptr[hi]] = True
    evaluated = np.isin(ml100k.user, ev.eval_users)
    assert 0.4 < mine.mean() < 0.6 and not evaluated[mine].all()
    for name in ("user", "item", "timestamp"):
        assert np.array_equal(cols[name].read, mine | evaluated), name
    assert not cols["rating"].read.any()
    assert len(share.train_user) + len(share.valid_user) + len(share.test_user) == mine.sum()


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_stable_order_is_the_stable_argsort(dtype):
    """The fast stable order equals NumPy's stable argsort, ties (many equal scores, -0.0 and 0.0,
    -inf) to the lower index, NaN last; float32 through its 64-bit keys, the others re-sorted."""
    rng = np.random.default_rng(0)
    rows = [
        rng.standard_normal(5000),
        rng.integers(0, 3, 5000),  # three values: almost everything tied
        np.zeros(5000),
        np.where(rng.random(5000) < 0.5, -np.inf, rng.standard_normal(5000)),
    ]
    scores = np.stack(rows).astype(dtype) if dtype != np.int64 else np.stack(rows[1:3]).astype(dtype)
    if dtype != np.int64:
        scores[0, :10] = -0.0
        scores[0, 10:20] = 0.0
        scores[0, 20:24] = [np.inf, -np.inf, np.nan, 1e-45]  # 1e-45: the least float32 above 0
        scores[0, 30:34] = [-1e-45, np.nan, np.finfo(dtype).max, -np.finfo(dtype).max]
    assert np.array_equal(stable_order(scores), np.argsort(-scores, axis=1, kind="stable"))
    assert np.array_equal(stable_order(scores[0]), np.argsort(-scores[:1], axis=1, kind="stable"))
