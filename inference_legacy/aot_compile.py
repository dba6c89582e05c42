"""Compile a packaged model ahead of time with AOTInductor; serve it, or the exported program.

    python -m inference_legacy.aot_compile runs/serving/dlrm-int8     # writes model.aoti.pt2 into it

AOTInductor (``torch._inductor.aoti_compile_and_package``) turns the artifact's ``torch.export``
program into C++ kernels and a shared library, packaged as ``model.aoti.pt2`` next to the
program. On this machine it scores 100 rows about 4x faster than the exported program (the
Python interpreter of the graph is gone). The compiled package is checked before it is written
and again when it is loaded: it must score the artifact's held-out rows like the exported program
within the tolerance recorded in the manifest's ``compiled`` entry. Whenever it cannot be used
(absent, altered, built by another torch / FBGEMM or for another CPU, failing to load, or
scoring differently) the loader logs why and serves the exported program instead.

One op is left out of the compiled graph: FBGEMM's ``bounds_check_indices``, which clamps
out-of-range IDs in place and whose data-dependent sizes AOTInductor cannot trace
(``GuardOnDataDependentSymNode``). :class:`CompiledProgram` checks every ID against its
feature's cardinality before the call instead (an out-of-range ID is an error, not a clamp).

The package is native code built on this machine: load only artifacts you built or trust
(``--eager`` on the servers ignores it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.features import FeatureSchema
from inference_legacy import artifact as art

log = logging.getLogger("inference_legacy.aot_compile")

COMPILED = "model.aoti.pt2"
CHECK_ROWS = 256  # held-out rows scored by both runtimes each time the package is loaded


def target() -> dict[str, str]:
    """What a compiled package is tied to besides the library versions: the CPU's instruction set
    (the kernels use the widest vector unit torch found when compiling) and the architecture."""
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine()}


class CompiledProgram:
    """The AOTInductor-compiled program behind the ID check its graph leaves out."""

    def __init__(self, runner: Any, schema: FeatureSchema) -> None:
        self.runner = runner
        self.names = schema.sparse_names
        self.cardinality = torch.tensor([f.cardinality for f in schema.sparse], dtype=torch.int64)

    def __call__(self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        per_feature = lengths.view(len(self.names), -1).sum(1)
        limit = self.cardinality.repeat_interleave(per_feature, output_size=values.numel())
        bad = (values < 0) | (values >= limit)
        if bool(bad.any()):
            j = int(bad.nonzero()[0])
            f = int(torch.searchsorted(per_feature.cumsum(0), j, right=True))
            raise ValueError(
                f"sparse feature {self.names[f]!r}: ID {int(values[j])} is out of range [0, "
                f"{int(self.cardinality[f])}); the compiled program has no in-graph bounds check"
            )
        return self.runner(dense, values, lengths)


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


def _inputs(schema: FeatureSchema, rows: list[dict[str, Any]]) -> tuple[torch.Tensor, ...]:
    fb = schema.from_records([r["features"] for r in rows])
    return fb.dense, fb.sparse.values().long(), fb.sparse.lengths().long()


@torch.inference_mode()
def _max_diff(a: Any, b: Any, inputs: tuple[torch.Tensor, ...]) -> float:
    return float((a(*inputs) - b(*inputs)).abs().max()) if len(inputs[0]) else 0.0


def compile_artifact(artifact: str | Path) -> dict[str, Any]:
    """Compile ``artifact``'s program, check it on the held-out rows, and add ``model.aoti.pt2`` and
    the manifest's ``compiled`` entry. Returns that entry."""
    import fbgemm_gpu  # noqa: F401  registers the ops the program calls

    artifact = Path(artifact)
    manifest = art.read_manifest(artifact)
    schema = art.load_schema(artifact, manifest)
    rows = art.read_heldout(artifact)
    if not rows:
        raise art.ArtifactError(f"{artifact}: no held-out rows to check a compiled program on; package it again")
    eager = art.load_program(artifact, manifest)
    program = torch.export.load(artifact / art.PROGRAM)  # checked pickle-free by load_program
    removed = strip_bounds_checks(program)
    program.example_inputs = (_inputs(schema, rows[:64]), {})
    tmp = artifact / f".tmp{os.getpid()}.{COMPILED}"  # the compiler wants a name ending in .pt2
    t0 = time.perf_counter()
    torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))
    seconds = time.perf_counter() - t0
    try:
        compiled = CompiledProgram(torch._inductor.aoti_load_package(str(tmp)), schema)
        inputs = _inputs(schema, rows)
        vs_program = _max_diff(compiled, eager, inputs)
        with torch.inference_mode():
            vs_fp32 = float(np.abs(compiled(*inputs).numpy() - np.array([r["fp32"] for r in rows])).max())
        limit = manifest["verification"]["tolerance"] + 1e-6
        if vs_fp32 > limit:
            raise art.ArtifactError(
                f"{artifact}: the compiled program is {vs_fp32:.2e} from the fp32 model on the held-out rows, "
                f"more than the artifact's tolerance {limit:.2e}; serve the exported program"
            )
        entry = {
            "file": COMPILED,
            "bytes": tmp.stat().st_size,
            "sha256": art.sha256(tmp),
            "compiler": f"AOTInductor (torch {torch.__version__})",
            "versions": art.versions(),
            **target(),
            "removed_ops": {"fbgemm.bounds_check_indices": removed},
            "rows": len(rows),
            "max_abs_diff_vs_program": vs_program,
            "max_abs_diff_vs_fp32": vs_fp32,
            # what a load must reproduce: the measured difference, with room for float reordering
            "tolerance": max(vs_program * 2, 1e-6),
            "compile_seconds": seconds,
        }
        os.replace(tmp, artifact / COMPILED)
    finally:
        tmp.unlink(missing_ok=True)
    manifest["compiled"] = entry
    new = artifact / f".{art.MANIFEST}.tmp{os.getpid()}"
    new.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(new, artifact / art.MANIFEST)
    return entry


def load_compiled(
    artifact: str | Path, manifest: dict[str, Any], program: Any, schema: FeatureSchema
) -> tuple[CompiledProgram | None, str]:
    """The compiled program, or ``None`` and why not (logged). ``program`` is the exported one: the
    compiled one must score the held-out rows like it, within the manifest's recorded tolerance."""
    artifact = Path(artifact)
    entry = manifest.get("compiled")
    if not entry:
        reason = f"no compiled package (python -m inference_legacy.aot_compile {artifact} builds one)"
        log.info("%s: serving the exported program: %s", artifact, reason)
        return None, reason
    reason = _mismatch(artifact, entry)
    compiled = None
    if reason is None:
        try:
            import fbgemm_gpu  # noqa: F401

            compiled = CompiledProgram(torch._inductor.aoti_load_package(str(artifact / COMPILED)), schema)
            rows = art.read_heldout(artifact)[:CHECK_ROWS]
            diff = _max_diff(compiled, program, _inputs(schema, rows))
            if not diff <= entry["tolerance"]:
                reason = (
                    f"it scores the held-out rows {diff:.2e} away from the exported program, more than its "
                    f"recorded tolerance {entry['tolerance']:.2e}"
                )
        except Exception as err:  # a package that will not load surfaces as many exception types
            reason = f"it failed to load ({type(err).__name__}: {str(err)[:200]})"
    if reason is not None:
        log.warning("%s: serving the exported program, not %s: %s", artifact, COMPILED, reason)
        return None, reason
    return compiled, "compiled"


def _mismatch(artifact: Path, entry: dict[str, Any]) -> str | None:
    path = artifact / COMPILED
    if not path.is_file():
        return f"{path} is missing (the manifest lists it)"
    if path.stat().st_size != entry.get("bytes") or art.sha256(path) != entry.get("sha256"):
        return f"{path} does not match the manifest's size and SHA-256 (altered, or from another compile)"
    here = art.versions()
    for lib in ("torch", "fbgemm"):
        if entry.get("versions", {}).get(lib) != here[lib]:
            return f"compiled with {lib} {entry.get('versions', {}).get(lib)}, this environment has {here[lib]}"
    for key, value in target().items():
        if entry.get(key) != value:
            return f"compiled for {key} {entry.get(key)}, this machine is {value}: compile it again here"
    return None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifacts", nargs="+", help="artifact directories (python -m inference_legacy.dlrm_packager)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = {}
    for path in a.artifacts:
        entry = compile_artifact(path)
        print(
            f"{path}: {COMPILED} ({entry['bytes'] / 1e6:.1f} MB) in {entry['compile_seconds']:.0f} s; "
            f"held-out rows {entry['rows']}: max |compiled - exported| {entry['max_abs_diff_vs_program']:.1e}, "
            f"max |compiled - fp32| {entry['max_abs_diff_vs_fp32']:.1e}"
        )
        out[path] = entry
    return out


if __name__ == "__main__":
    main()
