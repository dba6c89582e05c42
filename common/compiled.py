"""Loading ahead-of-time compiled models (AOTInductor), with the exported or eager model as the
fallback: what every serving module (``Retriever``, ``NextItemScorer``, ``DLRMPredictor``) repeats.

``python -m inference_legacy.aot_compile`` compiles a ``torch.export`` program into C++ kernels in a
``.pt2`` package beside its model, with a manifest entry that ties it to this torch / FBGEMM and CPU.
:func:`load_package` loads it only when that entry matches the file and the machine and the package
reproduces the reference model on check inputs within the recorded tolerance; otherwise it logs why
and returns ``None``, and the caller serves its reference. FBGEMM's ``bounds_check_indices`` is left
out of compiled graphs (AOTInductor cannot trace its data-dependent sizes): :class:`Guarded` checks
every ID against its feature's cardinality before each call instead (:func:`id_guard`: an error, not
a silent clamp). A package is native code built on this machine: load only packages you trust.
"""

from __future__ import annotations

import hashlib
import logging
import platform
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.features import FeatureSchema

log = logging.getLogger("common.compiled")


def versions() -> dict[str, str]:
    """Library versions an exported program or a compiled package is tied to."""
    out = {"torch": torch.__version__}
    for dist in ("fbgemm-gpu-cpu", "fbgemm-gpu", "torchrec"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    out["fbgemm"] = out.pop("fbgemm-gpu-cpu", out.pop("fbgemm-gpu", "absent"))
    return out


def target() -> dict[str, str]:
    """What a package is tied to besides the versions: the CPU's instruction set (the kernels use
    the widest vector unit torch found when compiling) and the architecture."""
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine()}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Guarded:
    """A compiled program behind the input check its graph leaves out (``guard`` raises on bad input)."""

    def __init__(self, runner: Callable[..., Any], guard: Callable[..., None]) -> None:
        self.runner, self.guard = runner, guard

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        self.guard(*inputs)
        return self.runner(*inputs)


def id_guard(schema: FeatureSchema) -> Callable[..., None]:
    """Checks the sparse IDs of a program whose last two inputs are ``(values, lengths)``,
    feature-major in ``schema``'s order, against each feature's cardinality."""
    names = schema.sparse_names
    cardinality = np.array([f.cardinality for f in schema.sparse], dtype=np.int64)

    def guard(*inputs: torch.Tensor) -> None:
        # in NumPy: on arrays this small each torch op costs several times its NumPy twin
        values, lengths = inputs[-2].numpy(), inputs[-1].numpy()
        per_feature = lengths.reshape(len(names), -1).sum(1)
        bad = (values < 0) | (values >= np.repeat(cardinality, per_feature))
        if bad.any():
            j = int(np.argmax(bad))
            f = int(np.searchsorted(np.cumsum(per_feature), j, side="right"))
            raise ValueError(
                f"sparse feature {names[f]!r}: ID {int(values[j])} is out of range [0, "
                f"{int(cardinality[f])}); the compiled program has no in-graph bounds check"
            )

    return guard


def by_user_guard(schema: FeatureSchema, user_features: list[str]) -> Callable[..., None]:
    """:func:`id_guard` for a per-user ranker program's inputs (dense, row_user, user_values,
    user_lengths, values, lengths): both sides' IDs, and every row's user index in range (the
    compiled gather reads memory unchecked)."""
    user_ids = id_guard(schema.subset(user_features))
    row_ids = id_guard(schema.subset([n for n in schema.sparse_names if n not in user_features]))
    features = len(user_features)

    def guard(*inputs: torch.Tensor) -> None:
        dense, row_user, user_values, user_lengths, values, lengths = inputs
        user_ids(user_values, user_lengths)
        row_ids(values, lengths)
        users, r = user_lengths.shape[0] // features, row_user.numpy()
        if r.shape != (dense.shape[0],) or (len(r) and (r.min() < 0 or r.max() >= users)):
            raise ValueError(f"row_user must hold one user index in [0, {users}) per row ({dense.shape[0]} rows)")

    return guard


@torch.inference_mode()
def max_diff(a: Callable[..., torch.Tensor], b: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> float:
    out_a, out_b = a(*inputs), b(*inputs)
    return float((out_a - out_b).abs().max()) if out_a.numel() else 0.0


def load_package(
    directory: Path,
    entry: dict[str, Any] | None,
    guard: Callable[..., None],
    reference: Callable[..., torch.Tensor],
    check_inputs: Callable[[], tuple[torch.Tensor, ...]],
    how_to_build: str,
) -> tuple[Guarded | None, str]:
    """The compiled model of ``directory`` described by ``entry`` (a manifest's ``compiled``), or
    ``None`` and the reason (logged): the caller then serves ``reference``."""
    if not entry:
        reason = f"no compiled package ({how_to_build} builds one)"
        log.info("%s: serving the exported model: %s", directory, reason)
        return None, reason
    reason = _mismatch(directory, entry)
    compiled = None
    if reason is None:
        try:
            import fbgemm_gpu  # noqa: F401

            compiled = Guarded(torch._inductor.aoti_load_package(str(directory / entry["file"])), guard)
            diff = max_diff(compiled, reference, check_inputs())
            if not diff <= entry["tolerance"]:
                reason = (
                    f"its outputs are {diff:.2e} from the exported model's on the check inputs, more than "
                    f"its recorded tolerance {entry['tolerance']:.2e}"
                )
        except Exception as err:  # a package that will not load surfaces as many exception types
            reason = f"it failed to load ({type(err).__name__}: {str(err)[:200]})"
    if reason is not None:
        log.warning("%s: serving the exported model, not %s: %s", directory, entry.get("file"), reason)
        return None, reason
    return compiled, "compiled"


def _mismatch(directory: Path, entry: dict[str, Any]) -> str | None:
    path = directory / str(entry.get("file"))
    if not path.is_file():
        return f"{path} is missing (the manifest lists it)"
    if path.stat().st_size != entry.get("bytes") or sha256(path) != entry.get("sha256"):
        return f"{path} does not match the manifest's size and SHA-256 (altered, or from another compile)"
    here = versions()
    for lib in ("torch", "fbgemm"):
        if entry.get("versions", {}).get(lib) != here[lib]:
            return f"compiled with {lib} {entry.get('versions', {}).get(lib)}, this environment has {here[lib]}"
    for key, value in target().items():
        if entry.get(key) != value:
            return f"compiled for {key} {entry.get(key)}, this machine is {value}: compile it again here"
    return None
