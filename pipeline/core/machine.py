"""What machine a number or a bit-exact result came from: the CPU model and a signature for exactness.

Deterministic CPU runs (threads = 1) give the same bits on machines with the same signature (CPU vendor,
family, model and the vector capability torch dispatches to) and the same torch; other machines agree
only to round-off. Benchmarks record :func:`describe_machine` with their numbers.
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from typing import Any

import torch


@lru_cache(maxsize=1)
def cpu_info() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip():
                    info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def cpu_model() -> str:
    return cpu_info().get("model name") or platform.processor() or platform.machine() or "unknown"


def machine_signature() -> str:
    """``vendor/family/model/capability``: machines with the same one train the same bits at threads = 1."""
    info = cpu_info()
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")()
    return "/".join([info.get("vendor_id", "unknown"), info.get("cpu family", "?"), info.get("model", "?"), capability])


def describe_machine() -> dict[str, Any]:
    """CPU model, core count, signature and torch version, as benchmarks record them."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "signature": machine_signature(), "torch": torch.__version__,
            "python": platform.python_version()}
