"""This project's U-Net (pipeline.networks.unet) with EDM preconditioning: model.json ``"network"`` + ``"sigma_data"``.

The checkpoint stores the bare network F; the denoiser is ``EDMPrecond(F, sigma_data)``. It is what the teacher
stage trains (``objective: edm``) and what a student of the exact mixture teacher is built from.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.diffusion.denoisers import EDMPrecond
from pipeline.networks.step_condition import randomize_step_condition
from pipeline.networks.unet import build_network, network_config
from pipeline.teachers.families.base import (
    ModelFamily, StepConditionOptions, TeacherFacts, copy_into, load_exact, refuse_authors,
)  # fmt: skip

STEP_CONDITION_PREFIXES = ("map_steps.", "steps_layer0.", "steps_layer1.")  # our U-Net's step-condition layers


class UNetFamily(ModelFamily):
    name = "unet"

    def claims_config(self, config: dict[str, Any]) -> bool:
        return "architecture" not in config and "network" in config and config.get("precond") is None

    def wrap(self, net: nn.Module, config: dict[str, Any]) -> nn.Module:
        """The denoiser around the bare network ``net``."""
        return EDMPrecond(net, sigma_data=float(config.get("sigma_data", 0.5)))

    def build(self, config: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> nn.Module:
        net = build_network(**config["network"])
        load_exact(net, tensors, f"{where} does not match its network config")
        return self.wrap(net, config)

    def fresh(self, config: dict[str, Any]) -> nn.Module:
        return self.wrap(build_network(**config["network"]), config)

    def facts(self, model: nn.Module, config: dict[str, Any]) -> TeacherFacts:
        return TeacherFacts([model.net.in_channels, *model.net.img_resolution], model.net.label_dim,
                            {"network": config["network"]}, {})

    def architecture_section(self, config: dict[str, Any]) -> dict[str, Any]:
        return {"network": copy.deepcopy(config["network"]), "sigma_data": float(config.get("sigma_data", 0.5))}

    def describe(self, config: dict[str, Any]) -> str:
        return "this project's U-Net with EDM preconditioning"

    def student_copy(self, teacher: Any, options: StepConditionOptions, device: str | torch.device) -> nn.Module:
        refuse_authors(self, options, teacher.path)
        arch = network_config(**teacher.config["network"])
        if options.enabled and not arch["step_condition"]:
            arch = {**arch, "step_condition": True}
        torch.manual_seed(options.seed)
        model = self.wrap(build_network(**arch), teacher.config)
        new = copy_into(model, teacher.model.checkpoint_state_dict(), Path(teacher.path),
                        lambda k: k.startswith(STEP_CONDITION_PREFIXES))
        if new and options.init == "random":
            randomize_step_condition(model, options.seed)
        return model.to(device).train()


FAMILY = UNetFamily()
