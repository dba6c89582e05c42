"""Batched inference: the unsharded reload reproduces training's metrics, INT8 stays close and
is smaller, pairs score from Python, bad input is named."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.features import FeatureError
from prediction.predict_using_torchrec import Ranker
from prediction.predict_using_torchrec import main as predict_main
from tests.conftest import torchrun
from tests.test_ranking import TINY


def test_reload_reproduces_training_auc_and_int8_is_close_and_smaller(ranking_run, tmp_path) -> None:
    res, out = ranking_run
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"user_id": 1, "item_id": 50}\n{"user_id": 2, "item_id": 1}\n')
    got = predict_main(
        [
            "--checkpoints",
            str(out / "checkpoints" / "dlrm"),
            "--input",
            str(pairs),
            "--out",
            str(tmp_path / "pred.json"),
        ]
    )
    # The unsharded model sums embeddings with other kernels than the sharded one (plain
    # EmbeddingBag vs FBGEMM's fused TBE), so scores agree to float32 rounding, not bit for bit.
    assert got["fp32"]["auc"] == pytest.approx(res["dlrm"]["test"]["auc"], abs=1e-5)
    assert got["fp32"]["reranked"]["NDCG@10"] == pytest.approx(res["dlrm"]["test_reranked"]["NDCG@10"], abs=2e-3)
    assert abs(got["auc_change"]) <= 0.002 and got["size_reduction"] >= 3.5
    lines = [json.loads(x) for x in (tmp_path / "pairs.jsonl.scores.jsonl").read_text().splitlines()]
    assert [x["user_id"] for x in lines] == [1, 2] and all(0 < x["score"] < 1 for x in lines)


def test_score_from_python_and_bad_input(ranking_run) -> None:
    _, out = ranking_run
    r = Ranker(out / "checkpoints" / "dlrm")
    p = r.score([1, 1, 2], [50, 172, 1])
    assert p.shape == (3,) and np.all((p > 0) & (p < 1))
    with pytest.raises(FeatureError, match=r"unknown IDs: users \[999999\]"):
        r.score([999_999], [50])
    with pytest.raises(FileNotFoundError, match="train first"):
        Ranker(out / "nowhere")


@pytest.mark.multiprocess
def test_checkpoint_of_two_processes_scores_in_one(tmp_path) -> None:
    torchrun("golden_training.train_dlrm", TINY + ["--out", str(tmp_path)])
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["world_size"] == 2
    reloaded = Ranker(tmp_path / "checkpoints" / "dlrm").evaluate_test()
    assert reloaded["auc"] == pytest.approx(res["dlrm"]["test"]["auc"], abs=1e-5)
