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
