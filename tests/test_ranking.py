"""DLRM ranking on real ml-100k: beats a logistic regression on the same features, golden
losses from a seeded tiny run, and re-ranking measured against the candidates' own order."""

from __future__ import annotations

import json
import math

import pytest

from golden_training.train_dlrm import main as train_dlrm

# Loss after 20 steps of the TINY run, seed 0, 1 process on the project's x86-64 CPU machine.
GOLDEN_LOSS_1PROC = 0.5079519152641296
TINY = ["--epochs", "1", "--limit-batches", "20", "--n-boot", "10", "--log-every", "1000", "--no-baseline",
        "--eval-negatives", "20"]


def test_golden_loss_of_a_seeded_tiny_run(tmp_path) -> None:
    """20 steps from seed 0, popularity negatives only: the loss is pinned (same machine type as CI)."""
    res = train_dlrm(TINY + ["--out", str(tmp_path)])
    assert res["dlrm"]["steps"] == 20
    assert res["dlrm"]["final_loss"] == pytest.approx(GOLDEN_LOSS_1PROC, rel=1e-4)
    assert res["candidate_source"] == "popularity"
    again = train_dlrm(TINY + ["--out", str(tmp_path / "again")])
    assert again["dlrm"]["final_loss"] == res["dlrm"]["final_loss"]


def test_dlrm_beats_logistic_regression_and_reranks_retrieval(retrieval_run, tmp_path) -> None:
    _, retrieval_dir = retrieval_run
    res = train_dlrm(["--retrieval-export", str(retrieval_dir / "export"), "--n-boot", "20", "--log-every", "10000",
                      "--out", str(tmp_path)])
    dlrm, lr = res["dlrm"]["test"], res["lr"]["test"]
    assert res["candidate_source"] == "retrieval"
    assert dlrm["auc"] > 0.70 and dlrm["auc"] > lr["auc"] + 0.05
    assert math.isfinite(dlrm["ne"]) and dlrm["num_examples"] > 943 * 20
    reranked, original = res["dlrm"]["test_reranked"], res["test_candidates_order"]
    # Re-ranking only reorders the 100 candidates, so Recall@100 cannot change.
    assert reranked["Recall@100"] == original["Recall@100"]
    assert reranked["HR@10"] > 0.08
    assert json.loads((tmp_path / "results.json").read_text())["dlrm"]["test"]["auc"] == dlrm["auc"]

