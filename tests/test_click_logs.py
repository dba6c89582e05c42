"""The DLRM trainer on click logs: Criteo TSV and TorchRec .npy files in their real layouts
(generated, since the real logs are 1 TB), random data, bad input, and the torchx and
quantized-communication launches."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from golden_training.criteo import NUM_DENSE, NUM_SPARSE, generate_criteo_tsv
from golden_training.train_click_logs import main as train_click_logs
from tests.conftest import REPO, venv_env

QUICK = ["--no-baseline", "--log-every", "1000", "--checkpoint-every", "0"]
RANDOM = ["--dataset", "random", "--random-rows", "40000", "--num-embeddings", "1000", *QUICK]


@pytest.fixture(scope="module")
def criteo_tsv(tmp_path_factory) -> Path:
    return generate_criteo_tsv(tmp_path_factory.mktemp("criteo") / "day_0", 30_000, seed=0)


def test_criteo_tsv_trains_beyond_chance_and_beats_nothing_silently(criteo_tsv, tmp_path) -> None:
    res = train_click_logs(
        [
            "--dataset",
            "criteo",
            "--criteo-path",
            str(criteo_tsv),
            "--num-embeddings",
            "20000",
            "--batch-size",
            "256",
            "--log-every",
            "1000",
            "--out",
            str(tmp_path),
        ]
    )
    assert res["dataset"] == "criteo-tsv(day_0)" and res["dlrm"]["steps"] == 24_000 // 256
    assert res["dlrm"]["test"]["num_examples"] == 3000
    assert res["dlrm"]["test"]["auc"] > 0.6 and res["lr"]["test"]["auc"] > 0.6
    # The generator puts negative counts in int_1, as the real logs have: clamped, and counted.
    assert res["clamped_negative_counts"]["int_1"] > 0 and res["skipped_lines"] == {}


def test_criteo_bad_line_is_named_or_skipped_and_counted(criteo_tsv, tmp_path) -> None:
    lines = criteo_tsv.read_text().splitlines(keepends=True)[:2000]
    fields = lines[1000].split("\t")
    fields[20] = "not-hex"
    lines[1000] = "\t".join(fields)
    bad = tmp_path / "bad.tsv"
    bad.write_text("".join(lines))
    args = ["--dataset", "criteo", "--criteo-path", str(bad), "--batch-size", "64", "--limit-batches", "2", *QUICK]
    with pytest.raises(ValueError, match=r"bad.tsv: line 1001: cat_6 must be a hex hash, got 'not-hex'"):
        train_click_logs(args + ["--out", str(tmp_path / "a")])
    res = train_click_logs(args + ["--on-bad-row", "skip", "--out", str(tmp_path / "b")])
    assert sum(res["skipped_lines"].values()) == 1
    with pytest.raises(ValueError, match=r"bad.tsv: line \d+: int_1 is a negative count"):
        train_click_logs(args + ["--negative-counts", "bad_line", "--out", str(tmp_path / "c")])


def test_criteo_npy_layout_and_an_id_beyond_the_table(tmp_path) -> None:
    rng = np.random.default_rng(0)
    for day in range(2):
        n = 6000
        sparse = rng.integers(0, 5000, size=(n, NUM_SPARSE))
        np.save(tmp_path / f"day_{day}_dense.npy", rng.exponential(1, size=(n, NUM_DENSE)).astype(np.float32))
        np.save(tmp_path / f"day_{day}_sparse.npy", sparse)
        np.save(tmp_path / f"day_{day}_labels.npy", (sparse[:, :1] % 3 == 0).astype(np.int32))
    res = train_click_logs(
        [
            "--dataset",
            "criteo",
            "--criteo-path",
            str(tmp_path),
            "--num-embeddings",
            "5000",
            "--batch-size",
            "256",
            *QUICK,
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert res["dlrm"]["steps"] == 6000 // 256 and res["dlrm"]["test"]["num_examples"] == 3000
    assert res["dlrm"]["test"]["auc"] > 0.55  # the label is a function of cat_0: learnable
    # IDs are hashed modulo the table size, so no ID can overflow; the schema still guards the kernel.
    from common.features import FeatureError
    from golden_training.ctr_data import criteo_schema, load_ctr, make_batch

    data = load_ctr("criteo", str(tmp_path), 5000)
    data.train.sparse[3, 7] = 5000
    with pytest.raises(FeatureError, match=r"'cat_7'.*ID 5000 in example 3 is out of range \[0, 5000\)"):
        make_batch(criteo_schema(5000), data.train, slice(0, 8))


def test_random_data_has_a_learnable_signal(tmp_path) -> None:
    res = train_click_logs(RANDOM + ["--out", str(tmp_path)])
    assert res["dataset"] == "random" and res["dlrm"]["test"]["auc"] > 0.65
    from prediction.predict_using_torchrec import Ranker

    with pytest.raises(ValueError, match="trained on random click logs; the Ranker scores MovieLens"):
        Ranker(tmp_path / "checkpoints" / "dlrm")


@pytest.mark.multiprocess
def test_torchx_ddp_launch_with_quantized_comms(tmp_path) -> None:
    """`torchx run -s local_cwd dist.ddp -j 1x2 --script golden_training/train_click_logs.py` as the
    README shows it, with and without --qcomms: quantized all-to-alls change the numbers a little."""
    runs = {}
    for name, extra in (("fp32", []), ("qcomms", ["--qcomms"])):
        cmd = [
            str(Path(sys.executable).parent / "torchx"),
            "run",
            "-s",
            "local_cwd",
            "dist.ddp",
            "-j",
            "1x2",
            "--script",
            "golden_training/train_click_logs.py",
            "--",
            *RANDOM,
            *extra,
            "--out",
            str(tmp_path / name),
        ]
        proc = subprocess.run(cmd, cwd=REPO, env=venv_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = json.loads((tmp_path / name / "results.json").read_text())
    fp32, q = runs["fp32"], runs["qcomms"]
    assert fp32["world_size"] == q["world_size"] == 2
    assert fp32["qcomms"] is None and q["qcomms"] == {"forward": "FP16", "backward": "FP16"}  # gloo: no BF16
    assert q["dlrm"]["final_loss"] != fp32["dlrm"]["final_loss"]
    assert q["dlrm"]["final_loss"] == pytest.approx(fp32["dlrm"]["final_loss"], rel=0.01)
    assert q["dlrm"]["test"]["auc"] > 0.65


@pytest.mark.parametrize(
    "field, value, problem",
    [
        (3, "inf", "int_2 must be an integer, got 'inf'"),
        (3, "1e400", "int_2 must be an integer, got '1e400'"),
        (3, "1" + "0" * 300, "int_2 is out of range for a count"),
        (20, "1" + "0" * 17, "cat_6 must be a hex hash of at most 64 bits"),
        (20, None, "has bytes that are not ASCII text"),
    ],
)
def test_criteo_reader_gaps_are_named_or_skipped(
    criteo_tsv, tmp_path, field: int, value: str | None, problem: str
) -> None:
    """Issue 17.7: infinite or huge counts, IDs wider than 64 bits and non-UTF-8 bytes are a
    file:line error, or a counted skip under on_bad_line='skip'; never accepted, never a crash."""
    from collections import Counter

    from golden_training.criteo import read_criteo_tsv

    lines = criteo_tsv.read_bytes().splitlines(keepends=True)[:3000]
    fields = lines[1500].split(b"\t")
    fields[field] = b"\xff\xfe" + fields[field] if value is None else value.encode()
    lines[1500] = b"\t".join(fields)
    bad = tmp_path / "bad.tsv"
    bad.write_bytes(b"".join(lines))
    with pytest.raises(ValueError, match=rf"bad.tsv: line 1501: {problem}"):
        read_criteo_tsv(bad, 1000)
    skipped: Counter[str] = Counter()
    good = read_criteo_tsv(bad, 1000, on_bad_line="skip", skipped=skipped)
    assert len(good) == 2999 and sum(skipped.values()) == 1
    assert np.isfinite(good.dense).all() and good.dense.max() < 25 and (good.sparse < 1000).all()


def test_criteo_keeps_full_64_bit_ids(tmp_path) -> None:
    """IDs from 2**63 to 2**64 - 1 fit no int64 but are valid 64-bit hashes: taken modulo the table."""
    from golden_training.criteo import read_criteo_tsv

    row = ["1"] + ["1"] * NUM_DENSE + ["ffffffffffffffff"] + ["0a"] * (NUM_SPARSE - 1)
    path = tmp_path / "wide.tsv"
    path.write_text("\t".join(row) + "\n")
    got = read_criteo_tsv(path, 1000)
    assert got.sparse[0, 0] == (2**64 - 1) % 1000 and got.sparse[0, 1] == 10
