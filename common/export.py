"""Reading an export directory's ``manifest.json``, the one way every stage does it: the two-tower's,
the item-to-item and the sequential exports and the ranker's serving artifact list their files with
SHA-256 (and sizes), and :func:`read_manifest` checks each before anything is loaded. A missing,
truncated, altered or foreign file is an :class:`ExportError` naming the file and how to make it again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common.data.download import file_digest

MANIFEST = "manifest.json"


class ExportError(ValueError):
    """An export directory is incomplete, altered or of another kind; the message says which and what to do."""


class ExportMissing(ExportError, FileNotFoundError):
    """There is no export (no manifest) where one was expected."""


def read_manifest(
    directory: str | Path, make: str, formats: tuple[str, ...] | None = None, verify_files: bool = True
) -> dict[str, Any]:
    """The manifest of the export in ``directory``, after checking that it is a JSON object, that its
    ``format`` is one of ``formats`` (when given) and, with ``verify_files``, that every file it lists
    is there with its recorded size (where recorded) and SHA-256. ``make`` says how to make the
    export (again); it ends every error message."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ExportMissing(f"{directory} has no {MANIFEST}; {make}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ExportError(f"{path} is not valid JSON ({err}); the export is damaged: {make}") from err
    if not isinstance(manifest, dict):
        raise ExportError(f"{path}: holds a JSON {type(manifest).__name__}, not an object; {make}")
    if formats is not None and manifest.get("format") not in formats:
        raise ExportError(f"{path}: format {manifest.get('format')!r}, expected one of {list(formats)}; {make}")
    files = manifest.get("files", {})
    if verify_files and isinstance(files, dict):
        for name, want in files.items():
            check_file(directory / name, want, make)
    return manifest


def check_file(path: Path, want: str | dict[str, Any], make: str) -> None:
    """``path`` as a manifest records it: its SHA-256 (a string), or ``{"bytes": n, "sha256": h}``."""
    if not path.is_file():
        raise ExportError(f"{path} is missing from the export; {make}")
    sha = want if isinstance(want, str) else want.get("sha256")
    size = None if isinstance(want, str) else want.get("bytes")
    if size is not None and path.stat().st_size != size:
        raise ExportError(
            f"{path} is {path.stat().st_size} bytes, the manifest says {size}: a truncated or partial copy; {make}"
        )
    if file_digest(path, "sha256") != sha:
        raise ExportError(
            f"{path} does not match the manifest's SHA-256: it was altered or comes from another export; {make}"
        )
