"""Small file writers shared by the stages' outputs, and the one way an OS error reaches the user.

Every output file is written atomically (a temporary file in the same directory, then a rename),
so a write that fails — no space, the file-size limit, a read-only or foreign-owned directory —
leaves the previous file (or none) and never a truncated one. Such failures become a
:class:`FileWriteError`: one line naming the path, the cause and what to do
(``cannot write models/sfd/model.safetensors: no space left on device [ENOSPC]: ...``), which
every stage and ``sfd`` command reports with exit code 2.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.core.param_checks import PipelineError


class FileWriteError(PipelineError):
    """The operating system refused a write (no space, file too large, read-only, permission); the
    message names the path and the cause."""


_CAUSES = {
    errno.ENOSPC: "no space left on device: free space there or write the outputs elsewhere",
    errno.EDQUOT: "disk quota exceeded: free space or raise the quota",
    errno.EFBIG: "file too large: over this process's file-size limit (`ulimit -f`) or the file system's "
                 "largest file; raise the limit or write elsewhere",
    errno.EROFS: "read-only file system: remount it writable or write the outputs elsewhere",
    errno.EACCES: "permission denied: make it writable for this user or write elsewhere",
    errno.EPERM: "operation not permitted (an immutable file or directory, or its permissions): make it writable "
                 "or write elsewhere",
}  # fmt: skip


def os_error_message(e: OSError, path: str | os.PathLike | None = None, action: str = "write") -> str:
    """One line: ``cannot <action> <path>: <cause> [ERRNO]``; ``path`` defaults to the error's own file name."""
    where = path if path is not None else (e.filename if e.filename is not None else None)
    cause = _CAUSES.get(e.errno) if e.errno is not None else None
    cause = cause or (e.strerror or str(e) or type(e).__name__)
    code = errno.errorcode.get(e.errno) if e.errno is not None else None
    target = f" {where}" if where is not None else ""
    return f"cannot {action}{target}: {cause}" + (f" [{code}]" if code else "")


_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def as_os_error(e: BaseException) -> OSError | None:
    """The OSError inside ``e``: itself, or the ``(os error N)`` that Rust-backed writers (safetensors) put in
    their messages; None when it is no OS error."""
    if isinstance(e, OSError):
        return e
    m = _RUST_OS_ERROR.search(str(e))
    if m is None:
        return None
    code = int(m.group(1))
    return OSError(code, os.strerror(code))


@contextmanager
def os_errors(path: str | os.PathLike | None, action: str = "write") -> Iterator[None]:
    """Turn an OS error raised inside (also one wrapped by safetensors) into a :class:`FileWriteError` naming ``path``."""
    try:
        yield
    except FileWriteError:
        raise
    except Exception as e:
        os_error = as_os_error(e)
        if os_error is None:
            raise
        raise FileWriteError(os_error_message(os_error, path, action)) from e


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` into a temporary file beside ``path``, then rename it over ``path``.

    On any failure the temporary file is removed and ``path`` is left as it was; an OSError becomes
    a :class:`FileWriteError` naming ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with os_errors(path):
            write(tmp)
            os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise
    return path


def make_dirs(path: str | os.PathLike) -> Path:
    """``mkdir -p`` whose failure is a :class:`FileWriteError` naming the directory."""
    path = Path(path)
    with os_errors(path, "create the directory"):
        path.mkdir(parents=True, exist_ok=True)
    return path


def check_writable(path: str | os.PathLike) -> None:
    """Refuse, before any work, an output location this process cannot write.

    ``path`` is an output file or directory, existing or not: a temporary file is created and removed
    in ``path`` (an existing directory) or in its nearest existing ancestor directory. Creates nothing
    else; raises :class:`FileWriteError` naming the directory and the cause."""
    target = Path(path)
    if target.exists() and not target.is_dir():  # an existing file: its directory takes the new file's rename
        target = target.parent
    while not target.exists():
        if target.parent == target:
            return
        target = target.parent
    if not target.is_dir():
        raise FileWriteError(f"cannot write {path}: {target} is a file, not a directory")
    try:
        fd, name = tempfile.mkstemp(prefix=".sfd-write-check-", dir=target)
    except OSError as e:
        raise FileWriteError(os_error_message(e, target)) from e
    os.close(fd)
    os.unlink(name)


def write_json(path: str | Path, data: Any) -> Path:
    """Pretty JSON with sorted keys (stable bytes for DVC), parent directories created, written atomically.

    Under torchrun only rank 0 writes (pipeline.core.distributed); the other ranks return the path."""
    from pipeline.core.distributed import is_main

    path = Path(path)
    if not is_main():
        return path
    make_dirs(path.parent)
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    return atomic_write(path, lambda p: p.write_text(text))
