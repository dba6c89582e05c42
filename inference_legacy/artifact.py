"""Self-contained model artifacts: a ``torch.export`` program, its feature schema and a manifest.

An artifact is a directory:

    manifest.json    format, versions, dims, quantization, file sizes and SHA-256, verification
    model.pt2        the exported program (torch.export.save), inputs (dense, values, lengths)
    model_by_user.pt2  (optional) the same model taking each user's features once per user: a batch
                     of many candidates per user (see ``by_user_inputs``); the manifest's ``by_user``
    schema.json      the FeatureSchema that turns requests into those inputs
    heldout.jsonl    held-out request rows with the eager fp32 model's probabilities

Loading needs torch, fbgemm_gpu (its ops run the quantized tables) and ``common.features``;
never the training code. Before anything is deserialized the loader checks the format version,
the torch / fbgemm versions, every file's size and checksum, and that ``model.pt2`` holds only
JSON and raw tensor bytes: ``torch.export.load`` unpickles some payload kinds (custom objects,
legacy weight files, sample inputs), and an artifact carrying any of them is refused.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.compiled import sha256, versions
from common.export import ExportError, check_file
from common.export import read_manifest as read_export_manifest
from common.features import FeatureBatch, FeatureSchema
from inference_legacy.compiler import export_program  # noqa: F401  (part of this module's API)

FORMAT = "recsys-examples-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROGRAM = "model.pt2"
SCHEMA = "schema.json"
HELDOUT = "heldout.jsonl"
BY_USER = "model_by_user.pt2"


ArtifactError = (
    ExportError  # the artifact is incomplete, altered, from another version or unsafe; the message says which
)


def write_artifact(
    out: str | Path,
    program: torch.export.ExportedProgram,
    schema: FeatureSchema,
    manifest: dict[str, Any],
    heldout: list[dict[str, Any]],
    overwrite: bool = False,
    verify: Callable[[Path], dict[str, Any]] | None = None,
    by_user: torch.export.ExportedProgram | None = None,
) -> Path:
    """Write the artifact to a temporary directory, check it, then move it into place: a crash
    never leaves a half-written artifact at ``out``. ``verify(tmp_dir)`` runs on the written files
    before the move; what it returns is merged into the manifest (which is not in its own
    checksum list). ``by_user``: the optional per-user program (:data:`BY_USER`)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it, or choose another --out")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.export.save(program, tmp / PROGRAM)
    if by_user is not None:
        torch.export.save(by_user, tmp / BY_USER)
    (tmp / SCHEMA).write_text(json.dumps(schema.to_dict(), indent=2) + "\n")
    (tmp / HELDOUT).write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in heldout))
    files = {
        name: {"sha256": sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
        for name in (PROGRAM, SCHEMA, HELDOUT, *([BY_USER] if by_user is not None else []))
    }
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, "versions": versions(), **manifest, "files": files}
    (tmp / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    for name in (PROGRAM, BY_USER):
        if (tmp / name).exists():
            check_pickle_free(tmp / name)
    if verify is not None:
        full.update(verify(tmp))
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    if out.exists():
        old = out.with_name(f".{out.name}.old{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    return out


def read_manifest(artifact: str | Path) -> dict[str, Any]:
    """The manifest, after checking its shape, format, versions, and every file's size and checksum."""
    artifact = Path(artifact)
    path = artifact / MANIFEST
    make = "package a model first (python -m inference_legacy.dlrm_packager) or point at the directory it wrote"
    manifest = read_export_manifest(artifact, make, verify_files=False)
    _check_manifest_shape(manifest, path)
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format {manifest.get('format')!r} version {manifest.get('format_version')!r}; "
            f"this loader reads {FORMAT!r} version {FORMAT_VERSION}: package the model again with "
            f"this checkout"
        )
    here = versions()
    for lib in ("torch", "fbgemm"):
        if manifest.get("versions", {}).get(lib) != here[lib]:
            raise ArtifactError(
                f"{path}: packaged with {lib} {manifest.get('versions', {}).get(lib)}, this "
                f"environment has {here[lib]}; exported programs and FBGEMM's quantized tables are "
                f"tied to the version that wrote them: package again here, or install that version"
            )
    for name, want in manifest.get("files", {}).items():
        check_file(artifact / name, want, "copy the artifact again, or package it again")
    missing = {PROGRAM, SCHEMA} - set(manifest.get("files", {}))
    if missing:
        raise ArtifactError(f"{path} lists no {sorted(missing)}; the artifact is incomplete")
    return manifest


def _check_manifest_shape(manifest: Any, path: Path) -> None:
    """The manifest's structure, before any field is read: a damaged one is one ArtifactError naming
    the field, not an AttributeError somewhere in the loader."""

    def bad(what: str) -> ArtifactError:
        return ArtifactError(f"{path}: {what}; the manifest is damaged: package the model again")

    if not isinstance(manifest, dict):
        raise bad(f"holds a JSON {type(manifest).__name__}, not an object")
    for key in ("files", "versions", "dims", "verification", "quantization"):
        if not isinstance(manifest.get(key, {}), dict):
            raise bad(f"'{key}' must be an object, got {type(manifest[key]).__name__}")
    for name, entry in manifest.get("files", {}).items():
        if not (
            isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)
        ):
            raise bad(f"files[{name!r}] must be {{'bytes': int, 'sha256': str}}, got {entry!r:.80}")
    tables = manifest.get("dims", {}).get("tables", {})
    if not isinstance(tables, dict) or not all(
        isinstance(t, dict) and isinstance(t.get("rows"), int) for t in tables.values()
    ):
        raise bad("dims.tables must map each table to an object with integer 'rows'")


# Entries of a .pt2 archive that hold JSON or raw tensor bytes (torch.export.save's layout).
_SAFE_FILES = ("archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id")


def check_pickle_free(pt2: str | Path) -> None:
    """Refuse a .pt2 archive that holds anything ``torch.export.load`` would unpickle."""
    try:
        z = zipfile.ZipFile(pt2)
    except zipfile.BadZipFile as err:
        raise ArtifactError(f"{pt2} is not a torch.export archive ({err}); package the model again") from err
    with z:
        for info in z.infolist():
            name = info.filename.split("/", 1)[1] if "/" in info.filename else info.filename
            if name in _SAFE_FILES or name.startswith("models/") and name.endswith(".json"):
                continue
            if name.startswith("data/sample_inputs/") and info.file_size == 0:
                continue
            if name.startswith(("data/weights/weight_", "data/constants/tensor_")):
                continue
            if name.startswith(("data/weights/", "data/constants/")) and name.endswith("_config.json"):
                try:
                    entries = json.loads(z.read(info)).get("config", {})
                    pickled = [k for k, v in entries.items() if v.get("use_pickle")]
                except (ValueError, AttributeError, TypeError) as err:
                    raise ArtifactError(
                        f"{pt2}: {name} is not a weights config ({type(err).__name__}: {err}); "
                        f"the archive is damaged: package the model again"
                    ) from None
                if pickled:
                    raise ArtifactError(
                        f"{pt2}: {name} stores {pickled[:3]} as pickles; refusing to load code-"
                        f"carrying payloads. Export plain tensors only"
                    )
                continue
            raise ArtifactError(
                f"{pt2}: unexpected entry {info.filename!r}; this loader accepts only JSON graphs "
                f"and raw tensor bytes (pickled objects can run code when loaded)"
            )


def load_program(artifact: str | Path, manifest: dict[str, Any], name: str = PROGRAM) -> torch.nn.Module:
    """The exported program ``name`` as a callable module (checked pickle-free first)."""
    import fbgemm_gpu  # noqa: F401  registers the fbgemm ops the quantized tables call

    if name not in manifest.get("files", {}):
        raise ArtifactError(f"{artifact}: the manifest lists no {name}")
    path = Path(artifact) / name
    check_pickle_free(path)
    # torch.export.load warns once per unbacked symbol that has no use after deserialization.
    logging.getLogger("torch._export.serde.serialize").setLevel(logging.ERROR)
    try:
        program = torch.export.load(path)
    except Exception as err:  # a damaged graph surfaces as many exception types
        raise ArtifactError(
            f"{path} could not be deserialized ({type(err).__name__}: {err}); package it again with this environment"
        ) from err
    module = program.module()
    # The unlifted module checks each call's input shapes against the export's symbolic ranges in a
    # forward pre-hook (sympy arithmetic, a large share of a served request's time). Every
    # input here is built from the artifact's own schema (FeatureSchema.from_records / from_columns),
    # which checks IDs, values and shapes first; the hook would only check them again, so it goes.
    for key, hook in list(module._forward_pre_hooks.items()):
        if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)
    return module


def load_schema(artifact: str | Path, manifest: dict[str, Any] | None = None) -> FeatureSchema:
    """The artifact's feature schema; with ``manifest``, checked against the model's table sizes
    (a cardinality the tables do not have would index past them or waste rows)."""
    path = Path(artifact) / SCHEMA
    try:
        schema = FeatureSchema.from_dict(json.loads(path.read_text()))
    except (ValueError, AttributeError, TypeError, KeyError) as err:
        raise ArtifactError(
            f"{path} is not a feature schema ({type(err).__name__}: {err}); the artifact is "
            f"damaged: package the model again"
        ) from None
    tables = (manifest or {}).get("dims", {}).get("tables")
    if tables:
        for f in schema.sparse:
            table = tables.get(f.table or f.name)
            if table is None or table["rows"] != f.cardinality:
                rows = "no table" if table is None else f"{table['rows']} rows"
                raise ArtifactError(
                    f"{path}: feature {f.name!r} has cardinality {f.cardinality}, but the model's "
                    f"table {f.table or f.name!r} has {rows}; the schema and the model disagree: "
                    f"package the model again"
                )
    return schema


def program_inputs(fb: FeatureBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A feature batch as the program's inputs: (dense, values, lengths)."""
    return fb.dense, fb.sparse.values().long(), fb.sparse.lengths().long()


def read_heldout(artifact: str | Path) -> list[dict[str, Any]]:
    path = Path(artifact) / HELDOUT
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def by_user_inputs(
    schema: FeatureSchema, user_features: list[str], inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    """Per-row program inputs (dense, values, lengths) as the :data:`BY_USER` program's: rows whose
    ``user_features`` are all equal share one user. Returns (dense, row_user, user_values,
    user_lengths, values, lengths): ``row_user [B]`` indexes each row's user; the user-side IDs come
    once per user, the others once per row, each side feature-major in schema order
    (``schema.subset(user_features)`` and the rest)."""
    dense, values, lengths = inputs
    names, rows = schema.sparse_names, dense.shape[0]
    unknown = sorted(set(user_features) - set(names))
    if unknown or not user_features:
        raise ArtifactError(f"user features {list(user_features)}: not a non-empty subset of the schema's {names}")
    v, lens = values.numpy(), lengths.numpy().reshape(len(names), rows)
    starts = (np.cumsum(lens.reshape(-1)) - lens.reshape(-1)).reshape(len(names), rows)
    side = [j for j, n in enumerate(names) if n in user_features]
    keys = [b"|".join(v[starts[j, r] : starts[j, r] + lens[j, r]].tobytes() for j in side) for r in range(rows)]
    index: dict[bytes, int] = {}
    row_user = np.array([index.setdefault(k, len(index)) for k in keys], dtype=np.int64)
    first = np.zeros(len(index), dtype=np.int64)
    first[row_user[::-1]] = np.arange(rows)[::-1]  # each user's first row (the last write wins)

    def gather(features: list[int], pick: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        out_values, out_lengths = [], []
        for j in features:
            take = lens[j, pick]
            at = np.repeat(starts[j, pick] - (np.cumsum(take) - take), take) + np.arange(take.sum())
            out_values.append(v[at])
            out_lengths.append(take)
        return tuple(torch.from_numpy(np.concatenate(x).astype(np.int64)) for x in (out_values, out_lengths))

    item_side = [j for j in range(len(names)) if j not in side]
    return (dense, torch.from_numpy(row_user), *gather(side, first), *gather(item_side, np.arange(rows)))
