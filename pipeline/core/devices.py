"""Device selection: ``auto`` uses a GPU when there is one."""

from __future__ import annotations

import torch

from pipeline.core.param_checks import ParamError


def resolve_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ParamError(f"device: {spec!r} requested but no CUDA device is available (use 'auto' or 'cpu')")
    try:
        return torch.device(spec)
    except RuntimeError:
        raise ParamError(f"device: {spec!r} is not a device; use 'auto', 'cpu' or 'cuda[:N]'") from None


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"
