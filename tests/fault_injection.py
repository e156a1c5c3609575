"""Faults for tests/test_faults.py: a read-only directory, a full disk, a SIGKILL right after a state save.

As a launcher, ``python tests/fault_injection.py MODULE ARGS...`` installs the faults named in the
environment variable ``SFD_FAULTS`` (``;``-separated) and runs ``python -m MODULE ARGS...`` in the same
process (a stage exactly as dvc.yaml calls it, with the fault in place):

    readonly:<dir>          every write, create, rename or delete under <dir> fails with EROFS (for root,
                            whom chmod does not stop, when ``chattr +i`` is not available either)
    enospc:<substring>      every write to a path containing <substring> fails with ENOSPC
    kill_after_saves:<n>    SIGKILL right after the n-th training-state save (a kill at a checkpoint)
    killpg_after_saves:<n>  the same from rank 0, SIGKILL to the whole torchrun job (its agent and every rank)
    killpg_after_chunks:<n> SIGKILL to the whole torchrun job right after this process's n-th chunk commit

File-size limits (EFBIG) need no launcher: ``resource.setrlimit(RLIMIT_FSIZE, ...)`` in the child.
:func:`read_only` makes a directory tree read-only for real (chmod; ``chattr +i`` as root) and says
when it could not, so the caller falls back to the ``readonly`` fault.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import runpy
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _fail(code: int, path) -> None:
    raise OSError(code, os.strerror(code), os.fsdecode(path))


def install_write_fault(code: int, matches) -> Callable[[], None]:
    """Patch Python's file-writing entry points (open for writing, os.open with write flags, mkdir, rename,
    replace, link, unlink, rmdir; safetensors' Rust writer) to fail with ``code`` where ``matches(path)``.
    Returns the function that undoes it."""
    saved = [(builtins, "open", builtins.open), (io, "open", io.open), (os, "open", os.open)]
    real_open, real_os_open = io.open, os.open

    def fake_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and matches(file):
            _fail(code, file)
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        if flags & _WRITE_FLAGS and matches(path):
            _fail(code, path)
        return real_os_open(path, flags, *args, **kwargs)

    def guard(real, *positions):
        def fake(*args, **kwargs):
            for i in positions:
                if i < len(args) and matches(args[i]):
                    _fail(code, args[i])
            return real(*args, **kwargs)

        return fake

    builtins.open = io.open = fake_open
    os.open = fake_os_open
    for name, positions in (("mkdir", (0,)), ("rename", (0, 1)), ("replace", (0, 1)), ("link", (0, 1)),
                            ("unlink", (0,)), ("remove", (0,)), ("rmdir", (0,))):  # fmt: skip
        saved.append((os, name, getattr(os, name)))
        setattr(os, name, guard(getattr(os, name), *positions))
    import safetensors.torch as st

    real_save = st.save_file
    saved.append((st, "save_file", real_save))

    def fake_save(tensors, filename, *args, **kwargs):
        if matches(filename):  # what safetensors raises for an OS error: a message with "(os error N)"
            raise RuntimeError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")
        return real_save(tensors, filename, *args, **kwargs)

    st.save_file = fake_save

    def restore() -> None:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)

    return restore


def kill_torchrun_job() -> None:
    """SIGKILL torchrun's agent (this worker's parent), every other worker it started, then this one (Linux /proc)."""
    agent, me = os.getppid(), os.getpid()
    workers = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != me:
            try:
                stat_fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat_fields[1]) == agent:  # field 4 of /proc/PID/stat: the parent's pid
                workers.append(int(entry))
    os.kill(agent, signal.SIGKILL)
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    os.kill(me, signal.SIGKILL)


def install_kill_after(owner, method: str, n: int, group: bool) -> Callable[[], None]:
    """SIGKILL right after the n-th call of ``owner.method`` in this process: the process itself, or with ``group``
    the whole torchrun job (its agent and every rank at once: :func:`kill_torchrun_job`)."""
    real = getattr(owner, method)
    count = [0]

    def wrapped(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        count[0] += 1
        if count[0] >= n:
            if group:
                kill_torchrun_job()
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    setattr(owner, method, wrapped)
    return lambda: setattr(owner, method, real)


def install_kill_after_saves(n: int, group: bool = False) -> Callable[[], None]:
    from pipeline.core.distributed import is_main
    from pipeline.training.state import TrainingState

    if group and not is_main():  # rank 0 writes the states; it kills everyone
        return lambda: None
    return install_kill_after(TrainingState, "save", n, group)


def install_kill_after_chunks(n: int) -> Callable[[], None]:
    from pipeline.trajectories.store import TrajectoryKey

    return install_kill_after(TrajectoryKey, "write_chunk", n, True)


def _path_matches(test):
    def matches(p) -> bool:
        return isinstance(p, (str, bytes, os.PathLike)) and test(os.path.abspath(os.fsdecode(p)))

    return matches


def install(spec: str) -> Callable[[], None]:
    """Install the faults of an SFD_FAULTS string (module docstring); returns the function that undoes them."""
    undo: list[Callable[[], None]] = []
    for fault in filter(None, spec.split(";")):
        kind, _, arg = fault.partition(":")
        if kind == "readonly":
            root = os.path.abspath(arg)
            under = _path_matches(lambda p, root=root: p == root or p.startswith(root + os.sep))
            undo.append(install_write_fault(errno.EROFS, under))
            real_access = os.access
            os.access = lambda p, mode, *a, **k: False if mode & os.W_OK and under(p) else real_access(p, mode, *a, **k)
            undo.append(lambda real_access=real_access: setattr(os, "access", real_access))
        elif kind == "enospc":
            undo.append(install_write_fault(errno.ENOSPC, _path_matches(lambda p, s=arg: s in p)))
        elif kind == "kill_after_saves":
            undo.append(install_kill_after_saves(int(arg)))
        elif kind == "killpg_after_saves":
            undo.append(install_kill_after_saves(int(arg), group=True))
        elif kind == "killpg_after_chunks":
            undo.append(install_kill_after_chunks(int(arg)))
        else:
            raise SystemExit(f"fault_injection: unknown fault {fault!r}")
    return lambda: [u() for u in reversed(undo)] and None


@contextmanager
def injected(spec: str) -> Iterator[None]:
    """The faults of ``spec`` in this process, for the duration of the block."""
    undo = install(spec)
    try:
        yield
    finally:
        undo()


def _walk(root: Path) -> list[Path]:
    return [root, *sorted(root.rglob("*"))]


def _writable_probe(root: Path) -> bool:
    probe = root / ".probe"
    try:
        probe.write_text("x")
    except OSError:
        return False
    probe.unlink()
    return True


@contextmanager
def read_only(root: str | Path) -> Iterator[bool]:
    """Make the tree ``root`` read-only for this process's children: True when that worked (chmod, or
    ``chattr +i`` as root), False when the caller must inject the ``readonly`` fault instead. Restored on exit."""
    root = Path(root)
    paths = _walk(root)
    modes = {p: p.stat().st_mode for p in paths}
    immutable = False
    if os.geteuid() != 0:
        for p in reversed(paths):
            p.chmod(modes[p] & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    elif shutil.which("chattr"):
        immutable = subprocess.run(["chattr", "-R", "+i", str(root)], capture_output=True).returncode == 0
    try:
        yield not _writable_probe(root)
    finally:
        if immutable:
            subprocess.run(["chattr", "-R", "-i", str(root)], check=True, capture_output=True)
        for p in paths:
            if p.exists():
                p.chmod(modes[p])


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())  # the repository root: `stages` and `pipeline` as `python -m` finds them
    install(os.environ.get("SFD_FAULTS", ""))
    module, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
