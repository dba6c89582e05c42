"""Two-tower retrieval on real ml-100k: quality thresholds, exact resume, export and serving."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from retrieval.two_tower_retrieval import ArtifactError, Retriever
from retrieval.two_tower_retrieval import main as retrieval_main
from retrieval.two_tower_train import main as train_main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def trained(retrieval_run) -> tuple[dict, Path]:
    return retrieval_run


def test_two_epochs_beat_the_thresholds_and_popularity(trained) -> None:
    results, out = trained
    test, pop = results["test"], results["popularity_test"]
    assert test["num_users"] == 943
    # This seeded 2-epoch run over seeds 0, 1, 2: HR@10 0.152 / 0.142 / 0.145, NDCG@10 0.079 / 0.076 /
    # 0.078, Recall@100 0.572 / 0.582 / 0.566; popularity's Recall@100 is 0.332.
    assert test["HR@10"] >= 0.12 and test["NDCG@10"] >= 0.065 and test["Recall@100"] >= 0.53
    assert test["Recall@100"] > pop["Recall@100"] + 0.20
    assert len(results["valid_per_epoch"]) == 2
    saved = json.loads((out / "results.json").read_text())
    assert saved["test"]["Recall@100"] == test["Recall@100"]


def test_served_model_reproduces_training_metrics_and_int8_is_close(trained) -> None:
    results, out = trained
    served = retrieval_main(["--export", str(out / "export"), "--write-candidates", str(out / "cands.jsonl")])
    assert served["test_fp32"]["Recall@100"] == pytest.approx(results["test"]["Recall@100"], abs=1e-9)
    assert abs(served["test_int8"]["Recall@100"] - served["test_fp32"]["Recall@100"]) <= 0.01
    assert served["int8_table_compression"] >= 3.5
    assert served["index_recall_vs_exact"] == 1.0  # a 1682-item catalog gets the exact index
    lines = (out / "cands.jsonl").read_text().splitlines()
    assert len(lines) == 943
    first = json.loads(lines[0])
    assert (
        first["user_id"] == 1
        and len(first["item_ids"]) == 100
        and first["scores"] == sorted(first["scores"], reverse=True)
    )


def test_recommend_excludes_seen_and_handles_cold_start(trained, ml100k) -> None:
    _, out = trained
    r = Retriever(out / "export", k=20)
    recs = r.recommend([1, 99_999, 2])
    assert [x.user_id for x in recs] == [1, 99_999, 2]
    seen = set(ml100k.item_raw_ids[r.history_of(0)].tolist())
    assert len(recs[0].item_ids) == 20 and not seen & set(recs[0].item_ids) and not recs[0].cold_start
    assert recs[1].cold_start and recs[1].item_ids[0] == 50  # Star Wars: the most popular movie
    # New interactions change the next answer: the watched item leaves the list.
    after = r.recommend([1], extra_history={1: [recs[0].item_ids[0]]})[0]
    assert recs[0].item_ids[0] not in after.item_ids
    with_seen = r.recommend([1], exclude_seen=False)[0]
    assert seen & set(with_seen.item_ids)


def test_a_batch_searched_in_groups_by_history_length_answers_as_one_search(trained) -> None:
    """top_k_indices searches a batch in groups by history length (power-of-two room for the seen
    items): the same items and scores as one search with room for the batch's longest history."""
    _, out = trained
    r = Retriever(out / "export", k=100)
    users = np.arange(300)
    hists = [r.history_of(u) for u in users]
    room = np.array([len(h) for h in hists])
    assert len(np.unique(np.ceil(np.log2(room)))) >= 3  # several groups
    q = r.query_embeddings(users, hists)
    scores, items = r.search(q, 100, room)
    want_scores, want_items = r.model.faiss_index.search(q, 100 + int(room.max()))
    for i in range(len(users)):  # each row: its first 100 + its own room agree; the rest is padding or more
        n = 100 + int(room[i])
        assert items[i, :n].tolist() == want_items[i, :n].tolist()
        assert np.allclose(scores[i, :n], want_scores[i, :n])
    got, got_scores = r.top_k_indices(users, 100, histories=hists)
    one = [r.top_k_indices(users[i : i + 1], 100, histories=hists[i : i + 1])[0][0] for i in range(0, 300, 37)]
    assert all(set(got[i * 37]) == set(o) for i, o in enumerate(one))
    assert not any(set(got[i]) & set(hists[i].tolist()) for i in range(len(users)))


def test_the_exact_search_in_torch_is_the_flat_index_search_without_the_seen_items(trained) -> None:
    """A flat index is served as torch ops (scores, seen items masked, top-k); its answer is the exact
    top 100 of the unseen items: each score is the query's dot product with that item, no seen item is
    in it, and no unseen item left out scores higher than the last one kept. FAISS's own search with
    the seen items removed afterwards (the path of every other index type) gives the same lists."""
    _, out = trained
    r = Retriever(out / "export", k=100)
    assert r.item_vectors is not None  # ml-100k's export: a flat index
    users = np.arange(300)
    hists = [r.history_of(u) for u in users]
    hists[5] = np.zeros(0, np.int64)  # a user with no history
    q = r.query_embeddings(users, hists)
    items, scores = r.search_unseen(q, 100, hists)
    all_scores = q @ r.item_vectors.numpy().T
    for i in range(len(users)):
        assert (items[i] >= 0).all() and len(set(items[i].tolist())) == 100
        assert not set(items[i].tolist()) & set(hists[i].tolist())
        assert np.allclose(scores[i], all_scores[i, items[i]], atol=1e-5)
        assert (np.diff(scores[i]) <= 0).all()
        left_out = np.setdiff1d(np.arange(len(all_scores[i])), np.r_[items[i], hists[i]])
        assert all_scores[i, left_out].max() <= scores[i, -1] + 1e-5
    vectors, r.item_vectors = r.item_vectors, None  # FAISS's search, then the seen items filtered out
    faiss_items, faiss_scores = r.search_unseen(q, 100, hists)
    r.item_vectors = vectors
    assert np.allclose(faiss_scores, scores, atol=1e-5)
    assert (faiss_items == items).mean() > 0.99  # the same lists, up to the order of float ties
    # fewer unseen items than k: the rest is padding; no exclusion: the seen items come back
    few_items, few_scores = r.search_unseen(q[:2], 100, [np.arange(r.features.num_items - 40)] * 2)
    assert (few_items[:, :40] >= 0).all() and (few_items[:, 40:] == -1).all() and np.isneginf(few_scores[:, 40:]).all()
    with_seen, _ = r.search_unseen(q[:1], 100, None)
    assert set(with_seen[0].tolist()) & set(hists[0].tolist())


def test_an_export_in_the_older_json_layout_still_serves_the_same(trained, tmp_path: Path) -> None:
    """two_tower_retrieval/2 keeps ID maps, histories and popularity as .npy; a /1 export (JSON lists
    in features.json) still loads and answers the same."""
    _, out = trained
    assert json.loads((out / "export" / "manifest.json").read_text())["format"] == "two_tower_retrieval/2"
    old = _copy_export(out, tmp_path)
    serving = json.loads((old / "features.json").read_text())
    assert set(serving) == {"features"}  # the arrays are not in the JSON any more
    for name in ("user_raw_ids", "item_raw_ids", "history_indptr", "history_items", "item_counts"):
        serving[name] = np.load(old / f"{name}.npy").tolist()
        (old / f"{name}.npy").unlink()
    (old / "features.json").write_text(json.dumps(serving))
    _edit_manifest(old, lambda m: m.update(format="two_tower_retrieval/1", files={}))
    users = [1, 2, 99_999]
    assert Retriever(old, k=20).recommend(users) == Retriever(out / "export", k=20).recommend(users)


def test_recommend_from_raw_features(trained, ml100k) -> None:
    from common.data.movielens import user_record

    _, out = trained
    r = Retriever(out / "export", k=10)
    history = [50, 181, 172]  # Star Wars, Return of the Jedi, The Empire Strikes Back
    # Records hold the data set's own user columns (MovieLens's raw fields mapped onto them).
    new = {"user_id": None, **user_record(30, "F", "engineer", "94043"), "history": history}
    known = {"user_id": 1, **user_record(24, "M", "technician", "85711"), "history": history}
    nothing = {"user_id": 123_456, **user_record(30, "M", "writer", "10001"), "history": []}
    recs = r.recommend_features([new, known, nothing])
    assert not recs[0].cold_start and len(recs[0].item_ids) == 10 and not set(history) & set(recs[0].item_ids)
    assert not recs[1].cold_start and recs[1].item_ids != recs[0].item_ids  # the ID embedding counts
    assert recs[2].cold_start and recs[2].item_ids == r.recommend([123_456], k=10)[0].item_ids
    from common.features import FeatureError

    with pytest.raises(FeatureError, match="record 0: unknown occupation 'astronaut'"):
        r.recommend_features([{**new, "occupation": "astronaut"}])
    with pytest.raises(FeatureError, match=r"record 0: missing user field 'zip_region'"):
        r.recommend_features([{k: v for k, v in new.items() if k != "zip_region"}])
    with pytest.raises(FeatureError, match="not in the catalog: \\[99999\\]"):
        r.recommend_features([{**new, "history": [99_999]}])


def _copy_export(out: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "export"
    shutil.copytree(out / "export", dst)
    return dst


def _edit_manifest(export: Path, edit) -> None:
    m = json.loads((export / "manifest.json").read_text())
    edit(m)
    (export / "manifest.json").write_text(json.dumps(m))


@pytest.mark.slow
def test_the_compiled_query_tower_serves_like_the_eager_one_and_falls_back_with_the_reason(
    trained, tmp_path: Path, caplog
) -> None:
    """``python -m inference_legacy.aot_compile EXPORT`` compiles the INT8 query tower; the Retriever
    serves it (the same top 100 as the eager tower, query vectors within the recorded tolerance), and
    without its package, or with an altered one, serves the eager tower and logs why."""
    from inference_legacy.aot_compile import main as compile_main

    _, out = trained
    export = _copy_export(out, tmp_path / "compiled")
    entry = compile_main([str(export)])[str(export)]
    assert entry["file"] == "query_tower.aoti.pt2" and entry["quantize"] == "int8"
    assert entry["check_rows"] == 256 and entry["max_abs_diff"] <= entry["tolerance"] <= 1e-5
    compiled, eager = Retriever(export), Retriever(export, compiled=False)
    assert compiled.runtime == "AOTInductor" and eager.runtime == "eager"
    users = np.arange(943)
    hists = [compiled.history_of(u) for u in users]
    q_c, q_e = compiled.query_embeddings(users, hists), eager.query_embeddings(users, hists)
    assert np.abs(q_c - q_e).max() <= entry["tolerance"]
    (items_c, _), (items_e, _) = compiled.top_k_indices(users, 100), eager.top_k_indices(users, 100)
    assert (items_c == items_e).mean() > 0.999  # only near-ties may swap
    assert [r.item_ids[:10] for r in compiled.recommend([1, 99_999])] == [
        r.item_ids[:10] for r in eager.recommend([1, 99_999])
    ]

    caplog.set_level("INFO", logger="common.compiled")
    data = bytearray((export / "query_tower.aoti.pt2").read_bytes())
    data[-100] ^= 1
    (export / "query_tower.aoti.pt2").write_bytes(bytes(data))
    altered = Retriever(export)
    assert altered.runtime.startswith("eager: ") and "does not match the manifest's size and SHA-256" in altered.runtime
    (export / "query_tower.aoti.pt2").unlink()
    assert "is missing" in Retriever(export).runtime
    _edit_manifest(export, lambda m: m.pop("compiled"))
    assert "no compiled package" in Retriever(export).runtime
    messages = [r.getMessage() for r in caplog.records if r.name == "common.compiled"]
    assert [("SHA-256" in m, "is missing" in m, "no compiled package" in m) for m in messages] == [
        (True, False, False),
        (False, True, False),
        (False, False, True),
    ]
    assert Retriever(export).top_k_indices(users, 100)[0].tolist() == items_e.tolist()


def test_mismatched_artifacts_fail_at_load_time(trained, tmp_path: Path) -> None:
    _, out = trained
    wrong_dim = _copy_export(out, tmp_path / "a")
    _edit_manifest(wrong_dim, lambda m: m.update(embedding_dim=32))
    with pytest.raises(ArtifactError, match="(?s)weights don't fit .*size mismatch"):
        Retriever(wrong_dim)

    missing_key = _copy_export(out, tmp_path / "b")
    _edit_manifest(missing_key, lambda m: m["query_schema"]["sparse"].pop(1))  # drop age_bucket
    with pytest.raises(ArtifactError, match="query schema and features.json disagree"):
        Retriever(missing_key)

    other_index = _copy_export(out, tmp_path / "c")
    faiss.write_index(faiss.IndexFlatIP(64), str(other_index / "index.faiss"))
    with pytest.raises(ArtifactError, match="index.faiss does not match the manifest's SHA-256"):
        Retriever(other_index)

    # Even with a manifest that vouches for it, an index of the wrong shape is refused.
    import hashlib

    idx = faiss.IndexFlatIP(32)
    idx.add(np.random.default_rng(0).standard_normal((1682, 32)).astype(np.float32))
    faiss.write_index(idx, str(other_index / "index.faiss"))
    sha = hashlib.sha256((other_index / "index.faiss").read_bytes()).hexdigest()
    _edit_manifest(other_index, lambda m: m["files"].update({"index.faiss": sha}))
    with pytest.raises(ArtifactError, match="dimension 32, .* from another model"):
        Retriever(other_index)

    extra_weight = _copy_export(out, tmp_path / "d")
    w = torch.load(extra_weight / "weights.pt")
    w["query_tower"]["mlp.9.weight"] = torch.zeros(1)
    torch.save(w, extra_weight / "weights.pt")
    sha = hashlib.sha256((extra_weight / "weights.pt").read_bytes()).hexdigest()
    _edit_manifest(extra_weight, lambda m: m["files"].update({"weights.pt": sha}))
    with pytest.raises(ArtifactError, match="(?s)Unexpected key.*mlp.9.weight"):
        Retriever(extra_weight)

    with pytest.raises(ArtifactError, match="train first"):
        Retriever(tmp_path / "nothing")


def test_one_seed_trains_the_same_two_tower_in_another_process(tmp_path: Path) -> None:
    """Reproducible from its seed: a run in a subprocess (as make demo runs it) and one in this
    process export the same item vectors to the bit and report the same metrics."""
    args = ["--epochs", "1", "--limit-batches", "30", "--n-boot", "10", "--log-every", "1000", "--embedding-dim", "32"]
    subprocess.run(
        [sys.executable, "-m", "retrieval.two_tower_train", *args, "--out", str(tmp_path / "a")],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    b = train_main(args + ["--out", str(tmp_path / "b")])
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    assert a["test"] == b["test"] and a["valid_per_epoch"] == b["valid_per_epoch"]
    vectors = [np.load(tmp_path / run / "export" / "item_embeddings.npy") for run in ("a", "b")]
    assert np.array_equal(*vectors)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_metrics(tmp_path: Path) -> None:
    args = [
        "--epochs",
        "2",
        "--checkpoint-every",
        "40",
        "--n-boot",
        "20",
        "--log-every",
        "1000",
        "--embedding-dim",
        "32",
        "--layer-sizes",
        "64",
        "32",
    ]
    reference = train_main(args + ["--out", str(tmp_path / "ref")])
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "retrieval.two_tower_train", *args, "--out", str(killed)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list((killed / "checkpoints").glob("step_*/meta.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    metas = [json.loads(p.read_text()) for p in (killed / "checkpoints").glob("step_*/meta.json")]
    assert metas and not (killed / "results.json").exists(), "the run finished before it could be killed"
    with pytest.raises(FileExistsError, match="--resume"):
        train_main(args + ["--out", str(killed)])  # a new run must not take over the killed one's checkpoints
    resumed = train_main(args + ["--out", str(killed), "--resume"])
    assert resumed["resumed_from_step"] == max(m["global_step"] for m in metas) > 0
    assert resumed["steps"] == reference["steps"]
    assert resumed["test"] == reference["test"]
    assert resumed["valid_per_epoch"] == reference["valid_per_epoch"]


@pytest.mark.multiprocess
def test_torchrun_two_processes(tmp_path: Path) -> None:
    from tests.conftest import torchrun

    out = tmp_path / "run"
    args = ["--epochs", "1", "--limit-batches", "40", "--batch-size", "256", "--n-boot", "20", "--out", str(out)]
    torchrun("retrieval.two_tower_train", args)
    res = json.loads((out / "results.json").read_text())
    assert res["world_size"] == 2 and res["test"]["num_users"] == 943
    assert res["test"]["Recall@100"] > res["popularity_test"]["Recall@100"]
    assert Retriever(out / "export").recommend([1])[0].item_ids


def test_holdout_last_leaves_each_users_latest_interactions_out(ml100k, ml100k_split) -> None:
    from retrieval.modules.feature_processor import TwoTowerFeatures
    from retrieval.two_tower_train import TrainExamples

    feats = TwoTowerFeatures.from_dataset(ml100k)
    full = TrainExamples(feats, ml100k_split, 512, 0, seed=0)
    held = TrainExamples(feats, ml100k_split, 512, 0, seed=0, holdout_last=2)
    assert full.num_examples - held.num_examples == 2 * 943
    last_row = np.r_[np.flatnonzero(np.diff(ml100k_split.train_user)), len(ml100k_split.train_user) - 1]
    assert not set(last_row.tolist()) & set(held.rows.tolist())
    rows = np.concatenate([b.item_ids.numpy() for b in held.batches(epoch=0, limit=3)])
    assert len(rows) == 3 * 512


def test_the_large_catalog_index_re_ranks_exactly_and_keeps_its_settings(tmp_path: Path) -> None:
    """ivf_pq_refine, the default above 100k items: the scores it returns are the exact inner
    products (its shortlist is re-ranked with the stored vectors), probing every list finds the
    exact top 100, and written and read back it searches with the settings it was built with."""
    from retrieval.modules.index import (
        build_index,
        default_index_type,
        recall_against_exact,
        refine_nprobe,
        set_search_params,
    )

    assert (default_index_type(100_000), default_index_type(100_001)) == ("flat", "ivf_pq_refine")
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((100, 32)).astype(np.float32)
    x = centers[rng.integers(0, 100, 20_000)] + 0.3 * rng.standard_normal((20_000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index, kind, params = build_index("ivf_pq_refine", x)
    # 20k items probe about half the lists (refine_nprobe: 1/20 x (1M / N)^0.6), 1M items 1/20
    assert params == {"nlist": 512, "nprobe": 268, "m": 32, "k_factor": 4}
    assert [refine_nprobe(4000, 1_000_000), refine_nprobe(1788, 200_000), refine_nprobe(8000, 4_000_000)] == [
        200,
        235,
        400,
    ]
    queries = x[rng.choice(len(x), 200, replace=False)]
    exact = np.argsort(-(queries @ x.T), axis=1, kind="stable")[:, :100]
    scores, ids = index.search(queries, 100)
    assert np.allclose(scores, np.take_along_axis(queries @ x.T, ids, 1), atol=1e-5)
    assert recall_against_exact(ids, exact) > 0.9
    path = tmp_path / "index.faiss"
    faiss.write_index(index, str(path))
    back = faiss.read_index(str(path))
    assert np.array_equal(back.search(queries, 100)[1], ids)
    set_search_params(back, {"nprobe": params["nlist"], "k_factor": 8})
    assert recall_against_exact(back.search(queries, 100)[1], exact) > 0.99
    set_search_params(back, params)
    assert np.array_equal(back.search(queries, 100)[1], ids)
