"""Issue 41: training through a real scheduler. A one-host Slurm cluster (Debian's slurm-wlm,
slurmdbd, munge, MariaDB; scripts/slurm_local.py) takes the TorchX component of the two-tower
(scripts/components.py), whose state goes PENDING -> RUNNING -> COMPLETED through ``torchx status``
and whose figures equal the same component run by TorchX's local scheduler; the same component
renders the Kubernetes job. Without the packages the Slurm test is skipped, unless
RECSYS_REQUIRE_SLURM=1 (CI: .ci/run installs them)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, venv_env

COMPONENT = str(REPO / "scripts" / "components.py")
TINY = ["--epochs", "1", "--limit-batches", "40", "--batch-size", "256", "--n-boot", "20", "--log-every", "10"]


def _slurm_missing() -> list[str]:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import slurm_local

        return slurm_local.missing_tools()
    finally:
        sys.path.pop(0)


def _torchx(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    out = subprocess.run(
        [str(Path(sys.executable).parent / "torchx"), *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    if out.returncode:
        raise RuntimeError(f"torchx {' '.join(args[:3])} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return out.stdout + out.stderr


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running one-host Slurm cluster: the environment its clients need."""
    missing = _slurm_missing()
    if missing:
        if os.environ.get("RECSYS_REQUIRE_SLURM") == "1":
            pytest.fail(
                f"RECSYS_REQUIRE_SLURM=1 but {', '.join(missing)} missing: apt-get install slurm-wlm slurmdbd munge mariadb-server"
            )
        pytest.skip(f"no Slurm here ({', '.join(missing)} missing)")
    root = tmp_path_factory.mktemp("slurm")
    script = str(REPO / "scripts" / "slurm_local.py")
    started = subprocess.run([sys.executable, script, "start", str(root)], capture_output=True, text=True)
    if started.returncode:
        subprocess.run([sys.executable, script, "stop", str(root)], capture_output=True)
        pytest.fail(f"the Slurm cluster did not start:\n{started.stdout}\n{started.stderr[-3000:]}")
    env = venv_env(SLURM_CONF=str(root / "slurm.conf"), OMP_NUM_THREADS="1")
    yield env
    subprocess.run([sys.executable, script, "stop", str(root)], capture_output=True)


@pytest.mark.multiprocess
def test_a_training_job_goes_through_slurm_and_equals_a_local_run(slurm, tmp_path: Path) -> None:
    # Another job holds every CPU of the node first, so that ours must wait: PENDING is seen, not raced.
    cpus = os.cpu_count() or 1
    blocker = subprocess.run(
        ["sbatch", "--parsable", f"--cpus-per-task={cpus}", "--wrap", "sleep 8"],
        cwd=tmp_path,
        env=slurm,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    out = _torchx(
        ["run", "-s", "slurm", f"{COMPONENT}:two_tower", "--cpu", str(min(2, cpus)), "--memMB", "4000", "--",
         *TINY, "--out", str(tmp_path / "slurm")],
        tmp_path, slurm,
    )  # fmt: skip
    handle = re.search(r"slurm://\S+", out).group(0)
    seen: list[tuple[str, str]] = []
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = _torchx(["status", handle], tmp_path, slurm)
        state = re.search(r"State: (\w+)", status).group(1)
        msg = re.search(r"Msg: (\w*)", status).group(1)
        if not seen or seen[-1] != (state, msg):
            seen.append((state, msg))
        if state in ("SUCCEEDED", "FAILED", "CANCELLED"):
            break
        time.sleep(0.5)
    states = [s for s, _ in seen if s != "UNKNOWN"]  # sacct may not list a job in its first instant
    assert states == ["PENDING", "RUNNING", "SUCCEEDED"], (seen, blocker)
    assert seen[-1] == ("SUCCEEDED", "COMPLETED")  # TorchX's name for Slurm's COMPLETED, and Slurm's own

    # the same component through TorchX's local scheduler: the same figures
    _torchx(
        ["run", "--wait", "-s", "local_cwd", f"{COMPONENT}:two_tower", "--", *TINY, "--out", str(tmp_path / "local")],
        tmp_path, venv_env(OMP_NUM_THREADS="1"),
    )  # fmt: skip
    a, b = (json.loads((tmp_path / r / "results.json").read_text()) for r in ("slurm", "local"))
    assert a["world_size"] == b["world_size"] == 2 and a["steps"] == b["steps"] > 0
    assert a["test"] == b["test"] and a["valid_per_epoch"] == b["valid_per_epoch"]
    losses = [
        [(r["step"], r["loss"]) for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
         if r["split"] == "train"]
        for run in ("slurm", "local")
    ]  # fmt: skip
    assert losses[0] == losses[1] and losses[0]


def test_the_kubernetes_job_is_rendered_with_image_command_resources_and_replicas(tmp_path: Path) -> None:
    """``torchx run -s kubernetes --dryrun``: the Volcano job TorchX would submit (no cluster needed)."""
    out = _torchx(
        ["run", "-s", "kubernetes", "--dryrun", "--workspace", "", "-cfg", "queue=default", f"{COMPONENT}:ranker",
         "--j", "2x4", "--cpu", "16", "--memMB", "64000", "--gpu", "4", "--", "--epochs", "3"],
        tmp_path, venv_env(OMP_NUM_THREADS="1"),
    )  # fmt: skip
    job = yaml.safe_load(out.split("=== SCHEDULER REQUEST ===", 1)[1])
    assert job["kind"] == "Job" and job["apiVersion"].startswith("batch.volcano.sh/")
    tasks = job["spec"]["tasks"]
    assert len(tasks) == 2 and all(t["replicas"] == 1 for t in tasks)  # one task a node
    for t in tasks:
        (c,) = t["template"]["spec"]["containers"]
        assert c["image"] == "recsys-examples:latest"
        command = " ".join(c["command"])
        assert "torchrun --rdzv_backend c10d" in command and "--nnodes 2 --nproc_per_node 4" in command
        assert "-m golden_training.train_dlrm --epochs 3" in command
        limits = c["resources"]["limits"]
        assert (limits["cpu"], limits["memory"], limits["nvidia.com/gpu"]) == ("16000m", "64000M", "4")
        assert {"name": "OMP_NUM_THREADS", "value": "1"} in c["env"]


def test_the_dockerfile_installs_with_the_script_ci_runs() -> None:
    """The image cannot be built here (no registry is reachable): what can be checked is checked. Its
    instructions parse; it installs with scripts/install.sh, the script `make` (hence .ci/run) runs,
    for the device its build argument names (cpu by default, cuda for the CUDA wheels); what it copies
    exists; the context leaves local environments and runs out; the TorchX components name its tag."""
    lines, joined = (REPO / "Dockerfile").read_text().splitlines(), []
    for line in lines:  # continuation lines joined, comments and blank lines dropped
        if joined and joined[-1].endswith("\\"):
            joined[-1] = joined[-1][:-1] + " " + line.strip()
        elif line.strip() and not line.lstrip().startswith("#"):
            joined.append(line.strip())
    known = {"FROM", "ARG", "RUN", "WORKDIR", "COPY", "ENV", "CMD"}
    steps = [(line.split(None, 1)[0], line.split(None, 1)[1]) for line in joined]
    assert {op for op, _ in steps} <= known and steps[0][0] == "FROM", steps
    assert ("ARG", "DEVICE=cpu") in steps
    (install,) = [arg for op, arg in steps if op == "RUN" and "scripts/install.sh" in arg]
    assert re.search(r'bash scripts/install\.sh "\$DEVICE"', install)
    assert re.search(r"bash scripts/install\.sh \$\(DEVICE\)", (REPO / "Makefile").read_text())
    assert "make test" in (REPO / ".ci" / "run").read_text()
    for op, arg in steps:
        if op == "COPY":
            *sources, _ = arg.split()
            assert all((REPO / s).exists() for s in sources if s != "."), arg
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", "runs", ".git"} <= set(ignored)
    assert 'IMAGE = "recsys-examples:latest"' in (REPO / "scripts" / "components.py").read_text()
    assert "docker build -t recsys-examples ." in (REPO / "Dockerfile").read_text()
