"""Every benchmark runs (quick mode) and writes its results file."""

from __future__ import annotations

import json

from bench import data_layer


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
    assert json.loads(out.read_text())["quick"] is True
