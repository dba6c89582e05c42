"""Target perturbation: nothing a model learns from, or is served with, may depend on the targets.

Every validation and test target of ml-100k, with its timestamp, is replaced by another item and a
later time. Then, for each stage that learns from order (two-tower retrieval, the DLRM ranker,
BERT4Rec, SASRec, the pipeline's feature store, the union ranker), the training batches, and the features and candidates
built to predict ``valid``, must be bit-identical to those of the real data. For ``test`` only the
test target is replaced (the validation item is legitimately part of the test-time history).

Candidates come from seeded, untrained models: with identical inputs they give identical lists,
and any input that leaked a target would change them. Each check is also run with a deliberate
leak patched in, and must then report a difference: these tests can fail.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from common.data.dataset import InteractionData
from common.data.split import Split, split_dataset

STAGES = {"valid": ("valid", "test"), "test": ("test",)}  # stage predicted -> targets replaced


def perturb(ds: InteractionData, replace: tuple[str, ...], seed: int = 0) -> InteractionData:
    """``ds`` with each user's validation and/or test interaction moved to another item and a later,
    distinct time (still the user's last two, so still the targets)."""
    counts = np.bincount(ds.user, minlength=ds.num_users)
    assert counts.min() >= 3, "every user needs train, valid and test interactions"
    end = np.cumsum(counts)
    rng = np.random.default_rng(seed)
    item, time = ds.item.copy(), ds.timestamp.copy()
    valid_row, test_row = end - 2, end - 1
    if "valid" in replace:
        item[valid_row] = (item[valid_row] + rng.integers(1, ds.num_items, len(end))) % ds.num_items
        time[valid_row] = time[end - 3] + rng.integers(1, 10**6, len(end))
    if "test" in replace:
        item[test_row] = (item[test_row] + rng.integers(1, ds.num_items, len(end))) % ds.num_items
        time[test_row] = time[valid_row] + rng.integers(1, 10**6, len(end))
    return dataclasses.replace(ds, item=item, timestamp=time)


def differences(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> list[str]:
    """Names of the arrays that are not bit-identical (shape, dtype and every value)."""
    assert a.keys() == b.keys()
    return [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not np.array_equal(a[k], b[k])]


def _kjt(prefix: str, kjt) -> dict[str, np.ndarray]:
    return {
        f"{prefix}.keys": np.array(kjt.keys()),
        f"{prefix}.values": kjt.values().numpy(),
        f"{prefix}.lengths": kjt.lengths().numpy(),
    }


def _top100(scores: torch.Tensor, split: Split, stage: str) -> np.ndarray:
    indptr, hist = split.history(stage)
    scores = scores.clone()
    for u in range(split.num_users if not split.repeats else 0):  # with repeats nothing is excluded
        scores[u, hist[indptr[u] : indptr[u + 1]]] = -torch.inf
    return torch.topk(scores, 100, dim=1).indices.numpy()


# ---------------------------------------------------------------------------------------------
# Each stage's training batches, served features and candidates, as named arrays.


def _two_tower(ds: InteractionData, split: Split):
    from retrieval.modules.feature_processor import TwoTowerFeatures
    from retrieval.modules.two_tower import TwoTower
    from retrieval.two_tower_train import TrainExamples

    features = TwoTowerFeatures.from_dataset(ds, history_len=50)
    examples = TrainExamples(features, split, batch_size=512, rank=0, seed=0, user_id_dropout=0.1)
    torch.manual_seed(0)
    model = TwoTower(features.query_schema, features.candidate_schema, 32, [32], examples.item_counts, 0.05)
    return features, examples, model.eval()


def retrieval_arrays(ds: InteractionData, stage: str) -> dict[str, np.ndarray]:
    from retrieval import two_tower_train

    split = split_dataset(ds)
    features, examples, model = _two_tower(ds, split)
    out = {"train.item_counts": examples.item_counts}
    for k, b in enumerate(examples.batches(epoch=0)):
        out |= _kjt(f"train.{k}.query", b.query) | _kjt(f"train.{k}.candidate", b.candidate)
        out[f"train.{k}.items"] = b.item_ids.numpy()
    users = np.arange(ds.num_users)
    query = features.query_batch(users, two_tower_train.query_histories(split, stage, users, features.history_len))
    out |= _kjt(f"{stage}.query", query.sparse)
    with torch.no_grad():
        scores = (
            model.query_tower(query.sparse)
            @ model.candidate_tower(features.candidate_batch(np.arange(ds.num_items)).sparse).T
        )
    out[f"{stage}.candidates"] = _top100(scores, split, stage)
    return out


def _retrieval_scorer(ds: InteractionData, split: Split, features):
    """train_dlrm's RetrievalScorer over the seeded untrained two-tower (no export on disk)."""
    from candidates.sources import RetrievalScorer

    tt, _, model = _two_tower(ds, split)
    scorer = RetrievalScorer.__new__(RetrievalScorer)
    scorer.tower, scorer.tt, scorer.index = model.query_tower, tt, None
    with torch.no_grad():
        scorer.items = model.candidate_tower(tt.candidate_batch(np.arange(ds.num_items)).sparse).numpy()
    return scorer


def _ranking_batch(out: dict, prefix: str, batch) -> None:
    out[f"{prefix}.dense"] = batch.dense_features.numpy()
    out[f"{prefix}.labels"] = batch.labels.numpy()
    out |= _kjt(prefix, batch.sparse_features)


def ranker_arrays(ds: InteractionData, stage: str) -> dict[str, np.ndarray]:
    from golden_training import train_dlrm
    from golden_training.evaluation import candidate_rows, eval_set, make_batch
    from golden_training.ranking_data import RankingFeatures, train_examples

    split = split_dataset(ds)
    cfg = train_dlrm.Config()
    features = RankingFeatures.build(ds, split, cfg.history_len, cfg.sequence_features, cfg.trend_days)
    retr = _retrieval_scorer(ds, split, features)
    examples, queries = train_examples(split, features, cfg, retr)
    seq = features.sequence
    out = {
        "features.item_counts": features.item_counts,
        "sequence.pair_keys": seq.pair_keys,
        "sequence.pair_counts": seq.pair_counts,
        "sequence.item_time": seq.item_time,
        "train.queries": queries,
    }
    fields = {f.name: getattr(examples, f.name) for f in dataclasses.fields(examples) if f.name != "own"}
    out |= {f"train.{name}": value for name, value in fields.items() if value is not None}
    perm = np.random.default_rng([cfg.seed, 10, 0]).permutation(len(examples))
    for k in range(20):  # the first 20 batches the trainer feeds, built the trainer's way
        rows = perm[k * cfg.batch_size : (k + 1) * cfg.batch_size]
        _ranking_batch(out, f"train.{k}", make_batch(features, examples.take(rows), queries, retr, cfg.history_len))
    ev = eval_set(split, features, stage, cfg, retr)
    out[f"{stage}.candidates"], out[f"{stage}.queries"], out[f"{stage}.time"] = ev.candidates, ev.queries, ev.time
    _ranking_batch(
        out,
        f"{stage}.candidate_rows",
        make_batch(features, candidate_rows(ev), ev.queries, retr, cfg.history_len),
    )
    return out


def _sequential_arrays(ds: InteractionData, stage: str, name: str) -> dict[str, np.ndarray]:
    """Training batches and candidates of a sequential stage (bert4rec/, sasrec/), built its way."""
    import importlib

    from bert4rec import bert4rec_main as sequential
    from bert4rec.scorer import make_model

    main = importlib.import_module(f"{name}.{name}_main")
    split = split_dataset(ds)
    cfg = main.Config()
    windows = sequential.training_windows(split, cfg.max_len, cfg.window_step)
    order = sequential.length_buckets(windows, cfg.batch_size, np.random.default_rng([cfg.seed, 0]))
    torch.manual_seed(0)
    settings = {**dataclasses.asdict(cfg), "embedding_dim": 32, "num_layers": 1}
    model = make_model(name, settings, ds.num_items, dropout=0.0).eval()
    rng = np.random.default_rng([cfg.seed, 0, 0])
    out = {"train.order": order}
    for k in range(len(windows) // cfg.batch_size):
        rows = order[k * cfg.batch_size : (k + 1) * cfg.batch_size]
        seq, at_row, at_col, labels = main.training_batch(cfg, [windows[i] for i in rows], rng, model)
        out |= _kjt(f"train.{k}.seq", seq)
        out[f"train.{k}.rows"], out[f"train.{k}.cols"], out[f"train.{k}.labels"] = (
            at_row.numpy(),
            at_col.numpy(),
            labels.numpy(),
        )
    indptr, hist = split.history(stage)
    seqs = model.query_sequences([hist[indptr[u] : indptr[u + 1]] for u in range(ds.num_users)])
    out[f"{stage}.sequences"] = np.concatenate(seqs)
    out[f"{stage}.candidates"] = _top100(sequential.Scorer(model, split, stage).scores, split, stage)
    return out


def bert4rec_arrays(ds: InteractionData, stage: str) -> dict[str, np.ndarray]:
    return _sequential_arrays(ds, stage, "bert4rec")


def sasrec_arrays(ds: InteractionData, stage: str) -> dict[str, np.ndarray]:
    return _sequential_arrays(ds, stage, "sasrec")


def feature_store_arrays(ds: InteractionData, stage: str) -> dict[str, np.ndarray]:
    from integration.feature_store import FeatureStore

    split = split_dataset(ds)
    store = FeatureStore.build(ds, split, history_len=50, sequence=True, trend_days=30.0, stage=stage)
    retr = _retrieval_scorer(ds, split, store.features)
    users = np.arange(ds.num_users)
    indptr, hist = split.history(stage)
    queries = retr.queries(users, hist, indptr[:-1], indptr[1:])
    items = retr.top_k(queries, [store.history(u) for u in users])
    scores = np.einsum("nd,nkd->nk", queries, retr.items[items])
    dense, values, lengths = store.ranking_inputs(users, items, scores)
    return {
        f"{stage}.histories": np.concatenate([store.history(u) for u in users]),
        f"{stage}.history_lengths": np.array([len(h) for h in store.histories]),
        f"{stage}.history_times": np.concatenate([store.timed_history(u)[1] for u in users]),
        f"{stage}.now": store.last_time,
        f"{stage}.candidates": items,
        f"{stage}.dense": dense.numpy(),
        f"{stage}.values": values.numpy(),
        f"{stage}.lengths": lengths.numpy(),
    }


def union_ranker_arrays(ds: InteractionData, stage: str) -> dict[str, np.ndarray]:
    """The union ranker's lists (integration/union_ranker.py), built its way from sources fitted on the
    training split (popularity, EASE, the transitions; "again" with repeats): the validation lists it
    trains on, with their labels when predicting test, and the lists of ``stage`` it ranks, without
    (their labels are the targets, which only the training lists may read)."""
    from candidates.again import AgainSource
    from candidates.sources import ItemItemSource, PopularitySource
    from integration import union_ranker
    from integration.feature_store import FeatureStore
    from retrieval.item_item import Config, ItemItem

    split = split_dataset(ds)
    export = ItemItem.fit(split, Config())
    sources = [
        PopularitySource(split.item_counts("valid"), ds.repeats),
        *(ItemItemSource(name, export, ds.repeats) for name in ("EASE", "transitions")),
        *([AgainSource(split.num_items, 30)] if ds.repeats else []),
    ]
    cfg = union_ranker.parse_args(["--lists-per-batch", "64", "--ids"])  # with_repeats' log has no categoricals
    out: dict[str, np.ndarray] = {}
    for st in dict.fromkeys(("valid", stage)):
        store = FeatureStore.build(ds, split, history_len=50, sequence=True, trend_days=30.0, stage=st)
        users = split.targets(st)[0]
        lists = union_ranker.stage_lists(
            split, store, sources, {"EASE": 0.5, "transitions": 0.5}, None, np.arange(len(users)), cfg
        )
        out[f"{st}.candidates"], out[f"{st}.provenance"] = lists.union.items, lists.union.features
        for j, b in enumerate(lists.batches[:4]):
            _ranking_batch(out, f"{st}.{j}", b)
            if st == stage:
                del out[f"{st}.{j}.labels"]
    return out


STAGE_ARRAYS = {
    "retrieval": retrieval_arrays,
    "ranker": ranker_arrays,
    "bert4rec": bert4rec_arrays,
    "sasrec": sasrec_arrays,
    "feature_store": feature_store_arrays,
    "union_ranker": union_ranker_arrays,
}


# ---------------------------------------------------------------------------------------------
# Deliberate leaks, one per stage, each a plausible bug.


def _leak_retrieval(monkeypatch) -> None:
    """The query tower sees the history as it stands at test time, whatever the stage."""
    from retrieval import two_tower_train

    real = two_tower_train.query_histories
    monkeypatch.setattr(
        two_tower_train, "query_histories", lambda split, stage, users, n: real(split, "test", users, n)
    )


def _target_time(split, stage, users):
    """A wrong "now" for a prediction: the target's own timestamp (so item_trend counts up to it)."""
    tu, tt = (split.valid_user, split.valid_time) if stage == "valid" else (split.test_user, split.test_time)
    return tt[np.searchsorted(tu, users)]


def _leak_ranker(monkeypatch) -> None:
    """'Now' for a prediction is the target's own timestamp."""
    from golden_training import evaluation

    monkeypatch.setattr(evaluation, "reference_time", _target_time)


def _leak_sequential(monkeypatch) -> None:
    """Training windows cut from the history through validation (the validation target trained on)."""
    from bert4rec import bert4rec_main as sequential

    real = sequential.training_windows

    def leaky(split, max_len, step):
        indptr, items = split.history("test")
        users = np.repeat(np.arange(split.num_users), np.diff(indptr))
        return real(dataclasses.replace(split, train_user=users, train_item=items), max_len, step)

    monkeypatch.setattr(sequential, "training_windows", leaky)


def _leak_feature_store(monkeypatch) -> None:
    """The store's histories built one stage too late."""
    from integration.feature_store import FeatureStore

    real = FeatureStore.build.__func__
    monkeypatch.setattr(
        FeatureStore,
        "build",
        classmethod(lambda cls, ds, split, *a, stage="test", **k: real(cls, ds, split, *a, stage="test", **k)),
    )


def _leak_union_ranker(monkeypatch) -> None:
    """The union ranker's "now" for a list (the store's, as serving reads it) is its target's timestamp."""
    from integration import feature_store

    monkeypatch.setattr(feature_store, "reference_time", _target_time)


LEAKS = {
    "retrieval": _leak_retrieval,
    "ranker": _leak_ranker,
    "bert4rec": _leak_sequential,
    "sasrec": _leak_sequential,
    "feature_store": _leak_feature_store,
    "union_ranker": _leak_union_ranker,
}


# ---------------------------------------------------------------------------------------------


def test_perturbation_replaces_every_target_and_keeps_training(ml100k, ml100k_split) -> None:
    for stage, replace in STAGES.items():
        p = split_dataset(perturb(ml100k, replace))
        for part in ("user", "item", "time"):
            assert np.array_equal(getattr(p, f"train_{part}"), getattr(ml100k_split, f"train_{part}"))
        for target in replace:
            assert (getattr(p, f"{target}_item") != getattr(ml100k_split, f"{target}_item")).all()
            assert (getattr(p, f"{target}_time") != getattr(ml100k_split, f"{target}_time")).all()
        if stage == "test":
            assert np.array_equal(p.valid_item, ml100k_split.valid_item)


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("name", list(STAGE_ARRAYS))
def test_targets_do_not_reach_training_or_serving(ml100k, name: str, stage: str) -> None:
    real = STAGE_ARRAYS[name](ml100k, stage)
    moved = STAGE_ARRAYS[name](perturb(ml100k, STAGES[stage]), stage)
    assert len(real) > 3 and f"{stage}.candidates" in real
    assert differences(real, moved) == []


@pytest.mark.parametrize("name", list(STAGE_ARRAYS))
def test_the_perturbation_check_catches_a_deliberate_leak(ml100k, name: str, monkeypatch) -> None:
    LEAKS[name](monkeypatch)
    real = STAGE_ARRAYS[name](ml100k, "valid")
    moved = STAGE_ARRAYS[name](perturb(ml100k, STAGES["valid"]), "valid")
    assert differences(real, moved), f"the {name} leak went unnoticed"


@pytest.mark.parametrize(
    "trainer, args",
    [
        ("retrieval.two_tower_train", ["--epochs", "1", "--limit-batches", "3", "--log-every", "1000"]),
        (
            "golden_training.train_dlrm",
            ["--limit-batches", "3", "--no-baseline", "--eval-negatives", "5", "--log-every", "1000"],
        ),
        ("bert4rec.bert4rec_main", ["--epochs", "1", "--eval-every", "1", "--window-step", "50"]),
        ("sasrec.sasrec_main", ["--epochs", "1", "--eval-every", "1", "--window-step", "200"]),
    ],
)
def test_no_test_flag_never_reads_a_test_target(trainer: str, args: list[str], tmp_path, monkeypatch) -> None:
    """--no-test runs (model selection) end on validation; any read of test's targets raises."""
    import importlib

    real = Split.targets

    def guarded(self, stage):
        if stage == "test":
            raise AssertionError("a --no-test run read the test targets")
        return real(self, stage)

    monkeypatch.setattr(Split, "targets", guarded)
    res = importlib.import_module(trainer).main(args + ["--no-test", "--n-boot", "5", "--out", str(tmp_path)])
    tables = res.get("dlrm", res)  # train_dlrm nests each model's figures
    assert "valid" in tables and not any(key.startswith("test") for key in (*res, *tables))
    with pytest.raises(AssertionError, match="read the test targets"):  # the guard itself bites
        split_dataset(_tiny()).targets("test")


def _tiny() -> InteractionData:
    return InteractionData(
        "tiny",
        "test",
        np.array([0, 0, 0]),
        np.array([0, 1, 2]),
        np.ones(3, np.float32),
        np.array([1, 2, 3]),
        np.array([1]),
        np.array([1, 2, 3]),
    )


# ---------------------------------------------------------------------------------------------
# Logs where people come back (``repeats``): a repeat is a valid target, histories are inputs only.


def with_repeats(
    ds: InteractionData, users: int = 300, share: float = 0.3, seed: int = 0, delay: int = 1
) -> InteractionData:
    """The first ``users`` users of ``ds``, each coming back to ``share`` of their items a second
    later (``delay`` > 1: 1 to ``delay`` - 1 seconds later, drawn), declared a log with repeats."""
    from common.data.dataset import build_dataset

    keep = ds.user < users
    user, item, time = ds.user[keep], ds.item[keep], ds.timestamp[keep]
    rng = np.random.default_rng(seed)
    again = rng.random(len(user)) < share
    # right after the first time by default (MovieLens's bursts would make most targets repeats)
    later = time[again] + (rng.integers(1, delay, again.sum()) if delay > 1 else 1)
    return build_dataset(
        "ml-100k-repeats",
        "test",
        ds.user_raw_ids[np.r_[user, user[again]]],
        ds.item_raw_ids[np.r_[item, item[again]]],
        np.r_[time, later],
        repeats=True,
    )


def test_a_repeat_target_is_reachable_and_reported_apart() -> None:
    """User 1 had item 10 before and buys it again last: with repeats the scorer that puts it first
    hits it (without, the same list is a miss), and the report gives repeat and new targets apart."""
    from common.data.dataset import build_dataset
    from common.metrics import evaluate_scores

    def tiny(repeats: bool) -> Split:
        ds = build_dataset(
            "tiny",
            "test",
            np.array([1, 1, 1, 1, 2, 2, 2]),
            np.array([10, 11, 12, 10, 10, 11, 12]),  # user 1: a repeat target; user 2: a new one
            np.array([1, 2, 3, 4, 1, 2, 3]),
            repeats=repeats,
        )
        return split_dataset(ds)

    def history_first(split: Split, stage: str):
        indptr, hist = split.history(stage)

        def score(users: torch.Tensor) -> torch.Tensor:
            s = torch.zeros(len(users), split.num_items)
            for r, u in enumerate(users.tolist()):
                s[r, hist[indptr[u] : indptr[u + 1]]] = 1.0 + torch.arange(indptr[u + 1] - indptr[u]) / 10
            return s

        return score

    rep = tiny(True)
    assert rep.repeats and rep.excluded("test", np.array([0])) is None
    report = evaluate_scores(history_first(rep, "test"), rep, "test", n_boot=10)
    assert report.group_users == {"repeat": 1, "new": 1}
    assert report.means["HR@10 repeat"] == 1.0 and report.means["HR@10 new"] == 1.0  # the new one: rank 2 of 3
    assert report.ranks.tolist() == [2, 2]  # item 10 after 12 and 11 (the later ones): seen items listed
    once = tiny(False)
    report = evaluate_scores(history_first(once, "test"), once, "test", n_boot=10)
    assert report.group_users == {} and "HR@10 repeat" not in report.means
    assert report.ranks.tolist()[0] == 100  # seen items out: the repeat target cannot be hit
    assert once.excluded("test", np.array([0]))[0].tolist() == [0, 1, 2]


def test_with_repeats_has_repeat_targets_and_histories(ml100k) -> None:
    ds = with_repeats(ml100k)
    split = split_dataset(ds)
    users, targets = split.targets("test")
    repeat = split.is_repeat("test", users, targets)
    assert ds.repeats and split.repeats and 0.1 < repeat.mean() < 0.9
    indptr, hist = split.history("valid")
    dup = [len(np.unique(hist[indptr[u] : indptr[u + 1]])) < indptr[u + 1] - indptr[u] for u in range(ds.num_users)]
    assert np.mean(dup) > 0.9


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("name", list(STAGE_ARRAYS))
def test_targets_do_not_reach_training_or_serving_with_repeats(ml100k, name: str, stage: str) -> None:
    ds = with_repeats(ml100k)
    real = STAGE_ARRAYS[name](ds, stage)
    moved = STAGE_ARRAYS[name](perturb(ds, STAGES[stage]), stage)
    assert differences(real, moved) == []


@pytest.mark.parametrize("name", ["retrieval", "ranker", "bert4rec", "feature_store", "union_ranker"])
def test_the_perturbation_check_catches_a_deliberate_leak_with_repeats(ml100k, name: str, monkeypatch) -> None:
    LEAKS[name](monkeypatch)
    ds = with_repeats(ml100k)
    real = STAGE_ARRAYS[name](ds, "valid")
    moved = STAGE_ARRAYS[name](perturb(ds, STAGES["valid"]), "valid")
    assert differences(real, moved), f"the {name} leak went unnoticed with repeats"
