"""SFD distillation (sfd-method.md sections 6-8): cached teacher targets, the student rolled out on the fly.

For each batch of B cached trajectories (x_0 = t_max z, or z for a flow schedule from t_max = inf; teacher
states y_1..y_{N-1}, labels):

    x <- x_0
    for n = 0 .. N-2:
        x_hat = x + (t_{n+1} - t_n) eps_theta(x, t_n),   eps_theta = (x - D_theta(x, t_n)) / t_n
                (AFS at n = 0: eps = x / sqrt(1 + t_0^2), no network call and no optimizer step)
        loss_n = d(x_hat, y_{n+1}); zero_grad; backward; optimizer step    # one step per student step
        x <- stopgrad(x_hat)                                             # global rollout, own state

Adam (lr 5e-5, betas 0.9/0.999, no weight decay, no EMA, no warm-up), lr x 0.1 once half the
budget (in kimg of trajectories) is spent, decided after a batch as sfd-main does (``lr_decay_check``,
DistillParams.lr_at). SFD-v draws one N per batch from the trajectory keys of its section (one key per
N; ``step_draw``: a seeded torch generator, or sfd-main's random.randint sequence after seed 42) and
conditions the network on N. Stage 2 is the same loop with the stage-1 model as teacher (Euler,
M = 2, AFS) and L1 + LPIPS on the last step. ``precision: fp16_authors`` is sfd-main's use_fp16
recipe (float16 body on CUDA, no scaler, nan_to_num gradients, float16 off for good after a batch
whose last loss is NaN); docs/sfd-vs-authors.md lists every difference from sfd-main.

Training runs in pipeline.training's loop and is resumable: model, optimizer, the N-draw generator,
the global torch RNG, the number of batches done and the rows consumed from each key are saved
every ``checkpoint_every_kimg`` (pipeline.training.state), so an interrupted run resumes and ends
exactly where an uninterrupted one would. A non-finite loss stops the run before the optimizer
step, leaving the last checkpoint untouched. The loss per step index (x axis kimg) and the lr go to
a DVCLive directory (pipeline.training.live).

The student may be this project's U-Net (EDMPrecond) or an EDM network (an EDM preconditioner);
only their common interface is used: ``step_condition``, ``checkpoint_module()`` /
``checkpoint_state_dict()`` (pipeline.distill.student).
"""

from __future__ import annotations

import functools
import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from pipeline.core.checkpoints import save_checkpoint
from pipeline.core.cost import CostMeter
from pipeline.core.distributed import (
    autocast_context, enable_tf32, grad_scaler, is_main, maybe_compile, rank_device, share, to_channels_last, world_size,
)  # fmt: skip
from pipeline.diffusion.denoisers import EDMPrecond
from pipeline.core.hashing import hash_description, hash_state_dict
from pipeline.config.distill import DistillParams
from pipeline.config.trajectories import TrajectoryParams
from pipeline.config.validation import described
from pipeline.distill.losses import Loss, make_loss, perceptual_term, resolve_perceptual_weight
from pipeline.core.param_checks import ParamError
from pipeline.diffusion.schedules import Schedule
from pipeline.diffusion.solvers import afs_step, euler_step
from pipeline.trajectories.reader import TrajectoryBatch, TrajectoryDataset
from pipeline.trajectories.spec import trajectory_specs
from pipeline.training.live import LiveLog
from pipeline.training.loop import TrainingLoop, optimizer_step
from pipeline.training.optim import adam
from pipeline.training.parallel import Trainable, enable_activation_checkpointing, micro_batches, prepare, state_view
from pipeline.training.state import TrainingState

RECENT = 50  # batches per step index averaged into the final loss
AUTHORS_STEP_SEED = 42  # sfd-main's RandomIntGenerator: random.seed(42), then random.randint(min N, max N) per batch


@dataclass
class TrajectorySource:
    """The cached targets of one student schedule (one store key)."""

    schedule: Schedule
    dataset: TrajectoryDataset
    key: str
    cache_size: int  # trajectories in one epoch over the cache


@dataclass
class DistillRun:
    """Where a run keeps its resumable state and what its usable checkpoint says."""

    state_dir: Path | None  # None: no periodic checkpoints (tests)
    training_key: str
    checkpoint_config: dict[str, Any]  # model.json of the usable checkpoint written with each state
    cost: CostMeter = field(default_factory=lambda: CostMeter("distill"))
    lora: Any = None  # a LoRA student's adapters (pipeline.networks.lora.LoraAdapters); None: every weight trained
    final_state: dict[str, torch.Tensor] | None = None  # the trained checkpoint tensors (whole, on rank 0), set by distill


def step_losses_keys(schedules: Sequence[Schedule], afs: bool) -> list[str]:
    """Names of the per-step losses: 'step{n}' (target y_n), 'N{N}/step{n}' with several schedules."""
    multi = len(schedules) > 1
    keys = []
    for s in schedules:
        for n in range(1 + int(afs), s.num_steps):
            keys.append(f"N{s.num_steps}/step{n}" if multi else f"step{n}")
    return keys


def _slice(b: TrajectoryBatch, lo: int, hi: int | None) -> TrajectoryBatch:
    return TrajectoryBatch(b.x_T[lo:hi], b.states[lo:hi], None if b.labels is None else b.labels[lo:hi], b.seeds[lo:hi])


def _cat(a: TrajectoryBatch, b: TrajectoryBatch) -> TrajectoryBatch:
    return TrajectoryBatch(
        torch.cat([a.x_T, b.x_T]),
        torch.cat([a.states, b.states]),
        None if a.labels is None else torch.cat([a.labels, b.labels]),
        torch.cat([a.seeds, b.seeds]),
    )


def batch_stream(source: TrajectorySource, batch_size: int, rows_done: int) -> Iterator[TrajectoryBatch]:
    """Endless batches of the key, epoch after epoch, continuing after ``rows_done`` rows.

    The reader's row order depends only on (shuffle seed, epoch), so starting at epoch
    rows_done // cache_size and dropping rows_done % cache_size rows resumes the exact stream.
    """
    ds = source.dataset
    ds.set_epoch(rows_done // source.cache_size)
    skip = rows_done % source.cache_size
    buf: TrajectoryBatch | None = None
    for b in ds:
        if skip:
            k = min(skip, len(b.seeds))
            b, skip = _slice(b, k, None), skip - k
            if not len(b.seeds):
                continue
        buf = b if buf is None else _cat(buf, b)
        while len(buf.seeds) >= batch_size:
            yield _slice(buf, 0, batch_size)
            buf = _slice(buf, batch_size, None)


def sfd_batch(
    model: EDMPrecond,
    optimizer: torch.optim.Optimizer,
    batch: TrajectoryBatch,
    t_steps: torch.Tensor,  # float64 student timestamps t_0 = t_max .. t_{N-1}
    loss_fn: Loss,
    *,
    afs: bool,
    last_step_extra: Loss | None = None,  # added to the last step's loss (stage 2: LPIPS)
    device: torch.device | str = "cpu",
    precision: str = "fp32",  # the student's forward under autocast (bf16/fp16); the rollout stays float32
    scaler: "torch.amp.GradScaler | None" = None,  # fp16: pipeline.core.distributed.grad_scaler
    forward: Any = None,  # the callable run as the network (a torch.compile'd model); None: ``model``
    nan_to_num: bool = False,  # sfd-main's recipe: no stop on a non-finite loss, sanitised gradients (optimizer_step)
    batch_gpu: int | None = None,  # micro-batch rows (gradient accumulation); None: the whole batch at once
    trainable: "Trainable | None" = None,  # the DDP / FSDP2 model (pipeline.training.parallel): syncs the last micro-batch
) -> list[tuple[int, float]]:
    """One batch of the SFD loop (module docstring): [(n + 1, loss_n)] for every optimizer step taken."""
    net = model if forward is None else forward
    t = t_steps.tolist()
    num_steps = len(t)
    x, y = batch.x_T.to(device), batch.states.to(device)
    labels = None if batch.labels is None else batch.labels.to(device)
    if y.shape[1] != num_steps - 1:
        raise ParamError(f"trajectories hold {y.shape[1]} teacher states per seed, the schedule needs {num_steps - 1}")
    net_kwargs = {"num_steps": torch.full((x.shape[0],), num_steps, dtype=torch.int64, device=device)
                  } if getattr(model, "step_condition", False) else {}
    parts = micro_batches(x.shape[0], batch_gpu)

    def student_step(n: int, x: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_hat, loss) of rows [lo, hi) at student step n."""
        xs, lab = x[lo:hi], None if labels is None else labels[lo:hi]
        sigma = torch.full((xs.shape[0],), t[n], dtype=xs.dtype, device=device)
        kw = {k: v[lo:hi] for k, v in net_kwargs.items()}
        with autocast_context(precision, device):  # a null context for fp32
            denoised = net(xs, sigma, lab, **kw)
            denoised = denoised if precision == "fp32" else denoised.float()
        x_hat = euler_step(xs, t[n], t[n + 1], denoised)  # x + (t_{n+1} - t_n) eps; from t_0 = inf its limit
        loss = loss_fn(x_hat, y[lo:hi, n])
        if last_step_extra is not None and n == num_steps - 2:
            loss = loss + last_step_extra(x_hat, y[lo:hi, n])
        return x_hat, loss

    out = []
    for n in range(num_steps - 1):
        if afs and n == 0:
            x = afs_step(x, t[0], t[1])
            continue
        what = f"the loss of student step {n + 1} (N={num_steps})"  # optimizer_step's error names it
        if len(parts) == 1:
            x_hat, loss = student_step(n, x, 0, x.shape[0])
            value = optimizer_step(optimizer, loss, what=what, scaler=scaler, nan_to_num=nan_to_num, model=trainable)
            x = x_hat.detach()
        else:  # batch_gpu: each micro-batch's mean weighted by its rows; its rollout state kept for the next step
            states: list[torch.Tensor] = []
            parts_losses = [functools.partial(_micro_batch_loss, student_step, states, n, x, lo, hi) for lo, hi in parts]
            value = optimizer_step(optimizer, parts_losses, what=what, scaler=scaler, nan_to_num=nan_to_num, model=trainable)
            x = torch.cat(states)
        out.append((n + 1, value))
    return out


def _micro_batch_loss(student_step: Any, states: list[torch.Tensor], n: int, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Rows [lo, hi) of step n: its loss weighted by its share of the batch; its rollout state appended to ``states``."""
    x_hat, loss = student_step(n, x, lo, hi)
    states.append(x_hat.detach())
    return loss * ((hi - lo) / x.shape[0])


def distill(
    model: EDMPrecond,
    sources: Sequence[TrajectorySource],
    params: DistillParams,
    run: DistillRun,
    *,
    loss_fn: Loss,
    last_step_extra: Loss | None = None,
    progress: bool = True,
    stop_after_batches: int | None = None,  # simulate an interruption after this many batches (tests)
    live: LiveLog | None = None,  # DVCLive: loss per step index and lr per log window
    name: str = "distill",
    compile: bool = False,  # run setting: torch.compile the student's forward (GPU only; pipeline.core.distributed)
) -> dict[str, Any]:
    """Train ``model`` in place by the SFD loop; returns the training summary (see module docstring).

    Under torchrun every rank streams the same global batches and trains on its rows
    ``share(batch_size)`` of each; DDP or FSDP2 averages the gradients (pipeline.training.parallel).
    """
    if not sources:
        raise ParamError("distill: no trajectory keys to learn from")
    device = next(model.parameters()).device
    lo, hi = share(params.batch_size, f"{name}.batch_size")
    micro_batches(hi - lo, params.batch_gpu, f"{name}.batch_gpu")  # refuse a batch_gpu that does not divide before any work
    authors_fp16 = params.precision == "fp16_authors"  # sfd-main's use_fp16 recipe (module docstring of this section below)
    scaler = None if authors_fp16 else grad_scaler(params.precision, device)
    if scaler is not None and params.sharding == "fsdp" and world_size() > 1:
        raise ParamError(f"{name}.sharding: fsdp with precision fp16 (a gradient scaler) is not supported; use bf16")
    lora = run.lora
    trainable, forward = _trainable(model, params, lora, device, name, compile=compile, progress=progress)
    optimizer = adam(model, params.lr, trainable.parameters() if lora is not None else None)
    draw = torch.Generator().manual_seed(params.seed)
    torch.manual_seed(params.seed)
    keys = step_losses_keys([s.schedule for s in sources], params.afs)
    multi = len(sources) > 1
    draw_index = _step_drawer(sources, params, draw, name) if multi else (lambda batch: 0)
    state = _training_state(run, trainable, optimizer, model, draw)
    loop = TrainingLoop(
        name, params.total_batches(), optimizers=[optimizer], lr=params.lr_at, state=state,
        checkpoint_every=params.every_batches(params.checkpoint_every_kimg),
        on_save=functools.partial(_save_usable, run, trainable),
        counters={"rows": [0] * len(sources), "optimizer_steps": 0, **({"fp16_off_at_batch": None} if authors_fp16 else {})},
        keys=keys, keep=max(100, RECENT),
        log_every=params.every_batches(params.log_every_kimg), images_per_batch=params.batch_size, live=live,
        cost=run.cost, hint="lower `lr`, or check the trajectories with `sfd store verify`", progress=progress,
        scaler=scaler,
    )  # fmt: skip
    step = _SFDStep(model, optimizer, trainable, forward, sources, params, run, loop, draw_index, loss_fn, last_step_extra,
                    device, scaler, (lo, hi), name)
    try:
        finished = loop.run(step, stop_after=stop_after_batches)
    finally:
        step.close()
    if not finished:
        return {"interrupted_at_batch": loop.batch}
    run.final_state = trainable.checkpoint_state_dict() if lora is None else lora.adapter_state_dict(trainable)
    model.eval().requires_grad_(False)
    return _training_summary(loop, sources, params, keys)


@dataclass
class _SFDStep:
    """One batch of :func:`distill`'s loop: the N drawn, its batch read, :func:`sfd_batch`, the counters."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    trainable: Trainable
    forward: Any
    sources: Sequence[TrajectorySource]
    params: DistillParams
    run: DistillRun
    loop: TrainingLoop
    draw_index: Any  # batch index -> source index
    loss_fn: Loss
    last_step_extra: Loss | None
    device: torch.device
    scaler: Any
    rows: tuple[int, int]  # this rank's rows of every global batch
    name: str
    streams: dict[int, Iterator[TrajectoryBatch]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.authors_fp16 = self.params.precision == "fp16_authors"
        self.edm_fp16 = getattr(self.model, "use_fp16", None)  # an EDM preconditioner: its own float16 body (CUDA only)

    def precision(self) -> str:
        """The forward precision of this batch; fp16_authors sets EDM's use_fp16 flag or uses fp16 autocast on CUDA."""
        if not self.authors_fp16:
            return self.params.precision
        on = self.loop.counters["fp16_off_at_batch"] is None
        if self.edm_fp16 is not None:
            self.model.use_fp16 = on
            return "fp32"
        return "fp16" if on and self.device.type == "cuda" else "fp32"

    def __call__(self, batch_index: int) -> list[tuple[str, float]]:
        p, loop, i = self.params, self.loop, self.draw_index(batch_index)
        if i not in self.streams:
            self.streams[i] = batch_stream(self.sources[i], p.batch_size, loop.counters["rows"][i])
        b = next(self.streams[i])
        n_imgs = len(b.seeds)  # the global batch: rows, cost and kimg count every rank's share
        mine = _slice(b, *self.rows) if world_size() > 1 else b
        step_values = sfd_batch(
            self.model, self.optimizer, mine, self.sources[i].schedule.t_steps(), self.loss_fn,
            afs=p.afs, last_step_extra=self.last_step_extra, device=self.device, precision=self.precision(),
            scaler=self.scaler, forward=None if self.forward is self.model else self.forward, nan_to_num=self.authors_fp16,
            batch_gpu=p.batch_gpu, trainable=self.trainable,
        )  # fmt: skip
        if self.authors_fp16 and loop.counters["fp16_off_at_batch"] is None and step_values and math.isnan(step_values[-1][1]):
            loop.counters["fp16_off_at_batch"] = batch_index  # sfd-main: "Meet nan, disable fp16!" for the rest of the run
            tqdm.write(f"{self.name}: NaN loss at batch {batch_index}: float16 is off for the rest of the run (precision fp16_authors)")
        self.run.cost.add_student_forward(n_imgs * len(step_values))
        self.run.cost.add_student_backward(n_imgs * len(step_values))
        loop.counters["optimizer_steps"] += len(step_values)
        loop.counters["rows"][i] += n_imgs
        prefix = f"N{self.sources[i].schedule.num_steps}/" if len(self.sources) > 1 else ""
        return [(f"{prefix}step{n}", v) for n, v in step_values]

    def close(self) -> None:
        for s in self.streams.values():
            s.close()  # stops the reader's prefetch thread
        if self.edm_fp16 is not None:
            self.model.use_fp16 = self.edm_fp16


def _trainable(model: nn.Module, params: DistillParams, lora: Any, device: torch.device, name: str, *, compile: bool,
               progress: bool) -> tuple[Trainable, Any]:
    """(the DDP / FSDP2 / plain model to train, the forward to call: compiled or not) in training mode; a LoRA
    student trains its adapters only, the teacher's weights frozen (pipeline.networks.lora)."""
    if lora is None:
        model.train().requires_grad_(True)
    else:
        model.train()
    if params.activation_checkpointing:
        enable_activation_checkpointing(model)
    trainable = prepare(model, sharding=params.sharding, device=device, what=f"{name}.sharding")
    forward, compile_note = maybe_compile(trainable.forward, compile, device)
    if compile_note is not None and progress and is_main():
        tqdm.write(f"{name}: {compile_note}")
    return trainable, forward


def _training_state(run: DistillRun, trainable: Trainable, optimizer: torch.optim.Optimizer, model: nn.Module,
                    draw: torch.Generator) -> TrainingState | None:
    """The resumable state (network, optimizer, N-draw generator); None without a state directory."""
    if run.state_dir is None:
        return None
    module_state, optimizer_state = state_view(trainable, optimizer, model.checkpoint_module(),
                                               keep=None if run.lora is None else run.lora.is_adapter)
    return TrainingState(run.state_dir, run.training_key, modules={"net": module_state},
                         optimizers={"optimizer": optimizer_state}, generators={"draw": draw},
                         collective=trainable.sharding == "fsdp")


def _save_usable(run: DistillRun, trainable: Trainable, loop: TrainingLoop) -> None:
    """A usable student next to the state: ``sfd sample --ckpt STATE_DIR``."""
    lora = run.lora
    net_state = trainable.checkpoint_state_dict() if lora is None else lora.adapter_state_dict(trainable)
    if not is_main():
        return
    config = dict(run.checkpoint_config)
    config["provenance"] = {**config.get("provenance", {}), "weights_hash": hash_state_dict(net_state),
                            "kimg_done": loop.kimg()}
    save_checkpoint(run.state_dir, net_state, config)


def _training_summary(loop: TrainingLoop, sources: Sequence[TrajectorySource], params: DistillParams,
                      keys: list[str]) -> dict[str, Any]:
    """What :func:`distill` returns: budget spent, final losses, epochs over each cached key, the loss log."""
    batch, rows = loop.batch, loop.counters["rows"]
    epochs = {s.key: r / s.cache_size for s, r in zip(sources, rows)}
    return {
        "batches": batch,
        "kimg": batch * params.batch_size / 1000,
        "optimizer_steps": loop.counters["optimizer_steps"],
        "final_loss": {k: loop.mean_last(k, RECENT) for k in keys},
        "rows_per_key": {s.key: r for s, r in zip(sources, rows)},
        "epochs_over_cache": epochs,
        "epochs_over_cache_max": max(epochs.values()),
        "cache_trajectories": {s.key: s.cache_size for s in sources},
        **({"fp16_off_at_batch": loop.counters["fp16_off_at_batch"]} if "fp16_off_at_batch" in loop.counters else {}),
        "regime": "cached trajectories reused across epochs (the authors draw fresh noise for every batch)"
        if max(epochs.values()) > 1 else "each cached trajectory used at most once (fresh-noise regime)",
        "log": loop.log,
    }


def _step_drawer(sources: Sequence[TrajectorySource], params: DistillParams, draw: torch.Generator, name: str) -> Any:
    """SFD-v: the source (one per N) of batch b. ``step_draw: seeded``: uniform over the keys from the saved
    torch generator ``draw`` (seeded by ``seed``). ``authors``: sfd-main's sequence, the b-th value of
    Python's ``random.randint(min N, max N)`` after ``random.seed(42)`` (uniform over min..max inclusive,
    so every N in between needs a key); rebuilt on resume by drawing the first b values again."""
    if params.step_draw != "authors":
        return lambda batch: int(torch.randint(len(sources), (1,), generator=draw))
    ns = [s.schedule.num_steps for s in sources]
    lo_n, hi_n = min(ns), max(ns)
    if sorted(ns) != list(range(lo_n, hi_n + 1)):
        raise ParamError(f"{name}.step_draw: 'authors' draws N with random.randint({lo_n}, {hi_n}) and needs one key per N "
                         f"in between; the trajectories have N = {sorted(ns)}")
    index = {n: i for i, n in enumerate(ns)}
    state: dict[str, Any] = {}

    def draw_index(batch: int) -> int:
        if "rng" not in state or state["next"] != batch:
            rng = random.Random(AUTHORS_STEP_SEED)
            for _ in range(batch):
                rng.randint(lo_n, hi_n)
            state["rng"] = rng
        state["next"] = batch + 1
        return index[state["rng"].randint(lo_n, hi_n)]

    return draw_index


def consumed_trajectory_cost(sources: Sequence[TrajectorySource], rows_per_key: dict[str, int]) -> dict[str, Any]:
    """The teacher cost of the cached trajectories a run consumed, from the store's commit records.

    Each stored trajectory counts once however many epochs read it: a key read for ``rows`` rows over
    a cache of ``cache_size`` seeds consumed min(rows, cache_size) distinct trajectories (each epoch is
    a permutation of the cache). A partial first epoch is charged the mean per-trajectory cost of the
    key's seeds (exact for teacher forwards, which every trajectory of a key spends equally).
    ``unknown_trajectories`` counts consumed trajectories whose chunk has no cost record."""
    from pipeline.trajectories.store import sum_stored_costs

    keys = {}
    for s in sources:
        rows = int(rows_per_key.get(s.key, 0))
        distinct = min(rows, s.cache_size)
        stored = s.dataset.open().stored_cost(s.dataset.seeds)
        frac = distinct / stored["trajectories"] if stored["trajectories"] else 0.0
        keys[s.key] = {
            **stored,
            "rows_read": rows,
            "trajectories": distinct,
            "teacher_forward_images": int(round(stored["teacher_forward_images"] * frac)),
            "wall_seconds": round(stored["wall_seconds"] * frac, 3),
            "unknown_trajectories": int(round(stored["unknown_trajectories"] * frac)),
        }
    return {**sum_stored_costs(list(keys.values())), "keys": keys}


def resolve_loss_name(params: DistillParams, top_level: Any) -> str:
    """The section's ``loss`` or else the top-level ``loss`` param (l1 when absent); both validated by the params."""
    return params.loss if params.loss is not None else (top_level if top_level is not None else "l1")


def training_key(params: DistillParams, **identity: Any) -> str:
    """What a saved state must match to be resumed: every param that changes the result, plus identity."""
    p = described(params, leave_out=DistillParams.RUN_ONLY)
    return hash_description({"params": p, **identity})


def _open_sources(
    store: str | Path,
    specs: Sequence[Any],  # TrajectorySpec, one per N
    seeds: Sequence[int],
    params: DistillParams,
) -> list[TrajectorySource]:
    """One streaming reader per key; a key that does not match (stale teacher, other schedule) is refused here."""
    from pipeline.trajectories.store import KeyMismatchError, StoreError

    sources = []
    for i, spec in enumerate(specs):
        ds = TrajectoryDataset(
            store, spec, batch_size=params.batch_size, seeds=seeds, shuffle_seed=params.seed * 1000 + i,
            prefetch=params.prefetch, cycle=True,
        )  # fmt: skip
        try:
            ds.chunks()  # opens the key and checks that every seed is committed
        except KeyMismatchError as e:
            raise KeyMismatchError(
                f"distill: the trajectory store has no targets for this teacher and schedule (N={spec.schedule.num_steps}); "
                f"if the teacher or the trajectory params changed, run the trajectories stage first. {e}"
            ) from None
        except StoreError as e:
            raise StoreError(f"distill: {e}") from None
        sources.append(TrajectorySource(spec.schedule, ds, spec.key, len(seeds)))
    return sources


def run_distill_stage(
    params: DistillParams,  # the validated section: Params.section(name)
    *,
    trajectories: TrajectoryParams,  # the section it names: Params.trajectories_for(name)
    loss: str = "l1",  # the top-level `loss` param (Params.loss), used when the section sets none
    name: str = "distill",  # the section's name: distill | distill_v | distill_stage2
    store: str | Path,
    teacher_ckpt: str | Path | None,  # the trajectories' teacher, also the student's initialisation
    out: str | Path,  # the distilled checkpoint directory
    state_dir: str | Path | None,  # resumable state (and the last verified checkpoint); None: no resume
    metrics: str | Path | None = None,
    live_dir: str | Path | None = None,  # DVCLive directory: loss per step index (x axis kimg), lr, final metrics
    cost_path: str | Path | None = None,
    progress: bool = True,
    stop_after_batches: int | None = None,  # tests: simulate an interruption
    compile: bool = False,  # run setting: torch.compile the student's forward (GPU only)
    channels_last: bool = False,  # run setting: channels-last student (GPU only)
) -> dict[str, Any]:
    """A distillation stage end to end: find the keys, build the student, train, write checkpoint + metrics.

    Under torchrun each process trains on its share of every global batch and rank 0 alone writes the
    checkpoint, the state, the metrics, the DVCLive log and the cost record (pipeline.core.distributed)."""
    from pipeline.diffusion.seeds import parse_seeds
    from pipeline.distill.student import save_student
    from pipeline.trajectories.generation import load_trajectory_teacher

    section, p, traj = name, params, trajectories
    loss_name = resolve_loss_name(p, loss)
    device = _stage_device(p)
    teacher, _, teacher_hash = load_trajectory_teacher(traj.teacher, teacher_ckpt, device="cpu")
    specs = trajectory_specs(traj, teacher_hash=teacher_hash, num_classes=teacher.num_classes, sample_shape=teacher.sample_shape,
                             **teacher.spec_options())
    schedules = [s.schedule for s in specs]  # their N agree with p (pipeline.config.params.check_student_steps)
    init = _initial_student(p, traj, teacher, teacher_ckpt, section, device)
    model = init.model
    lora = _add_lora(p, model, teacher_ckpt, traj, section)
    sources = _open_sources(store, specs, parse_seeds(traj.seeds), p)
    losses = _stage_losses(p, loss_name, tuple(teacher.sample_shape), device)
    identity = {"loss": loss_name, "lpips": losses.lpips_used, "teacher_hash": teacher_hash,
                "store_keys": [s.key for s in sources], "seeds": traj.seeds, "init_hash": init.init_hash}
    key = training_key(p, **identity)
    config = _distilled_config(p, traj, section, init, schedules, sources, losses.description, key, lora=lora,
                               teacher=teacher, teacher_hash=teacher_hash, teacher_ckpt=teacher_ckpt, store=store)
    cost = CostMeter(section, device)
    run = DistillRun(Path(state_dir) if state_dir is not None else None, key, config, cost, lora=lora)
    live = LiveLog(live_dir) if live_dir is not None else None
    _, cl_note = to_channels_last(model, channels_last, device)
    compile_note = maybe_compile(model, compile, device)[1] if compile and device.type != "cuda" else None
    summary = distill(
        model, sources, p, run, loss_fn=losses.loss_fn, last_step_extra=losses.last_step_extra, progress=progress,
        stop_after_batches=stop_after_batches, live=live, name=section, compile=compile and compile_note is None,
    )  # fmt: skip
    if "interrupted_at_batch" in summary:
        return summary
    save_student(out, model, config, state=run.final_state)
    summary.pop("log")
    result = _stage_result(p, section, loss_name, losses, schedules, summary, cost, out, config, run,
                           notes=[n for n in (cl_note, compile_note) if n])
    _write_stage_records(result, summary, sources, p, cost, metrics=metrics, live=live, cost_path=cost_path)
    return result


def _stage_device(p: DistillParams) -> torch.device:
    """This process's device; TF32 for bf16/fp16 (fp16_authors keeps it off, as sfd-main does); CPU threads."""
    from pipeline.core.devices import resolve_device

    device = rank_device(resolve_device(p.device))
    if p.precision in ("bf16", "fp16"):
        enable_tf32(device)
    if device.type == "cpu" and p.threads > 0:
        torch.set_num_threads(p.threads)  # measured: 30 s on 1 thread vs 233 s on 2 for the default, on a busy 2-core CPU
    return device


def _initial_student(p: DistillParams, traj: TrajectoryParams, teacher: Any, teacher_ckpt: str | Path | None,
                     section: str, device: torch.device) -> Any:
    """The student before training: a copy of the teacher checkpoint, else a fresh ``student_network``."""
    from pipeline.distill.student import student_from_checkpoint, student_from_scratch

    if teacher_ckpt is not None:  # rules that depend on the command line (--teacher-ckpt), not on params alone
        if p.student_network is not None:
            raise ParamError(f"{section}.student_network: the student copies the teacher checkpoint; remove this key")
        return student_from_checkpoint(teacher_ckpt, step_condition=p.step_condition, seed=p.seed, device=device,
                                       step_condition_init=p.step_condition_init, step_condition_arch=p.step_condition_arch)
    if p.step_condition and p.step_condition_arch == "authors":
        raise ParamError(f"{section}.step_condition_arch: 'authors' (sfd-main's step layers) exists for EDM networks only; "
                         "the student is built from student_network (this project's U-Net)")
    if p.student_network is None:
        raise ParamError(
            f"{section}.student_network: the teacher ({traj.teacher}) has no network to copy; give the student's "
            "architecture here, or pass --teacher-ckpt"
        )
    return student_from_scratch(
        p.student_network, sample_shape=teacher.sample_shape, num_classes=teacher.num_classes,
        step_condition=p.step_condition, seed=p.seed, device=device, step_condition_init=p.step_condition_init,
    )  # fmt: skip


def _add_lora(p: DistillParams, model: nn.Module, teacher_ckpt: str | Path | None, traj: TrajectoryParams,
              section: str) -> Any:
    """LoRA adapters on the student (``lora_rank`` > 0; pipeline.networks.lora); None otherwise."""
    if p.lora_rank == 0:
        return None
    from pipeline.networks.lora import add_lora

    if teacher_ckpt is None:
        raise ParamError(f"{section}.lora_rank: a LoRA student adapts a teacher network; the teacher "
                         f"({traj.teacher}) has none: set lora_rank: 0")
    return add_lora(model, rank=p.lora_rank, alpha=p.lora_alpha, targets=p.lora_targets, seed=p.seed,
                    what=f"{section}.lora_rank")


@dataclass
class StageLosses:
    loss_fn: Loss
    last_step_extra: Loss | None  # stage 2: + lambda x batch-mean LPIPS on the last step
    description: str
    lpips_used: bool


def _stage_losses(p: DistillParams, loss_name: str, sample_shape: tuple[int, ...], device: torch.device) -> StageLosses:
    """The section's loss, and stage 2's LPIPS term on the last step (losses.py), with a readable description."""
    lpips_options = dict(lpips_weights=p.lpips_weights, lpips_net=p.lpips_net, lpips_size=p.lpips_size,
                         lpips_pooling=p.lpips_pooling, lpips_scaling=p.lpips_scaling, lpips_heads=p.lpips_heads, device=device)
    lpips_desc = (f"lpips {p.lpips_net}, {p.lpips_size or 'at least 64'} px, {p.lpips_pooling} pooling, "
                  f"{p.lpips_scaling} input scaling, {'heads ' + str(p.lpips_heads) if p.lpips_heads else 'lpips v0.1 heads'}")
    losses = StageLosses(make_loss(loss_name, **lpips_options), None, loss_name, loss_name == "lpips")
    if p.lpips_last_step and p.lpips_weights is not None:
        weight = resolve_perceptual_weight(p.lpips_weight, sample_shape)
        losses.last_step_extra = perceptual_term(make_loss("lpips", **lpips_options), weight)  # sfd_batch adds it
        losses.lpips_used = True
        losses.description += f" + {weight:g} x batch-mean {lpips_desc} on the last step"
    elif p.lpips_last_step:
        losses.description += " (no local LPIPS weights: lpips_weights is null, the last step keeps " + loss_name + ")"
    return losses


def _distilled_config(p: DistillParams, traj: TrajectoryParams, section: str, init: Any, schedules: list[Schedule],
                      sources: list[TrajectorySource], loss_desc: str, key: str, *, lora: Any, teacher: Any,
                      teacher_hash: str, teacher_ckpt: str | Path | None, store: str | Path) -> dict[str, Any]:
    """The distilled checkpoint's model.json: the student's architecture, its sampler and the provenance; a LoRA
    student's model.safetensors holds the adapters, its base is the teacher checkpoint (pipeline.networks.lora)."""
    from pipeline.distill.student import sampler_section, student_config

    provenance = {
        "kind": section,
        "method": "SFD-v" if p.step_condition else ("SFD stage 2" if teacher.is_distilled else "SFD"),
        "teacher_hash": teacher_hash,
        "teacher": str(teacher_ckpt) if teacher_ckpt is not None else traj.teacher,
        "init": init.source,
        "store": str(store),
        "store_keys": {str(s.schedule.num_steps): s.key for s in sources},
        "trajectories": {
            "section": p.trajectories, "seeds": traj.seeds, "solver": traj.solver, "max_order": traj.max_order,
            "M": traj.M, "afs": traj.afs, "guidance": traj.guidance,
        },
        "loss": loss_desc,
        "training": described(p, leave_out=("device",)),
        "training_key": key,
    }  # fmt: skip
    step_condition = [s.num_steps for s in schedules] if init.model.step_condition else None
    default_schedule = max(schedules, key=lambda s: s.num_steps)  # SFD-v: the largest N (the stage-2 teacher's)
    sampler = sampler_section(default_schedule, afs=p.afs, step_condition=step_condition, guidance=p.guidance)
    config = student_config(init.config, sampler, provenance)
    if lora is not None:
        config["lora"] = {**lora.describe(), "base": str(teacher_ckpt), "base_weights_hash": init.init_hash}
    return config


def _stage_result(p: DistillParams, section: str, loss_name: str, losses: StageLosses, schedules: list[Schedule],
                  summary: dict[str, Any], cost: CostMeter, out: str | Path, config: dict[str, Any], run: Any,
                  notes: list[str]) -> dict[str, Any]:
    """The stage's metrics file."""
    result = {
        "section": section,
        "loss": loss_name,
        "loss_used": losses.description,
        "lpips": losses.lpips_used,
        **({"stage2_loss": losses.description} if p.lpips_last_step else {}),
        "nfe": {str(s.num_steps): s.num_steps - 1 - int(p.afs) for s in schedules},
        **summary,
        "wall_seconds": round(cost.wall_seconds, 3),
        "checkpoint": str(out),
        **({"lora": config["lora"], "trained_parameters": sum(t.numel() for t in run.final_state.values())}
           if "lora" in config and run.final_state else {}),
    }
    if world_size() > 1 or p.precision != "fp32" or notes:
        result["processes"] = world_size()
        result["precision"] = p.precision
        result["notes"] = notes
    return result


def _write_stage_records(result: dict[str, Any], summary: dict[str, Any], sources: list[TrajectorySource],
                         p: DistillParams, cost: CostMeter, *, metrics: str | Path | None, live: Any,
                         cost_path: str | Path | None) -> None:
    """Metrics JSON and DVCLive's final values (rank 0), the cost record with what the stage consumed."""
    if metrics is not None and is_main():
        path = Path(metrics)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
    if live is not None:
        live.log_final({k: result[k] for k in ("final_loss", "kimg", "optimizer_steps", "epochs_over_cache_max")})
        live.end()
    consumed = consumed_trajectory_cost(sources, summary["rows_per_key"])
    cost.extra.update({"trajectories_seen": summary["batches"] * p.batch_size, "optimizer_steps": summary["optimizer_steps"],
                       "epochs_over_cache": summary["epochs_over_cache_max"],
                       "consumed_trajectories": consumed,
                       "note": "the counts above are this stage's own passes; consumed_trajectories is the teacher cost "
                               "of the stored trajectories it read (from the store's commit records, each once)"})
    if cost_path is not None:
        cost.write(cost_path)

