"""One resumable training state: ``<dir>/training_state.safetensors`` (+ a readable ``training_state.json``).

Tensors (safetensors, nothing unpickled):
    ``<module>.<param>``        every module's state dict (e.g. ``net.*``, ``ema.*``)
    ``<optimizer>.optimizer.*`` every optimizer (pipeline.core.checkpoints.optimizer_to_tensors)
    ``rng.<name>``              every named torch.Generator
    ``rng.torch``               the global CPU generator (dropout draws from it), and
    ``rng.cuda.<i>``            each CUDA device's generator when CUDA is in use.
State JSON: ``protocol``, ``training_key``, ``counters`` (batches done, rows read, ...), ``metadata``
(loss statistics, log rows, cost, ...) and the optimizers' scalar state.

Integrity. The state JSON and a checksum (xxh3-128 of the JSON and of every tensor's name, dtype,
shape and bytes) live inside the safetensors file's own header (``sfd_training_state``,
``sfd_checksum``), so the checksum is written atomically with what it covers: the file is written
to a temporary name, read back and verified, then renamed into place. ``training_state.json`` is a
readable copy of the JSON (with the checksum); resuming never trusts it. The state saved before
(verified when it was written or resumed) is kept as ``training_state.previous.safetensors``; a
kill at any instant leaves at least one verified state.

Resuming takes the newest verified state with this protocol and training key (the key hashes
everything that changes the result: params, data, initialisation): ``training_state``, else
``training_state.previous`` (a damaged newest state — a flipped bit, overwritten bytes, a truncated
file — is named in a note). States of another key or an older format are ignored and, at the next
save, overwritten. When the only matching candidates are damaged, :class:`DamagedStateError` stops
the run with one line naming the file and what to do. Only a verified state is ever called good.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.core.checkpoints import CheckpointError, optimizer_from_tensors, optimizer_to_tensors
from pipeline.core.files import atomic_write, make_dirs, os_errors
from pipeline.core.hashing import hash_description, hash_state_dict
from pipeline.core.param_checks import ParamError

STATE_NAME = "training_state"
PREVIOUS_NAME = "training_state.previous"
PROTOCOL = 3  # 1: the teacher's and SFD's own formats before pipeline.training; 2: no checksum
META_KEY = "sfd_training_state"  # safetensors header metadata: the state JSON ...
CHECKSUM_KEY = "sfd_checksum"  # ... and the checksum of that JSON and every tensor


class DamagedStateError(CheckpointError):
    """A training state of this run fails its checksum or cannot be read, and no verified earlier state exists."""


@dataclass
class Restored:
    """What :meth:`TrainingState.load` read back besides the tensors it put in place."""

    counters: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None  # the verified state file it came from
    damaged: list[str] = field(default_factory=list)  # newer states that failed verification: "<file>: <why>"


def state_checksum(meta_json: str, tensors: Mapping[str, torch.Tensor]) -> str:
    """xxh3-128 of the state JSON (exact text) and of every tensor (name, dtype, shape, bytes; sorted)."""
    return hash_description({"meta": meta_json, "tensors": hash_state_dict(tensors)})


class _Damaged(Exception):
    pass


def _read_header(path: Path) -> dict[str, str] | None:
    """The safetensors header metadata (without reading any tensor); raises _Damaged when unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata()
    except Exception as e:  # SafetensorError: truncated, overwritten header, not a safetensors file
        raise _Damaged(f"cannot be read ({str(e).strip() or type(e).__name__})") from None


def _parse_meta(path: Path) -> dict[str, Any] | None:
    """The state JSON from a state file's header; None for a state of an older format (no checksum)."""
    header = _read_header(path)
    if not header or META_KEY not in header:
        return None
    try:
        meta = json.loads(header[META_KEY])
    except ValueError:
        raise _Damaged("its state JSON is not valid JSON") from None
    if not isinstance(meta, dict) or CHECKSUM_KEY not in header:
        raise _Damaged("its header lacks the state JSON or the checksum")
    return meta


def _read_verified(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(state JSON, tensors) of a state file whose checksum matches; raises _Damaged otherwise."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise _Damaged(f"cannot be read ({str(e).strip() or type(e).__name__})") from None
    if META_KEY not in header or CHECKSUM_KEY not in header:
        raise _Damaged("its header lacks the state JSON or the checksum")
    if state_checksum(header[META_KEY], tensors) != header[CHECKSUM_KEY]:
        raise _Damaged("does not match its checksum")
    try:
        return json.loads(header[META_KEY]), tensors
    except ValueError:
        raise _Damaged("its state JSON is not valid JSON") from None


class TrainingState:
    """Saves and restores models, optimizers, RNG states, counters and metadata under one training key."""

    def __init__(
        self,
        directory: str | Path,
        training_key: str,
        *,
        modules: Mapping[str, nn.Module],
        optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
        generators: Mapping[str, torch.Generator] | None = None,
        global_rng: bool = True,  # the global torch RNG (CPU, and CUDA when initialised): dropout draws from it
        collective: bool = False,  # every rank takes part in a save (FSDP2 shards are gathered); rank 0 writes
    ) -> None:
        self.directory = Path(directory)
        self.collective = collective
        self.training_key = training_key
        self.modules = dict(modules)
        self.optimizers = dict(optimizers or {})
        self.generators = dict(generators or {})
        self.global_rng = global_rng
        names = [*self.modules, *self.optimizers, "rng"]
        bad = [n for n in names if not n or "." in n]
        if len(set(names)) != len(names) or bad:
            raise ParamError(f"training state: module and optimizer names must be distinct, dot-free and not 'rng', got {names}")
        self._current_verified = False  # training_state.safetensors was written or verified by this process

    @property
    def path(self) -> Path:
        return self.directory / f"{STATE_NAME}.safetensors"

    @property
    def previous_path(self) -> Path:
        return self.directory / f"{PREVIOUS_NAME}.safetensors"

    def exists(self) -> bool:
        return self.path.is_file() or self.previous_path.is_file()

    def save(self, counters: Mapping[str, Any], metadata: Mapping[str, Any] | None = None) -> None:
        """Write a new verified state; the current one (when verified) becomes the previous one.

        Under torchrun only rank 0 writes (with ``collective``, every rank first takes part in gathering FSDP2
        shards into whole tensors). An OS error (no space, file too large, read-only) is a one-line
        FileWriteError naming the file; the states already on disk are left as they were."""
        from pipeline.core.distributed import is_main

        if not is_main() and not self.collective:
            return
        tensors: dict[str, torch.Tensor] = {}
        optimizer_meta: dict[str, Any] = {}
        for name, module in self.modules.items():
            tensors.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
        for name, optimizer in self.optimizers.items():
            opt_tensors, optimizer_meta[name] = optimizer_to_tensors(optimizer)
            tensors.update({f"{name}.{k}": v for k, v in opt_tensors.items()})
        for name, generator in self.generators.items():
            tensors[f"rng.{name}"] = generator.get_state().clone()
        if self.global_rng:
            tensors["rng.torch"] = torch.get_rng_state().clone()
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                for i, s in enumerate(torch.cuda.get_rng_state_all()):
                    tensors[f"rng.cuda.{i}"] = s.clone()
        if not is_main():  # a collective save: this rank gave its shards to rank 0
            return
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {
            "protocol": PROTOCOL,
            "training_key": self.training_key,
            "counters": dict(counters),
            "metadata": dict(metadata or {}),
            "optimizers": optimizer_meta,
        }
        text = json.dumps(meta, sort_keys=True)
        checksum = state_checksum(text, tensors)
        self._write(tensors, {META_KEY: text, CHECKSUM_KEY: checksum})
        readable = {**meta, "checksum": checksum, "about": f"a readable copy; resuming reads {self.path.name}"}
        atomic_write(self.directory / f"{STATE_NAME}.json",
                     lambda p: p.write_text(json.dumps(readable, indent=2, sort_keys=True) + "\n"))

    def _write(self, tensors: dict[str, torch.Tensor], header: dict[str, str]) -> None:
        from safetensors.torch import save_file

        make_dirs(self.directory)
        tmp = self.directory / f".{STATE_NAME}.safetensors.tmp-{os.getpid()}"
        try:
            with os_errors(self.path):
                save_file(tensors, str(tmp), metadata=header)
            try:
                _read_verified(tmp)
            except _Damaged as e:
                raise CheckpointError(f"training state {self.path}: the file just written {e} (a failing disk?); "
                                      "the earlier states are kept") from None  # fmt: skip
            with os_errors(self.path):
                if self._current_verified and self.path.is_file():
                    os.replace(self.path, self.previous_path)
                    current_json = self.directory / f"{STATE_NAME}.json"
                    if current_json.is_file():
                        os.replace(current_json, self.directory / f"{PREVIOUS_NAME}.json")
                os.replace(tmp, self.path)
        finally:
            if tmp.exists():
                tmp.unlink()
        self._current_verified = True

    def peek(self) -> dict[str, Any] | None:
        """The newest state's JSON (counters, metadata, key) from its header, without reading any tensor;
        None when there is no state, or it is unreadable or of an older format."""
        for path in (self.path, self.previous_path):
            if path.is_file():
                try:
                    return _parse_meta(path)
                except _Damaged:
                    continue
        return None

    def _matches(self, meta: dict[str, Any] | None, accept: Callable[[dict[str, Any]], bool] | None) -> bool:
        if meta is None or meta.get("protocol") != PROTOCOL or meta.get("training_key") != self.training_key:
            return False
        return accept is None or bool(accept(meta.get("counters", {})))

    def load(self, accept: Callable[[dict[str, Any]], bool] | None = None) -> Restored | None:
        """Put the newest verified matching state in place and return its counters and metadata.

        Candidates, newest first: ``training_state``, ``training_state.previous``. One of another protocol or
        training key, or that ``accept(counters)`` refuses (e.g. more steps done than the budget), is skipped;
        None when no candidate matches (nothing is changed then). A damaged candidate (checksum mismatch,
        truncated, unreadable) is skipped and named in ``Restored.damaged``; when no verified candidate is
        left, :class:`DamagedStateError` names the file and what to do."""
        damaged: list[tuple[Path, str]] = []
        for path in (self.path, self.previous_path):
            if not path.is_file():
                continue
            try:
                if not self._matches(_parse_meta(path), accept):
                    continue
                meta, tensors = _read_verified(path)
            except _Damaged as e:
                damaged.append((path, str(e)))
                continue
            self._restore(tensors, meta)
            self._current_verified = path == self.path
            return Restored(dict(meta["counters"]), dict(meta.get("metadata", {})), path,
                            [f"{p}: {why}" for p, why in damaged])  # fmt: skip
        if damaged:
            found = "; ".join(f"{p} {why}" for p, why in damaged)
            raise DamagedStateError(
                f"training state {found}; no verified state of this run is left to resume from: delete {self.directory} "
                "to start this stage over (it is deterministic: the result is the same)"
            )
        return None

    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        for name, module in self.modules.items():
            prefix = f"{name}."
            module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        for name, optimizer in self.optimizers.items():
            prefix = f"{name}."
            opt_tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix + "optimizer.")}
            optimizer_from_tensors(optimizer, opt_tensors, meta["optimizers"][name])
        for name, generator in self.generators.items():
            generator.set_state(tensors[f"rng.{name}"])
        if self.global_rng:
            torch.set_rng_state(tensors["rng.torch"])
            if torch.cuda.is_available():
                for i in range(torch.cuda.device_count()):
                    if f"rng.cuda.{i}" in tensors:
                        torch.cuda.set_rng_state(tensors[f"rng.cuda.{i}"], device=i)


def load_checkpoint_meta(directory: str | Path) -> dict[str, Any]:
    """The readable JSON copy of a training state (``training_state.json``; resuming reads the state file itself)."""
    path = Path(directory) / f"{STATE_NAME}.json"
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"training state {path} is not valid JSON: {e}") from None
