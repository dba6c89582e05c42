"""Issue 41: training as several nodes. Each script runs as 2 nodes x 1 process on this host (two
torchrun agents meeting by c10d rendezvous, as two hosts of a cluster would) and must give what the
1-node, 2-process run gives: the same losses, metrics and exports, and checkpoints that load into one
process. Run with ``pytest -m multiprocess -k nodes``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import torchrun, torchrun_nodes


def _train_losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["split"] == "train" and "loss" in r]


def _both(module: str, args: list[str], tmp_path: Path) -> tuple[Path, Path]:
    one, two = tmp_path / "one-node", tmp_path / "two-nodes"
    torchrun(module, args + ["--out", str(one)])
    torchrun_nodes(module, args + ["--out", str(two)])
    return one, two


@pytest.mark.multiprocess
def test_the_two_tower_on_two_nodes_equals_one_node_of_two_processes(tmp_path: Path) -> None:
    from retrieval.two_tower_retrieval import Retriever

    args = ["--epochs", "1", "--limit-batches", "40", "--batch-size", "256", "--n-boot", "20", "--log-every", "10"]
    one, two = _both("retrieval.two_tower_train", args, tmp_path)
    a, b = (json.loads((r / "results.json").read_text()) for r in (one, two))
    assert a["world_size"] == b["world_size"] == 2 and (a["nodes"], b["nodes"]) == (1, 2)
    assert a["steps"] == b["steps"] > 0
    assert _train_losses(one) == _train_losses(two) and _train_losses(one)
    assert a["test"] == b["test"] and a["valid_per_epoch"] == b["valid_per_epoch"]
    # the exports, loaded in this one process, hold the same towers and recommend the same items
    ra, rb = Retriever(one / "export"), Retriever(two / "export")
    users = np.arange(50)
    np.testing.assert_array_equal(ra.top_k_indices(users, 100)[0], rb.top_k_indices(users, 100)[0])
    for (name, x), (_, y) in zip(ra.model.state_dict().items(), rb.model.state_dict().items()):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), name


@pytest.mark.multiprocess
def test_the_ranker_on_two_nodes_equals_one_node_of_two_processes(tmp_path: Path) -> None:
    from prediction.predict_using_torchrec import Ranker
    from tests.test_ranking import GOLDEN_LOSS_2PROC, TINY

    one, two = _both("golden_training.train_dlrm", TINY + ["--log-every", "5"], tmp_path)
    a, b = (json.loads((r / "results.json").read_text()) for r in (one, two))
    assert a["world_size"] == b["world_size"] == 2 and (a["nodes"], b["nodes"]) == (1, 2)
    assert a["dlrm"]["final_loss"] == b["dlrm"]["final_loss"] == pytest.approx(GOLDEN_LOSS_2PROC, rel=1e-4)
    assert a["dlrm"]["test"] == b["dlrm"]["test"] and a["dlrm"]["steps"] == b["dlrm"]["steps"]
    assert _train_losses(one) == _train_losses(two) and len(_train_losses(one)) == 4
    # the DCP checkpoints the two ranks wrote (each node its shards) load into this one process, equal
    ma, mb = (Ranker(r / "checkpoints" / "dlrm", quantize="none").model for r in (one, two))
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "module, args",
    [
        ("sasrec.sasrec_main", ["--window-step", "200"]),
        ("bert4rec.bert4rec_main", ["--window-step", "50"]),
    ],
)
def test_the_sequential_models_on_two_nodes_equal_one_node_of_two_processes(module, args, tmp_path: Path) -> None:
    tiny = ["--epochs", "1", "--eval-every", "1", "--n-boot", "10", "--eval-users", "200", *args]
    one, two = _both(module, tiny, tmp_path)
    a, b = (json.loads((r / "results.json").read_text()) for r in (one, two))
    assert (a["world_size"], a["nodes"], b["world_size"], b["nodes"]) == (2, 1, 2, 2)
    assert a["test"] == b["test"] and a["valid"] == b["valid"] and a["test"]["full"]["num_users"] == 200


def _without_timings(x):
    if isinstance(x, dict):
        return {
            k: _without_timings(v) for k, v in x.items() if "per_s" not in k and "seconds" not in k and k != "nodes"
        }
    if isinstance(x, list):
        return [_without_timings(v) for v in x]
    return x


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "module, args, figures",
    [
        (
            "golden_training.train_click_logs",
            ["--dataset", "random", "--random-rows", "40000", "--num-embeddings", "1000", "--no-baseline"]
            + ["--log-every", "1000", "--checkpoint-every", "0"],
            "dlrm",
        ),
        (
            "zch.main",
            ["--variants", "zch_lru", "--ratios", "0.25", "--epochs", "1", "--limit-batches", "40"],
            "results",
        ),
    ],
)
def test_the_click_log_ranker_and_zch_on_two_nodes_equal_one_node(module, args, figures, tmp_path: Path) -> None:
    one, two = _both(module, args, tmp_path)
    a, b = (json.loads((r / "results.json").read_text()) for r in (one, two))
    assert a[figures] and _without_timings(a[figures]) == _without_timings(b[figures])
