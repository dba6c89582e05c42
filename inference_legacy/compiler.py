"""Export and compile a model for serving: ``torch.export`` with size-oblivious shapes, then
AOTInductor into a ``.pt2`` package checked against the exported model before it is written.

The loading side, which every serving module needs (a package tied to its versions and CPU, checked
against the reference on load, with the eager model as the fallback), is common/compiled.py;
``python -m inference_legacy.aot_compile`` compiles the served models with this module.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from common.compiled import Guarded, sha256, target, versions
from common.export import read_manifest


def export_program(
    module: torch.nn.Module, example_args: tuple[torch.Tensor, ...], dynamic_shapes: dict[str, Any]
) -> torch.export.ExportedProgram:
    """``torch.export`` with size-oblivious symbolic shapes, so a batch of 1 takes the same graph
    as a batch of 1000 (otherwise export specializes on 0/1 and guards out B == 1)."""
    import torch.fx.experimental._config as fx_config

    with fx_config.patch(backed_size_oblivious=True), torch.no_grad():
        program = torch.export.export(module.eval(), example_args, dynamic_shapes=dynamic_shapes, strict=False)
    program.example_inputs = None  # would be pickled into the archive
    return program


def strip_bounds_checks(program: torch.export.ExportedProgram) -> int:
    """Remove FBGEMM's in-place bounds checks from the graph; returns how many there were."""
    nodes = [
        n
        for n in program.graph.nodes
        if n.op == "call_function" and n.target is torch.ops.fbgemm.bounds_check_indices.default
    ]
    for n in nodes:
        if n.users:
            raise RuntimeError(f"{n.name} has users {list(n.users)}; expected an op used only for its effect")
        program.graph.erase_node(n)
    program.graph_module.recompile()
    return len(nodes)


def compile_program(
    program: torch.export.ExportedProgram,
    example_inputs: tuple[torch.Tensor, ...],
    out: Path,
    guard: Callable[..., None],
    reference: Callable[..., torch.Tensor],
    check_inputs: tuple[torch.Tensor, ...],
    limit: float = 1e-3,
) -> tuple[dict[str, Any], Guarded]:
    """Compile ``program`` (its bounds checks stripped) to ``out``, written only if it matches
    ``reference`` on ``check_inputs`` within ``limit``; returns the manifest entry :func:`load_package`
    checks, and the compiled program as loaded for that check."""
    import fbgemm_gpu  # noqa: F401  registers the ops the programs call

    removed = strip_bounds_checks(program)
    program.example_inputs = (example_inputs, {})
    tmp = out.with_name(f".tmp{os.getpid()}.{out.name}")  # the compiler wants a name ending in .pt2
    t0 = time.perf_counter()
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))
        seconds = time.perf_counter() - t0
        compiled = Guarded(torch._inductor.aoti_load_package(str(tmp)), guard)
        with torch.inference_mode():
            got, want = compiled(*check_inputs), reference(*check_inputs)
        diff = float((got - want).abs().max()) if got.numel() else 0.0
        if not diff <= limit:
            raise RuntimeError(
                f"the compiled program's outputs are {diff:.2e} from the exported model's on the check inputs "
                f"(limit {limit:.0e}); {out.name} not written: serve the exported model"
            )
        entry = {
            "file": out.name,
            "bytes": tmp.stat().st_size,
            "sha256": sha256(tmp),
            "compiler": f"AOTInductor (torch {torch.__version__})",
            "versions": versions(),
            **target(),
            "removed_ops": {"fbgemm.bounds_check_indices": removed},
            "check_rows": len(want),
            "max_abs_diff": diff,
            # what a load must reproduce: the measured difference, with room for float reordering
            "tolerance": max(diff * 2, 1e-6),
            "compile_seconds": seconds,
        }
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return entry, compiled


def write_entry(manifest_path: Path, entry: dict[str, Any], key: str = "compiled") -> None:
    """Set the manifest's ``key`` entry (a new file moved into place: never half-written)."""
    manifest = read_manifest(manifest_path.parent, "export the model first", verify_files=False)
    manifest[key] = entry
    new = manifest_path.with_name(f".{manifest_path.name}.tmp{os.getpid()}")
    new.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(new, manifest_path)
