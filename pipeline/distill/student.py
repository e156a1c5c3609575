"""The SFD student: a copy of the teacher network (sfd-method.md sections 6-7, 10) and its checkpoint.

- Stage 1 / stage 2: the student starts as an exact copy of its teacher's network (all weights
  fine-tuned). For SFD-v the network gains the step condition (number of timestamps N); its new
  layers end in a zero-initialised linear layer, so the student starts equal to the teacher
  (``step_condition_init: random`` draws that layer too, as sfd-main starts from random step layers).
- The exact Gaussian-mixture teacher has no network to copy: a student network is then built
  fresh from an architecture given in params (tests and toy runs).
- A distilled checkpoint is the network plus a ``"sampler"`` section (solver euler, schedule,
  AFS, step condition, guidance), so ``sfd sample --ckpt PATH`` needs no other option. It is
  loaded by pipeline.teachers.loader (``load_student`` / ``load_teacher``).
- Any model family (pipeline.teachers.families: this project's U-Net, an EDM network, a diffusers
  UNet or flow transformer, ...): the family that owns the teacher's model.json makes the copy
  (``student_copy``), names its architecture in the student's model.json and writes its side files
  (a diffusers VAE, text encoder, prompt set). The code here and in pipeline.distill only uses the
  networks' common interface: ``step_condition``, ``checkpoint_state_dict()``, ``checkpoint_module()``,
  ``checkpoint_architecture()``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.core.checkpoints import CheckpointError, save_checkpoint
from pipeline.diffusion.denoisers import EDMPrecond
from pipeline.core.hashing import hash_state_dict
from pipeline.networks.step_condition import randomize_step_condition
from pipeline.networks.unet import build_network, network_config
from pipeline.core.param_checks import ParamError
from pipeline.diffusion.schedules import Schedule
from pipeline.teachers.families import StepConditionOptions, family_for_config
from pipeline.teachers.loader import load_teacher



@dataclass
class StudentInit:
    """A freshly built student before distillation."""

    model: nn.Module  # trainable, D(x, sigma, labels, num_steps=...): EDMPrecond or an EDM preconditioner
    config: dict[str, Any]  # architecture part + data (checkpoint JSON without sampler/provenance)
    init_hash: str  # hash of the initial weights (part of the training key)
    source: str  # the teacher checkpoint it copies, or "scratch"


def student_from_checkpoint(
    teacher_ckpt: str | Path,
    *,
    step_condition: bool = False,  # add the SFD-v step condition (zero-initialised) if the copy lacks it
    seed: int = 0,  # initialises the new step-condition layers (their last layer is zero)
    device: torch.device | str = "cpu",
    step_condition_init: str = "zero",  # random: new step layers' last layer drawn too (sfd-main; randomize_step_condition)
    step_condition_arch: str = "ours",  # authors: sfd-main's step embedding and per-block affine_step (EDM networks only)
) -> StudentInit:
    """A trainable copy of a network checkpoint (teacher or stage-1 student); the options come validated
    (pipeline.config.distill.DistillParams)."""
    teacher_ckpt = Path(teacher_ckpt)
    if not teacher_ckpt.exists():
        raise CheckpointError(
            f"teacher checkpoint {teacher_ckpt} does not exist (the student starts as a copy of it; "
            "train the teacher with `dvc repro teacher`)"
        )
    teacher = load_teacher(teacher_ckpt)  # before the seed: building its network draws from the global RNG
    options = StepConditionOptions(bool(step_condition), int(seed), step_condition_init, step_condition_arch)
    model = family_for_config(teacher.config).student_copy(teacher, options, device)
    base = {**model.checkpoint_architecture(), "data": copy.deepcopy(teacher.config.get("data", {}))}
    return StudentInit(model, base, hash_state_dict(model.checkpoint_state_dict()), str(teacher_ckpt))


def model_from_architecture(config: dict[str, Any], *, seed: int, device: torch.device | str = "cpu") -> nn.Module:
    """A freshly initialised (seeded) network of the architecture a model.json ``config`` describes:
    an EDM preconditioner (``"architecture": "edm"``) or EDMPrecond around our U-Net (``"network"``)."""
    torch.manual_seed(seed)
    return family_for_config(config).fresh(config).to(device)


def student_from_scratch(
    network: dict[str, Any],  # architecture kwargs; resolution, channels and label_dim come from the data
    *,
    sample_shape: Sequence[int],
    num_classes: int,
    step_condition: bool = False,
    seed: int = 0,
    sigma_data: float = 0.5,
    device: torch.device | str = "cpu",
    step_condition_init: str = "zero",  # random: the step embedding's last layer drawn too (randomize_step_condition)
) -> StudentInit:
    """A freshly initialised student, for teachers without a network (the exact mixture denoiser)."""
    for key in ("img_resolution", "in_channels", "label_dim"):
        if key in network:
            raise ParamError(f"student_network.{key}: comes from the teacher's data; remove it from params")
    if len(sample_shape) != 3:
        raise ParamError(f"student_network: needs images [C, H, W], the teacher's samples are {list(sample_shape)}")
    c, h, w = (int(v) for v in sample_shape)
    arch = network_config(
        **{**network, "step_condition": bool(step_condition) or bool(network.get("step_condition", False))},
        img_resolution=h if h == w else [h, w],
        in_channels=c,
        label_dim=num_classes,
    )
    torch.manual_seed(seed)
    net = build_network(**arch)
    if step_condition_init == "random" and arch["step_condition"]:
        randomize_step_condition(net, seed)
    model = EDMPrecond(net, sigma_data=sigma_data).to(device)
    base = {"network": arch, "sigma_data": sigma_data, "data": {"sample_shape": list(sample_shape), "num_classes": num_classes}}
    return StudentInit(model, base, hash_state_dict(net.state_dict()), "scratch")


def sampler_section(
    schedule: Schedule,
    *,
    afs: bool,
    step_condition: Sequence[int] | None = None,  # SFD-v: the N values it was trained on
    guidance: float = 1.0,
) -> dict[str, Any]:
    """The checkpoint's ``"sampler"``: Euler on the student schedule (section 10)."""
    return {
        "solver": "euler",
        "max_order": 1,
        "schedule": schedule.to_dict(),
        "afs": bool(afs),
        "step_condition": sorted(int(n) for n in step_condition) if step_condition else None,
        "guidance": float(guidance),
    }


def student_config(base: dict[str, Any], sampler: dict[str, Any], provenance: dict[str, Any]) -> dict[str, Any]:
    """The distilled checkpoint's JSON: our U-Net: network, sigma_data, data, sampler, provenance; an EDM
    network: architecture, edm, data, sampler, provenance.

    ``base``: a :class:`StudentInit` config or the teacher checkpoint's model.json (the baselines keep
    the teacher's architecture); only its architecture part and data are kept."""
    arch = family_for_config(base).architecture_section(base)
    return {**arch, "data": copy.deepcopy(base.get("data", {})), "sampler": sampler, "provenance": provenance}


def save_student(directory: str | Path, model: nn.Module, config: dict[str, Any],
                 state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write model.safetensors (``model.checkpoint_state_dict()``, or ``state``: FSDP2's gathered tensors, a LoRA
    student's adapters) + model.json; the weights hash goes into the provenance."""
    state = model.checkpoint_state_dict() if state is None else state
    config = {**config, "provenance": {**config.get("provenance", {}), "weights_hash": hash_state_dict(state)}}
    out = save_checkpoint(directory, state, config)
    family_for_config(config).save_side_files(model, out, config)  # a diffusers VAE, text encoder, prompt set
    return out

