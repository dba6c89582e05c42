"""The flags every training script shares, declared once.

    p = argparse.ArgumentParser(...)
    ... the script's own data and model flags ...
    groups = add_trainer_args(p, Config(), batch_size="examples per rank per step; also the in-batch negatives")
    groups["distributed"].add_argument("--qcomms", ...)   # a script's own flags join the shared groups

Each flag is added only where the script's ``Config`` has its field, with that field's default; a
keyword argument rewords one flag's help for the script.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from common.checkpoint import checkpoint_interval
from common.sharding import PIPELINE_HELP, PIPELINES, SHARDING_TYPES

CHECKPOINT_HELP = (
    "DCP checkpoints mid-epoch every N steps (200) or every interval of wall time (30s, 5min, 1h); "
    "0 = epoch ends only (default: {default})"
)
RESUME_HELP = (
    "continue from the latest checkpoint under --out, if there is one, exactly where it stopped (without it, "
    "an --out holding checkpoints is refused)"
)
# (group, flag, add_argument keywords, help with {default}); the dest is the flag's field name.
_FLAGS: tuple[tuple[str, str, dict[str, Any], str], ...] = (
    ("training", "--epochs", {"type": int}, "passes over the training data (default: {default})"),
    ("training", "--batch-size", {"type": int}, "examples per rank per step (default: {default})"),
    ("training", "--sparse-lr", {"type": float}, "RowWiseAdagrad learning rate of the tables (default: {default})"),
    ("training", "--dense-lr", {"type": float}, "Adam learning rate of the MLPs (default: {default})"),
    ("training", "--seed", {"type": int}, "seed for initialization and data order (default: {default})"),
    ("training", "--limit-batches", {"type": int}, "stop each epoch after this many steps (default: all)"),
    ("training", "--checkpoint-every", {"type": checkpoint_interval}, CHECKPOINT_HELP),
    ("training", "--resume", {"action": "store_true"}, RESUME_HELP),
    ("training", "--log-every", {"type": int}, "steps between log lines and metrics.jsonl lines (default: {default})"),
    ("training", "--tensorboard", {"action": "store_true"}, "also write TensorBoard events under <out>/tensorboard"),
    ("distributed", "--device", {"choices": ["auto", "cpu", "cuda"]}, "auto: cuda if available (default: {default})"),
    ("distributed", "--sharding-type", {}, "how tables are sharded; row-wise kinds need CUDA (default: {default})"),
    ("distributed", "--pipeline", {"choices": PIPELINES}, PIPELINE_HELP),
    ("output", "--out", {}, "run directory (default: {default})"),
    ("output", "--n-boot", {"type": int}, "bootstrap resamples for CIs (default: {default})"),
    ("output", "--no-test", {"action": "store_true"}, "never evaluate on test (model selection runs): validation only"),
)


def add_trainer_args(
    p: argparse.ArgumentParser, defaults: Any, sharding_types: tuple[str, ...] = SHARDING_TYPES, **help_of: str
) -> dict[str, Any]:
    """Add the shared flags that ``defaults`` (a script's ``Config()``) has fields for, in the groups
    "training", "distributed" and "output", and return the groups for the script's own flags.
    ``sharding_types`` are the --sharding-type choices (a sequence table's sharder offers fewer);
    ``help_of[field]`` replaces a flag's help ("{default}" is filled in)."""
    fields = {f.name for f in dataclasses.fields(defaults)}
    groups = {name: p.add_argument_group(name) for name in ("training", "distributed", "output")}
    for group, flag, kw, text in _FLAGS:
        dest = flag[2:].replace("-", "_")
        if dest not in fields:
            continue
        default = getattr(defaults, dest)
        text = help_of.get(dest, text)
        if kw.get("action") != "store_true":
            kw = {**kw, "default": default}
        if flag == "--sharding-type":
            kw = {**kw, "choices": sharding_types}
        groups[group].add_argument(flag, help=text if flag == "--pipeline" else text.format(default=default), **kw)
    unknown = set(help_of) - {flag[2:].replace("-", "_") for _, flag, _, _ in _FLAGS}
    if unknown:
        raise ValueError(f"add_trainer_args: no shared flag for {sorted(unknown)}")
    return groups
