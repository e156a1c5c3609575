"""Generate teacher trajectories into the store, chunk by chunk, skipping committed chunks.

For each seed s: x_T = t_max * z(s) (pipeline.diffusion.seeds; z(s) itself for a flow schedule from t_max = inf), the teacher solver runs over the fine grid
spec.schedule.fine(M) (sfd-method.md section 4) and the states at the student timestamps
t_1..t_{N-1} (fine indices (M+1), 2(M+1), ...) are stored. Whole chunks are generated: a seed
range that covers part of a chunk generates the whole chunk.

Several processes: each owns the chunks c with c % n == i (``--shard i/n``, or torchrun's RANK and
WORLD_SIZE), so every chunk is written by one process and the store equals a one-process run's.
Under torchrun rank 0 creates the key first, and the stage's summary and cost records are gathered
and written by rank 0 alone. With ``precision`` bf16/fp16 the teacher's forwards run under autocast
(the solver's arithmetic and the stored states stay float32; the precision is part of the key).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.core.devices import describe_device
from pipeline.diffusion.denoisers import Denoiser, guided
from pipeline.core.distributed import (
    all_gather_objects, autocast_denoiser, enable_tf32, main_first, maybe_compile, to_channels_last,
)  # fmt: skip
from pipeline.core.param_checks import ParamError, check_int
from pipeline.diffusion.schedules import student_indices
from pipeline.diffusion.seeds import seed_labels, seed_noise
from pipeline.diffusion.solvers import CountingDenoiser, initial_state, solve
from pipeline.teachers.loader import Teacher, load_teacher
from pipeline.config.trajectories import TrajectoryParams
from pipeline.trajectories.spec import TrajectorySpec, trajectory_specs
from pipeline.trajectories.store import (
    ChunkCorruptError, StoreError, TrajectoryKey, check_store_location, make_compressors, open_store, store_write_problem,
    sum_stored_costs,
)  # fmt: skip


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'i/n' -> (i, n) with 0 <= i < n; None -> None."""
    if text is None:
        return None
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ParamError(f"shard: expected 'i/n' like '0/4', got {text!r}") from None
    return check_shard((i, n))


def check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    i, n = shard
    check_int("shard n", n, minimum=1)
    check_int("shard i", i, minimum=0, maximum=n - 1)
    return i, n


def shard_from_env() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) under torchrun, else (0, 1)."""
    return check_shard((int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))))


def teacher_trajectories(
    denoiser: Denoiser,
    spec: TrajectorySpec,
    seeds: Sequence[int],
    *,
    device: torch.device | str = "cpu",
) -> dict[str, np.ndarray]:
    """x_T [B,*S], states [B,N-1,*S] (and labels [B]) for a batch of seeds: the bare solver loop."""
    dtype = getattr(torch, spec.compute_dtype)
    if spec.precision != "fp32":
        denoiser = autocast_denoiser(denoiser, spec.precision, device)
    t_fine = spec.schedule.fine(spec.M)
    record = student_indices(spec.schedule.num_steps, spec.M)[1:]
    z = seed_noise(seeds, spec.sample_shape, device=device, dtype=torch.float64)
    x_T = initial_state(z, float(t_fine[0])).to(dtype)  # t_max z (z itself from t_max = inf)
    labels = seed_labels(seeds, spec.num_classes, device=device) if spec.labelled else None
    with torch.inference_mode():
        _, states = solve(
            denoiser, x_T, t_fine, spec.solver,
            max_order=spec.max_order, lower_order_final=spec.lower_order_final, afs=spec.afs,
            labels=labels, record=record, dynamic_thresholding=spec.dynamic_thresholding,
        )  # fmt: skip
    out = {"x_T": x_T.float().cpu().numpy(), "states": torch.stack(states, dim=1).float().cpu().numpy()}
    if labels is not None:
        out["labels"] = labels.cpu().numpy()
    return out


class _ChunkWriter:
    """Writes and commits chunks on a background thread so the teacher keeps computing."""

    def __init__(self, key: TrajectoryKey, depth: int = 2) -> None:
        self.key = key
        self.queue: queue.Queue[tuple[int, dict[str, np.ndarray], dict[str, Any]] | None] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.write_seconds = 0.0
        self.thread = threading.Thread(target=self._run, name="chunk-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    start = time.perf_counter()
                    chunk, data, cost = item
                    self.key.write_chunk(chunk, data, cost=cost)
                    self.write_seconds += time.perf_counter() - start
                except BaseException as e:  # re-raised in the caller's thread
                    self.error = e

    def put(self, chunk: int, data: dict[str, np.ndarray], cost: dict[str, Any]) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((chunk, data, cost))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def generate_trajectories(
    teacher: Teacher | Denoiser,  # a loaded teacher or a denoiser D(x, sigma, labels)
    spec: TrajectorySpec,
    seeds: Sequence[int],
    store_path: str | Path,
    *,
    batch_size: int = 256,
    chunk_size: int = 256,
    device: torch.device | str = "cpu",
    shard: tuple[int, int] = (0, 1),  # (i, n): this process owns the chunks c with c % n == i
    progress: bool = True,
    compressor: str = "blosc-zstd",
    storage_options: dict[str, Any] | None = None,  # fsspec options when store_path is a URL
    teacher_source: str | None = None,  # where the teacher came from (a checkpoint path), named in errors
) -> dict[str, Any]:
    """Fill the store key of ``spec`` for every chunk touching ``seeds`` that is not yet committed.

    Every committed chunk it would reuse is verified first (checksums and finite values): a bad one is
    uncommitted and regenerated with a warning, never counted as reused. Every generated chunk is checked
    for NaN/inf before it is committed (:class:`pipeline.trajectories.store.NonFiniteTrajectoryError`).
    A read-only store is fine as long as nothing needs writing; otherwise one StoreError line says what."""
    shard, seeds = _check_generation_args(batch_size, chunk_size, shard, seeds, compressor, store_path)
    denoiser = teacher.denoiser if isinstance(teacher, Teacher) else teacher
    counting = CountingDenoiser(guided(denoiser, spec.guidance) if spec.guidance != 1.0 else denoiser)
    read_only = store_write_problem(store_path)  # None: writable (or not a local path)
    with main_first():  # under torchrun rank 0 creates the key, the others then open it
        store = open_store(store_path, mode="a", storage_options=storage_options)
        if read_only is not None and spec.key not in store.keys():
            raise StoreError(f"{read_only}; the store lacks key {spec.key} ({len(seeds)} seeds to generate): make it "
                             "writable, or write the trajectories to another store")  # fmt: skip
        key = store.create_key(spec, chunk_size=chunk_size, compressor=compressor)
    chunk_size = key.chunk_size
    wanted, owned, todo, bad = _plan_chunks(key, seeds, shard, read_only, progress=progress)
    start = time.perf_counter()
    solver_seconds = 0.0
    cost_base = {"device": describe_device(torch.device(device)),
                 "precision": str(getattr(spec, "precision", None) or spec.compute_dtype)}  # the spec's compute setting
    chunks_per_group = max(1, batch_size // chunk_size)
    bar = tqdm(total=len(todo) * chunk_size, unit="traj", desc=f"trajectories {key.name[:8]}", disable=not progress)
    writer = _ChunkWriter(key)
    try:
        for g in range(0, len(todo), chunks_per_group):
            solver_seconds += _generate_group(counting, spec, key, todo[g : g + chunks_per_group], writer, bar, cost_base,
                                              batch_size=batch_size, device=device, teacher_source=teacher_source)
        writer.close()
    finally:
        bar.close()
        if writer.thread.is_alive():
            writer.queue.put(None)
            writer.thread.join()
    return _generation_summary(key, seeds, shard, (wanted, owned, todo, bad), counting, writer,
                               seconds=time.perf_counter() - start, solver_seconds=solver_seconds)


def _generation_summary(key: TrajectoryKey, seeds: list[int], shard: tuple[int, int], plan: tuple[list, list, list, set],
                        counting: CountingDenoiser, writer: "_ChunkWriter", *, seconds: float,
                        solver_seconds: float) -> dict[str, Any]:
    """What :func:`generate_trajectories` returns: the chunks reused and generated, times, teacher calls, stored cost."""
    wanted, owned, todo, bad = plan
    generated = len(todo) * key.chunk_size
    return {
        "key": key.name,
        "description": key.description,
        "shard": list(shard),
        "chunk_size": key.chunk_size,
        "chunks_requested": len(wanted),
        "chunks_owned": len(owned),
        "chunks_reused": len(owned) - len(todo),
        "chunks_generated": len(todo),
        "chunks_regenerated": len(bad),  # committed but failed verification: generated again (in chunks_generated)
        "trajectories_generated": generated,
        "seconds": round(seconds, 3),
        "solver_seconds": round(solver_seconds, 3),
        "write_seconds": round(writer.write_seconds, 3),
        "traj_per_s": round(generated / seconds, 2) if generated and seconds > 0 else 0.0,
        "teacher_calls": counting.calls,
        "teacher_forward_images": counting.images,
        # what every committed trajectory of the requested seeds cost, from the commit records
        # (whichever run generated it): the same after a re-run that generates nothing
        "stored_cost": key.stored_cost(seeds),
    }


def _check_generation_args(batch_size: int, chunk_size: int, shard: tuple[int, int], seeds: Sequence[int],
                           compressor: str, store_path: str | Path) -> tuple[tuple[int, int], list[int]]:
    """(shard, seeds as a list) after checking every argument, before anything is written."""
    check_int("batch_size", batch_size, minimum=1)
    check_int("chunk_size", chunk_size, minimum=1)
    shard = check_shard(tuple(shard))  # type: ignore[arg-type]
    seeds = list(seeds)
    if not seeds:
        raise ParamError("seeds: empty seed list")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ParamError("seeds: expected non-negative integers")
    make_compressors(compressor)  # validates the name
    check_store_location(store_path)
    return shard, seeds


def _plan_chunks(key: TrajectoryKey, seeds: list[int], shard: tuple[int, int], read_only: str | None, *,
                 progress: bool) -> tuple[list[int], list[int], list[int], set[int]]:
    """(chunks wanted, owned by this shard, to generate, committed but bad): reused chunks are verified first and a
    bad one is uncommitted, so no reader takes it before it is regenerated."""
    wanted = key.chunks_for_seeds(seeds)
    owned = [c for c in wanted if c % shard[1] == shard[0]]
    committed = set(key.committed_chunks())
    bad = _verify_reused(key, [c for c in owned if c in committed], progress=progress)
    todo = [c for c in owned if c not in committed or c in bad]
    if todo and read_only is not None:
        from pipeline.diffusion.seeds import format_seeds

        missing = format_seeds([s for c in todo for s in key.chunk_seeds(c)])
        raise StoreError(f"{read_only}; key {key.name} needs {len(todo)} chunk(s) written (seeds {missing}"
                         f"{', ' + str(len(bad)) + ' of them failed verification' if bad else ''}): make the store "
                         "writable, or write the trajectories to another store")  # fmt: skip
    for c in bad:
        key.delete_record(c)
    return wanted, owned, todo, bad


def _generate_group(counting: CountingDenoiser, spec: TrajectorySpec, key: TrajectoryKey, group: list[int],
                    writer: "_ChunkWriter", bar: Any, cost_base: dict[str, Any], *, batch_size: int,
                    device: torch.device | str, teacher_source: str | None) -> float:
    """Generate the chunks ``group`` in batches of ``batch_size`` seeds and queue them for writing; the solver seconds."""
    chunk_size = key.chunk_size
    group_seeds = [s for c in group for s in key.chunk_seeds(c)]
    parts: list[dict[str, np.ndarray]] = []
    images_before, group_start, solver_seconds = counting.images, time.perf_counter(), 0.0
    for b in range(0, len(group_seeds), batch_size):
        t0 = time.perf_counter()
        parts.append(teacher_trajectories(counting, spec, group_seeds[b : b + batch_size], device=device))
        solver_seconds += time.perf_counter() - t0
        bar.update(len(parts[-1]["x_T"]))
    data = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    share = chunk_size / len(group_seeds)  # the group's teacher work, shared by its chunks (all equal)
    cost = {
        "teacher_forward_images": int(round((counting.images - images_before) * share)),
        "wall_seconds": round((time.perf_counter() - group_start) * share, 4),
        **cost_base,
    }
    for j, c in enumerate(group):
        chunk_data = {name: a[j * chunk_size : (j + 1) * chunk_size] for name, a in data.items()}
        key.check_finite(c, chunk_data, teacher=teacher_source)  # never commit a NaN: nothing of it is written
        writer.put(c, chunk_data, dict(cost))
    return solver_seconds


def _verify_reused(key: TrajectoryKey, chunks: list[int], *, progress: bool) -> set[int]:
    """The committed chunks among ``chunks`` that fail verification (checksum, decoding, NaN/inf), each warned about."""
    import sys

    bad = set()
    bar = tqdm(chunks, unit="chunk", desc=f"verify {key.name[:8]}", disable=not progress or len(chunks) < 8, leave=False)
    for c in bar:
        try:
            key.read_chunk(c, verify=True)
        except ChunkCorruptError as e:
            bad.add(c)
            seeds = key.chunk_seeds(c)
            tqdm.write(f"warning: {key.owner.location}/{key.name} chunk {c} (seeds {seeds.start}-{seeds.stop - 1}): "
                       f"{e.problem}; regenerating it", file=sys.stderr)  # fmt: skip
    bar.close()
    return bad


def merge_shard_results(per_rank: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One entry per key from every rank's :func:`generate_trajectories` results (counts summed; the wall
    time is the slowest rank's, so traj/s is the stage's throughput)."""
    merged = []
    for entries in zip(*per_rank):
        first = dict(entries[0])
        for name in ("chunks_owned", "chunks_reused", "chunks_generated", "chunks_regenerated", "trajectories_generated",
                     "teacher_calls"):
            first[name] = sum(e[name] for e in entries)
        for name in ("seconds", "solver_seconds", "write_seconds"):
            first[name] = max(e[name] for e in entries)
        first["shard"] = [0, len(entries)]
        first["processes"] = len(entries)
        g, s = first["trajectories_generated"], first["seconds"]
        first["traj_per_s"] = round(g / s, 2) if g and s > 0 else 0.0
        merged.append(first)
    return merged


def load_trajectory_teacher(
    params_teacher: dict[str, Any] | None,
    teacher_ckpt: str | Path | None,
    *,
    device: torch.device | str = "cpu",
) -> tuple[Teacher, Denoiser, str]:
    """(Teacher, denoiser to run, teacher hash for the spec): the checkpoint ``teacher_ckpt``, else the
    params' ``teacher: {source: gmm, ...}`` (or ``{source: checkpoint, path: ...}``), through load_teacher.

    A distilled checkpoint whose sampler has a step_condition (SFD-v) comes with the sampler's N
    bound and that N in its hash (pipeline.teachers.loader).
    """
    if teacher_ckpt is not None:
        teacher = load_teacher(Path(teacher_ckpt), device=device)
        return teacher, teacher.denoiser, teacher.weights_hash
    if not params_teacher:
        raise ParamError(
            "teacher: no teacher given; pass --teacher-ckpt models/teacher, or set the section's "
            "`teacher: {source: gmm, ...}` for the exact mixture denoiser"
        )
    options = dict(params_teacher)  # validated by TrajectoryParams (pipeline.config.trajectories.check_teacher_source)
    teacher = load_teacher(options.pop("source"), device=device, **options)
    return teacher, teacher.denoiser, teacher.weights_hash


def run_trajectories_stage(
    params: TrajectoryParams,  # the validated section: Params.section(name)
    out: str | Path,
    *,
    name: str = "trajectories",  # the section's name: trajectories | trajectories_v | trajectories_stage2
    device: str = "auto",  # the top-level `device` param (Params.device)
    teacher_ckpt: str | Path | None = None,
    seeds: str | None = None,  # overrides the section's seeds
    shard: tuple[int, int] | None = None,  # None: torchrun's RANK/WORLD_SIZE, else (0, 1)
    progress: bool = True,
    compile: bool = False,  # run setting: torch.compile the teacher (GPU only)
    channels_last: bool = False,  # run setting: channels-last teacher (GPU only)
) -> tuple[dict[str, Any], int]:
    """The `trajectories` stage: every key of the section, only uncommitted chunks; (summary, teacher images)."""
    from pipeline.core.devices import resolve_device
    from pipeline.diffusion.seeds import format_seeds, parse_seeds
    from pipeline.trajectories.store import StoreError

    section, p = name, params
    seed_list = parse_seeds(seeds if seeds is not None else p.seeds)
    shard = check_shard(shard) if shard is not None else shard_from_env()
    device = resolve_device(device)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    check_store_location(out)  # before the teacher is loaded; writes nothing
    teacher, denoiser, teacher_hash = load_trajectory_teacher(p.teacher, teacher_ckpt, device=device)
    teacher_source = str(teacher_ckpt) if teacher_ckpt is not None else f"teacher.source {p.teacher.get('source')!r}"
    denoiser, notes = _run_settings(teacher, denoiser, p, device, compile=compile, channels_last=channels_last)
    specs = trajectory_specs(p, teacher_hash=teacher_hash, num_classes=teacher.num_classes, sample_shape=teacher.sample_shape,
                             **teacher.spec_options())
    results = []
    teacher_images = 0
    for spec in specs:
        stats = generate_trajectories(
            denoiser, spec, seed_list, out,
            batch_size=p.batch_size, chunk_size=p.chunk_size, device=device, shard=shard,
            progress=progress, compressor=p.compressor, teacher_source=teacher_source,
        )  # fmt: skip
        teacher_images += stats.pop("teacher_forward_images")
        results.append(stats)
    if not results:
        raise StoreError("no trajectory keys to generate")
    gathered = all_gather_objects((results, teacher_images))  # [(results, images)] with one process
    if len(gathered) > 1:
        results, teacher_images = merge_shard_results([g[0] for g in gathered]), sum(g[1] for g in gathered)
        shard = (0, len(gathered))  # the stage's summary covers every rank
    summary = {"section": section, "store": str(out), "seeds": format_seeds(seed_list), "shard": list(shard),
               "device": str(device), **_stage_totals(results)}
    if p.precision != "fp32" or notes:
        summary["precision"] = p.precision
        summary["notes"] = notes
    return summary, teacher_images


def _run_settings(teacher: Teacher, denoiser: Denoiser, p: TrajectoryParams, device: torch.device, *, compile: bool,
                  channels_last: bool) -> tuple[Denoiser, list[str]]:
    """(the denoiser to run, notes): channels-last and torch.compile (GPU only), TF32 under autocast."""
    notes = []
    if isinstance(getattr(teacher, "model", None), torch.nn.Module):
        _, note = to_channels_last(teacher.model, channels_last, device)  # in place: the denoiser calls it
        notes += [note] if note else []
    denoiser, note = maybe_compile(denoiser, compile, device)
    notes += [note] if note else []
    if p.precision != "fp32":
        enable_tf32(device)  # the matmuls autocast leaves in float32 (fp32 stays strict float32)
    return denoiser, notes


def _stage_totals(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The stage summary's totals over its keys."""
    generated = sum(r["trajectories_generated"] for r in results)
    seconds = sum(r["seconds"] for r in results)
    return {
        "keys": results,
        "chunks_generated": sum(r["chunks_generated"] for r in results),
        "chunks_reused": sum(r["chunks_reused"] for r in results),
        "chunks_regenerated": sum(r["chunks_regenerated"] for r in results),
        "trajectories_generated": generated,
        "traj_per_s": round(generated / seconds, 2) if generated and seconds > 0 else 0.0,
        "stored_cost": sum_stored_costs([r["stored_cost"] for r in results]),
    }
