"""Process group, device, seeding and rank-0 output: the setup every script repeats.

Works the same for ``python -m ...`` (one process) and ``torchrun --nproc_per_node=N -m ...``:
torchrun exports RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT and we read them;
a plain run gets a one-process group backed by an in-memory store, because TorchRec's
``DistributedModelParallel`` needs a process group even on one device.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Runtime:
    """Where this process sits: ``rank`` is global (use it for "am I rank 0"), ``local_rank``
    picks the device on this host."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str
    # processes on this host (torchrun's LOCAL_WORLD_SIZE; None: all of them): the sharding planner
    # prices the links between hosts apart from those within one
    local_world_size: int | None = None

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @property
    def nodes(self) -> int:
        """How many hosts the processes span (torchrun's nodes)."""
        return self.world_size // (self.local_world_size or self.world_size)


def autodetect_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` picks ``cuda:<local_rank>`` when CUDA is available, else ``cpu``."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                "--device cuda was asked for but torch.cuda.is_available() is False; "
                "use --device cpu (or auto), or install the CUDA build: make setup DEVICE=cuda"
            )
        return torch.device("cuda", local_rank)
    if requested == "cpu":
        return torch.device("cpu")
    raise ValueError(f"device must be one of auto, cpu, cuda; got {requested!r}")


def backend_for(device: torch.device) -> str:
    """nccl for CUDA devices, gloo for CPU (the only TorchRec-capable CPU backend)."""
    return "nccl" if device.type == "cuda" else "gloo"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None or value == "" else int(value)


def init_runtime(device: str = "auto") -> Runtime:
    """Initialize the default process group (if not yet) and return this process's place in it."""
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = autodetect_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = backend_for(dev)
    if not dist.is_initialized():
        if world_size == 1 and "MASTER_ADDR" not in os.environ:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group(backend, rank=rank, world_size=world_size)
    world_size = dist.get_world_size()
    return Runtime(
        rank=dist.get_rank(),
        local_rank=local_rank,
        world_size=world_size,
        device=dev,
        backend=backend,
        local_world_size=_env_int("LOCAL_WORLD_SIZE", world_size),
    )


def shutdown() -> None:
    """Tear down the default process group, if any."""
    if dist.is_initialized():
        dist.destroy_process_group()


def launch_local(fn: Callable[..., Any], nproc: int, *args: Any) -> dict[int, Any]:
    """Run ``fn(*args)`` in ``nproc`` processes on this host, as ``torchrun --nproc_per_node`` would
    (RANK, WORLD_SIZE, MASTER_ADDR... set; ``init_runtime`` picks them up), and return
    {rank: return value}. ``fn`` must be importable (defined in a module, not in ``__main__`` or a
    notebook), because the workers are spawned. This is how torchrec_dlrm's tests launch 2 ranks."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    # The launcher installs its own SIGTERM/SIGINT handlers and leaves them behind; put the caller's
    # back, so that e.g. a notebook kernel still interrupts and shuts down normally afterwards.
    import signal
    import threading

    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
    saved = {s: signal.getsignal(s) for s in signals} if threading.current_thread() is threading.main_thread() else {}
    try:
        return elastic_launch(config, entrypoint=fn)(*args)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def torchrun_command(
    module: str, args: list[str], nproc: int = 2, nnodes: int = 1, endpoint: str | None = None, run_id: str = "recsys"
) -> list[str]:
    """``torchrun --standalone --nproc_per_node=<nproc> -m <module> <args>`` with this interpreter, for
    a subprocess (the benchmarks and tests that run a script in several processes). With ``nnodes`` >
    1, the command one node runs: every node runs it (on its own host, or here several times), and
    they meet by c10d rendezvous at ``endpoint`` (``host:port``, on the first node) under ``run_id``;
    ranks are given in the order the nodes join."""
    if nnodes == 1:
        launch = ["--standalone"]
    elif endpoint is None:
        raise ValueError(f"{nnodes} nodes meet at a rendezvous endpoint: give endpoint='host:port'")
    else:
        launch = [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={run_id}"]
    return [sys.executable, "-m", "torch.distributed.run", *launch, f"--nproc_per_node={nproc}", "-m", module, *args]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices). Give every rank the same seed so that model
    initialization agrees; data order is derived from the seed explicitly by each loader."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def all_reduce(value: np.ndarray | int, op: str = "sum", device: torch.device | None = None) -> np.ndarray:
    """``value`` (a number or an integer / float array) reduced over the ranks of the default group
    with ``op`` ("sum", "min" or "max"); returned as an array, unchanged in a single process.
    ``device`` is where the collective runs (default: the current CUDA device under nccl, else CPU)."""
    a = np.asarray(value)
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return a
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64 if a.dtype.kind == "f" else np.int64))
    t = t.to(device)
    dist.all_reduce(t, op=ops[op])
    return t.cpu().numpy().reshape(a.shape)  # ascontiguousarray makes a 0-d value 1-d


def all_gather(local: Any) -> list[Any]:
    """Every rank's ``local`` (any picklable value, e.g. a tuple of arrays), in rank order; ``[local]``
    in a single process."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [local]
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return parts


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else _env_int("RANK", 0)


def print0(*args: Any, sep: str = " ", end: str = "\n", file: Any = None) -> None:
    """print() on global rank 0 only, through ``tqdm.write``: a message printed while a progress bar
    is showing goes above the bar instead of garbling it."""
    if get_rank() == 0:
        from tqdm import tqdm

        tqdm.write(sep.join(str(a) for a in args), file=file or sys.stdout, end=end)
        (file or sys.stdout).flush()


class Progress:
    """Progress of long work: a tqdm bar on a terminal; elsewhere (a log file, the demo's pipe, where a
    bar's carriage returns never end a line) a line every ``every`` seconds: ``desc: done/total, rate``."""

    def __init__(self, total: int, desc: str, unit: str = "it", every: float = 30.0, enabled: bool = True) -> None:
        from tqdm import tqdm

        self.total, self.desc, self.unit, self.every, self.done = total, desc, unit, every, 0
        self.terminal = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False) if self.terminal else None
        self.enabled, self.t0 = enabled, time.monotonic()
        self.last = self.t0

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and (time.monotonic() - self.last >= self.every or self.done >= self.total):
            self.last = time.monotonic()
            rate = self.done / max(self.last - self.t0, 1e-9)
            print(f"{self.desc}: {self.done:,}/{self.total:,} {self.unit} ({rate:,.0f}/s)", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def write_json_atomic(path: str | Path, payload: Any) -> Path:
    """Write JSON to ``path`` via a temporary file and rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def write_results(out_dir: str | Path, results: dict[str, Any], name: str = "results.json") -> Path | None:
    """Rank 0 writes ``out_dir/results.json``; other ranks write nothing and get None."""
    if get_rank() != 0:
        return None
    return write_json_atomic(Path(out_dir) / name, results)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


class MetricsLog:
    """A training run's figures as they come, for curves: one JSON object per line in
    ``<out_dir>/metrics.jsonl`` (appended and flushed line by line, so a resumed run continues the
    file and a crash loses nothing written) and, with ``tensorboard=True``, TensorBoard event files
    under ``<out_dir>/tensorboard`` (needs ``pip install tensorboard``). Only rank 0 writes.

    A line: ``{"time": unix seconds, "stage": "two_tower", "split": "train" | "valid", "step": global
    step, "epoch": n, ...figures}``; ``python -m bench.report`` draws them.
    """

    def __init__(self, out_dir: str | Path, stage: str, tensorboard: bool = False) -> None:
        self.stage, self.file, self.board = stage, None, None
        if get_rank() != 0:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise SystemExit("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.board = SummaryWriter(str(out / "tensorboard"))
        self.file = open(out / "metrics.jsonl", "a")

    def log(self, split: str, step: int, epoch: int | None = None, **figures: float) -> None:
        if self.file is None:
            return
        values = {k: float(v) for k, v in figures.items()}
        self.file.write(
            json.dumps(
                {
                    "time": round(time.time(), 3),
                    "stage": self.stage,
                    "split": split,
                    "step": int(step),
                    "epoch": epoch,
                    **values,
                }
            )
            + "\n"
        )
        self.file.flush()
        if self.board is not None:
            for name, value in values.items():
                self.board.add_scalar(f"{self.stage}/{split}/{name}", value, int(step))

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.board is not None:
            self.board.close()
            self.board = None
