"""Verified downloads into a cache directory: nothing partial or corrupt is ever used.

A file is downloaded to ``<name>.part`` and renamed into place only after its size and checksum
match; an archive is extracted into a temporary directory and renamed into place with a
``.complete`` manifest written last: the archive's checksum and every extracted file's size and
SHA-256. Every load checks the extracted files against it (sizes always, hashes once per process
and file version), so a truncated or edited cache file is noticed and extracted again from the
verified archive. A cached download whose checksum no longer matches is moved aside
(``<name>.corrupt``) and fetched again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm


class DataIntegrityError(RuntimeError):
    """A download or cached file does not match its published checksum or size."""


# Extracted files whose SHA-256 was checked in this process: (path, size, mtime_ns).
_HASHED: set[tuple[str, int, int]] = set()
_WARNED: set[tuple[str, str]] = set()


def default_data_dir() -> Path:
    """``$RECSYS_DATA_DIR``, else ``~/.cache/recsys-examples``."""
    env = os.environ.get("RECSYS_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "recsys-examples"


def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path: Path, checksum: str, size: int | None = None) -> None:
    """Raise :class:`DataIntegrityError` unless ``path`` has ``size`` bytes and ``checksum``.

    ``checksum`` is ``"md5:<hex>"`` or ``"sha256:<hex>"``.
    """
    algorithm, expected = checksum.split(":", 1)
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise DataIntegrityError(
            f"{path.name}: expected {size} bytes, found {actual_size} (a partial or truncated download)"
        )
    actual = file_digest(path, algorithm)
    if actual != expected:
        raise DataIntegrityError(
            f"{path.name}: {algorithm} is {actual}, expected {expected} (corrupt or not the published file)"
        )


def cached_verified(path: Path, checksum: str, size: int | None = None) -> bool:
    """True if ``path`` exists and verifies. A cached file that fails is moved to ``*.corrupt``."""
    if not path.is_file():
        return False
    try:
        verify_file(path, checksum, size)
        return True
    except DataIntegrityError as err:
        corrupt = path.with_name(path.name + ".corrupt")
        os.replace(path, corrupt)
        print(f"warning: cached {err}; moved it to {corrupt.name} and will fetch it again", file=sys.stderr)
        return False


def download(url: str, dest: Path, checksum: str, size: int | None = None, timeout: float = 30.0) -> Path:
    """Download ``url`` to ``dest`` (unless a verified copy is already there) and verify it."""
    if cached_verified(dest, checksum, size):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or size
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=f"download {dest.name}", disable=None, leave=False
            ) as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
        verify_file(part, checksum, size)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    return dest


def pip_download(requirement: str, dest: Path, checksum: str) -> Path:
    """Fetch one wheel with ``pip download --no-deps`` (works wherever pip reaches PyPI)."""
    name, version = requirement.split("==")
    wheel = dest / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"  # a wheel's file name (PEP 427)
    if cached_verified(wheel, checksum):
        return wheel
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--disable-pip-version-check",
            "--only-binary=:all:",
            requirement,
            "-d",
            tmp,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / wheel.name
        if proc.returncode != 0 or not got.is_file():
            raise ConnectionError(f"`{' '.join(cmd)}` failed:\n{proc.stderr.strip()}")
        verify_file(got, checksum)
        os.replace(got, wheel)
    return wheel


def extracted_ok(dest: Path, marker: str) -> bool:
    """True when ``dest`` holds a finished extraction for ``marker`` whose files still have the
    size (checked every time) and SHA-256 (checked once per process and file version) recorded in
    its ``.complete`` manifest. A mismatch is reported on stderr, naming the file."""
    done = dest / ".complete"
    try:
        info = json.loads(done.read_text())
    except (OSError, ValueError):
        return False  # not extracted, or an older plain-text marker: extract again
    if not isinstance(info, dict) or info.get("marker") != marker or not isinstance(info.get("files"), dict):
        return False
    for rel, want in info["files"].items():
        path = dest / rel
        try:
            st = path.stat()
        except OSError:
            problem = "is missing"
        else:
            key = (str(path), st.st_size, st.st_mtime_ns)
            if st.st_size != want.get("size"):
                problem = f"has {st.st_size:,} bytes, {want.get('size'):,} when extracted"
            elif key in _HASHED or file_digest(path, "sha256") == want.get("sha256"):
                _HASHED.add(key)
                continue
            else:
                problem = "has other contents than when extracted (SHA-256 differs)"
        if (str(path), problem) not in _WARNED:  # the callers and extract_zip both ask: say it once
            _WARNED.add((str(path), problem))
            print(f"warning: cached {path} {problem}; extracting it again from the verified archive", file=sys.stderr)
        return False
    return True


def extract_zip(archive: Path, dest: Path, members: dict[str, str] | None = None, marker: str = "") -> Path:
    """Extract ``archive`` into ``dest`` atomically; return ``dest``.

    ``members`` maps member names to output file names (default: everything, keeping paths).
    ``marker`` (e.g. the archive checksum) and every extracted file's size and SHA-256 are written
    to ``dest/.complete`` last; an existing ``dest`` is reused only when :func:`extracted_ok`
    says so, so a half-done, truncated or edited extraction is redone.
    """
    if extracted_ok(dest, marker):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        with zipfile.ZipFile(archive) as zf:
            if members is None:
                zf.extractall(tmp)
            else:
                names = set(zf.namelist())
                for member, out_name in members.items():
                    if member not in names:
                        raise DataIntegrityError(f"{archive.name} has no member {member!r}")
                    with zf.open(member) as src, open(tmp / out_name, "wb") as out:
                        shutil.copyfileobj(src, out)
        files = {
            p.relative_to(tmp).as_posix(): {"size": p.stat().st_size, "sha256": file_digest(p, "sha256")}
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        (tmp / ".complete").write_text(json.dumps({"marker": marker, "files": files}))
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
