"""Checkpoints: safetensors for tensors + a JSON file for configuration. Nothing is unpickled.

A checkpoint is a directory holding ``<name>.safetensors`` and ``<name>.json``. Writes are atomic
(temporary file, then rename) so an interrupted or failed save (no space, file too large: a one-line
:class:`pipeline.core.files.FileWriteError`) leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from pipeline.core.files import atomic_write, make_dirs
from pipeline.core.param_checks import PipelineError


class CheckpointError(PipelineError, FileNotFoundError):
    """A checkpoint file is missing or malformed."""


def save_checkpoint(
    directory: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    *,
    name: str = "model",
) -> Path:
    """Write ``<directory>/<name>.safetensors`` and ``<name>.json``; returns the directory.

    Under torchrun only rank 0 writes (every rank holds the same weights); the others return the directory."""
    from pipeline.core.distributed import is_main

    directory = Path(directory)
    if not is_main():
        return directory
    make_dirs(directory)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(directory / f"{name}.safetensors", lambda p: save_file(tensors, str(p)))
    atomic_write(
        directory / f"{name}.json",
        lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"),
    )
    return directory


def load_checkpoint(
    directory: str | os.PathLike,
    *,
    name: str = "model",
    device: str | torch.device = "cpu",
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`; a missing file raises a clear error."""
    directory = Path(directory)
    weights, config_path = directory / f"{name}.safetensors", directory / f"{name}.json"
    for path in (weights, config_path):
        if not path.is_file():
            raise CheckpointError(
                f"checkpoint file {path} is missing (a checkpoint directory holds {name}.safetensors "
                f"and {name}.json)"
            )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint config {config_path} is not valid JSON: {e}") from None
    return load_file(str(weights), device=str(device)), config


def has_checkpoint(directory: str | os.PathLike, *, name: str = "model") -> bool:
    directory = Path(directory)
    return (directory / f"{name}.safetensors").is_file() and (directory / f"{name}.json").is_file()


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten an optimizer state dict into tensors (safetensors) and JSON metadata."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    """Inverse of :func:`optimizer_to_tensors`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith("optimizer."):
            continue
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, entry in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(entry)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
