"""Baselines distilled on the same teacher as SFD (shared/docs/baselines.md).

- :mod:`pipeline.distill.baselines.progressive`: progressive distillation (Salimans & Ho 2022) in EDM variables;
- :mod:`pipeline.distill.baselines.sfddm`: SFDDM, one fold, with its training-free control row;
- :mod:`pipeline.distill.baselines.vanilla`: vanilla trajectory distillation (SFD paper, Algorithm 1).

This module holds what they share: the training data, the student checkpoints (the common JSON
convention with a ``"sampler"`` section, so pipeline.diffusion.sampling and the evaluation stage read
them) and small optimiser helpers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.diffusion.denoisers import EDMPrecond
from pipeline.core.hashing import hash_state_dict
from pipeline.core.param_checks import ParamError, check_int, check_positive
from pipeline.distill.student import sampler_section, save_student  # noqa: F401  (re-exported for the baselines)


@dataclass
class TrainingData:
    """Clean training images y (float32 [N, C, H, W]) and their labels (None when unconditional)."""

    images: torch.Tensor
    labels: torch.Tensor | None

    def __post_init__(self) -> None:
        if self.images.ndim < 2 or len(self.images) == 0:
            raise ParamError(f"training data: expected [N, *sample_shape] images with N > 0, got {tuple(self.images.shape)}")
        if self.labels is not None and self.labels.shape != (len(self.images),):
            raise ParamError(f"training data: {len(self.images)} images but labels of shape {tuple(self.labels.shape)}")

    def draw(
        self, batch_size: int, generator: torch.Generator, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A uniformly drawn batch (with replacement): (y [B, ...], labels [B] or None) on ``device``."""
        idx = torch.randint(len(self.images), (batch_size,), generator=generator)
        labels = None if self.labels is None else self.labels[idx].to(device)
        return self.images[idx].to(device), labels


def load_training_data(data_dir: str | Path, *, conditional: bool) -> TrainingData:
    """The ``train`` split written by the data stage; labels kept only for a conditional teacher."""
    from pipeline.data.datasets import load_split

    images, labels = load_split(data_dir, "train")
    return TrainingData(images.float(), labels if conditional else None)


def student_config(teacher_config: dict[str, Any], sampler: dict[str, Any], provenance: dict[str, Any]) -> dict[str, Any]:
    """Checkpoint JSON of a distilled student with the teacher's architecture."""
    return {
        "network": teacher_config["network"],
        "sigma_data": float(teacher_config.get("sigma_data", 0.5)),
        "data": teacher_config["data"],
        "sampler": sampler,
        "provenance": provenance,
    }


def trainable_copy(model: EDMPrecond) -> EDMPrecond:
    """A deep copy in train mode with gradients on (the student starts as a copy of its teacher)."""
    return copy.deepcopy(model).train().requires_grad_(True)


def frozen(model: nn.Module) -> nn.Module:
    return model.eval().requires_grad_(False)


def adam(model: nn.Module, lr: float) -> torch.optim.Adam:
    """Adam with betas (0.9, 0.999), no weight decay (as every baseline's reference code)."""
    return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def check_common(section: str, *, batch_size: int, lr: float, seed: int, updates: int, updates_key: str = "updates") -> None:
    check_int(f"{section}.batch_size", batch_size, minimum=1)
    check_positive(f"{section}.lr", lr)
    check_int(f"{section}.seed", seed, minimum=0)
    check_int(f"{section}.{updates_key}", updates, minimum=1)


def check_finite(loss: torch.Tensor, where: str) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{where}: the loss is {float(loss)}; lower the learning rate")


def load_baseline_inputs(
    teacher_dir: str | Path, data_dir: str | Path, device: torch.device | str
) -> tuple[EDMPrecond, dict[str, Any], TrainingData, dict[str, Any]]:
    """(teacher model, its checkpoint config, training data, provenance) for a baseline stage."""
    from pipeline.teachers.loader import load_network

    teacher, config = load_network(teacher_dir, device)
    conditional = int(config.get("data", {}).get("num_classes", 0)) > 0
    data = load_training_data(data_dir, conditional=conditional)
    provenance = {
        "teacher": str(teacher_dir),
        "teacher_weights_hash": hash_state_dict(teacher.net.state_dict()),
        "data": str(data_dir),
        "conditional": conditional,
    }
    return teacher, config, data, provenance
