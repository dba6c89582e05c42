"""Shared runtime and DCP checkpoints, in one process and across 2 gloo processes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.checkpoint import (
    UnsafeCheckpoint,
    checkpoint_dirs,
    latest_checkpoint,
    load_checkpoint,
    resume_if_possible,
    save_checkpoint,
)
from common.runtime import (
    autodetect_device,
    backend_for,
    init_runtime,
    seed_everything,
    shutdown,
    write_results,
)
from tests import dist_workers


@pytest.fixture
def runtime():
    rt = init_runtime("cpu")
    yield rt
    shutdown()


def test_device_and_backend_detection() -> None:
    assert autodetect_device("cpu") == torch.device("cpu")
    assert backend_for(torch.device("cpu")) == "gloo" and backend_for(torch.device("cuda", 1)) == "nccl"
    if not torch.cuda.is_available():
        assert autodetect_device("auto") == torch.device("cpu")
        with pytest.raises(RuntimeError, match="--device cpu"):
            autodetect_device("cuda")
    with pytest.raises(ValueError, match="auto, cpu, cuda"):
        autodetect_device("tpu")


def test_single_process_runtime(runtime) -> None:
    assert (runtime.rank, runtime.world_size, runtime.backend, runtime.is_rank0) == (0, 1, "gloo", True)
    assert torch.distributed.is_initialized()


def test_seed_everything_is_deterministic() -> None:
    seed_everything(3)
    a = (torch.rand(3), np.random.rand(3))
    seed_everything(3)
    b = (torch.rand(3), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and (a[1] == b[1]).all()


def test_write_results_is_atomic_json(tmp_path: Path) -> None:
    path = write_results(tmp_path / "run", {"auc": np.float32(0.75), "n": np.int64(3), "v": torch.tensor([1, 2])})
    assert json.loads(path.read_text()) == {"auc": 0.75, "n": 3, "v": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]


def test_checkpoint_save_load_prune_and_ignore_partial(runtime, tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, {"model": model, "opt": opt}, meta={"epoch": step // 10}, keep_last=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_00000020", "step_00000030"]
    # A save killed half-way leaves a .partial directory: never picked.
    (tmp_path / ".step_00000040.partial").mkdir()
    (tmp_path / "step_00000050").mkdir()  # no meta.json: incomplete
    assert latest_checkpoint(tmp_path).name == "step_00000030"
    fresh = torch.nn.Linear(4, 2)
    fresh_opt = torch.optim.Adam(fresh.parameters())
    meta = resume_if_possible(tmp_path, {"model": fresh, "opt": fresh_opt})
    assert meta["step"] == 30 and meta["epoch"] == 3
    assert torch.equal(fresh.weight, model.weight)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert resume_if_possible(tmp_path / "none", {"model": fresh}) is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "step_00000050", {"model": fresh})


@pytest.mark.multiprocess
def test_torchrun_style_environment(tmp_path: Path) -> None:
    dist_workers.launch(dist_workers.ranks_of_this_process, 2, str(tmp_path))
    assert (tmp_path / "rank0.txt").read_text() == "0 2 0 gloo cpu"
    assert (tmp_path / "rank1.txt").read_text() == "1 2 1 gloo cpu"
    assert json.loads((tmp_path / "results.json").read_text()) == {"written_by": 0}


@pytest.mark.multiprocess
def test_checkpoint_from_two_ranks_loads_into_one_process(tmp_path: Path) -> None:
    ckpt, expected_file = tmp_path / "ckpt", tmp_path / "expected.pt"
    dist_workers.launch(dist_workers.train_and_save, 2, str(ckpt), str(expected_file))
    expected = torch.load(expected_file)
    assert "table_wise" in expected["plan"] and "column_wise" in expected["plan"]
    rt = init_runtime("cpu")
    try:
        # Saved as t0 table-wise, t1 column-wise, t2 data-parallel over 2 ranks; loaded with t0 and
        # t1 swapped. (A data-parallel table keeps its in-backward optimizer state outside
        # model.fused_optimizer, so it must stay data-parallel to find its checkpoint keys.)
        model = dist_workers.build_sharded_ebc(rt, {"t0": "column_wise", "t1": "table_wise", "t2": "data_parallel"})
        before = dist_workers.full_tables(model)
        meta = resume_if_possible(ckpt, {"model": model, "sparse_opt": model.fused_optimizer})
        assert meta == {"step": 3, "world_size": 2, "epoch": 0}
        after = dist_workers.full_tables(model)
        for key, weight in expected["tables"].items():
            assert not torch.equal(before[key], weight), f"{key} was not trained"
            assert torch.equal(after[key], weight), f"{key} differs after loading"
        # The fused optimizer's row-wise Adagrad state came back too: nonzero for trained rows.
        state = model.fused_optimizer.state_dict()["state"]
        momentum = [t for v in state.values() for t in v.values() if hasattr(t, "local_shards")]
        assert momentum and all(sum(s.tensor.sum() for s in m.local_shards()) > 0 for m in momentum)
    finally:
        shutdown()


@pytest.mark.multiprocess
def test_distributed_evaluation_counts_every_user_once(tmp_path: Path, ml100k_split) -> None:
    from common.baselines import popularity_report

    out = tmp_path / "eval.pt"
    dist_workers.launch(dist_workers.evaluate_popularity_distributed, 2, str(out))
    got = torch.load(out, weights_only=False)
    single = popularity_report(ml100k_split, "test", n_boot=50)
    assert len(got["users"]) == 943 and (got["users"] == np.arange(943)).all()
    assert (got["ranks"] == single.ranks).all() and got["means"] == single.means


def test_resume_refuses_checkpoints_of_other_settings(runtime, tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    save_checkpoint(tmp_path, 5, {"model": model}, meta={"run_config": {"lr": 0.1, "dims": [4, 2]}})
    assert resume_if_possible(tmp_path, {"model": model}, {"lr": 0.1, "dims": (4, 2)})["step"] == 5
    with pytest.raises(ValueError, match=r"other settings \(lr: 0.1 -> 0.2\).*another --out"):
        resume_if_possible(tmp_path, {"model": model}, {"lr": 0.2, "dims": (4, 2)})


class _RunsCommand:
    """What a hostile checkpoint would pickle: unpickling it runs a shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        import os

        return os.system, (self.command,)


def _plant(checkpoint: Path, name: str, data: bytes) -> None:
    """Replace a checkpoint file the way an attacker would: with meta.json's size and hash made to match."""
    import hashlib

    (checkpoint / name).write_bytes(data)
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / "meta.json").write_text(json.dumps(meta))


def test_a_checkpoint_whose_metadata_runs_code_is_refused(runtime, tmp_path: Path) -> None:
    """Issue 17.1: DCP unpickles .metadata; a replaced one must not run, and the error names the file."""
    import pickle

    from common.checkpoint import DamagedCheckpoint

    model = torch.nn.Linear(4, 2)
    path = save_checkpoint(tmp_path / "ckpt", 1, {"model": model})
    marker = tmp_path / "pwned"
    hostile = pickle.dumps(_RunsCommand(f"touch {marker}"))
    (path / ".metadata").write_bytes(hostile)  # replaced, hashes not updated: damaged
    with pytest.raises(DamagedCheckpoint, match=r"\.metadata (has|differs)"):
        load_checkpoint(path, {"model": torch.nn.Linear(4, 2)})
    _plant(path, ".metadata", hostile)  # hashes forged too: the unpickler still refuses it
    with pytest.raises(UnsafeCheckpoint, match=r"\.metadata refers to posix\.system"):
        load_checkpoint(path, {"model": torch.nn.Linear(4, 2)})
    assert not marker.exists()
    # A truncated metadata file is a clear error too, not a raw unpickling traceback.
    _plant(path, ".metadata", pickle.dumps({"a": 1})[:5])
    with pytest.raises(UnsafeCheckpoint, match="damaged"):
        load_checkpoint(path, {"model": torch.nn.Linear(4, 2)})


def test_checkpoint_values_are_loaded_as_plain_data_only(tmp_path: Path) -> None:
    """DCP loads non-tensor values with torch.load(weights_only=False); ours refuses code there too."""
    import io

    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

    from common.checkpoint import _WeightsOnlyPlanner

    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"lr": 0.1, "evil": _RunsCommand(f"touch {marker}")}, buf)
    buf.seek(0)
    item = ReadItem(
        type=LoadItemType.BYTE_IO,
        dest_index=MetadataIndex("opt.param_groups"),
        dest_offsets=torch.Size([0]),
        storage_index=MetadataIndex("opt.param_groups"),
        storage_offsets=torch.Size([0]),
        lengths=torch.Size([0]),
    )
    planner = _WeightsOnlyPlanner()
    planner.flatten_state_dict, planner.state_dict = False, {}
    with pytest.raises(UnsafeCheckpoint, match="'opt.param_groups' is not plain data"):
        planner.load_bytes(item, buf)
    assert not marker.exists()
    plain = io.BytesIO()
    torch.save({"lr": 0.1, "betas": (0.9, 0.999)}, plain)
    plain.seek(0)
    planner.load_bytes(item, plain)
    assert planner.state_dict["opt.param_groups"] == {"lr": 0.1, "betas": (0.9, 0.999)}


def test_the_packager_refuses_a_hostile_checkpoint_without_running_it(ranking_run, tmp_path: Path) -> None:
    """The issue's reproduction: `dlrm_packager --checkpoints <folder with a replaced .metadata>`."""
    import pickle
    import shutil
    import subprocess
    import sys

    _, run_dir = ranking_run
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(run_dir / "checkpoints" / "dlrm", ckpts)
    marker = tmp_path / "pwned"
    _plant(latest_checkpoint(ckpts), ".metadata", pickle.dumps(_RunsCommand(f"touch {marker}")))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "inference_legacy.dlrm_packager",
            "--checkpoints",
            str(ckpts),
            "--out",
            str(tmp_path / "artifact"),
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode != 0 and not marker.exists()
    assert "refusing to load it (unpickling it could run code)" in proc.stderr


@pytest.mark.parametrize("damage", ["truncate_distcp", "overwrite_64_bytes", "remove_metadata", "garble_meta_json"])
def test_resume_skips_a_damaged_newest_checkpoint(runtime, tmp_path: Path, damage: str, capsys) -> None:
    """Issue 17.3: every file's size and SHA-256 is saved with the checkpoint; --resume falls back
    to the newest intact one and says which it skipped and why."""
    from common.checkpoint import DamagedCheckpoint

    model = torch.nn.Linear(64, 64)
    weights = {}
    for step in (10, 20):
        with torch.no_grad():
            model.weight.fill_(step)
        weights[step] = model.weight.detach().clone()
        save_checkpoint(tmp_path, step, {"model": model}, meta={"epoch": step})
    newest = tmp_path / "step_00000020"
    distcp = next(newest.glob("*.distcp"))
    if damage == "truncate_distcp":
        distcp.write_bytes(distcp.read_bytes()[:-100])
    elif damage == "overwrite_64_bytes":
        data = bytearray(distcp.read_bytes())
        data[-200:-136] = bytes(64)
        distcp.write_bytes(bytes(data))
    elif damage == "remove_metadata":
        (newest / ".metadata").unlink()
    else:
        (newest / "meta.json").write_text('{"step": 20, "epo')
    fresh = torch.nn.Linear(64, 64)
    meta = resume_if_possible(tmp_path, {"model": fresh})
    assert meta["step"] == 10 and torch.equal(fresh.weight, weights[10])
    err = capsys.readouterr().err
    assert "resuming from" in err and "step_00000010" in err and "step_00000020" in err
    with pytest.raises(DamagedCheckpoint, match="step_00000020.* is damaged"):
        load_checkpoint(newest, {"model": fresh})
    # Nothing intact at all: one clear error, not a DCP traceback.
    (tmp_path / "step_00000010" / ".metadata").unlink()
    with pytest.raises(DamagedCheckpoint, match="no intact checkpoint under .*start over without --resume"):
        resume_if_possible(tmp_path, {"model": fresh})
