"""diffusers flow-matching transformers (Stable Diffusion 3 / 3.5, Flux.1) as :class:`pipeline.networks.flow.DiffusersFlow`.

A pipeline folder with ``transformer/`` and a ``FlowMatchEulerDiscreteScheduler``; its converted checkpoint's
model.json has ``diffusers.transformer_class``. Its schedules start at sigma = inf (``Teacher.flow_shift``); a
distilled student exports as ``StableDiffusion3Pipeline`` / ``FluxPipeline`` (pipeline.teachers.diffusers_export).
"""

from __future__ import annotations

from pipeline.teachers.families.diffusers_pixel import DiffusersFamily


class DiffusersFlowFamily(DiffusersFamily):
    name = "diffusers_flow"
    kind = "flow"
    diffusers_export = "flow"


FAMILY = DiffusersFlowFamily()
