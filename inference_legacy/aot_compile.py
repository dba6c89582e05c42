"""Compile the served models ahead of time with AOTInductor; each is served compiled when its
package checks out, else as before.

    python -m inference_legacy.aot_compile runs/serving/dlrm-int8      # the ranker: model.aoti.pt2
    python -m inference_legacy.aot_compile runs/retrieval/export       # the query tower: query_tower.aoti.pt2
    python -m inference_legacy.aot_compile runs/bert4rec/export        # BERT4Rec's scorer: scorer.aoti.pt2 (+ _one)

- A ranker artifact (``inference_legacy.dlrm_packager``): its ``torch.export`` program compiled;
  checked on the artifact's held-out rows against the exported program and against the fp32
  model's recorded probabilities (within the artifact's tolerance).
- A retrieval export (``retrieval.two_tower_train``): the INT8 query tower as ``Retriever`` loads it,
  exported and compiled; checked on the first 256 users' queries against the eager tower.
- A BERT4Rec or SASRec export: the model's next-item scores over the catalog from padded tokens
  (``padded_scores``), exported and compiled; checked on 64 seeded histories of every length; and a
  program for one history alone (``scorer_one.aoti.pt2``), checked on the longest.

Each adds its package and a ``compiled`` entry to the directory's manifest (see
``common/compiled.py`` for what the entry ties the package to). Compiled, the graph no longer runs
node by node through Python (each model's speed-up: inference_legacy/README.md). The
loaders (``DLRMPredictor``, ``Retriever``, ``NextItemScorer``) use a package only when it matches its
entry and reproduces the exported model on check inputs; otherwise they log why and serve the
exported model. The servers' ``--eager`` ignores packages.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.export import Dim

from common.compiled import Guarded, by_user_guard, id_guard, load_package
from common.export import ExportError, read_manifest
from common.features import FeatureSchema
from inference_legacy import artifact as art
from inference_legacy.compiler import compile_program, export_program, write_entry

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


def compile_query_tower(export_dir: str | Path) -> dict:
    """Export the INT8 query tower as ``Retriever`` serves it on CPU, compile it with AOTInductor to
    ``query_tower.aoti.pt2`` (checked on the first users' queries against the eager tower) and add
    the manifest's ``compiled`` entry. Returns that entry."""
    export_dir = Path(export_dir)
    from retrieval.two_tower_retrieval import COMPILED_TOWER, Retriever, TowerProgram

    r = Retriever(export_dir, device="cpu", compiled=False)
    program = TowerProgram(r.tower)
    example = r.check_inputs(64)
    batch = Dim("batch", min=1, max=1 << 20)
    exported = export_program(
        program,
        example,
        {"values": {0: Dim("nnz", min=0, max=1 << 30)}, "lengths": {0: len(r.tower.feature_names) * batch}},
    )
    schema = r.features.query_schema
    entry, _ = compile_program(
        exported, example, export_dir / COMPILED_TOWER, id_guard(schema), program, r.check_inputs()
    )
    entry["quantize"] = "int8"
    write_entry(export_dir / "manifest.json", entry)
    return entry


def compile_scorer(export_dir: str | Path) -> dict:
    """Export the sequential model's ``padded_scores`` and compile it with AOTInductor to
    ``scorer.aoti.pt2`` (checked against the eager model on seeded histories of every length); adds
    the manifest's ``compiled`` entry and returns it. Also the one-sequence program,
    ``scorer_one.aoti.pt2`` (the manifest's ``compiled_one``, returned as the entry's ``one``): the
    batch program's shapes start at two rows, so a lone user's request (the service's) would pay
    for a padding row as long as its own sequence; this one takes one row of any width."""
    export_dir = Path(export_dir)
    from bert4rec.scorer import COMPILED_ONE, COMPILED_SCORER, NextItemScorer

    scorer = NextItemScorer(export_dir, compiled=False)
    model, inputs = scorer.model, scorer.check_inputs()

    class Program(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            return self.model.padded_scores(tokens, lengths)

    batch, width = Dim("batch", min=2, max=1 << 20), Dim("width", min=2, max=model.max_len)
    program = export_program(Program(), inputs, {"tokens": {0: batch, 1: width}, "lengths": {0: batch}})
    entry, _ = compile_program(
        program, inputs, export_dir / COMPILED_SCORER, scorer.token_guard, model.padded_scores, inputs
    )
    write_entry(export_dir / "manifest.json", entry)
    one = scorer.check_one()
    program = export_program(Program(), one, {"tokens": {1: width}, "lengths": None})  # one row, any width
    entry["one"], _ = compile_program(
        program, one, export_dir / COMPILED_ONE, scorer.token_guard, model.padded_scores, one
    )
    write_entry(export_dir / "manifest.json", entry["one"], key="compiled_one")
    return entry


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
        try:  # what kind of export it is; each loader checks its files
            kind = read_manifest(
                path, "give a ranker artifact, a retrieval export or a sequential export", verify_files=False
            )
        except ExportError as err:
            raise SystemExit(str(err)) from None
        if "query_schema" in kind:
            entry, what = compile_query_tower(path), "query tower"
        elif kind.get("model") in ("bert4rec", "sasrec"):
            entry, what = compile_scorer(path), f"{kind['model']} scorer"
        else:
            entry, what = compile_artifact(path), "ranker"
        extra = (
            f", max |compiled - fp32| {entry['max_abs_diff_vs_fp32']:.1e}" if "max_abs_diff_vs_fp32" in entry else ""
        )
        if "one" in entry:
            extra += (
                f"; the one-sequence program to {entry['one']['file']} "
                f"(max |compiled - exported| {entry['one']['max_abs_diff']:.1e})"
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
