"""Every benchmark runs (quick mode) and writes its results file."""

from __future__ import annotations

import json

import pytest

from bench import data_layer

# each benchmark's quick run: the slow tier (make test, CI), not plain pytest
pytestmark = pytest.mark.slow


def test_data_layer_benchmark_quick(tmp_path) -> None:
    out = tmp_path / "data_layer.json"
    res = data_layer.main(["--quick", "--repeats", "1", "--out", str(out)])
    rates = {k: v for k, v in res.items() if k.endswith("_per_s")}
    assert len(rates) == 5 and all(v > 0 for v in rates.values())
    assert json.loads(out.read_text())["quick"] is True


def test_dlrm_throughput_benchmark_quick(tmp_path) -> None:
    from bench import dlrm_throughput

    out = tmp_path / "dlrm.json"
    res = dlrm_throughput.main(
        ["--quick", "--processes", "1", "--batch-sizes", "64", "--steps", "10", "--repeats", "1", "--out", str(out)]
    )
    (row,) = res["rows"]
    assert row["processes"] == 1 and row["pipeline_ex_per_s"] > 0 and row["compute_only_ex_per_s"] > 0
    assert row["pipeline_prebuilt_ex_per_s"] > 0 and 0 < row["batch_build_ms"] < row["step_ms_compute_only"]
    assert json.loads(out.read_text())["quick"] is True


def test_optimizer_fusion_benchmark_quick(tmp_path) -> None:
    """Fused and separate sparse updates of the same DLRM from the same weights reach the same loss
    (the same model and optimizer, only where the update runs), and the fused one is faster."""
    from bench import optimizer_fusion

    out = tmp_path / "fusion.json"
    res = optimizer_fusion.main(["--quick", "--batch-sizes", "32", "--out", str(out)])
    (row,) = res["results"]
    assert abs(row["fused"]["final_loss"] - row["separate"]["final_loss"]) < 1e-3, row
    assert row["speedup"] > 1 and json.loads(out.read_text())["rows_per_table"] == 5_000


@pytest.mark.multiprocess
def test_quantized_comms_halve_the_bytes_of_the_embeddings(tmp_path) -> None:
    """2 gloo processes: with --qcomms the embeddings and their gradients go to the all-to-all as FP16,
    counted at the call (exactly half the bytes of FP32), the ids unchanged, the loss the same to 1e-3."""
    from bench import qcomms_bytes

    res = qcomms_bytes.main(["--quick", "--out", str(tmp_path / "qcomms.json")])
    assert res["reduction_floats"] == pytest.approx(2.0)
    assert 1.5 < res["reduction_total"] < 2.0
    fp32, q = res["runs"]["fp32"], res["runs"]["qcomms"]
    assert (
        "all_to_all_single float16" in q["bytes_per_step"] and "all_to_all_single float16" not in fp32["bytes_per_step"]
    )
    assert fp32["mean_loss"] == pytest.approx(q["mean_loss"], abs=1e-3)


def test_the_chain_at_scale_smoke(tmp_path) -> None:
    """`python -m bench.scale --sizes 1e5 --smoke`: every stage of the chain in its own process on a
    synthetic Parquet log (5,000 users, 1,000 items), with the quality sample and the oracle. Seeded:
    the two-tower recovers about 75% of the oracle's HR@10, and the ranker lifts its order."""
    from bench import scale

    out = tmp_path / "scale.json"
    res = scale.main(["--sizes", "1e5", "--smoke", "--work", str(tmp_path / "work"), "--out", str(out)])
    (size,) = res["sizes"]
    assert size["interactions"] == 100_000 and (size["users"], size["items"]) == (5_000, 1_000)
    assert set(size["stages"]) == set(scale.STAGES)
    assert all(s["peak_rss_gb"] > 0.05 for k, s in size["stages"].items() if k != "faiss index")
    q = size["quality"]
    assert q["oracle"]["HR@10"] > q["two-tower"]["HR@10"] > 5 * q["popularity"]["HR@10"]
    assert 0.5 < q["two-tower"]["share_of_oracle_HR@10"] < 1.0
    assert size["stages"]["latency"]["single_user_p99_ms"] > 0
    assert json.loads(out.read_text())["sizes"][0]["eval_users"] == 5_000


def test_run_all_runs_each_benchmark_in_its_own_process_and_says_what_it_skipped(capsys) -> None:
    from bench import run_all

    summary = run_all.main(["--quick", "--only", "data_layer", "service_chaos"])
    assert summary["data_layer"]["status"] == "ok" and summary["data_layer"]["seconds"] > 0
    assert summary["service_chaos"] == {"status": "skipped", "why": "no quick mode"}
    out = capsys.readouterr().out
    assert "== bench.data_layer --quick --out" in out and "service_chaos        skipped: no quick mode" in out
