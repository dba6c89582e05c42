"""Distributed checkpoints (torch.distributed.checkpoint, "DCP") that survive a crash.

Layout under a run's checkpoint directory::

    ckpt/
      step_00000100/        one DCP checkpoint (every rank's shards + .metadata)
        meta.json           written last, by rank 0: marks the checkpoint complete
      step_00000200/
      .step_00000300.partial/   a save in progress (or killed mid-way); never loaded

A save writes into a ``.partial`` directory; only when every rank has finished does rank 0 add
``meta.json`` and rename the directory into place, so a run killed at any point leaves either the
previous checkpoints or a complete new one. DCP stores sharded tensors with their global layout,
so a checkpoint saved by 2 ranks loads into 1 process (or any other world size) unchanged.
``meta.json`` also records every file's size and SHA-256: a checkpoint damaged after it was written
is refused by :func:`load_checkpoint`, and :func:`resume_if_possible` falls back to the newest intact
one, saying which it skipped and why.

Loading never runs code from the checkpoint. DCP pickles its ``.metadata`` and unpickles it on
load, and loads non-tensor values with ``torch.load(weights_only=False)``: a checkpoint copied
from elsewhere could carry a pickle that runs a command. :func:`load_checkpoint` reads the
metadata with an unpickler that admits only the classes DCP writes there, and every value with
``weights_only=True``; anything else is refused with :class:`UnsafeCheckpoint`, naming the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import pickle
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torchrec.optim.keyed import CombinedOptimizer

from common.data.download import file_digest
from common.runtime import get_rank, write_json_atomic

_STEP_DIR = re.compile(r"^step_(\d{8})$")


class UnsafeCheckpoint(ValueError):
    """A checkpoint file holds something other than what DCP writes: it is not loaded."""


class DamagedCheckpoint(ValueError):
    """A checkpoint's files differ from what was saved (truncated, overwritten, missing)."""


def checkpoint_problem(path: str | Path) -> str | None:
    """Why checkpoint ``path`` cannot be trusted (a sentence naming the file), or None if it is
    intact: meta.json readable, DCP's .metadata present, and every file with the size and SHA-256
    recorded when it was saved (checkpoints written before sizes and hashes were recorded are
    checked for the first two only)."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as err:
        return f"{path / 'meta.json'} is unreadable ({type(err).__name__}: {err})"
    if not isinstance(meta, dict):
        return f"{path / 'meta.json'} is not a JSON object"
    if not (path / ".metadata").is_file():
        return f"{path / '.metadata'} is missing"
    files = meta.get("files") or {}
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != want.get("size"):
            return f"{f} has {f.stat().st_size:,} bytes, {want.get('size'):,} when saved"
        if file_digest(f, "sha256") != want.get("sha256"):
            return f"{f} differs from the file saved (SHA-256)"
    return None


# Everything DCP 2.x pickles into .metadata (found by reading the pickles of this project's checkpoints).
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_CLASSES.get(module, ()) or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise UnsafeCheckpoint(f"{module}.{name}")


class _SafeReader(FileSystemReader):
    """DCP's file reader with the metadata unpickled through :class:`_MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except UnsafeCheckpoint as err:
                raise UnsafeCheckpoint(
                    f"{path} refers to {err}, which DCP never writes into checkpoint metadata; "
                    f"refusing to load it (unpickling it could run code). Use checkpoints from "
                    f"a source you trust, or retrain"
                ) from None
            except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError) as err:
                raise UnsafeCheckpoint(
                    f"{path} is not readable DCP metadata ({type(err).__name__}: {err}); the checkpoint is damaged"
                ) from None
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpoint(f"{path} holds a {type(metadata).__name__}, not DCP metadata; refusing it")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _WeightsOnlyPlanner(DefaultLoadPlanner):
    """DCP's load planner, with non-tensor values read by ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpoint(
                f"checkpoint value {read_item.dest_index.fqn!r} is not plain data ({err}); refusing to load it"
            ) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and (child / "meta.json").is_file():
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


_INTERVAL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|min|h)?\s*$")
_UNIT_SECONDS = {"s": 1, "min": 60, "h": 3600}


def checkpoint_interval(text: str) -> str:
    """argparse type of ``--checkpoint-every``: a number of steps (``200``), a wall-clock interval
    (``30s``, ``5min``, ``1h``), or ``0`` (epoch ends only). Returns the text, checked."""
    m = _INTERVAL.match(str(text))
    if not m or (m.group(2) is None and "." in m.group(1)):
        raise argparse.ArgumentTypeError(
            f"--checkpoint-every {text!r}: give a number of steps (200), a time (30s, 5min, 1h), or 0 for epoch ends only"
        )
    return str(text).strip()


class CheckpointSchedule:
    """When to save mid-epoch under ``--checkpoint-every`` (see :func:`checkpoint_interval`).

    A step interval is the same for every table size, so its cost grows with the tables (at a million
    users, saving every 100 steps took most of the training time: retrieval/README.md). A time
    interval bounds both the cost (one save per interval) and the work lost in a crash (at most the
    interval). Under ``torchrun`` the ranks must save together: rank 0's clock decides and
    broadcasts its decision every ``poll_steps`` steps (one 1-element collective), so a timed save
    comes at most ``poll_steps`` steps late.
    """

    def __init__(self, every: str, poll_steps: int = 20) -> None:
        m = _INTERVAL.match(checkpoint_interval(every))
        value, unit = float(m.group(1)), m.group(2)
        self.steps = int(value) if unit is None else 0
        self.seconds = value * _UNIT_SECONDS[unit] if unit else 0.0
        self.poll_steps = poll_steps
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.saved()

    def saved(self) -> None:
        """Restart the clock (after a save, and at the start of training)."""
        self.last = time.monotonic()

    def due(self, step: int) -> bool:
        """Whether to save after ``step`` (the same answer on every rank)."""
        if self.steps:
            return step % self.steps == 0
        if not self.seconds:
            return False
        if self.world == 1:
            return time.monotonic() - self.last >= self.seconds
        if step % self.poll_steps:
            return False
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        flag = torch.tensor([float(time.monotonic() - self.last >= self.seconds)], device=device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())


def save_checkpoint(
    root: str | Path, step: int, state: dict[str, Any], meta: dict[str, Any] | None = None, keep_last: int = 2
) -> Path:
    """Save ``state`` (modules, optimizers, or plain state dicts) as checkpoint ``step``.

    Every rank must call this. ``meta`` (JSON-able: step counters, epoch, config) is written by
    rank 0 and returned by :func:`load_checkpoint`. Older complete checkpoints beyond
    ``keep_last`` are removed after the new one is in place.
    """
    root = Path(root)
    final = root / f"step_{step:08d}"
    partial = root / f".step_{step:08d}.partial"
    if get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # leftovers of a killed save
        partial.mkdir()
    _barrier()
    dcp.save(_state_dicts(state), checkpoint_id=str(partial))
    _barrier()
    if get_rank() == 0:
        info = {
            "step": step,
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            **(meta or {}),
            "files": {
                f.name: {"size": f.stat().st_size, "sha256": file_digest(f, "sha256")}
                for f in sorted(partial.iterdir())
                if f.is_file()
            },
        }
        write_json_atomic(partial / "meta.json", info)
        if final.exists():  # a re-save of the same step (e.g. after resuming) replaces it
            shutil.rmtree(final)
        os.replace(partial, final)
        for old in checkpoint_dirs(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: str | Path, state: dict[str, Any], verify: bool = True) -> dict[str, Any]:
    """Load checkpoint ``path`` into ``state`` in place (same keys as saved; any world size).

    Returns the checkpoint's ``meta`` dict. Modules and optimizers in ``state`` get their
    ``load_state_dict`` called with the loaded values. ``verify`` checks every file against the
    sizes and hashes in meta.json first (:class:`DamagedCheckpoint` names the file that differs).
    """
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise FileNotFoundError(
            f"{path} is not a complete checkpoint (no meta.json); pick one from checkpoint_dirs({path.parent})"
        )
    problem = checkpoint_problem(path) if verify else None
    if problem:
        raise DamagedCheckpoint(f"checkpoint {path} is damaged: {problem}")
    for obj in state.values():
        if isinstance(obj, torch.optim.Optimizer):
            _materialize_optimizer_state(obj)
    plain = _state_dicts(state)
    reader = _SafeReader(path)
    reader.read_metadata()  # first here: DCP's own read folds errors into one message without the type
    dcp.load(plain, storage_reader=reader, planner=_WeightsOnlyPlanner())
    for key, obj in state.items():
        if hasattr(obj, "load_state_dict") and not isinstance(obj, dict):
            obj.load_state_dict(plain[key])
    meta = json.loads(meta_file.read_text())
    meta.pop("files", None)  # the checkpoint's own bookkeeping, not the caller's meta
    return meta


# Script settings that may change between a run and its resumption (more epochs, other paths...).
RESUMABLE_CHANGES = frozenset(
    {
        "resume",
        "out",
        "epochs",
        "log_every",
        "tensorboard",
        "checkpoint_every",
        "n_boot",
        "eval_batch_size",
        "device",
        "data_dir",
        "source",
        "index_type",
        "pipeline",  # how steps are scheduled, not what they compute
    }
)


def run_config(cfg: Any, fingerprint: str) -> dict[str, Any]:
    """What defines a run (a script's config dataclass minus :data:`RESUMABLE_CHANGES`, plus the
    data fingerprint), for :func:`resume_if_possible` to refuse checkpoints of other settings."""
    return {
        **{k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE_CHANGES},
        "data_fingerprint": fingerprint,
    }


def resume_if_possible(
    root: str | Path, state: dict[str, Any], run_config: dict[str, Any] | None = None, resume: bool = True
) -> dict[str, Any] | None:
    """Load the latest complete checkpoint under ``root`` into ``state``; None if there is none.

    With ``resume=False`` (a script run without ``--resume``) an existing checkpoint is an error
    instead, so that a new run never continues an old one by accident, nor overwrites it.

    Rank 0 decides which checkpoint to use and every rank follows, so ranks never disagree.
    ``run_config`` (the settings that define the run) is compared with the ``"run_config"`` saved
    in the checkpoint's meta: resuming a run with other settings would silently mix two runs, so a
    difference is an error that names the settings and the way out.
    """
    decision: list[Any] = ["", "", ""]  # newest checkpoint, the newest intact one, why newer ones were skipped
    if get_rank() == 0:
        dirs = checkpoint_dirs(root)
        skipped = []
        for p in reversed(dirs if resume else []):
            problem = checkpoint_problem(p)
            if problem is None:
                decision[1] = p.name
                break
            skipped.append(problem)
        decision = [dirs[-1].name if dirs else "", decision[1], "; ".join(skipped)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(decision, src=0)
    newest, intact, skipped = decision
    if not newest:
        return None
    if not resume:
        raise FileExistsError(
            f"{Path(root) / newest} is a checkpoint of an earlier run; pass --resume to continue "
            f"it, or use another --out (or delete {root}) to start over"
        )
    if not intact:
        raise DamagedCheckpoint(
            f"no intact checkpoint under {root} to resume from ({skipped}); delete {root} and "
            f"start over without --resume"
        )
    path = Path(root) / intact
    if skipped and get_rank() == 0:
        print(
            f"warning: resuming from {path}, the newest intact checkpoint; skipped newer ones: {skipped}",
            file=sys.stderr,
        )
    if run_config is not None:
        saved = json.loads((path / "meta.json").read_text()).get("run_config")
        if saved is not None:
            now = json.loads(json.dumps(run_config))  # tuples -> lists, as saved
            diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
            if diff:
                detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff)
                raise ValueError(
                    f"{root} holds checkpoints of a run with other settings ({detail}); resume with "
                    f"the same settings, or use another --out (or delete {root}) to start over"
                )
    return load_checkpoint(path, state, verify=False)  # rank 0 just verified it


def gathered_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights, assembled on rank 0 (collective; other ranks get an empty dict)."""
    rank0 = torch.distributed.get_rank() == 0
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if isinstance(value, ShardedTensor):
            full = torch.empty(value.size(), dtype=value.dtype) if rank0 else None
            value.gather(dst=0, out=full)
            value = full
        if rank0:
            out[key] = value.detach().cpu().clone()
    return out


def _state_dicts(state: dict[str, Any]) -> dict[str, Any]:
    return {
        key: (obj.state_dict() if hasattr(obj, "state_dict") and not isinstance(obj, dict) else obj)
        for key, obj in state.items()
    }


def _materialize_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Optimizers create their state on the first step, but DCP loads in place into the tensors a
    state dict already has. So take one step with zero gradients and zero learning rate first:
    the state exists, and no parameter moves. TorchRec's fused optimizers are already full; a
    CombinedOptimizer is handled one part at a time, since its fused part makes it look full."""
    if isinstance(opt, CombinedOptimizer):
        for _, part in opt.optimizers:
            _materialize_optimizer_state(part)
        return
    if opt.state:
        return
    params = [p for group in opt.param_groups for p in group["params"] if p.requires_grad]
    if any(p.grad is not None for p in params):
        return
    saved_lrs = [group.get("lr") for group in opt.param_groups]
    for group in opt.param_groups:
        if "lr" in group:
            group["lr"] = torch.zeros_like(group["lr"]) if isinstance(group["lr"], torch.Tensor) else 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for group, lr in zip(opt.param_groups, saved_lrs):
        if lr is not None:
            group["lr"] = lr
    for p in params:
        p.grad = None
