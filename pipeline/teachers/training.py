"""Train the default teacher: EDM's denoising loss, Adam, EMA, resumable, deterministic from ``seed``.

Loss (EDM, Karras et al. 2022, eq. 2 and Table 1 "training"):
    ln sigma ~ N(P_mean, P_std^2),  lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2,
    L = E_{y, n ~ N(0, sigma^2 I)} [ lambda(sigma) ||D(y + n, sigma, label) - y||^2 ]   (mean over pixels).
EMA with a half-life in images: beta = 0.5^(batch / (ema_halflife_kimg * 1000)).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipeline.core.checkpoints import has_checkpoint, load_checkpoint, optimizer_from_tensors, optimizer_to_tensors, save_checkpoint
from pipeline.core.cost import CostMeter
from pipeline.diffusion.denoisers import EDMPrecond
from pipeline.core.hashing import hash_description, hash_state_dict
from pipeline.networks.unet import build_network, drop_labels, network_config
from pipeline.core.param_checks import ParamError, check_int, check_keys, check_positive

STATE_NAME = "training_state"


@dataclass(frozen=True)
class TeacherParams:
    network: dict[str, Any] = field(
        default_factory=lambda: {"model_channels": 32, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4]}
    )  # architecture; resolution, channels and label_dim come from the data
    conditional: bool = True  # class-conditional when the data has labels
    label_dropout: float = 0.1  # probability of the null class in training (classifier-free guidance)
    sigma_data: float = 0.5
    P_mean: float = -1.2
    P_std: float = 1.2
    batch_size: int = 128
    steps: int = 2500  # optimizer steps
    lr: float = 2e-3
    lr_rampup_steps: int = 100
    ema_halflife_kimg: float = 20.0
    checkpoint_every: int = 500  # steps between resumable training states
    pretrained: str | None = None  # a local teacher checkpoint directory used instead of training
    seed: int = 0
    device: str = "auto"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TeacherParams":
        check_keys("teacher", d, [f for f in cls.__dataclass_fields__])
        p = cls(**d)
        if not isinstance(p.network, dict):
            raise ParamError(f"teacher.network: expected a mapping of architecture keys, got {p.network!r}")
        for key in ("img_resolution", "in_channels", "label_dim"):
            if key in p.network:
                raise ParamError(f"teacher.network.{key}: comes from the data; remove it from params")
        network_config(**p.network)
        if not isinstance(p.conditional, bool):
            raise ParamError(f"teacher.conditional: expected true or false, got {p.conditional!r}")
        if not 0 <= p.label_dropout < 1:
            raise ParamError(f"teacher.label_dropout: must lie in [0, 1), got {p.label_dropout}")
        for key in ("sigma_data", "P_std", "lr", "ema_halflife_kimg"):
            check_positive(f"teacher.{key}", getattr(p, key))
        if isinstance(p.P_mean, bool) or not isinstance(p.P_mean, (int, float)):
            raise ParamError(f"teacher.P_mean: expected a number, got {p.P_mean!r}")
        check_int("teacher.batch_size", p.batch_size, minimum=1)
        check_int("teacher.steps", p.steps, minimum=1)
        check_int("teacher.lr_rampup_steps", p.lr_rampup_steps, minimum=0)
        check_int("teacher.checkpoint_every", p.checkpoint_every, minimum=1)
        check_int("teacher.seed", p.seed, minimum=0)
        if p.pretrained is not None and (not isinstance(p.pretrained, str) or not p.pretrained):
            raise ParamError(f"teacher.pretrained: expected a checkpoint directory path or null, got {p.pretrained!r}")
        return p

    def training_key(self, data_description: dict[str, Any]) -> str:
        """Identity of a run: a saved training state is resumed only under the same key.

        ``steps`` is left out so that a longer run continues a shorter one.
        """
        d = {k: v for k, v in asdict(self).items() if k not in ("checkpoint_every", "device", "steps")}
        return hash_description({"params": d, "data": data_description})


def edm_loss(
    model: EDMPrecond,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    P_mean: float,
    P_std: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """EDM training loss lambda(sigma) ||D(y + n, sigma) - y||^2 with log-normal sigma (module docstring)."""
    b = images.shape[0]
    rnd = torch.randn((b,), generator=generator).to(images.device)
    sigma = (rnd * P_std + P_mean).exp()
    sd = model.sigma_data
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    n = torch.randn(images.shape, generator=generator).to(images.device) * sigma[:, None, None, None]
    d = model(images + n, sigma, labels)
    return (weight[:, None, None, None] * (d - images) ** 2).mean()


def train_teacher(
    params: TeacherParams,
    images: torch.Tensor,  # float32 [N, C, H, W] in [-1, 1]
    labels: torch.Tensor | None,
    num_classes: int,
    out_dir: str | Path,
    *,
    state_dir: str | Path | None = None,  # where resumable training states go; None = no resume
    data_description: dict[str, Any] | None = None,
    cost: CostMeter | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train, write the EMA network to ``out_dir`` (model.safetensors + model.json); returns a summary.

    Deterministic from ``params.seed`` (same steps, same batches, same noise) on one device. When a
    training state with the same training key exists in ``state_dir`` it resumes from it.
    """
    from pipeline.core.devices import resolve_device

    device = resolve_device(params.device)
    conditional = params.conditional and labels is not None and num_classes > 0
    label_dim = num_classes if conditional else 0
    sample_shape = list(images.shape[1:])
    arch = network_config(
        **params.network,
        img_resolution=sample_shape[1] if sample_shape[1] == sample_shape[2] else sample_shape[1:],
        in_channels=sample_shape[0],
        label_dim=label_dim,
    )
    data_description = data_description or {"sample_shape": sample_shape, "num_classes": label_dim, "count": len(images)}
    key = params.training_key(data_description)

    torch.manual_seed(params.seed)
    net = build_network(**arch).to(device)
    model = EDMPrecond(net, sigma_data=params.sigma_data).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(net.parameters(), lr=params.lr, betas=(0.9, 0.999), eps=1e-8)
    generator = torch.Generator().manual_seed(params.seed)
    step, losses = 0, []
    cost = cost or CostMeter("teacher", device)

    if state_dir is not None and has_checkpoint(state_dir, name=STATE_NAME):
        tensors, meta = load_checkpoint(state_dir, name=STATE_NAME)
        if meta.get("training_key") == key and int(meta["step"]) <= params.steps:
            net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
            ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
            optimizer_from_tensors(optimizer, tensors, meta["optimizer"])
            generator.set_state(tensors["rng"])
            torch.set_rng_state(tensors["torch_rng"])  # dropout draws from the global generator
            step, losses = int(meta["step"]), list(meta["losses"])
            cost.restore(meta.get("cost", {}))
            tqdm.write(f"teacher: resuming from {state_dir} at step {step}/{params.steps}")
        else:
            tqdm.write(f"teacher: ignoring the training state in {state_dir} (different params or data, or more steps)")

    def save_state() -> None:
        opt_tensors, opt_meta = optimizer_to_tensors(optimizer)
        tensors = {
            **{f"net.{k}": v for k, v in net.state_dict().items()},
            **{f"ema.{k}": v for k, v in ema.state_dict().items()},
            **opt_tensors,
            "rng": generator.get_state().clone(),
            "torch_rng": torch.get_rng_state().clone(),
        }
        meta = {"training_key": key, "step": step, "losses": losses, "optimizer": opt_meta, "cost": cost.to_dict()}
        save_checkpoint(state_dir, tensors, meta, name=STATE_NAME)

    images_dev = images.to(device)
    labels_dev = labels.to(device) if conditional else None
    beta = 0.5 ** (params.batch_size / (params.ema_halflife_kimg * 1000))
    n = len(images)
    bar = tqdm(total=params.steps, initial=step, desc="teacher", unit="step", disable=not progress, mininterval=2.0)
    while step < params.steps:
        idx = torch.randint(n, (params.batch_size,), generator=generator).to(device)
        y = images_dev[idx]
        lab = None
        if conditional:
            lab = drop_labels(labels_dev[idx], label_dim, params.label_dropout, generator=generator)
        for g in optimizer.param_groups:
            g["lr"] = params.lr * min(1.0, (step + 1) / max(1, params.lr_rampup_steps))
        loss = edm_loss(model, y, lab, P_mean=params.P_mean, P_std=params.P_std, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), net.parameters()):
                p_ema.lerp_(p, 1 - beta)
        cost.add_student_forward(params.batch_size)
        cost.add_student_backward(params.batch_size)
        step += 1
        losses.append(float(loss.detach()))
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / 50:.4f}")
        if state_dir is not None and (step % params.checkpoint_every == 0 or step == params.steps):
            save_state()
    bar.close()

    config = {
        "network": arch,
        "sigma_data": params.sigma_data,
        "data": {"sample_shape": sample_shape, "num_classes": label_dim},
        "sampler": None,
        "provenance": {
            "kind": "teacher",
            "trainer": "pipeline.teachers.training (EDM loss, Adam, EMA)",
            "training": {k: v for k, v in asdict(params).items() if k != "device"},
            "training_key": key,
            "data": data_description,
            "weights_hash": hash_state_dict(ema.state_dict()),
        },
    }
    save_checkpoint(out_dir, ema.state_dict(), config)
    window = max(1, min(100, len(losses) // 4))
    return {
        "steps": step,
        "final_loss": sum(losses[-window:]) / window,
        "first_loss": sum(losses[:window]) / window,
        "wall_seconds": round(cost.wall_seconds, 2),
        "weights_hash": config["provenance"]["weights_hash"],
    }


def import_pretrained_teacher(source: str | Path, out_dir: str | Path, data_description: dict[str, Any]) -> dict[str, Any]:
    """Use a teacher that was trained elsewhere: check it loads and fits the data, copy it to ``out_dir``.

    The checkpoint is this project's format (never a pickle): ``model.safetensors`` with the
    weights of the U-Net in pipeline/networks.py and ``model.json`` with its ``network`` config.
    """
    import shutil

    from pipeline.core.checkpoints import CheckpointError
    from pipeline.teachers.loader import load_network

    source = Path(source)
    for name, what in (("model.safetensors", "the weights"), ("model.json", "the network config")):
        if not (source / name).is_file():
            raise CheckpointError(
                f"teacher.pretrained: {source / name} is missing ({what}). A teacher checkpoint directory holds "
                f"model.safetensors and model.json as written by `dvc repro teacher` (pipeline/networks.py U-Net); "
                f"put both files in {source}/ or set teacher.pretrained: null to train the teacher"
            )
    model, config = load_network(source)
    shape = list(config.get("data", {}).get("sample_shape", []))
    want = list(data_description.get("sample_shape", []))
    if shape and want and shape != want:
        raise CheckpointError(f"teacher.pretrained: {source} was trained on samples of shape {shape}, the data has {want}")
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for name in ("model.safetensors", "model.json"):
        shutil.copyfile(source / name, out_dir / name)
    return {"pretrained": str(source), "weights_hash": hash_state_dict(model.net.state_dict()), "steps": 0}
