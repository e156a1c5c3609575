"""The one teacher loader: a denoiser plus what the pipeline needs to know about it.

``load_teacher(path_or_source, device="cpu", **options)`` takes

- a checkpoint directory of this project (``model.safetensors`` + ``model.json``): a trained
  teacher, or a distilled student (the teacher of stage 2). The ``"sampler"`` section of model.json
  tells them apart, and this module is the one place that reads it: a distilled student comes with
  its sampler (:class:`pipeline.diffusion.sampling.SamplerSpec`; ``options`` override it as in
  ``resolve_sampler``: solver, max_order, num_steps, schedule, afs, guidance). When that sampler is
  step-conditioned (SFD-v), the denoiser is called with the sampler's N bound
  (:func:`pipeline.diffusion.denoisers.bind_num_steps`) and that N enters the weights hash
  (:func:`bound_teacher_hash`), so store keys tell the N apart;
- the built-in source ``"gmm"``: the exact Gaussian-mixture denoiser (fast end-to-end tests,
  solver oracles); options num_components, sample_shape, std, seed, conditional;
- an NVlabs/edm snapshot pickle (a path ending in ``.pkl``, e.g. ``edm-cifar10-32x32-uncond-vp.pkl``),
  read safely by :func:`pipeline.teachers.edm_pickle.load_edm_pickle` (no pickled code runs), or the
  checkpoint directory ``sfd teacher import`` converts it into;
- a diffusers folder (``model_index.json``, or ``unet/`` + ``scheduler/``): a pixel ``UNet2DModel`` or a
  latent text-to-image pipeline, read by :mod:`pipeline.teachers.diffusers_folder` (safetensors only) as a
  :class:`pipeline.networks.diffusers_vp.DiffusersVP` (VE view, k-diffusion timestep interpolation);
  option ``prompts`` (a prompt file or list) binds a text-to-image teacher's prompt set. Its converted
  checkpoint has ``"architecture": "diffusers"`` in model.json (with side files for the VAE, text
  encoder, tokenizer and prompts) and loads with identical outputs. A flow-matching transformer folder
  (Stable Diffusion 3 / 3.5, Flux.1) is read the same way as a
  :class:`pipeline.networks.flow.DiffusersFlow` (D = x_tau - tau v in the VE view; its schedules start at
  sigma = inf, :attr:`Teacher.flow_shift`), and this project's U-Net trained as a rectified flow
  (model.json ``"precond": "flow"``) as a :class:`pipeline.networks.flow.PixelFlow`.

Which network a checkpoint or a foreign file holds is the model-family registry's business
(:mod:`pipeline.teachers.families`: this project's U-Net, its rectified-flow form, EDM networks, diffusers
pixel / latent text-to-image UNets, diffusers flow transformers): the family that claims a model.json builds
its network, says its sample shape and classes, and reads its side files; this module never asks which family
it holds. Each family module's docstring describes its model.json.

The old form ``load_teacher("checkpoint", path=...)`` still works. A directory literally named
``gmm`` is loaded as a checkpoint when given as a ``Path`` (or ``"./gmm"``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config.trajectories import GMM_OPTIONS, TEACHER_SOURCES  # "checkpoint": load_teacher("checkpoint", path=...)
from pipeline.core.checkpoints import CheckpointError, load_checkpoint
from pipeline.core.hashing import hash_description
from pipeline.core.param_checks import ParamError, check_keys
from pipeline.diffusion.denoisers import Denoiser, bind_num_steps
from pipeline.diffusion.gmm import GaussianMixture
from pipeline.diffusion.sampling import SamplerSpec, make_denoiser, resolve_sampler
from pipeline.diffusion.schedules import Schedule
from pipeline.teachers.content import network_weights_hash, teacher_content_hash
from pipeline.teachers.families import ModelFamily, family_for_config, family_for_source

SAMPLER_OPTIONS = ("solver", "max_order", "num_steps", "schedule", "afs", "guidance")  # resolve_sampler overrides
CHECKPOINT_FILES = (
    ("model.safetensors", "the network weights"),
    ("model.json", "its config: network, sigma_data, data, and for a distilled student its sampler"),
)
WHERE_CHECKPOINTS_COME_FROM = (
    "a checkpoint directory holds model.safetensors and model.json as written by `dvc repro teacher` "
    "(a teacher), a distillation stage (a distilled student) or `sfd teacher import SRC.pkl --out DIR` "
    "(an EDM network)"
)


@dataclass
class Teacher:
    """A loaded teacher. ``denoiser`` is what to run as the teacher; ``model`` the bare network."""

    denoiser: Denoiser  # D(x, sigma, labels=None) -> x0; the EDMPrecond (nn.Module) of a network, SFD-v N bound
    sample_shape: tuple[int, ...]  # shape of one sample, e.g. (1, 8, 8)
    num_classes: int  # 0 when unconditional
    weights_hash: str  # content hash of everything that determines `denoiser` (the teacher hash in store keys)
    description: dict[str, Any] = field(default_factory=dict)  # readable provenance
    model: Denoiser | None = None  # unbound: the EDMPrecond (net kwargs such as num_steps pass through); default denoiser
    config: dict[str, Any] | None = None  # the checkpoint's model.json; None for a built-in source
    sampler: SamplerSpec | None = None  # a distilled checkpoint's own sampler (options applied); None for a teacher
    network_hash: str | None = None  # hash of the network weights alone (hash_state_dict); None for a built-in source
    path: Path | None = None  # the checkpoint directory

    def __post_init__(self) -> None:
        if self.model is None:
            self.model = self.denoiser

    @property
    def is_distilled(self) -> bool:
        """A distilled student (its model.json has a sampler section), not a trained teacher."""
        return self.sampler is not None

    @property
    def num_steps(self) -> int | None:
        """The N bound into ``denoiser`` for a step-conditioned (SFD-v) student; None otherwise."""
        return None if self.sampler is None else self.sampler.bound_num_steps

    def sampler_spec(self, **overrides: Any) -> SamplerSpec:
        """The checkpoint's sampler section (the teacher default for a teacher) with ``overrides``
        (resolve_sampler's; None values keep the checkpoint's). Without overrides: ``self.sampler`` if any.
        A flow-matching teacher's default sampler runs on the ``flow`` schedule (from sigma = inf, its shift)."""
        if self.sampler is not None and all(v is None for v in overrides.values()):
            return self.sampler
        spec = resolve_sampler(sampler_section(self.config), **overrides)
        if self.sampler is None and self.flow_shift is not None and overrides.get("schedule") is None:
            spec = replace(spec, schedule=Schedule.flow(spec.schedule.num_steps, shift=self.flow_shift))
        return spec

    # -- diffusers teachers (pipeline.networks.diffusers_vp): text-to-image and latent models ------------
    @property
    def latent(self) -> bool:
        """Whether samples are latents that :meth:`decode` turns into images (a VAE is attached)."""
        return bool(getattr(self.model, "latent", False))

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from samples: the VAE decoder of a latent model, identity otherwise."""
        return self.model.decode(samples) if self.latent else samples

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text-encoder hidden states [P, L, D] of a text-to-image teacher: ``denoiser(x, sigma, cond)``
        takes them (a float tensor) in place of labels, cond=None being the empty prompt."""
        if not hasattr(self.model, "encode_prompts"):
            raise ParamError(f"teacher ({self.description.get('source')}) is not a text-to-image model")
        return self.model.encode_prompts(list(prompts))

    @property
    def prompts(self) -> list[str] | None:
        """The bound prompt set of a text-to-image teacher (labels index it); None otherwise."""
        return getattr(self.model, "prompts", None)

    @property
    def alphas_cumprod(self) -> list[float] | None:
        """The abar table of a discrete (diffusers) teacher, float64 values; None for a continuous one."""
        abar = getattr(self.model, "alphas_cumprod", None)
        return None if abar is None else abar.double().cpu().tolist()

    @property
    def sigma_range(self) -> tuple[float, float] | None:
        """(sigma_min, sigma_max) of a discrete teacher's table; None for a continuous one."""
        if getattr(self.model, "alphas_cumprod", None) is None:
            return None
        return float(self.model.sigma_min), float(self.model.sigma_max)

    @property
    def prompt_set_hash(self) -> str | None:
        """Hash of the bound prompt set of a text-to-image teacher (part of the store key); None otherwise."""
        from pipeline.teachers.prompts import prompt_set_hash

        return prompt_set_hash(self.prompts) if self.prompts else None

    @property
    def flow_shift(self) -> float | None:
        """The time shift of a flow-matching teacher (its schedules are the ``flow`` kind, from sigma = inf);
        None for any other teacher."""
        shift = getattr(self.model, "flow_shift", None)
        return None if shift is None else float(shift)

    def spec_options(self) -> dict[str, Any]:
        """What :func:`pipeline.trajectories.spec.trajectory_specs` needs beyond hash, classes and shape:
        the abar table (schedule range and the discrete kind), a flow teacher's time shift and the prompt-set hash."""
        return {"alphas_cumprod": self.alphas_cumprod, "prompt_set": self.prompt_set_hash, "flow_shift": self.flow_shift}

    def sampling_denoiser(self, spec: SamplerSpec | None = None) -> Denoiser:
        """D(x, sigma, labels) for sampling with ``spec`` (default: its own sampler): the step condition
        bound at the spec's N and guidance applied (pipeline.diffusion.sampling.make_denoiser)."""
        return make_denoiser(self.model, spec if spec is not None else self.sampler_spec())


def sampler_section(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """The one reader of model.json's ``"sampler"``: the section of a distilled student, None for a teacher."""
    return None if config is None else config.get("sampler")


def is_distilled_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a distilled student (reads model.json only; False when there is none)."""
    config_path = Path(path) / "model.json"
    return config_path.is_file() and sampler_section(json.loads(config_path.read_text())) is not None


def bound_teacher_hash(weights_hash: str, num_steps: int | None) -> str:
    """Teacher hash including a bound step condition (distilled SFD-v teachers); plain hash otherwise."""
    if num_steps is None:
        return weights_hash
    return hash_description({"weights_hash": weights_hash, "num_steps": int(num_steps)})


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


def load_teacher(path_or_source: str | os.PathLike, device: str | torch.device = "cpu", **options: Any) -> Teacher:
    """A teacher from a checkpoint directory or a built-in source name (see the module docstring)."""
    if isinstance(path_or_source, str) and path_or_source in TEACHER_SOURCES:
        if path_or_source == "gmm":
            check_keys("teacher (gmm)", options, GMM_OPTIONS)
            if "sample_shape" in options:
                options["sample_shape"] = tuple(options["sample_shape"])
            return gmm_teacher(**options)
        path = options.pop("path", None)
        if path is None:
            raise ParamError("teacher.path: the 'checkpoint' teacher source needs the checkpoint directory path")
        return load_teacher(Path(path), device, **options)
    if not isinstance(path_or_source, (str, os.PathLike)):
        raise ParamError(
            f"teacher: expected a checkpoint directory or one of {', '.join(map(repr, TEACHER_SOURCES))}, "
            f"got {path_or_source!r}"
        )
    family = family_for_source(path_or_source)
    if family is not None:  # an EDM pickle, a diffusers folder (pipeline.teachers.families)
        return _source_teacher(family, Path(path_or_source), device, **options)
    return _checkpoint_teacher(Path(path_or_source), device, **options)


def load_student(path: str | os.PathLike, device: str | torch.device = "cpu", **overrides: Any) -> Teacher:
    """A distilled checkpoint with its own sampler (``overrides`` as in resolve_sampler); refuses a teacher."""
    path = Path(path)
    if path.is_dir() and (path / "model.json").is_file() and not is_distilled_checkpoint(path):
        raise CheckpointError(f"{path}/model.json has no sampler section: it is a teacher, not a distilled student")
    return load_teacher(path, device, **overrides)


def check_checkpoint_dir(path: Path) -> None:
    """A clear error naming the missing directory or file and what goes there."""
    if not path.is_dir():
        raise CheckpointError(
            f"teacher checkpoint {path} does not exist (expected a directory with model.safetensors and model.json; "
            f"{WHERE_CHECKPOINTS_COME_FROM}; built-in teacher sources: 'gmm')"
        )
    for name, what in CHECKPOINT_FILES:
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name} is missing ({what}); {WHERE_CHECKPOINTS_COME_FROM}")


def build_denoiser(config: dict[str, Any], tensors: dict[str, torch.Tensor], where: str = "checkpoint") -> nn.Module:
    """The network of a model.json ``config`` with ``tensors`` loaded (not yet moved or put in eval mode),
    built by the family that owns the config (pipeline.teachers.families)."""
    return family_for_config(config, where).build(config, tensors, where)


def load_network(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(the network in eval mode, checkpoint config) from a checkpoint directory: the network part of
    :func:`load_teacher` (which the pipeline uses; this is for code that wants the bare module and JSON).
    Our U-Net: EDMPrecond(UNet); an EDM network: its preconditioner (see :func:`build_denoiser`)."""
    path = Path(path)
    check_checkpoint_dir(path)
    tensors, config = load_checkpoint(path, device=device)
    if "lora" in config:  # a LoRA student: the base network with its adapters merged (pipeline.networks.lora)
        from pipeline.networks.lora import load_lora_student, resolve_base

        base = resolve_base(str(config["lora"].get("base")), path)
        base_model, _ = load_network(base, device)
        return load_lora_student(path, config, tensors, base_model, network_weights_hash(base_model)).to(device), config
    family = family_for_config(config, f"{path}/model.safetensors")
    return family.load_checkpoint(path, config, tensors, device), config


def _source_teacher(family: ModelFamily, path: Path, device: str | torch.device, *, prompts: Any = None,
                    **options: Any) -> Teacher:
    """A foreign file or folder (an EDM pickle, a diffusers folder) read by its family; ``prompts``: a prompt file
    or list (text-to-image)."""
    from pipeline.teachers.prompts import read_prompts

    check_keys(f"teacher ({path})", options, SAMPLER_OPTIONS)
    if any(v is not None for v in options.values()):
        raise ParamError(f"{path} is {family.source_what} (no sampler section); the options "
                         f"{', '.join(sorted(options))} set a distilled student's sampler")
    if isinstance(prompts, (str, os.PathLike)):
        prompts = read_prompts(prompts)
    model, config = family.load_source(path, device, **({} if prompts is None else {"prompts": prompts}))
    return _teacher_from(model, config, path, sampler=None, source=family.source_name)


def _teacher_from(model: nn.Module, config: dict[str, Any], path: Path, *, sampler: SamplerSpec | None,
                  source: str) -> Teacher:
    num_steps = None if sampler is None else sampler.bound_num_steps
    if num_steps is not None and not model.step_condition:
        raise CheckpointError(f"{path}/model.json: the sampler has a step_condition but the network is not step-conditioned")
    network_hash = network_weights_hash(model)
    data = config.get("data", {})
    content_hash = teacher_content_hash(model, network_hash)
    facts = family_for_config(config, f"{path}/model.json").facts(model, config)
    data = {**data, **facts.data_overrides}
    return Teacher(
        denoiser=bind_num_steps(model, num_steps),
        sample_shape=tuple(data.get("sample_shape", facts.sample_shape)),
        num_classes=int(data.get("num_classes", facts.num_classes)),
        weights_hash=bound_teacher_hash(content_hash, num_steps),
        description={"source": source, "path": str(path), **facts.architecture,
                     "distilled": sampler is not None, "num_steps": num_steps,
                     "provenance": config.get("provenance", {})},
        model=model,
        config=config,
        sampler=sampler,
        network_hash=network_hash,
        path=path,
    )


def _checkpoint_teacher(path: Path, device: str | torch.device, **options: Any) -> Teacher:
    check_keys(f"teacher ({path})", options, SAMPLER_OPTIONS)
    model, config = load_network(path, device)
    section = sampler_section(config)
    if section is None and any(v is not None for v in options.values()):
        raise ParamError(
            f"{path} is a teacher checkpoint (model.json has no sampler section); the options "
            f"{', '.join(sorted(options))} set a distilled student's sampler"
        )
    sampler = None if section is None else resolve_sampler(section, **options)
    return _teacher_from(model, config, path, sampler=sampler, source="checkpoint")
