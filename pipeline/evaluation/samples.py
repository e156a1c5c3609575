"""``sfd sample``: samples of a checkpoint or built-in teacher written as PNGs, a grid and sampler.json."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pipeline.core.images import save_grid, save_pngs
from pipeline.core.param_checks import ParamError
from pipeline.diffusion.sampling import SamplerSpec, generate, resolve_labels
from pipeline.diffusion.seeds import parse_seeds
from pipeline.teachers.loader import Teacher, load_teacher


def sample_from_checkpoint(
    ckpt: str | Path,
    seeds: str | Sequence[int],
    *,
    labels: str | int | Sequence[int] | None = None,
    batch_size: int = 500,
    device: str | torch.device = "cpu",
    progress: bool = False,
    **overrides: Any,  # solver, max_order, num_steps, schedule, afs, guidance (None = from the checkpoint)
) -> tuple[torch.Tensor, torch.Tensor | None, SamplerSpec]:
    """(images, labels, sampler) for the seeds, using the checkpoint's sampler section unless overridden."""
    teacher = load_teacher(Path(ckpt), device)
    return sample_teacher(teacher, seeds, labels=labels, batch_size=batch_size, device=device, progress=progress,
                          **overrides)


def sample_teacher(
    teacher: Teacher,
    seeds: str | Sequence[int],
    *,
    labels: str | int | Sequence[int] | None = None,
    batch_size: int = 500,
    device: str | torch.device = "cpu",
    progress: bool = False,
    decode: bool = True,  # latent models: decode with the VAE (False: return the latents)
    **overrides: Any,  # solver, max_order, num_steps, schedule, afs, guidance (None = its own sampler)
) -> tuple[torch.Tensor, torch.Tensor | None, SamplerSpec]:
    """(images, labels, sampler) of a loaded teacher or student: its own sampler (a teacher: the default)
    unless overridden. For a text-to-image model labels are prompt indices (``guidance`` w: the same
    network on both branches, the empty prompt being the unconditional one)."""
    spec = teacher.sampler_spec(**overrides)
    seed_list = parse_seeds(seeds) if isinstance(seeds, (str, int)) else list(seeds)
    lab = resolve_labels(labels, seed_list, teacher.num_classes)
    images = generate(teacher.sampling_denoiser(spec), seed_list, teacher.sample_shape, spec, labels=lab,
                      batch_size=batch_size, device=device, progress=progress)
    if decode and teacher.latent:  # a latent (diffusers text-to-image) model: the VAE decodes to images
        images = teacher.decode(images)
    return images, lab, spec


def sample_command(
    *,
    ckpt: str | Path | None,
    teacher: str | None,
    seeds: str,
    out: str | Path,
    labels: str | None = None,
    batch_size: int = 500,
    device: str = "auto",
    **overrides: Any,
) -> dict[str, Any]:
    """``sfd sample``: write one PNG per seed, ``grid.png`` and ``sampler.json`` into ``out``."""
    from pipeline.core.devices import resolve_device
    from pipeline.teachers.loader import TEACHER_SOURCES

    dev = resolve_device(device)
    seed_list = parse_seeds(seeds)
    if (ckpt is None) == (teacher is None):
        raise ParamError("sample: give exactly one of --ckpt PATH or --teacher gmm")
    if teacher is not None and (teacher == "checkpoint" or teacher not in TEACHER_SOURCES):
        raise ParamError(f"--teacher: got {teacher!r}; built-in teachers: 'gmm' (a checkpoint directory goes in --ckpt)")
    loaded = load_teacher(Path(ckpt) if ckpt is not None else teacher, dev)
    images, lab, spec = sample_teacher(loaded, seed_list, labels=labels, batch_size=batch_size, device=dev,
                                       progress=True, **overrides)
    source = str(ckpt) if ckpt is not None else teacher
    out = Path(out)
    save_pngs(images, seed_list, out)
    save_grid(out / "grid.png", images[:256])
    info = {"source": source, "sampler": spec.to_dict(), "seeds": seeds,
            "labels": None if lab is None else lab.tolist(), "count": len(seed_list)}
    (out / "sampler.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
