"""Baselines distilled on the same teacher as SFD (shared/docs/baselines.md).

- :mod:`pipeline.distill.baselines.progressive`: progressive distillation (Salimans & Ho 2022) in EDM variables;
- :mod:`pipeline.distill.baselines.sfddm`: SFDDM, one fold, with its training-free control row;
- :mod:`pipeline.distill.baselines.vanilla`: vanilla trajectory distillation (SFD paper, Algorithm 1).

This module holds what they share: the training data, the student checkpoints (the common JSON
convention with a ``"sampler"`` section, so pipeline.diffusion.sampling and the evaluation stage read
them) and the training key of their resumable states. The optimiser helpers and the training loop
are pipeline.training's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config.validation import described
from pipeline.core.cost import CostMeter
from pipeline.core.distributed import all_reduce_sum, autocast_context, grad_scaler, share, world_size
from pipeline.diffusion.denoisers import EDMPrecond
from pipeline.core.hashing import hash_description, hash_state_dict
from pipeline.core.param_checks import ParamError
from pipeline.teachers.loader import load_teacher
from pipeline.training.live import LiveLog
from pipeline.training.loop import TrainingLoop, optimizer_step
from pipeline.training.optim import adam
from pipeline.training.parallel import enable_activation_checkpointing, micro_batches, prepare
from pipeline.training.state import TrainingState


@dataclass
class TrainingData:
    """Clean training images y (float32 [N, C, H, W]) and their labels (None when unconditional)."""

    images: torch.Tensor
    labels: torch.Tensor | None

    def __post_init__(self) -> None:
        if self.images.ndim < 2 or len(self.images) == 0:
            raise ParamError(f"training data: expected [N, *sample_shape] images with N > 0, got {tuple(self.images.shape)}")
        if self.labels is not None and self.labels.shape != (len(self.images),):
            raise ParamError(f"training data: {len(self.images)} images but labels of shape {tuple(self.labels.shape)}")

    def draw(
        self, batch_size: int, generator: torch.Generator, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A uniformly drawn batch (with replacement): (y [B, ...], labels [B] or None) on ``device``."""
        idx = torch.randint(len(self.images), (batch_size,), generator=generator)
        labels = None if self.labels is None else self.labels[idx].to(device)
        return self.images[idx].to(device), labels


def load_training_data(data_dir: str | Path, *, conditional: bool) -> TrainingData:
    """The ``train`` split written by the data stage; labels kept only for a conditional teacher."""
    from pipeline.data.datasets import load_split

    images, labels = load_split(data_dir, "train")
    return TrainingData(images.float(), labels if conditional else None)


def baseline_training_key(kind: str, params: Any, data: TrainingData, teacher: Any, student: nn.Module,
                          generator: torch.Generator, **identity: Any) -> str:
    """What a baseline's saved training state must match to be resumed: its params (less ``device``), the
    training data, the teacher's and the student's initial weights, the data generator's state at the start."""
    def weights(m: Any) -> str:
        return hash_state_dict(m.state_dict()) if isinstance(m, nn.Module) else f"{type(m).__module__}.{type(m).__qualname__}"

    labels = {} if data.labels is None else {"labels": data.labels}
    return hash_description({
        "kind": kind,
        "params": described(params, leave_out=("device", "batch_gpu", "activation_checkpointing")),
        "data": hash_state_dict({"images": data.images, **labels}),
        "teacher": weights(teacher),
        "student_init": weights(student),
        "generator": hash_state_dict({"state": generator.get_state()}),
        **identity,
    })


def checkpoint_every(updates: int) -> int:
    """Updates between a baseline's training states: ten per training run (or round, or student)."""
    return max(1, updates // 10)


BaselineLoss = Callable[[Any, torch.Tensor, "torch.Tensor | None", "tuple[int, int] | None"], tuple[torch.Tensor, int]]
# (net, y, labels, rows) -> (loss, teacher images): draws its randomness for the whole global batch y, then computes
# only ``rows`` (this process's share under torchrun, or a micro-batch of it; None: every row) through ``net``, the
# student as the loop runs it (DDP under torchrun: pipeline.training.parallel)


def fit_student(
    label: str,  # progress-bar label, e.g. "pd N=4"
    kind: str,  # the method, part of the training key
    student: EDMPrecond,  # trained in place
    teacher: Any,
    data: TrainingData,
    params: Any,  # the method's params section (batch_size, lr; hashed into the training key)
    loss_fn: BaselineLoss,  # (y, labels) -> (loss, teacher images it cost); draws its noise from `generator`
    *,
    updates: int,
    lr: Callable[[int], float],  # lr of update u
    generator: torch.Generator,  # data draws and the loss's noise, saved with the state
    device: torch.device | str = "cpu",
    cost: CostMeter | None = None,
    clip: float | None = None,  # max gradient norm
    state_dir: str | Path | None = None,  # resumable training state; None = no resume
    live: LiveLog | None = None,
    live_prefix: str = "",
    progress: bool = True,
    leave: bool = True,
    **identity: Any,  # more of the training key (e.g. student_steps)
) -> dict[str, Any]:
    """The baselines' training: per update, a batch of clean data, the method's loss, one Adam step.

    Under torchrun every rank draws the same global batch and noise and computes its rows
    (pipeline.core.distributed.share); DDP averages the gradients (pipeline.training.parallel). ``params.precision`` bf16/fp16
    runs the loss (teacher and student forwards) under autocast, fp16 with a gradient scaler.

    Returns {updates, loss_first, loss_last, teacher_images}."""
    precision = getattr(params, "precision", "fp32")
    scaler = grad_scaler(precision, device)
    rows = share(params.batch_size, f"{kind}.batch_size") if world_size() > 1 else None
    lo, hi = rows if rows is not None else (0, params.batch_size)
    parts = micro_batches(hi - lo, getattr(params, "batch_gpu", None), f"{kind}.batch_gpu")
    student.train()
    if getattr(params, "activation_checkpointing", False):
        enable_activation_checkpointing(student)
    trainable = prepare(student, sharding="ddp", device=device)  # DDP under torchrun; the student itself with one process
    optimizer = adam(student, params.lr)
    state = None
    if state_dir is not None:
        key = baseline_training_key(kind, params, data, teacher, student, generator, **identity)
        state = TrainingState(state_dir, key, modules={"student": student}, optimizers={"optimizer": optimizer},
                              generators={"data": generator})

    step = _BaselineStep(params, data, generator, device, loss_fn, trainable, optimizer, student, clip, scaler, cost,
                         rows, parts, precision)
    loop = TrainingLoop(
        label, updates, unit="upd", optimizers=[optimizer], lr=lr, state=state,
        checkpoint_every=checkpoint_every(updates), counters={"teacher_images": 0}, keys=["loss"], cost=cost,
        live=live, live_prefix=live_prefix, progress=progress, leave=leave, scaler=scaler,
    )  # fmt: skip
    step.loop = loop
    loop.run(step)
    window = max(1, min(10, loop.count["loss"] // 4))
    return {"updates": loop.count["loss"], "loss_first": loop.mean_first("loss", window),
            "loss_last": loop.mean_last("loss", window), "teacher_images": loop.counters["teacher_images"]}


class _BaselineStep:
    """One update of :func:`fit_student`: a batch of clean data, the method's loss (micro-batched when ``batch_gpu``
    is set: every micro-batch replays the global batch's draws, the same noise, and computes its rows), one step."""

    def __init__(self, params: Any, data: TrainingData, generator: torch.Generator, device: torch.device | str,
                 loss_fn: BaselineLoss, trainable: Any, optimizer: torch.optim.Optimizer, student: nn.Module,
                 clip: float | None, scaler: Any, cost: CostMeter | None, rows: tuple[int, int] | None,
                 parts: list[tuple[int, int]], precision: str) -> None:
        self.params, self.data, self.generator, self.device, self.loss_fn = params, data, generator, device, loss_fn
        self.trainable, self.optimizer, self.student, self.clip, self.scaler = trainable, optimizer, student, clip, scaler
        self.cost, self.rows, self.parts, self.precision = cost, rows, parts, precision
        self.lo = rows[0] if rows is not None else 0
        self.hi = rows[1] if rows is not None else params.batch_size
        self.loop: TrainingLoop | None = None
        self.teacher_images = 0

    def __call__(self, u: int) -> list[tuple[str, float]]:
        y, labels = self.data.draw(self.params.batch_size, self.generator, self.device)
        self.teacher_images = 0
        if len(self.parts) == 1:
            with autocast_context(self.precision, self.device):
                loss, self.teacher_images = self.loss_fn(self.trainable.forward, y, labels, self.rows)
            loss = loss.float()
        else:
            start = self.generator.get_state()
            loss = [functools.partial(self._micro, start, y, labels, a, b) for a, b in self.parts]
        clip = None if self.clip is None else (self.student.parameters(), self.clip)
        value = optimizer_step(self.optimizer, loss, what=f"the loss of update {u}", clip=clip, scaler=self.scaler,
                               model=self.trainable)
        teacher_images = self.teacher_images
        if self.rows is not None:
            teacher_images = int(all_reduce_sum(teacher_images))  # the whole global batch's
        self.loop.counters["teacher_images"] += teacher_images
        if self.cost is not None:
            self.cost.add_teacher_forward(teacher_images)
            self.cost.add_student_forward(self.params.batch_size)
            self.cost.add_student_backward(self.params.batch_size)
        return [("loss", value)]

    def _micro(self, start: torch.Tensor, y: torch.Tensor, labels: Any, a: int, b: int) -> torch.Tensor:
        self.generator.set_state(start)
        with autocast_context(self.precision, self.device):
            part, images = self.loss_fn(self.trainable.forward, y, labels, (self.lo + a, self.lo + b))
        self.teacher_images += images
        return part.float() * ((b - a) / (self.hi - self.lo))


def load_baseline_inputs(
    teacher_dir: str | Path, data_dir: str | Path, device: torch.device | str
) -> tuple[EDMPrecond, dict[str, Any], TrainingData, dict[str, Any]]:
    """(teacher model, its checkpoint config, training data, provenance) for a baseline stage."""
    teacher = load_teacher(Path(teacher_dir), device)
    conditional = teacher.num_classes > 0
    data = load_training_data(data_dir, conditional=conditional)
    provenance = {
        "teacher": str(teacher_dir),
        "teacher_weights_hash": teacher.network_hash,
        "data": str(data_dir),
        "conditional": conditional,
    }
    return teacher.model, teacher.config, data, provenance
