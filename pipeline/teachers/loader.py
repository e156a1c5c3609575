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
  solver oracles); options num_components, sample_shape, std, seed, conditional.

The old form ``load_teacher("checkpoint", path=...)`` still works. A directory literally named
``gmm`` is loaded as a checkpoint when given as a ``Path`` (or ``"./gmm"``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from pipeline.core.checkpoints import CheckpointError, load_checkpoint
from pipeline.core.hashing import hash_description, hash_state_dict
from pipeline.core.param_checks import ParamError, check_keys
from pipeline.diffusion.denoisers import Denoiser, EDMPrecond, bind_num_steps
from pipeline.diffusion.gmm import GaussianMixture
from pipeline.diffusion.sampling import SamplerSpec, make_denoiser, resolve_sampler
from pipeline.networks.unet import build_network

TeacherSource = Literal["gmm", "checkpoint"]
TEACHER_SOURCES = ("gmm", "checkpoint")  # "checkpoint": the old form load_teacher("checkpoint", path=...)
GMM_OPTIONS = ("num_components", "sample_shape", "std", "seed", "conditional")
SAMPLER_OPTIONS = ("solver", "max_order", "num_steps", "schedule", "afs", "guidance")  # resolve_sampler overrides
CHECKPOINT_FILES = (
    ("model.safetensors", "the network weights"),
    ("model.json", "its config: network, sigma_data, data, and for a distilled student its sampler"),
)
WHERE_CHECKPOINTS_COME_FROM = (
    "a checkpoint directory holds model.safetensors and model.json as written by `dvc repro teacher` "
    "(a teacher) or a distillation stage (a distilled student)"
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
        (resolve_sampler's; None values keep the checkpoint's). Without overrides: ``self.sampler`` if any."""
        if self.sampler is not None and all(v is None for v in overrides.values()):
            return self.sampler
        return resolve_sampler(sampler_section(self.config), **overrides)

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


def load_network(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(EDMPrecond(UNet) in eval mode, checkpoint config) from a checkpoint directory: the network part of
    :func:`load_teacher` (which the pipeline uses; this is for code that wants the bare module and JSON)."""
    path = Path(path)
    check_checkpoint_dir(path)
    tensors, config = load_checkpoint(path, device=device)
    if "network" not in config:
        raise CheckpointError(f"{path}/model.json has no 'network' section; it is not a network checkpoint")
    net = build_network(**config["network"])
    missing, unexpected = net.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}/model.safetensors does not match its network config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    model = EDMPrecond(net, sigma_data=float(config.get("sigma_data", 0.5))).to(device).eval().requires_grad_(False)
    return model, config


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
    num_steps = None if sampler is None else sampler.bound_num_steps
    if num_steps is not None and not getattr(model.net, "step_condition", False):
        raise CheckpointError(f"{path}/model.json: the sampler has a step_condition but the network is not step-conditioned")
    network_hash = hash_state_dict(model.net.state_dict())
    data = config.get("data", {})
    return Teacher(
        denoiser=bind_num_steps(model, num_steps),
        sample_shape=tuple(data.get("sample_shape", [model.net.in_channels, *model.net.img_resolution])),
        num_classes=int(data.get("num_classes", model.net.label_dim)),
        weights_hash=bound_teacher_hash(network_hash, num_steps),
        description={"source": "checkpoint", "path": str(path), "network": config["network"],
                     "distilled": sampler is not None, "num_steps": num_steps,
                     "provenance": config.get("provenance", {})},
        model=model,
        config=config,
        sampler=sampler,
        network_hash=network_hash,
        path=path,
    )
