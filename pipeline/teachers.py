"""Teacher sources behind one interface: a denoiser plus what the pipeline needs to know about it.

Sources:
- ``gmm``: the exact Gaussian-mixture denoiser (fast end-to-end tests, solver oracles);
- ``checkpoint``: a network trained by this project (safetensors + JSON config).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from pipeline.gmm import GaussianMixture
from pipeline.hashing import hash_description
from pipeline.param_checks import ParamError

TeacherSource = Literal["gmm", "checkpoint"]
TEACHER_SOURCES = ("gmm", "checkpoint")


@dataclass
class Teacher:
    denoiser: Callable[..., torch.Tensor]  # D(x, sigma, labels=None) -> x0
    sample_shape: tuple[int, ...]  # shape of one sample, e.g. (1, 8, 8)
    num_classes: int  # 0 when unconditional
    weights_hash: str  # content hash of everything that determines D
    description: dict[str, Any] = field(default_factory=dict)  # readable provenance


def gmm_teacher(
    *,
    num_components: int = 4,
    sample_shape: tuple[int, ...] = (1, 4, 4),
    std: float = 0.2,
    seed: int = 0,
    conditional: bool = False,
) -> Teacher:
    gmm = GaussianMixture.random(num_components=num_components, sample_shape=sample_shape, std=std, seed=seed)
    desc = gmm.description()
    return Teacher(
        denoiser=gmm,
        sample_shape=tuple(sample_shape),
        num_classes=num_components if conditional else 0,
        weights_hash=hash_description(desc),
        description={"source": "gmm", **desc},
    )


def load_teacher(source: str, *, device: str | torch.device = "cpu", **options: Any) -> Teacher:
    """Build a teacher from its source name and options (see module docstring)."""
    if source == "gmm":
        return gmm_teacher(**options)
    if source == "checkpoint":
        from pipeline.networks import load_network_teacher

        return load_network_teacher(options.get("path"), device=device)
    raise ParamError(f"teacher.source: got {source!r}; allowed values: {', '.join(map(repr, TEACHER_SOURCES))}")
