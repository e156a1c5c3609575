"""One training-loop skeleton for the teacher, SFD (stage 1, SFD-v, stage 2) and the baselines.

The unit is a *batch*: ``step_fn(batch_index)`` draws its data, takes one or several optimizer
steps (SFD: one per student step) through :func:`optimizer_step`, and returns the loss of each
step taken as ``[(key, value), ...]``. Around it the loop does, per batch:

    lr <- lr(batch) on every optimizer;  losses <- step_fn(batch);  batch += 1;
    loss statistics (first and last values per key); a log row every ``log_every`` batches (the
    mean of each key over the window, the lr, kimg) to the progress bar and DVCLive; the training
    state every ``checkpoint_every`` batches and at the end.

Before the loop it resumes from the newest verified saved state with the same training key (models,
optimizers, RNG states, counters, statistics, log rows, cost; pipeline.training.state), so an
interrupted run ends bit-identical to an uninterrupted one. A NaN/inf loss stops the run before its
optimizer step (:class:`NonFiniteLossError`, naming the batch and the last verified state).

Several processes (torchrun, pipeline.core.distributed): every rank runs this loop over the same
batches; ``step_fn`` computes the rank's share of each global batch (pipeline.core.distributed.share)
through the DDP / FSDP2 model of pipeline.training.parallel, which averages the gradients during the
backward pass; :func:`optimizer_step` averages the loss value, so every rank takes the same step and
holds the same weights (or shards), equal to one process's to float tolerance. Only rank 0 writes the
training state, the ``on_save`` checkpoint, the DVCLive log and the progress bar (under FSDP2 every rank
takes part in gathering the whole tensors first); every rank resumes from the same saved state. With
one process none of this runs.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from pipeline.core.distributed import is_distributed, is_main, mean_over_ranks
from pipeline.core.param_checks import PipelineError
from pipeline.training.optim import set_lr
from pipeline.training.state import TrainingState

if TYPE_CHECKING:
    from pipeline.core.cost import CostMeter
    from pipeline.training.parallel import Trainable
    from pipeline.training.live import LiveLog

StepLosses = Sequence[tuple[str, float]]


class NonFiniteLossError(PipelineError, FloatingPointError):
    """A loss was NaN or inf; the run stopped before the optimizer step."""


MicroLoss = Callable[[], torch.Tensor]  # one micro-batch's forward: its loss, weighted by its share of the process's rows


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor | Sequence[MicroLoss],  # the loss, or one thunk per micro-batch (pipeline.training.parallel)
    *,
    what: str = "the loss",
    clip: tuple[Any, float] | None = None,  # (parameters, max gradient norm)
    scaler: "torch.amp.GradScaler | None" = None,  # fp16 training (pipeline.core.distributed.grad_scaler)
    nan_to_num: bool = False,  # sfd-main's recipe: never stop, sanitise the gradients instead (below)
    model: "Trainable | None" = None,  # the DDP / FSDP2 model: only the last micro-batch synchronises
) -> float:
    """Check the loss is finite, then zero_grad, backward, (clip,) step; returns the loss value.

    ``loss`` is one tensor, or a sequence of micro-batch thunks (``batch_gpu``): each runs its forward and
    backward in turn (its graph freed before the next), the gradients accumulate, and under DDP / FSDP2 only
    the last micro-batch synchronises them (``model.sync``); the value is the sum of the weighted micro-batch
    losses, i.e. the process's mean. Under torchrun the gradients are averaged by DDP / FSDP2 during the backward
    pass and the loss value is averaged over the ranks (one all-reduce of a scalar), so every rank stops or
    steps together; the finiteness check then follows the backward pass.
    With a GradScaler (fp16) the loss is scaled before the backward pass and the gradients unscaled
    before clipping; a step whose gradients overflow is skipped by the scaler.
    With ``nan_to_num`` (sfd-main's fp16 recipe, precision ``fp16_authors``) a non-finite loss does not
    stop anything: after the backward pass every gradient goes through
    ``torch.nan_to_num(nan=0, posinf=1e5, neginf=-1e5)`` and the step is taken; the caller sees the
    non-finite value returned.
    """
    if nan_to_num and scaler is not None:
        raise ValueError("optimizer_step: nan_to_num replaces the gradient scaler; pass one or the other")
    single = isinstance(loss, torch.Tensor)
    if single and scaler is None and not nan_to_num and not is_distributed():  # one process, fp32/bf16: the original path
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLossError(f"{what} is {value}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(clip[0], clip[1])
        optimizer.step()
        return value
    optimizer.zero_grad(set_to_none=True)
    micro = [lambda: loss] if single else list(loss)
    total = None
    for j, thunk in enumerate(micro):
        with (model.sync(j == len(micro) - 1) if model is not None else contextlib.nullcontext()):
            part = thunk()
            (part if scaler is None else scaler.scale(part)).backward()
        total = part.detach().float() if total is None else total + part.detach().float()
    assert total is not None
    value = mean_over_ranks(total)
    if nan_to_num:
        _sanitise_gradients(optimizer)
    elif not math.isfinite(value):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(f"{what} is {value}")
    _step(optimizer, clip, scaler)
    return value


def _sanitise_gradients(optimizer: torch.optim.Optimizer) -> None:
    """sfd-main's fp16 recipe: every gradient through nan_to_num(nan=0, posinf=1e5, neginf=-1e5)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                torch.nan_to_num(g, nan=0.0, posinf=1e5, neginf=-1e5, out=g)


def _step(optimizer: torch.optim.Optimizer, clip: tuple[Any, float] | None, scaler: Any) -> None:
    """(Unscale and) clip, then step: through the GradScaler when there is one (it skips an overflowing step)."""
    if scaler is not None:
        if clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(clip[0], clip[1])
        scaler.step(optimizer)
        scaler.update()
        return
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip[0], clip[1])
    optimizer.step()


class TrainingLoop:
    """Budget, lr schedule, resume, periodic state, NaN/inf stop, statistics, logging, progress bar."""

    def __init__(
        self,
        name: str,  # progress-bar label and message prefix
        total: int,  # batches in the budget
        *,
        unit: str = "batch",
        optimizers: Sequence[torch.optim.Optimizer] = (),
        lr: Callable[[int], float] | None = None,  # lr of batch b (0-based), set on every optimizer before it
        state: TrainingState | None = None,  # None: no resume, no periodic state
        checkpoint_every: int | None = None,  # batches between states (None: only at the end)
        on_save: Callable[["TrainingLoop"], None] | None = None,  # after each state save (SFD: a usable checkpoint)
        accept: Callable[[dict[str, Any]], bool] | None = None,  # may a saved state's counters be resumed?
        counters: Mapping[str, Any] | None = None,  # extra counters saved with the state (rows read, ...)
        keys: Sequence[str] = (),  # loss keys known in advance (a log row names every one, None if not drawn)
        keep: int = 100,  # first and last values kept per key (summaries average windows of at most this)
        log_every: int = 1,
        images_per_batch: int | None = None,  # gives log rows a kimg column (the x axis of the loss plot)
        live: "LiveLog | None" = None,
        live_prefix: str = "",
        cost: "CostMeter | None" = None,  # saved and restored with the state
        scaler: "torch.amp.GradScaler | None" = None,  # fp16: its loss scale is saved and restored with the state
        hint: str = "lower the learning rate",  # advice after a non-finite loss
        progress: bool = True,
        leave: bool = True,
    ) -> None:
        self.name, self.total, self.unit = name, int(total), unit
        self.optimizers, self.lr = list(optimizers), lr
        self.state, self.checkpoint_every, self.on_save, self.accept = state, checkpoint_every, on_save, accept
        self.counters: dict[str, Any] = dict(counters or {})
        self.keys = list(keys)
        self.keep, self.log_every = keep, max(1, int(log_every))
        self.images_per_batch = images_per_batch
        self.scaler = scaler
        self.writer = is_main()  # rank 0 (or the only process) writes states, checkpoints and logs
        self.live = live if self.writer else None
        self.live_prefix, self.cost = live_prefix, cost
        self.hint, self.progress, self.leave = hint, progress and self.writer, leave
        self.batch = 0
        self.first: dict[str, list[float]] = {k: [] for k in self.keys}
        self.recent: dict[str, deque[float]] = {k: deque(maxlen=keep) for k in self.keys}
        self.count: dict[str, int] = {k: 0 for k in self.keys}
        self.window: dict[str, list[float]] = {k: [] for k in self.keys}
        self.log: list[dict[str, Any]] = []
        self.saved_at: int | None = None
        self.resumed = False
        self._last_lr: float | None = None

    # ------------------------------------------------------------------ statistics

    def mean_first(self, key: str, n: int) -> float | None:
        v = self.first.get(key, [])[:n]
        return sum(v) / len(v) if v else None

    def mean_last(self, key: str, n: int) -> float | None:
        v = list(self.recent.get(key, ()))[-n:]
        return sum(v) / len(v) if v else None

    def kimg(self, batch: int | None = None) -> float | None:
        if self.images_per_batch is None:
            return None
        return (self.batch if batch is None else batch) * self.images_per_batch / 1000

    def _where(self, batch: int) -> str:
        k = self.kimg(batch)
        return f"{self.unit} {batch}" + (f", {k:g} kimg" if k is not None else "")

    def _progress(self, batch: int) -> str:
        """``batch 20 of 188 (5.12 of 48.1 kimg)``: where a run stands in its budget, each unit named."""
        k, total = self.kimg(batch), self.kimg(self.total)
        return f"{self.unit} {batch} of {self.total}" + (f" ({k:g} of {total:g} kimg)" if k is not None else "")

    def _add(self, key: str, value: float) -> None:
        if key not in self.count:
            self.keys.append(key)
            self.first[key], self.recent[key], self.count[key], self.window[key] = [], deque(maxlen=self.keep), 0, []
        if len(self.first[key]) < self.keep:
            self.first[key].append(value)
        self.recent[key].append(value)
        self.count[key] += 1
        self.window[key].append(value)

    # ------------------------------------------------------------------ state

    def _metadata(self) -> dict[str, Any]:
        return {
            "first": self.first, "recent": {k: list(v) for k, v in self.recent.items()}, "count": self.count,
            "window": self.window, "log": self.log, "cost": self.cost.to_dict() if self.cost is not None else None,
            **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
        }  # fmt: skip

    def resume(self) -> bool:
        """Load a matching saved state (see module docstring); False when there is none to resume."""
        if self.state is None or self.resumed:
            return self.resumed
        restored = self.state.load(accept=lambda c: int(c.get("batch", 0)) <= self.total and (self.accept is None or self.accept(c)))
        if restored is None:
            if self.state.exists():
                tqdm.write(f"{self.name}: ignoring the training state in {self.state.directory} "
                           "(different params, data or initialisation, an older format, or more done than this budget)")
            return False
        for damaged in restored.damaged:  # a newer state failed verification: resumed from the previous one
            tqdm.write(f"{self.name}: warning: training state {damaged}; resuming from the previous verified state "
                       f"{restored.path}")  # fmt: skip
        c, m = restored.counters, restored.metadata
        self.batch = int(c.pop("batch"))
        self.counters.update(c)
        for k in m.get("first", {}):
            if k not in self.count:
                self.keys.append(k)
        self.first = {k: list(m.get("first", {}).get(k, [])) for k in self.keys}
        self.recent = {k: deque(m.get("recent", {}).get(k, []), maxlen=self.keep) for k in self.keys}
        self.count = {k: int(m.get("count", {}).get(k, 0)) for k in self.keys}
        self.window = {k: list(m.get("window", {}).get(k, [])) for k in self.keys}
        self.log = list(m.get("log", []))
        if self.cost is not None and m.get("cost"):
            self.cost.restore(m["cost"])
        if self.scaler is not None and m.get("scaler"):
            self.scaler.load_state_dict(m["scaler"])
        self.saved_at, self.resumed = self.batch, True
        if self.batch < self.total:
            tqdm.write(f"{self.name}: resuming from {restored.path} (verified) at {self._progress(self.batch)}")
        return True

    def save(self) -> None:
        if self.state is None:
            return
        self.saved_at = self.batch
        if not self.writer and not self.state.collective:
            return
        self.state.save({"batch": self.batch, **self.counters}, self._metadata())  # rank 0 writes (all gather: FSDP2)
        if self.on_save is not None:
            self.on_save(self)
        if self.writer:
            self._flush_live()

    def _flush_live(self) -> None:
        if self.live is not None:
            self.live.log_table(self.log, x="kimg" if self.images_per_batch else "step", prefix=self.live_prefix,
                                title=f"{self.name} loss")
            self.live.flush()

    # ------------------------------------------------------------------ the loop

    def _row(self) -> dict[str, Any]:
        row: dict[str, Any] = {"step": self.batch}
        if self.images_per_batch is not None:
            row["kimg"] = self.kimg()
        row["lr"] = self._last_lr
        row.update({k: (sum(v) / len(v) if v else None) for k, v in self.window.items()})
        return row

    def run(self, step_fn: Callable[[int], StepLosses], *, stop_after: int | None = None) -> bool:
        """Resume, then train to ``total`` batches; False when stopped at ``stop_after`` batches (tests)."""
        self.resume()  # every rank reads the same state: the replicas (or shards) stay equal
        if self.live is not None:
            for row in self.log:  # a resumed run rewrites the rows logged before the interruption
                self.live.log_row(row, step=row["step"], prefix=self.live_prefix)
        bar = tqdm(total=self.total, initial=self.batch, desc=self.name, unit=self.unit, disable=not self.progress,
                   mininterval=1.0, leave=self.leave)
        try:
            while self.batch < self.total:
                if stop_after is not None and self.batch >= stop_after:
                    return False
                if self.lr is not None:
                    self._last_lr = self.lr(self.batch)
                    for optimizer in self.optimizers:
                        set_lr(optimizer, self._last_lr)
                try:
                    losses = step_fn(self.batch)
                except NonFiniteLossError as e:
                    where = (  # saved_at: a state this run wrote and read back, or resumed from, verified
                        f"the last verified state is in {self.state.directory} ({self._where(self.saved_at)})"
                        if self.state is not None and self.saved_at is not None else "no state was saved yet"
                    )
                    raise NonFiniteLossError(
                        f"{self.name}: stopped at {self._where(self.batch)}: {e}; the optimizer step was not taken "
                        f"and {where}. {self.hint[:1].upper()}{self.hint[1:]}"
                    ) from None
                self.batch += 1
                for key, value in losses:
                    self._add(key, value)
                if self.batch % self.log_every == 0 or self.batch == self.total:
                    row = self._row()
                    self.log.append(row)
                    self.window = {k: [] for k in self.keys}
                    if self.live is not None:
                        self.live.log_row(row, step=self.batch, prefix=self.live_prefix)
                    bar.set_postfix({k.replace("step", "s"): f"{v:.4g}" for k, v in row.items()
                                     if k in self.count and v is not None}, refresh=False)
                bar.update(1)
                if self.state is not None and (
                    self.batch == self.total or (self.checkpoint_every and self.batch % self.checkpoint_every == 0)
                ):
                    self.save()
        finally:
            bar.close()
        self._flush_live()
        return True
