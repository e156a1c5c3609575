"""Initialising the SFD-v step-condition layers of a student copy (any network family)."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.core.param_checks import ParamError

# the zero-initialised last layer of the step embedding: our U-Net, an EDM network, a diffusers UNet (DiffusersVP)
STEP_LAST_LAYER_SUFFIXES = ("steps_layer1", "map_steps.2")


def randomize_step_condition(model: nn.Module, seed: int) -> list[str]:
    """``step_condition_init: random`` (sfd-main starts its step layers from random weights): the step
    embedding's last layer, zero by default, drawn Xavier-uniform (bias 0) from a generator seeded with
    ``seed`` — the init sfd-main's SongUNet gives its ``map_step_layer1``. The student then no longer
    starts equal to its teacher. Returns the names of the layers re-drawn."""
    g = torch.Generator().manual_seed(int(seed))
    names = []
    with torch.no_grad():
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if not name.endswith(STEP_LAST_LAYER_SUFFIXES) or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
                continue
            fan_out, fan_in = weight.shape
            bound = (6.0 / (fan_in + fan_out)) ** 0.5
            weight.copy_(((2 * torch.rand(weight.shape, generator=g, dtype=torch.float64) - 1) * bound).to(weight.dtype))
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
            names.append(name)
    if not names:
        raise ParamError("step_condition_init: the student has no step-condition layer to initialise")
    return names


def zero_authors_step_modulation(model: nn.Module) -> list[str]:
    """``step_condition_arch: authors`` with ``step_condition_init: zero``: every block's ``affine_step`` set to 0,
    so each block's step modulation is the identity and the student starts equal to its teacher (sfd-main's
    own init keeps them random)."""
    names = []
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("affine_step"):
                for p in module.parameters():
                    p.zero_()
                names.append(name)
    return names
