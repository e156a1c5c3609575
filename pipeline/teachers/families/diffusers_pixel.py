"""diffusers pixel U-Nets (``UNet2DModel`` + a DDPM-type scheduler) as :class:`pipeline.networks.diffusers_vp.DiffusersVP`.

Read from a diffusers folder (``model_index.json`` or ``unet/`` + ``scheduler/``) by pipeline.teachers.diffusers_folder;
converted checkpoint: model.json ``{"architecture": "diffusers", "diffusers": {"unet_class", "unet", "scheduler", ...}}``.
:class:`DiffusersFamily` holds what all diffusers families share (the latent text-to-image and the flow-transformer
families subclass it).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.networks.diffusers_vp import DIFFUSERS_ARCHITECTURE
from pipeline.networks.step_condition import randomize_step_condition
from pipeline.teachers import diffusers_folder as folder
from pipeline.teachers.families.base import ModelFamily, StepConditionOptions, TeacherFacts, refuse_authors


class DiffusersFamily(ModelFamily):
    """What every diffusers family shares; ``kind`` is :func:`pipeline.teachers.diffusers_folder.folder_kind`'s."""

    kind = "?"
    architecture = DIFFUSERS_ARCHITECTURE
    source_name = "diffusers"
    source_what = "a diffusers teacher folder"
    takes_prompts = True

    def claims_source(self, path: Path) -> bool:
        return folder.is_diffusers_folder(path) and folder.folder_kind(path) == self.kind

    def claims_config(self, config: dict[str, Any]) -> bool:
        return config.get("architecture") == DIFFUSERS_ARCHITECTURE and folder.config_kind(config) == self.kind

    def load_source(self, path: Path, device: str | torch.device, *, prompts: list[str] | None = None) -> tuple[nn.Module, dict[str, Any]]:
        model = folder.load_diffusers_folder(path, device, prompts=prompts)
        return model, folder.checkpoint_config(model, provenance={"kind": "teacher", "source_folder": str(path)})

    def import_source(self, source: Path, out_dir: Path, *, prompts_file: Path | None = None,
                      data_description: dict[str, Any] | None = None) -> dict[str, Any]:
        return folder.convert_diffusers_folder(source, out_dir, prompts_file=prompts_file, data_description=data_description)

    def pretrained_summary(self, info: dict[str, Any]) -> dict[str, Any]:
        return {"weights_hash": info["weights_hash"], "steps": 0, "architecture": DIFFUSERS_ARCHITECTURE,
                "unet_class": info["class"], "prediction_type": info["prediction_type"], "prompts": info["prompts"]}

    def summary_entries(self, config: dict[str, Any]) -> dict[str, Any]:
        return {"architecture": config["architecture"]}

    def import_line(self, source: Path, info: dict[str, Any], out: Path) -> str:
        return (f"teacher import: {source}: diffusers {info['class']} ({info['prediction_type']}), "
                f"{info['parameters']:,} parameters, samples {'x'.join(map(str, info['sample_shape']))}"
                f"{' (latents)' if info['latent'] else ''}, sigma {info['sigma_range'][0]:.4g} ... "
                f"{info['sigma_range'][1]:.4g}, {info['prompts'] or 'no'} prompts, weights hash {info['weights_hash']} -> {out}")

    def build(self, config: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> nn.Module:
        model = folder.build_diffusers_model(config, where=where.removesuffix("/model.safetensors") + "/model.json")
        model.load_checkpoint_state(tensors, where)
        return model

    def load_checkpoint(self, path: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                        device: str | torch.device) -> nn.Module:
        return folder.load_converted_diffusers(path, config, tensors, device)  # with its VAE, text encoder, prompts

    def fresh(self, config: dict[str, Any]) -> nn.Module:
        return folder.build_diffusers_model(config)

    def facts(self, model: nn.Module, config: dict[str, Any]) -> TeacherFacts:
        classes = {k: v for k, v in model.checkpoint_architecture()["diffusers"].items() if k.endswith("_class")}
        # the bound prompt set decides the classes, not model.json
        return TeacherFacts(list(model.sample_shape), model.num_classes, {"diffusers": classes},
                            {"num_classes": model.num_classes})

    def architecture_section(self, config: dict[str, Any]) -> dict[str, Any]:
        return {"architecture": config["architecture"], "diffusers": copy.deepcopy(config["diffusers"])}

    def save_side_files(self, model: nn.Module, directory: Path, config: dict[str, Any]) -> None:
        if "lora" not in config:  # a LoRA student loads its VAE / text encoder with its base network
            folder.save_components(model, directory)

    def describe(self, config: dict[str, Any]) -> str:
        section = config["diffusers"]
        return f"diffusers {section.get('unet_class') or section.get('transformer_class') or 'UNet'}"

    def student_copy(self, teacher: Any, options: StepConditionOptions, device: str | torch.device) -> nn.Module:
        """The same network, fine-tuned (its VAE / text encoder ride along); SFD-v: new zero-initialised step layers."""
        refuse_authors(self, options, teacher.path)
        model = teacher.model
        if options.enabled and not model.step_condition:
            torch.manual_seed(options.seed)
            model = model.with_step_condition()
            if options.init == "random":
                randomize_step_condition(model, options.seed)
        return model.to(device).train().requires_grad_(True)


class DiffusersPixelFamily(DiffusersFamily):
    name = "diffusers_pixel"
    kind = "pixel"
    diffusers_export = "unet"


FAMILY = DiffusersPixelFamily()
