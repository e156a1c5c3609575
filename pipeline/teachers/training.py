"""Train the default teacher: EDM's denoising loss, Adam, EMA, resumable, deterministic from ``seed``.

Loss (EDM, Karras et al. 2022, eq. 2 and Table 1 "training"):
    ln sigma ~ N(P_mean, P_std^2),  lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2,
    L = E_{y, n ~ N(0, sigma^2 I)} [ lambda(sigma) ||D(y + n, sigma, label) - y||^2 ]   (mean over pixels).
EMA with a half-life in images: beta = 0.5^(batch / (ema_halflife_kimg * 1000)).

``objective: flow`` trains the same U-Net as a rectified flow (pipeline.networks.flow.PixelFlow): the velocity
loss ||v_theta(x_tau, tau) - (eps - y)||^2 with x_tau = (1 - tau) y + tau eps is the same expectation with
lambda(sigma) = ((1 + sigma) / sigma)^2 = 1 / tau^2 (x = x_tau / (1 - tau) = y + sigma eps), and ln sigma =
logit(tau) ~ N(P_mean, P_std^2) is SD3's logit-normal sampling of tau (its default: P_mean 0, P_std 1).
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.core.checkpoints import save_checkpoint
from pipeline.core.cost import CostMeter
from pipeline.core.distributed import autocast_context, enable_tf32, grad_scaler, rank_device, share, world_size
from pipeline.diffusion.denoisers import EDMPrecond
from pipeline.core.hashing import hash_state_dict
from pipeline.networks.flow import FLOW_PRECOND, PixelFlow
from pipeline.networks.unet import build_network, drop_labels, network_config
from pipeline.config.teacher import TeacherParams
from pipeline.config.validation import described
from pipeline.training.loop import TrainingLoop, optimizer_step
from pipeline.training.optim import adam
from pipeline.training.parallel import enable_activation_checkpointing, micro_batches, prepare
from pipeline.training.state import TrainingState


def edm_loss(
    model: EDMPrecond,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    P_mean: float,
    P_std: float,
    generator: torch.Generator,
    rows: tuple[int, int] | None = None,  # this process's rows of the global batch (torchrun); None: all
    precision: str = "fp32",  # the forward under bf16/fp16 autocast
    forward: Any = None,  # the callable run as the network (DDP, pipeline.training.parallel); None: ``model``
) -> torch.Tensor:
    """EDM training loss lambda(sigma) ||D(y + n, sigma) - y||^2 with log-normal sigma and the model's own lambda
    (``loss_weight``: EDM's, or the velocity loss's for a flow teacher; module docstring).

    The noise is drawn for the whole global batch (the same draws with any number of processes); with
    ``rows`` only those rows go through the network and into the mean."""
    b = images.shape[0]
    rnd = torch.randn((b,), generator=generator).to(images.device)
    sigma = (rnd * P_std + P_mean).exp()
    weight = model.loss_weight(sigma)  # EDM's lambda(sigma), or a flow teacher's 1 / tau^2
    n = torch.randn(images.shape, generator=generator).to(images.device) * sigma[:, None, None, None]
    if rows is not None:
        lo, hi = rows
        images, n, sigma, weight = images[lo:hi], n[lo:hi], sigma[lo:hi], weight[lo:hi]
        labels = None if labels is None else labels[lo:hi]
    net = model if forward is None else forward
    if precision == "fp32":
        d = net(images + n, sigma, labels)
    else:
        with autocast_context(precision, images.device):
            d = net(images + n, sigma, labels).float()
    return (weight[:, None, None, None] * (d - images) ** 2).mean()


FIRST_LOSSES = 32  # per-step losses of the first optimizer steps kept in the summary


def data_description(info: dict[str, Any]) -> dict[str, Any]:
    """The dataset fields (of the data stage's dataset.json) that a teacher's training key and provenance record."""
    return {k: info[k] for k in ("name", "sample_shape", "num_classes", "sizes", "provenance")}


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
    live_dir: str | Path | None = None,  # DVCLive directory for the loss and lr per step; None = no log
) -> dict[str, Any]:
    """Train, write the EMA network to ``out_dir`` (model.safetensors + model.json); returns a summary.

    Deterministic from ``params.seed`` (same steps, same batches, same noise) on one device. When a
    training state with the same training key exists in ``state_dir`` it resumes from it
    (pipeline.training: net, EMA, optimizer, the batch generator and the global RNG for dropout).
    """
    from pipeline.core.devices import resolve_device
    from pipeline.training.live import LiveLog

    device = rank_device(resolve_device(params.device))
    if params.precision != "fp32":
        enable_tf32(device)
    conditional = params.conditional and labels is not None and num_classes > 0
    label_dim = num_classes if conditional else 0
    sample_shape = list(images.shape[1:])
    arch = _teacher_architecture(params, sample_shape, label_dim)
    data_description = data_description or {"sample_shape": sample_shape, "num_classes": label_dim, "count": len(images)}
    key = params.training_key(data_description)

    torch.manual_seed(params.seed)
    net = build_network(**arch).to(device)
    flow = params.objective == "flow"
    model = (PixelFlow(net) if flow else EDMPrecond(net, sigma_data=params.sigma_data)).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    if params.activation_checkpointing:
        enable_activation_checkpointing(model)
    trainable = prepare(model, sharding="ddp", device=device)  # DDP under torchrun; the model itself with one process
    optimizer = adam(net, params.lr)
    generator = torch.Generator().manual_seed(params.seed)
    cost = cost or CostMeter("teacher", device)
    state = None
    if state_dir is not None:
        state = TrainingState(state_dir, key, modules={"net": net, "ema": ema}, optimizers={"optimizer": optimizer},
                              generators={"batches": generator})
    step = _TeacherStep(params, model, trainable, net, ema, optimizer, generator, cost, images.to(device),
                        labels.to(device) if conditional else None, label_dim, device)
    live = LiveLog(live_dir) if live_dir is not None else None
    loop = TrainingLoop(
        "teacher", params.steps, unit="step", optimizers=[optimizer], keys=["loss"], state=state,
        checkpoint_every=params.checkpoint_every, cost=cost, live=live, progress=progress, scaler=step.scaler,
        lr=lambda b: params.lr * min(1.0, (b + 1) / max(1, params.lr_rampup_steps)),
    )  # fmt: skip
    loop.run(step)
    config = _teacher_config(params, arch, sample_shape, label_dim, key, data_description, ema)
    save_checkpoint(out_dir, ema.state_dict(), config)
    return _teacher_summary(loop, cost, config, live)


def _teacher_architecture(params: TeacherParams, sample_shape: list[int], label_dim: int) -> dict[str, Any]:
    """The U-Net config: params' network with the data's resolution, channels and label dimension."""
    return network_config(
        **params.network,
        img_resolution=sample_shape[1] if sample_shape[1] == sample_shape[2] else sample_shape[1:],
        in_channels=sample_shape[0],
        label_dim=label_dim,
    )


class _TeacherStep:
    """One optimizer step of the teacher: a batch drawn from the data (with label dropout), the EDM or flow loss
    (micro-batched when ``batch_gpu`` is set), the EMA update."""

    def __init__(self, params: TeacherParams, model: nn.Module, trainable: Any, net: nn.Module, ema: nn.Module,
                 optimizer: torch.optim.Optimizer, generator: torch.Generator, cost: CostMeter, images: torch.Tensor,
                 labels: torch.Tensor | None, label_dim: int, device: torch.device) -> None:
        self.params, self.model, self.trainable, self.net, self.ema = params, model, trainable, net, ema
        self.optimizer, self.generator, self.cost = optimizer, generator, cost
        self.images, self.labels, self.label_dim = images, labels, label_dim
        self.beta = 0.5 ** (params.batch_size / (params.ema_halflife_kimg * 1000))
        self.rows = share(params.batch_size, "teacher.batch_size") if world_size() > 1 else None  # torchrun: this rank's
        self.lo, self.hi = self.rows if self.rows is not None else (0, params.batch_size)
        self.parts = micro_batches(self.hi - self.lo, params.batch_gpu, "teacher.batch_gpu")
        self.scaler = grad_scaler(params.precision, device)
        self.device = device

    def __call__(self, _: int) -> list[tuple[str, float]]:
        params, generator = self.params, self.generator
        idx = torch.randint(len(self.images), (params.batch_size,), generator=generator).to(self.device)
        y = self.images[idx]
        lab = None
        if self.labels is not None:
            lab = drop_labels(self.labels[idx], self.label_dim, params.label_dropout, generator=generator)
        kwargs = dict(P_mean=params.P_mean, P_std=params.P_std, generator=generator, precision=params.precision,
                      forward=self.trainable.forward)
        if len(self.parts) == 1:
            loss = edm_loss(self.model, y, lab, rows=self.rows, **kwargs)
        else:  # batch_gpu: every micro-batch replays the global batch's noise draws and keeps its rows
            loss = [functools.partial(self._micro, y, lab, kwargs, generator.get_state(), a, b) for a, b in self.parts]
        value = optimizer_step(self.optimizer, loss, scaler=self.scaler, model=self.trainable)
        with torch.no_grad():
            for p_ema, p in zip(self.ema.parameters(), self.net.parameters()):
                p_ema.lerp_(p, 1 - self.beta)
        self.cost.add_student_forward(params.batch_size)
        self.cost.add_student_backward(params.batch_size)
        return [("loss", value)]

    def _micro(self, y: torch.Tensor, lab: Any, kwargs: dict[str, Any], start: torch.Tensor, a: int, b: int) -> torch.Tensor:
        self.generator.set_state(start)
        rows = (self.lo + a, self.lo + b)
        return edm_loss(self.model, y, lab, rows=rows, **kwargs) * ((b - a) / (self.hi - self.lo))


def _teacher_config(params: TeacherParams, arch: dict[str, Any], sample_shape: list[int], label_dim: int, key: str,
                    data_description: dict[str, Any], ema: nn.Module) -> dict[str, Any]:
    """The trained teacher's model.json."""
    flow = params.objective == "flow"
    return {
        "network": arch,
        "sigma_data": params.sigma_data,
        **({"precond": FLOW_PRECOND} if flow else {}),
        "data": {"sample_shape": sample_shape, "num_classes": label_dim},
        "sampler": None,
        "provenance": {
            "kind": "teacher",
            "trainer": f"pipeline.teachers.training ({'rectified-flow velocity' if flow else 'EDM'} loss, Adam, EMA)",
            "training": described(params, leave_out=("device",)),
            "training_key": key,
            "data": data_description,
            "weights_hash": hash_state_dict(ema.state_dict()),
        },
    }


def _teacher_summary(loop: TrainingLoop, cost: CostMeter, config: dict[str, Any], live: Any) -> dict[str, Any]:
    window = max(1, min(100, loop.count["loss"] // 4))
    summary = {
        "steps": loop.batch,
        "final_loss": loop.mean_last("loss", window),
        "first_loss": loop.mean_first("loss", window),
        "wall_seconds": round(cost.wall_seconds, 2),
        "weights_hash": config["provenance"]["weights_hash"],
        "first_losses": loop.first["loss"][:FIRST_LOSSES],  # a retraining's first steps are checked against these
    }
    if live is not None:
        live.log_final({k: v for k, v in summary.items() if k not in ("wall_seconds", "first_losses")})
        live.end()
    return summary


def import_pretrained_teacher(source: str | Path, out_dir: str | Path, data_description: dict[str, Any],
                              prompts: str | Path | None = None) -> dict[str, Any]:
    """Use a teacher that was trained elsewhere: check it loads and fits the data, put it in ``out_dir``.

    ``source`` is one of

    - an NVlabs/edm snapshot pickle (``*.pkl``, e.g. ``edm-cifar10-32x32-uncond-vp.pkl``): read by the
      safe reader (no pickled code runs) and converted into ``out_dir`` as ``sfd teacher import`` does;
    - a folder converted by ``sfd teacher import`` (``"architecture": "edm"`` in model.json): copied;
    - a checkpoint folder of this project's U-Net (``model.safetensors`` + ``model.json`` with its
      ``network`` config): copied, byte for byte.

    - a diffusers folder (``model_index.json``, or ``unet/`` + ``scheduler/``): converted as
      ``sfd teacher import FOLDER --out DIR`` does (pipeline.teachers.diffusers_folder); ``prompts`` (a
      local prompt file) binds a text-to-image teacher's prompt set. A latent teacher's samples are
      latents, so its shape is not compared with the data's images.

    The teacher's sample shape must equal the data's (a clear error names both).
    """
    import shutil

    from pipeline.core.checkpoints import CheckpointError
    from pipeline.teachers.families import family_for_config, family_for_source
    from pipeline.teachers.families.base import check_data_shape
    from pipeline.teachers.loader import load_teacher

    source = Path(source)
    if prompts is not None and not Path(prompts).is_file():
        raise CheckpointError(f"teacher.prompts: {prompts} does not exist (a local file: one prompt per line, or a JSON/CSV of captions)")
    family = family_for_source(source)
    if family is not None:  # an EDM pickle, a diffusers folder: converted by its family
        if prompts is not None and not family.takes_prompts:
            raise CheckpointError(f"teacher.prompts: {source} is not a diffusers text-to-image folder; remove teacher.prompts")
        info = family.import_source(source, Path(out_dir), prompts_file=prompts, data_description=data_description)
        return {"pretrained": str(source), **family.pretrained_summary(info)}
    if prompts is not None:
        raise CheckpointError(f"teacher.prompts: {source} is not a diffusers text-to-image folder; remove teacher.prompts")
    for name, what in (("model.safetensors", "the weights"), ("model.json", "the network config")):
        if not (source / name).is_file():
            raise CheckpointError(
                f"teacher.pretrained: {source / name} is missing ({what}). teacher.pretrained is an EDM snapshot "
                f"pickle (*.pkl, e.g. edm-cifar10-32x32-uncond-vp.pkl), a diffusers folder (model_index.json, "
                f"or unet/ + scheduler/), a folder converted from either by "
                f"`sfd teacher import SRC.pkl --out DIR`, or a teacher checkpoint directory holding "
                f"model.safetensors and model.json as written by `dvc repro teacher` (pipeline/networks/unet.py U-Net); "
                f"put the files in {source}/ or set teacher.pretrained: null to train the teacher"
            )
    teacher = load_teacher(source)
    check_data_shape(source, list(teacher.config.get("data", {}).get("sample_shape", [])), data_description)
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for name in ("model.safetensors", "model.json"):
        shutil.copyfile(source / name, out_dir / name)
    summary = {"pretrained": str(source), "weights_hash": teacher.weights_hash, "network_hash": teacher.network_hash, "steps": 0}
    return {**summary, **family_for_config(teacher.config).summary_entries(teacher.config)}
