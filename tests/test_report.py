"""What people look at besides the tables: every training script's metrics.jsonl (and TensorBoard),
the charts of `make report`, messages that do not garble progress bars, no planner warning."""

from __future__ import annotations

import io
import json
import logging
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from tqdm import tqdm

from bench import report
from common.runtime import MetricsLog, init_runtime, print0, shutdown


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "fixture, stage, valid_key",
    [
        ("retrieval_run", "two_tower", "NDCG@10"),
        ("ranking_run", "dlrm", "auc"),
        ("bert4rec_run", "bert4rec", "NDCG@10"),
    ],
)
def test_training_scripts_write_their_curves(request, fixture: str, stage: str, valid_key: str) -> None:
    results, out = request.getfixturevalue(fixture)
    lines = _lines(out)
    train = [x for x in lines if x["split"] == "train"]
    valid = [x for x in lines if x["split"] == "valid"]
    assert train and valid and {x["stage"] for x in lines} == {stage}
    assert all(math.isfinite(x["loss"]) and x["examples_per_s"] > 0 for x in train)
    assert [x["step"] for x in train] == sorted(x["step"] for x in train)
    assert all(0 <= x[valid_key] <= 1 for x in valid)
    if stage == "two_tower":  # the fixture runs it with --tensorboard; metrics.jsonl holds what it printed
        assert len(valid) == 2 and valid[-1]["NDCG@10"] == pytest.approx(results["valid_per_epoch"][-1]["NDCG@10"])
        events = list((out / "tensorboard").glob("events.out.tfevents.*"))
        assert events and events[0].stat().st_size > 0


def test_metrics_log_appends_and_only_rank_0_writes(tmp_path, monkeypatch) -> None:
    log = MetricsLog(tmp_path, "demo")
    log.log("train", 1, 0, loss=0.5, examples_per_s=np.float32(10.0))
    log.close()
    log = MetricsLog(tmp_path, "demo")  # a resumed run continues the file
    log.log("valid", 2, 0, auc=torch.tensor(0.75))
    log.close()
    lines = _lines(tmp_path)
    assert [(x["split"], x["step"]) for x in lines] == [("train", 1), ("valid", 2)] and lines[1]["auc"] == 0.75
    monkeypatch.setenv("RANK", "1")
    MetricsLog(tmp_path / "rank1", "demo").log("train", 1, loss=1.0)
    assert not (tmp_path / "rank1").exists()


def test_messages_go_above_a_progress_bar() -> None:
    out = io.StringIO()
    bar = tqdm(total=10, file=out, desc="epoch 0", ascii=True)
    bar.update(3)
    print0("epoch 0 | step 3/10 | loss 0.5000", file=out)
    bar.update(1)
    bar.close()
    pieces = [p.strip() for chunk in out.getvalue().split("\n") for p in chunk.split("\r")]
    assert "epoch 0 | step 3/10 | loss 0.5000" in pieces  # a line of its own, not glued to the bar


def test_the_planner_gets_an_explicit_storage_reservation(caplog) -> None:
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

    from common.sharding import shard_model

    rt = init_runtime("cpu")
    try:
        ebc = EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=20, feature_names=["f"])],
            device=torch.device("meta"),
        )
        model = torch.nn.Module()
        model.ebc, model.dense = ebc, torch.nn.Linear(8, 1)
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
            warnings.simplefilter("always")
            shard_model(model, [ebc], rt, "table_wise", 0.1, 0.01)
    finally:
        shutdown()
    assert not [w for w in caught if "StorageReservation" in str(w.message)]
    assert "dense_tensor_estimate" not in caplog.text


def _fixture_results(root: Path) -> None:
    """Small results files of each kind, shaped as the benchmarks and the demo write them."""
    (root / "curves").mkdir(parents=True)
    rows = [
        {
            "stage": "dlrm",
            "split": "train",
            "step": s,
            "epoch": s // 50,
            "loss": 0.6 / (1 + s / 50),
            "examples_per_s": 30_000 + s,
        }
        for s in range(10, 110, 10)
    ]
    rows += [
        {
            "stage": "dlrm",
            "split": "valid",
            "step": 50 * (e + 1),
            "epoch": e,
            "auc": 0.7 + 0.02 * e,
            "NDCG@10": 0.08 + 0.01 * e,
        }
        for e in range(2)
    ]
    (root / "curves" / "dlrm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = {
        name: {
            "HR@10": v,
            "HR@10_ci95": [v - 0.02, v + 0.02],
            "NDCG@10": v / 2,
            "NDCG@10_ci95": [v / 2 - 0.01, v / 2 + 0.01],
            "num_users": 943,
        }
        for name, v in (("popularity", 0.09), ("two-tower", 0.18), ("two-tower + ranker", 0.19))
    }
    (root / "demo_results.json").write_text(
        json.dumps({"test": table, "served": "two-tower + ranker", "stage": "test"})
    )
    compare = {n: {k: v for k, v in row.items() if k != "num_users"} for n, row in table.items()}
    compare["ensemble"] = compare["served"] = {
        **compare["two-tower + ranker"],
        "NDCG@10": 0.11,
        "NDCG@10_ci95": [0.1, 0.12],
    }
    (root / "compare_ml100k.json").write_text(
        json.dumps({"test": compare, "served": ["ensemble", "ensemble", "two-tower + ranker"], "seeds": [0, 1, 2]})
    )
    level = {"errors": 0, "p50_ms": 3.0, "max_ms": 9.0}
    (root / "serving_load.json").write_text(
        json.dumps(
            {
                "rows_per_request": 1,
                "batching": [
                    {**level, "concurrency": c, "requests_per_s": 300 * c**0.5, "p99_ms": 4 + c} for c in (1, 8, 32)
                ],
                "no_batching": [{**level, "concurrency": 32, "requests_per_s": 280, "p99_ms": 150}],
            }
        )
    )
    faiss_rows = [
        {"type": "flat", "params": {}, "recall_at_k": 1.0, "qps_single_thread": 37, "qps_batched": 77},
        *[
            {
                "type": "ivf_flat",
                "params": {"nprobe": p},
                "recall_at_k": 0.9 + p / 5000,
                "qps_single_thread": 50_000 / p,
                "qps_batched": 90_000 / p,
                "is_default": p == 250,
            }
            for p in (62, 125, 250)
        ],
    ]
    (root / "faiss_indexes.json").write_text(json.dumps({"rows": faiss_rows, "k": 100, "items": 1_000_000, "dim": 64}))
    zch_rows = [
        {"variant": v, "table_size": s, "auc_test": a, "collision_rate": c}
        for v, s, a, c in (
            ("full", "all IDs", 0.72, 0.0),
            ("modulo", "0.5x", 0.67, 0.57),
            ("modulo", "1x", 0.69, 0.37),
            ("zch_lfu", "0.5x", 0.70, 0.52),
            ("zch_lfu", "1x", 0.72, 0.31),
        )
    ]
    (root / "zch.json").write_text(json.dumps({"results": zch_rows, "data": "ml-100k"}))


def test_make_report_draws_every_chart_as_a_valid_image(tmp_path) -> None:
    import matplotlib.image

    _fixture_results(tmp_path / "results")
    made = report.main(["--results", str(tmp_path / "results"), "--out", str(tmp_path / "charts")])
    assert sorted(p.name for p in made) == [
        "curves_dlrm.png",
        "faiss_recall_qps.png",
        "serving_load.png",
        "systems_compare.png",
        "systems_test.png",
        "zch.png",
    ]
    for path in made:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        pixels = matplotlib.image.imread(path)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 400
        assert pixels[..., :3].std() > 0.05  # something is drawn, not a blank canvas
    assert report.main(["--results", str(tmp_path / "none"), "--out", str(tmp_path / "charts2")]) == []


def test_report_collects_a_run_directory(tmp_path) -> None:
    runs = tmp_path / "runs"
    (runs / "retrieval").mkdir(parents=True)
    (runs / "retrieval" / "metrics.jsonl").write_text(
        json.dumps({"stage": "two_tower", "split": "train", "step": 1, "epoch": 0, "loss": 1.0, "examples_per_s": 5.0})
        + "\n"
    )
    copied = report.collect(runs, tmp_path / "results")
    assert [p.name for p in copied] == ["two_tower.jsonl"]
    assert (tmp_path / "results" / "curves" / "two_tower.jsonl").read_text().count("\n") == 1
