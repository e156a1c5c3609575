"""Files from outside the pipeline (a user's teacher, dataset, reference statistics, backbone weights) as
content: one small JSON manifest per params key, which DVC tracks as the dependency of the stages that
read the file.

A params value is a string; DVC cannot see that the file it names was replaced. The ``inputs`` stage
(always run, a fraction of a second when nothing changed) writes ``data/inputs/<key>.json`` with the
path, kind (file / dir / none / missing), size and xxh3 content hash of what the key names. The manifest changes
exactly when the content does, so ``dvc repro`` re-runs exactly the stages downstream of a replaced
file (dvc.yaml lists each stage's manifests as deps). A directory's hash covers every file's relative
path and content. Hashes are cached by (size, mtime, inode) in ``.cache/inputs/hashes.json`` so a
multi-GB teacher is read once, as DVC's own state cache does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from pipeline.core.param_checks import PipelineError

CHUNK_BYTES = 1 << 24
MANIFEST_VERSION = 1


class InputFileError(PipelineError):
    """A file a params key names cannot be read."""


@dataclass(frozen=True)
class ExternalInput:
    """A params key whose value names a local file or folder the pipeline reads."""

    key: str  # full params key, e.g. "teacher.pretrained"
    what: str  # what goes there, for the error when it is missing


def _file_hash(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            h.update(block)
    return h.hexdigest()


class HashCache:
    """Content hashes of files keyed by (path, size, mtime_ns, inode): unchanged files are not read again."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, list[Any]] = {}
        if path is not None and path.is_file():
            try:
                self.entries = json.loads(path.read_text())
            except (OSError, ValueError):
                self.entries = {}  # a damaged cache only costs a re-read

    def file_hash(self, path: Path) -> str:
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        name = str(path.resolve())
        cached = self.entries.get(name)
        if cached is not None and cached[:3] == stamp:
            return cached[3]
        digest = _file_hash(path)
        self.entries[name] = [*stamp, digest]
        return digest

    def save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.entries, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError:
            pass  # the cache is an optimisation: a read-only workspace still gets correct manifests


def describe_path(path: Path, cache: HashCache) -> dict[str, Any]:
    """{kind, bytes, files, hash} of a file or a folder (every file under it, by relative path and content)."""
    if path.is_file():
        return {"kind": "file", "bytes": path.stat().st_size, "files": 1, "hash": cache.file_hash(path)}
    files = sorted(p for p in path.rglob("*") if p.is_file())
    h = xxhash.xxh3_128()
    total = 0
    for f in files:
        rel = f.relative_to(path).as_posix()
        h.update(f"{rel}\0{cache.file_hash(f)}\n".encode())
        total += f.stat().st_size
    return {"kind": "dir", "bytes": total, "files": len(files), "hash": h.hexdigest()}


def manifest(inp: ExternalInput, value: str | None, cache: HashCache) -> dict[str, Any]:
    """The manifest of one key: ``value`` None (not used) or the path it names, with its content hash."""
    base = {"manifest_version": MANIFEST_VERSION, "key": inp.key, "path": value}
    if value is None:
        return {**base, "kind": "none"}
    path = Path(value).expanduser()
    if not path.exists():  # the stages that read it fail with their own message; when it appears, they re-run
        return {**base, "kind": "missing", "note": missing_note(inp, value)}
    try:
        return {**base, **describe_path(path, cache)}
    except OSError as e:
        raise InputFileError(f"{inp.key}: cannot read {e.filename or value}: {e.strerror or e}") from None


def missing_note(inp: ExternalInput, value: str) -> str:
    return (f"{inp.key}: {value} does not exist ({inp.what}); nothing is downloaded here: put the file there "
            f"or point {inp.key} at your copy")


def manifest_name(key: str) -> str:
    return f"{key}.json"


def write_manifests(inputs: Iterable[tuple[ExternalInput, str | None]], out: Path, *, cache_path: Path | None) -> list[dict[str, Any]]:
    """Write ``out/<key>.json`` for every (input, value); a file is rewritten only when its content changes
    (so its mtime stays put too). Returns the manifests (kind file / dir / none / missing)."""
    cache = HashCache(cache_path)
    manifests = [manifest(inp, value, cache) for inp, value in inputs]
    out.mkdir(parents=True, exist_ok=True)
    keep = set()
    for m in manifests:
        target = out / manifest_name(m["key"])
        keep.add(target.name)
        text = json.dumps(m, indent=2, sort_keys=True) + "\n"
        if not target.is_file() or target.read_text() != text:
            tmp = target.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, target)
    for stale in out.glob("*.json"):
        if stale.name not in keep:
            stale.unlink()
    cache.save()
    return manifests


def read_manifest(directory: str | Path | None, key: str) -> dict[str, Any] | None:
    """The manifest of ``key`` under ``directory`` (None when there is no such directory or file)."""
    if directory is None:
        return None
    path = Path(directory) / manifest_name(key)
    return json.loads(path.read_text()) if path.is_file() else None
