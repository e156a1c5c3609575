"""Small optimiser and model helpers shared by every training loop."""

from __future__ import annotations

import copy
from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


def adam(model: nn.Module, lr: float, parameters: list[nn.Parameter] | None = None) -> torch.optim.Adam:
    """Adam with betas (0.9, 0.999), eps 1e-8, no weight decay (the teacher, SFD and every baseline);
    ``parameters``: a subset to train (a LoRA student's adapters), default every parameter of ``model``."""
    return torch.optim.Adam(model.parameters() if parameters is None else parameters, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def trainable_copy(model: M) -> M:
    """A deep copy in train mode with gradients on (a student starts as a copy of its teacher)."""
    return copy.deepcopy(model).train().requires_grad_(True)


def frozen(model: M) -> M:
    """``model`` itself in eval mode without gradients (a teacher)."""
    return model.eval().requires_grad_(False)
