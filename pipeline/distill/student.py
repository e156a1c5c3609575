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
- A diffusers UNet (model.json ``"architecture": "diffusers"``, pipeline.networks.diffusers_vp): the
  student fine-tunes the same UNet; its VAE, text encoder and prompt set are copied into the student's
  checkpoint; SFD-v adds zero-initialised step layers (``sfd_map_steps.*``) to the UNet's time embedding.
- Either architecture: this project's U-Net (:class:`EDMPrecond`, model.json ``"network"``) or an
  EDM network (a preconditioner of pipeline.diffusion.preconditioners, model.json
  ``"architecture": "edm"``). The code here and in pipeline.distill only uses their common
  interface: ``step_condition``, ``checkpoint_state_dict()``, ``checkpoint_module()``,
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
from pipeline.networks.unet import build_network, network_config
from pipeline.core.param_checks import ParamError
from pipeline.diffusion.schedules import Schedule
from pipeline.networks.edm import build_edm_model
from pipeline.networks.flow import precondition
from pipeline.teachers.diffusers_folder import is_diffusers_config
from pipeline.teachers.loader import is_edm_config, load_teacher

STEP_CONDITION_PREFIXES = ("map_steps.", "steps_layer0.", "steps_layer1.")  # our U-Net's step-condition layers
EDM_STEP_CONDITION_PREFIXES = ("model.map_steps_layer0.", "model.map_steps_layer1.",  # an EDM network's
                               "model.map_step.", "model.map_step_layer0.", "model.map_step_layer1.")  # sfd-main's
STEP_CONDITION_ARCHS = ("ours", "authors")
STEP_CONDITION_INITS = ("zero", "random")
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


@dataclass
class StudentInit:
    """A freshly built student before distillation."""

    model: nn.Module  # trainable, D(x, sigma, labels, num_steps=...): EDMPrecond or an EDM preconditioner
    config: dict[str, Any]  # architecture part + data (checkpoint JSON without sampler/provenance)
    init_hash: str  # hash of the initial weights (part of the training key)
    source: str  # the teacher checkpoint it copies, or "scratch"


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


def student_from_checkpoint(
    teacher_ckpt: str | Path,
    *,
    step_condition: bool = False,  # add the SFD-v step condition (zero-initialised) if the copy lacks it
    seed: int = 0,  # initialises the new step-condition layers (their last layer is zero)
    device: torch.device | str = "cpu",
    step_condition_init: str = "zero",  # random: new step layers' last layer drawn too (sfd-main; randomize_step_condition)
    step_condition_arch: str = "ours",  # authors: sfd-main's step embedding and per-block affine_step (EDM networks only)
) -> StudentInit:
    """A trainable copy of a network checkpoint (teacher or stage-1 student)."""
    if step_condition_init not in STEP_CONDITION_INITS:
        raise ParamError(f"step_condition_init: got {step_condition_init!r}; allowed values: 'zero', 'random'")
    if step_condition_arch not in STEP_CONDITION_ARCHS:
        raise ParamError(f"step_condition_arch: got {step_condition_arch!r}; allowed values: 'ours', 'authors'")
    teacher_ckpt = Path(teacher_ckpt)
    if not teacher_ckpt.exists():
        raise CheckpointError(
            f"teacher checkpoint {teacher_ckpt} does not exist (the student starts as a copy of it; "
            "train the teacher with `dvc repro teacher`)"
        )
    teacher = load_teacher(teacher_ckpt)  # before the seed: building its network draws from the global RNG
    config, tensors = teacher.config, teacher.model.checkpoint_state_dict()
    if step_condition and step_condition_arch == "authors" and not is_edm_config(config):
        raise ParamError("step_condition_arch: 'authors' (sfd-main's step layers) exists for EDM networks only; "
                         f"{teacher_ckpt} holds another architecture")
    if is_diffusers_config(config):  # the same diffusers UNet, fine-tuned (its VAE / text encoder ride along)
        model = teacher.model
        if step_condition and not model.step_condition:  # SFD-v: new zero-initialised step layers
            torch.manual_seed(seed)
            model = model.with_step_condition()
            if step_condition_init == "random":
                randomize_step_condition(model, seed)
        model = model.to(device).train().requires_grad_(True)
        base = {**model.checkpoint_architecture(), "data": copy.deepcopy(config.get("data", {}))}
        return StudentInit(model, base, hash_state_dict(model.checkpoint_state_dict()), str(teacher_ckpt))
    if is_edm_config(config):
        edm = config["edm"]
        kwargs = dict(edm["init_kwargs"])
        if step_condition and not kwargs.get("step_condition", False):
            kwargs["step_condition"] = True if step_condition_arch == "ours" else "authors"
        torch.manual_seed(seed)
        model = build_edm_model(edm["precond"], kwargs)
        prefixes = EDM_STEP_CONDITION_PREFIXES
    else:
        arch = network_config(**config["network"])
        if step_condition and not arch["step_condition"]:
            arch = {**arch, "step_condition": True}
        torch.manual_seed(seed)
        model = precondition(build_network(**arch), config)  # EDMPrecond, or PixelFlow ("precond": "flow")
        prefixes = STEP_CONDITION_PREFIXES
    missing, unexpected = model.checkpoint_module().load_state_dict(tensors, strict=False)
    bad_missing = [k for k in missing if not k.startswith(prefixes) and ".affine_step." not in k]
    if bad_missing or unexpected:
        raise CheckpointError(
            f"{teacher_ckpt}/model.safetensors does not fit its network config: missing {bad_missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    new_step_layers = any(k.startswith(prefixes) or ".affine_step." in k for k in missing)  # layers new to the copy
    if new_step_layers and ".affine_step." in " ".join(missing):  # sfd-main's layers: random as built (EDM's init)
        if step_condition_init == "zero":
            zero_authors_step_modulation(model)
    elif step_condition_init == "random" and new_step_layers:
        randomize_step_condition(model, seed)
    model = model.to(device).train()
    base = {**model.checkpoint_architecture(), "data": copy.deepcopy(config.get("data", {}))}
    return StudentInit(model, base, hash_state_dict(model.checkpoint_state_dict()), str(teacher_ckpt))


def model_from_architecture(config: dict[str, Any], *, seed: int, device: torch.device | str = "cpu") -> nn.Module:
    """A freshly initialised (seeded) network of the architecture a model.json ``config`` describes:
    an EDM preconditioner (``"architecture": "edm"``) or EDMPrecond around our U-Net (``"network"``)."""
    torch.manual_seed(seed)
    if is_diffusers_config(config):
        from pipeline.teachers.diffusers_folder import build_diffusers_model

        model = build_diffusers_model(config)
    elif is_edm_config(config):
        model = build_edm_model(config["edm"]["precond"], dict(config["edm"]["init_kwargs"]))
    else:
        model = precondition(build_network(**config["network"]), config)
    return model.to(device)


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
    if step_condition_init not in STEP_CONDITION_INITS:
        raise ParamError(f"step_condition_init: got {step_condition_init!r}; allowed values: 'zero', 'random'")
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
    if is_diffusers_config(base):
        arch = {"architecture": base["architecture"], "diffusers": copy.deepcopy(base["diffusers"])}
    elif is_edm_config(base):
        arch = {"architecture": base["architecture"], "edm": copy.deepcopy(base["edm"])}
    else:
        arch = {"network": copy.deepcopy(base["network"]), "sigma_data": float(base.get("sigma_data", 0.5))}
        if "precond" in base:  # this project's U-Net as a rectified flow (pipeline.networks.flow.PixelFlow)
            arch["precond"] = base["precond"]
    return {**arch, "data": copy.deepcopy(base.get("data", {})), "sampler": sampler, "provenance": provenance}


def save_student(directory: str | Path, model: nn.Module, config: dict[str, Any],
                 state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write model.safetensors (``model.checkpoint_state_dict()``, or ``state``: FSDP2's gathered tensors, a LoRA
    student's adapters) + model.json; the weights hash goes into the provenance."""
    state = model.checkpoint_state_dict() if state is None else state
    config = {**config, "provenance": {**config.get("provenance", {}), "weights_hash": hash_state_dict(state)}}
    out = save_checkpoint(directory, state, config)
    if is_diffusers_config(config) and "lora" not in config:  # VAE, text encoder, tokenizer, prompt set: copied from
        # the teacher (a LoRA student loads them with its base network)
        from pipeline.teachers.diffusers_folder import save_components

        save_components(model, out)
    return out

