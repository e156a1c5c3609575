"""This project's U-Net trained as a rectified flow (``objective: flow``): model.json ``"precond": "flow"``.

The denoiser is :class:`pipeline.networks.flow.PixelFlow` (D = x_tau - tau v in the VE view); everything
else is the U-Net family's.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from pipeline.networks.flow import FLOW_PRECOND, PixelFlow
from pipeline.teachers.families.unet import UNetFamily


class PixelFlowFamily(UNetFamily):
    name = "pixel_flow"

    def claims_config(self, config: dict[str, Any]) -> bool:
        return "architecture" not in config and "network" in config and config.get("precond") == FLOW_PRECOND

    def wrap(self, net: nn.Module, config: dict[str, Any]) -> nn.Module:
        return PixelFlow(net)

    def architecture_section(self, config: dict[str, Any]) -> dict[str, Any]:
        return {"network": copy.deepcopy(config["network"]), "sigma_data": float(config.get("sigma_data", 0.5)),
                "precond": config["precond"]}

    def describe(self, config: dict[str, Any]) -> str:
        return "this project's U-Net as a rectified flow (velocity network)"


FAMILY = PixelFlowFamily()
