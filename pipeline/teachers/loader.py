"""Teacher sources behind one interface: a denoiser plus what the pipeline needs to know about it.

Sources:
- ``gmm``: the exact Gaussian-mixture denoiser (fast end-to-end tests, solver oracles);
- ``checkpoint``: a network trained by this project (safetensors + JSON config).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from pipeline.core.checkpoints import CheckpointError, load_checkpoint
from pipeline.diffusion.denoisers import EDMPrecond
from pipeline.diffusion.gmm import GaussianMixture
from pipeline.networks.unet import build_network
from pipeline.core.hashing import hash_description, hash_state_dict
from pipeline.core.param_checks import ParamError

TeacherSource = Literal["gmm", "checkpoint"]
TEACHER_SOURCES = ("gmm", "checkpoint")


@dataclass
class Teacher:
    denoiser: Callable[..., torch.Tensor]  # D(x, sigma, labels=None) -> x0
    sample_shape: tuple[int, ...]  # shape of one sample, e.g. (1, 8, 8)
    num_classes: int  # 0 when unconditional
    weights_hash: str  # content hash of everything that determines D
    description: dict[str, Any] = field(default_factory=dict)  # readable provenance


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


def load_teacher(source: str, *, device: str | torch.device = "cpu", **options: Any) -> Teacher:
    """Build a teacher from its source name and options (see module docstring)."""
    if source == "gmm":
        return gmm_teacher(**options)
    if source == "checkpoint":
        return load_network_teacher(options.get("path"), device=device)
    raise ParamError(f"teacher.source: got {source!r}; allowed values: {', '.join(map(repr, TEACHER_SOURCES))}")


def load_network(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(EDMPrecond(UNet) in eval mode, checkpoint config) from a checkpoint directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"network checkpoint {path} does not exist (expected a directory with model.safetensors and "
            f"model.json; train one with `dvc repro teacher`)"
        )
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


def load_network_teacher(path: str | Path | None, device: str | torch.device = "cpu"):
    """A :class:`pipeline.teachers.loader.Teacher` from a checkpoint trained by this project."""
    if path is None:
        raise ParamError("teacher.path: the 'checkpoint' teacher source needs the checkpoint directory path")
    model, config = load_network(path, device)
    data = config.get("data", {})
    return Teacher(
        denoiser=model,
        sample_shape=tuple(data.get("sample_shape", [model.net.in_channels, *model.net.img_resolution])),
        num_classes=int(data.get("num_classes", model.net.label_dim)),
        weights_hash=hash_state_dict(model.net.state_dict()),
        description={"source": "checkpoint", "path": str(path), "network": config["network"],
                     "provenance": config.get("provenance", {})},
    )
