"""One resumable training state: ``<dir>/training_state.safetensors`` + ``training_state.json``.

Tensors (safetensors, nothing unpickled):
    ``<module>.<param>``        every module's state dict (e.g. ``net.*``, ``ema.*``)
    ``<optimizer>.optimizer.*`` every optimizer (pipeline.core.checkpoints.optimizer_to_tensors)
    ``rng.<name>``              every named torch.Generator
    ``rng.torch``               the global CPU generator (dropout draws from it), and
    ``rng.cuda.<i>``            each CUDA device's generator when CUDA is in use.
JSON: ``protocol``, ``training_key``, ``counters`` (batches done, rows read, ...), ``metadata``
(loss statistics, log rows, cost, ...) and the optimizers' scalar state.

A state is resumed only when its protocol and training key match (the key hashes everything that
changes the result: params, data, initialisation); otherwise it is ignored and, at the next save,
overwritten. Writes are atomic (pipeline.core.checkpoints), so an interrupted save leaves the
previous state intact.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.core.checkpoints import has_checkpoint, load_checkpoint, optimizer_from_tensors, optimizer_to_tensors, save_checkpoint
from pipeline.core.param_checks import ParamError

STATE_NAME = "training_state"
PROTOCOL = 2  # 1: the teacher's and SFD's own formats before pipeline.training


@dataclass
class Restored:
    """What :meth:`TrainingState.load` read back besides the tensors it put in place."""

    counters: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)


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
    ) -> None:
        self.directory = Path(directory)
        self.training_key = training_key
        self.modules = dict(modules)
        self.optimizers = dict(optimizers or {})
        self.generators = dict(generators or {})
        self.global_rng = global_rng
        names = [*self.modules, *self.optimizers, "rng"]
        bad = [n for n in names if not n or "." in n]
        if len(set(names)) != len(names) or bad:
            raise ParamError(f"training state: module and optimizer names must be distinct, dot-free and not 'rng', got {names}")

    def exists(self) -> bool:
        return has_checkpoint(self.directory, name=STATE_NAME)

    def save(self, counters: Mapping[str, Any], metadata: Mapping[str, Any] | None = None) -> None:
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
        meta = {
            "protocol": PROTOCOL,
            "training_key": self.training_key,
            "counters": dict(counters),
            "metadata": dict(metadata or {}),
            "optimizers": optimizer_meta,
        }
        save_checkpoint(self.directory, tensors, meta, name=STATE_NAME)

    def peek(self) -> dict[str, Any] | None:
        """The saved JSON (counters, metadata, key) without touching any tensor; None when there is no state."""
        if not self.exists():
            return None
        return load_checkpoint_meta(self.directory)

    def load(self, accept: Callable[[dict[str, Any]], bool] | None = None) -> Restored | None:
        """Put a matching saved state in place and return its counters and metadata.

        None when there is no state, or it has another protocol or training key, or ``accept(counters)``
        refuses it (e.g. more steps done than the budget); nothing is changed then.
        """
        meta = self.peek()
        if meta is None or meta.get("protocol") != PROTOCOL or meta.get("training_key") != self.training_key:
            return None
        if accept is not None and not accept(meta["counters"]):
            return None
        tensors, meta = load_checkpoint(self.directory, name=STATE_NAME)
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
        return Restored(dict(meta["counters"]), dict(meta.get("metadata", {})))


def load_checkpoint_meta(directory: str | Path) -> dict[str, Any]:
    """The JSON half of a training state."""
    import json

    from pipeline.core.checkpoints import CheckpointError

    path = Path(directory) / f"{STATE_NAME}.json"
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"training state {path} is not valid JSON: {e}") from None
