"""Compile the served models ahead of time with AOTInductor; each is served compiled when its
package checks out, else as before.

    python -m inference_legacy.aot_compile runs/serving/dlrm-int8      # the ranker: model.aoti.pt2
    python -m inference_legacy.aot_compile runs/retrieval/export       # the query tower: query_tower.aoti.pt2
    python -m inference_legacy.aot_compile runs/bert4rec/export        # BERT4Rec's scorer: scorer.aoti.pt2

- A ranker artifact (``inference_legacy.dlrm_packager``): its ``torch.export`` program compiled;
  checked on the artifact's held-out rows against the exported program and against the fp32
  model's recorded probabilities (within the artifact's tolerance).
- A retrieval export (``retrieval.two_tower_train``): the INT8 query tower as ``Retriever`` loads it,
  exported and compiled; checked on the first 256 users' queries against the eager tower.
- A BERT4Rec or SASRec export: the model's next-item scores over the catalog from padded tokens
  (``padded_scores``), exported and compiled; checked on 64 seeded histories of every length.

Each adds its package and a ``compiled`` entry to the directory's manifest (see
``common/compiled.py`` for what the entry ties the package to). On this machine, one thread, the
ranker over 100 candidate rows takes 0.28 ms compiled against 0.70 ms, the query tower 0.09 against
0.20, BERT4Rec's scores 0.43 against 0.69 (the graph no longer runs node by node through Python). The
loaders (``DLRMPredictor``, ``Retriever``, ``NextItemScorer``) use a package only when it matches its
entry and reproduces the exported model on check inputs; otherwise they log why and serve the
exported model. The servers' ``--eager`` ignores packages.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.compiled import Guarded, by_user_guard, compile_program, id_guard, load_package, write_entry
from common.features import FeatureSchema
from inference_legacy import artifact as art

COMPILED = "model.aoti.pt2"
COMPILED_BY_USER = "model_by_user.aoti.pt2"  # the per-user program (manifest key "compiled_by_user")
CHECK_ROWS = 256  # held-out rows scored by both runtimes each time the package is loaded


def _inputs(schema: FeatureSchema, rows: list[dict[str, Any]]) -> tuple[torch.Tensor, ...]:
    return art.program_inputs(schema.from_records([r["features"] for r in rows]))


class _Program:
    """One of a ranker artifact's programs: the per-row one (``model.pt2``) or, with ``by_user``, the
    per-user one (``model_by_user.pt2``): its files, manifest key, input guard and held-out inputs."""

    def __init__(self, manifest: dict[str, Any], schema: FeatureSchema, by_user: bool = False) -> None:
        self.schema, self.by_user = schema, by_user
        if by_user:
            self.features = manifest["by_user"]["user_features"]
            self.exported, self.file, self.key = art.BY_USER, COMPILED_BY_USER, "compiled_by_user"
            self.guard, self.name = by_user_guard(schema, self.features), "per-user program"
        else:
            self.exported, self.file, self.key = art.PROGRAM, COMPILED, "compiled"
            self.guard, self.name = id_guard(schema), "program"

    def inputs(self, rows: list[dict[str, Any]]) -> tuple[torch.Tensor, ...]:
        x = _inputs(self.schema, rows)
        return art.by_user_inputs(self.schema, self.features, x) if self.by_user else x


def compile_artifact(artifact: str | Path) -> dict[str, Any]:
    """Compile a ranker artifact's program (and its per-user program, where it has one), check each on
    the held-out rows, and add ``model.aoti.pt2`` and the manifest's ``compiled`` entry (and
    ``model_by_user.aoti.pt2``, ``compiled_by_user``). Returns the ``compiled`` entry, with the per-user
    one under ``by_user``."""
    artifact = Path(artifact)
    manifest = art.read_manifest(artifact)
    schema = art.load_schema(artifact, manifest)
    rows = art.read_heldout(artifact)
    if not rows:
        raise art.ArtifactError(f"{artifact}: no held-out rows to check a compiled program on; package it again")
    entry = _compile(artifact, manifest, _Program(manifest, schema), rows)
    if "by_user" in manifest:
        entry["by_user"] = _compile(artifact, manifest, _Program(manifest, schema, by_user=True), rows)
    return entry


def _compile(artifact: Path, manifest: dict[str, Any], which: _Program, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Compile ``which``, check it against its exported program and the fp32 model's recorded
    probabilities on the held-out rows, and write its manifest entry."""
    eager = art.load_program(artifact, manifest, which.exported)
    program = torch.export.load(artifact / which.exported)  # checked pickle-free by load_program
    inputs = which.inputs(rows)
    entry, compiled = compile_program(
        program, which.inputs(rows[:64]), artifact / which.file, which.guard, eager, inputs
    )
    with torch.inference_mode():
        entry["max_abs_diff_vs_fp32"] = float(
            np.abs(compiled(*inputs).numpy() - np.array([r["fp32"] for r in rows])).max()
        )
    limit = manifest["verification"]["tolerance"] + 1e-6
    if entry["max_abs_diff_vs_fp32"] > limit:
        (artifact / which.file).unlink()
        raise art.ArtifactError(
            f"{artifact}: the compiled {which.name} is {entry['max_abs_diff_vs_fp32']:.2e} from the fp32 model on "
            f"the held-out rows, more than the artifact's tolerance {limit:.2e}; serve the exported program"
        )
    write_entry(artifact / art.MANIFEST, entry, which.key)
    return entry


def load_compiled(
    artifact: str | Path, manifest: dict[str, Any], program: Any, schema: FeatureSchema, by_user: bool = False
) -> tuple[Guarded | None, str]:
    """A ranker artifact's compiled program (``by_user``: its per-user program), or ``None`` and why not
    (logged). ``program`` is the exported one, which the compiled one must match on held-out rows
    within the recorded tolerance."""
    artifact = Path(artifact)
    which = _Program(manifest, schema, by_user)
    return load_package(
        artifact,
        manifest.get(which.key),
        which.guard,
        program,
        lambda: which.inputs(art.read_heldout(artifact)[:CHECK_ROWS]),
        f"python -m inference_legacy.aot_compile {artifact}",
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "paths",
        nargs="+",
        help="ranker artifacts (inference_legacy.dlrm_packager), retrieval exports (retrieval.two_tower_train) or "
        "BERT4Rec / SASRec exports",
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = {}
    for path in a.paths:
        manifest = Path(path) / "manifest.json"
        if not manifest.is_file():
            raise SystemExit(f"{manifest} not found: give a ranker artifact or a retrieval export directory")
        kind = json.loads(manifest.read_text())
        if "query_schema" in kind:
            from retrieval.two_tower_retrieval import compile_query_tower

            entry, what = compile_query_tower(path), "query tower"
        elif kind.get("model") in ("bert4rec", "sasrec"):
            from common.sequential import compile_scorer

            entry, what = compile_scorer(path), f"{kind['model']} scorer"
        else:
            entry, what = compile_artifact(path), "ranker"
        extra = (
            f", max |compiled - fp32| {entry['max_abs_diff_vs_fp32']:.1e}" if "max_abs_diff_vs_fp32" in entry else ""
        )
        if "by_user" in entry:
            extra += (
                f"; the per-user program to {entry['by_user']['file']} "
                f"(max |compiled - exported| {entry['by_user']['max_abs_diff']:.1e})"
            )
        print(
            f"{path}: {what} compiled to {entry['file']} ({entry['bytes'] / 1e6:.1f} MB) in "
            f"{entry['compile_seconds']:.0f} s; {entry['check_rows']} check rows: max |compiled - exported| "
            f"{entry['max_abs_diff']:.1e}{extra}"
        )
        out[path] = entry
    return out


if __name__ == "__main__":
    main()
