"""GPU benchmark: the SFD CIFAR-10 run (12-NFE teacher trajectories + NFE-2 distillation) on the DDPM++ network.

Measures, on EDM's CIFAR-10 DDPM++ network (VPPrecond + SongUNet, 55.7M parameters, random weights;
``pipeline.networks.edm.build_edm_model``), for each precision (fp32 | tf32 | bf16 | fp16) and batch size:

- teacher trajectories/s at N = 4, M = 3: DPM-Solver++(3M) over 13 fine timestamps = 12 NFE, through
  the project's ``pipeline.trajectories.generation.teacher_trajectories`` (seed noise, solver, states
  at t_1..t_3 copied to the host), the denoiser wrapped in ``CountingDenoiser`` to check the 12 NFE;
- SFD distillation kimg/s at NFE 2 (N = 4 with AFS: 2 student forwards + backwards + Adam steps per
  batch), through the project's ``pipeline.distill.sfd.sfd_batch`` with the L1 loss and
  ``pipeline.training.optim.adam``; fp16 trains with a ``torch.amp.GradScaler``;
- peak GPU memory (``torch.cuda.max_memory_allocated``) of each point;
- FLOPs per forward and per forward + backward (``torch.utils.flop_counter.FlopCounterMode``) and the
  fraction of the GPU's dense peak each rate reaches (``PEAKS``);
- whether the store writer or reader is the bottleneck: ``generate_trajectories`` into a
  scratch store (writer-thread seconds against solver seconds), the ``TrajectoryDataset`` reader's
  trajectories/s against the distillation step's, and distillation fed by the reader;
- the projected wall time of the paper's CIFAR-10 SFD run: 200k teacher trajectories + 200 kimg of
  distillation at batch 128 (NFE 2), from the measured rates.

Precisions: ``fp32`` strict float32 (TF32 off); ``tf32`` float32 with TF32 matmuls/convolutions;
``bf16`` / ``fp16`` ``torch.autocast`` (TF32 on for what stays float32). The teacher's and the
preconditioner's arithmetic outside the network stays float32 (the preconditioner casts), as the
stored states do. (When the ``precision`` setting of issue 14 lands in pipeline/, switch
``precision_context`` to its autocast helper.)

Writes ``--out``/gpu_bench.json and ``--out``/gpu_bench.md. ``--smoke`` runs a tiny network with tiny
batches on the CPU in seconds (tests/test_gpu_bench_smoke.py), to check the script before GPU time
is spent; its numbers say nothing about a GPU.

    python3 bench/gpu_bench.py --out /tmp/gpu-bench                 # on the GPU machine (see bench/gpu.md)
    /work/main/.venv/bin/python bench/gpu_bench.py --smoke --out /tmp/gpu-smoke
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

try:  # sfd.py needs pydantic (pipeline.config) and zarr (the reader): the GPU machine lacks both
    from pipeline.diffusion.schedules import Schedule
    from pipeline.diffusion.seeds import seed_noise
    from pipeline.diffusion.solvers import CountingDenoiser
    from pipeline.distill.losses import make_loss
    from pipeline.distill.sfd import sfd_batch
    from pipeline.networks.edm import build_edm_model, count_parameters
    from pipeline.trajectories.generation import generate_trajectories, teacher_trajectories
    from pipeline.trajectories.reader import TrajectoryBatch, TrajectoryDataset
    from pipeline.trajectories.spec import TrajectorySpec
    from pipeline.training.optim import adam
except ImportError as e:  # pragma: no cover - only where the project's dependencies are missing
    sys.exit(f"gpu_bench: cannot import the project's code ({e}); on the GPU machine carry the wheels "
             "(pydantic, zarr, numcodecs, ...) as bench/gpu.md says")

DDPMPP_CIFAR10 = dict(
    img_resolution=32, img_channels=3, label_dim=0, use_fp16=False, model_type="SongUNet", embedding_type="positional",
    encoder_type="standard", decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1], model_channels=128,
    channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], dropout=0.13, augment_dim=9,
)  # EDM's train.py --arch=ddpmpp --precond=vp for CIFAR-10 (bench/edm_sfd_batch.py)
SMOKE_NET = dict(DDPMPP_CIFAR10, img_resolution=8, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])

#: Dense (no sparsity) peak TFLOP/s from NVIDIA's data sheets; "fp32" is the non-tensor-core rate.
PEAKS = {
    "H100 SXM": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2},
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
}
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
N_STEPS, M_TEACHER = 4, 3  # the CIFAR-10 preset: N = 4 student timestamps, M = 3 (12 teacher NFE)
PAPER_KIMG, PAPER_BATCH = 200, 128  # SFD CIFAR-10 stage 1: 200 kimg at batch 128
TARGET_TEACHER_TPS, TARGET_RUN_SECONDS = 600.0, 600.0  # issue 14, one H100 in bf16


def peak_table_name(device_name: str) -> str | None:
    name = device_name.upper()
    if "H200" in name:
        return "H200"
    if "H100" in name:
        return "H100 PCIe" if "PCIE" in name else "H100 SXM"
    if "A100" in name:
        return "A100"
    return None


def set_tf32(on: bool) -> None:
    """TF32 for float32 matmuls and convolutions (torch >= 2.9's fp32_precision API, else the allow_tf32 flags)."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(torch.backends.cudnn, "conv"):
        torch.backends.cuda.matmul.fp32_precision = "tf32" if on else "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32" if on else "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device):
    """The compute precision of a block: TF32 switches and torch.autocast (bf16 / fp16)."""
    set_tf32(precision != "fp32")
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        with torch.autocast(device.type, dtype=dtype):
            yield
    else:
        yield


class ScaledOptimizer:
    """An optimizer whose step goes through a GradScaler (fp16 training) behind the plain interface.

    ``pipeline.training.loop.optimizer_step`` calls zero_grad, backward on the (scaled) loss, step;
    the loss is scaled by the loss function (``scaled_loss``), so sfd_batch runs unchanged.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        self.optimizer, self.scaler = optimizer, scaler
        self.param_groups = optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], device: torch.device, *, min_time: float, min_repeats: int, max_repeats: int) -> dict:
    """One warm-up call, then timed calls until min_time has passed and min_repeats are done."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    fn()  # warm-up: cuDNN algorithm choice, allocator growth
    sync(device)
    times: list[float] = []
    while len(times) < max_repeats and (len(times) < min_repeats or sum(times) < min_time):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    out = {"seconds": [round(t, 5) for t in times], "median_s": times[len(times) // 2]}
    if device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return out


def count_flops(teacher: torch.nn.Module, student: torch.nn.Module, shape: tuple[int, ...], device: torch.device) -> dict:
    """Forward FLOPs of one image (eval, no grad) and forward + backward FLOPs per image (train, batch 2)."""
    x = torch.randn(1, *shape, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as c:
        teacher(x, torch.tensor([2.5], device=device))
    fwd = c.get_total_flops()
    x2 = torch.randn(2, *shape, device=device)
    with FlopCounterMode(display=False) as c:
        student(x2, torch.full((2,), 2.5, device=device)).square().mean().backward()
    student.zero_grad(set_to_none=True)
    return {"forward_flop": fwd, "forward_backward_flop": c.get_total_flops() / 2}


def run_teacher(teacher, spec: TrajectorySpec, batch: int, precision: str, device: torch.device, timing: dict) -> dict:
    counting = CountingDenoiser(teacher)
    seeds = list(range(batch))

    def once() -> None:
        with precision_context(precision, device):
            out = teacher_trajectories(counting, spec, seeds, device=device)
        assert out["states"].shape[:2] == (batch, spec.num_targets)

    r = measure(once, device, **timing)
    calls = counting.calls / (1 + len(r["seconds"]))
    r.update(traj_per_s=batch / r["median_s"], nfe=calls)
    t0 = time.perf_counter()
    seed_noise(seeds, spec.sample_shape, device=device, dtype=torch.float64)
    sync(device)
    r["seed_noise_s"] = round(time.perf_counter() - t0, 5)
    return r


def make_distill(student, precision: str, device: torch.device):
    """(optimizer, loss function) for sfd_batch at this precision: fp16 scales the loss and steps via a GradScaler."""
    optimizer = adam(student, 5e-5)
    loss_fn = make_loss("l1")
    if precision != "fp16":
        return optimizer, loss_fn
    scaler = torch.amp.GradScaler(device.type)

    def scaled_loss(x_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return scaler.scale(loss_fn(x_hat, y))

    return ScaledOptimizer(optimizer, scaler), scaled_loss


def random_batch(batch: int, shape: tuple[int, ...], device: torch.device) -> TrajectoryBatch:
    g = torch.Generator(device=device).manual_seed(1)
    return TrajectoryBatch(80 * torch.randn((batch, *shape), generator=g, device=device),
                           torch.randn((batch, N_STEPS - 1, *shape), generator=g, device=device), None,
                           torch.arange(batch))  # fmt: skip


def run_distill(student, batch: int, shape, precision: str, device: torch.device, timing: dict) -> dict:
    optimizer, loss_fn = make_distill(student, precision, device)
    t_steps = Schedule(num_steps=N_STEPS).t_steps()
    data = random_batch(batch, shape, device)
    steps: list[int] = []

    def once() -> None:
        with precision_context(precision, device):
            out = sfd_batch(student, optimizer, data, t_steps, loss_fn, afs=True, device=device)
        steps.append(len(out))

    r = measure(once, device, **timing)
    r.update(traj_per_s=batch / r["median_s"], kimg_per_s=batch / r["median_s"] / 1000, network_steps=max(steps))
    return r


def run_store(teacher, student, initial_student: dict, spec: TrajectorySpec, args, precision: str, device: torch.device,
              distill_tps: float) -> dict:
    """Teacher into a scratch store (writer thread vs solver), the reader's rate, distillation fed by the reader."""
    scratch = Path(tempfile.mkdtemp(prefix="sfd-gpu-bench-", dir=args.store_dir))
    try:
        path = scratch / "trajectories.zarr"
        counting = CountingDenoiser(teacher)
        with precision_context(precision, device):
            stats = generate_trajectories(counting, spec, range(args.store_trajectories), path, batch_size=args.store_batch,
                                          chunk_size=args.chunk, device=device, progress=False,
                                          compressor="blosc-zstd")  # fmt: skip
        n = stats["trajectories_generated"]
        out = {
            "trajectories": n, "storage_dtype": spec.storage_dtype, "chunk_size": args.chunk, "batch": args.store_batch,
            "seconds": stats["seconds"], "solver_seconds": stats["solver_seconds"], "writer_seconds": stats["write_seconds"],
            "traj_per_s_with_store": n / stats["seconds"],
            "writer_busy_fraction": stats["write_seconds"] / stats["seconds"],
            "writer_is_bottleneck": stats["write_seconds"] > stats["solver_seconds"],
        }  # fmt: skip
        ds = TrajectoryDataset(path, spec, batch_size=args.distill_batch, verify=True)
        t0 = time.perf_counter()
        rows = sum(len(b.seeds) for b in ds)
        out["reader_traj_per_s"] = rows / (time.perf_counter() - t0)
        out["reader_is_bottleneck"] = out["reader_traj_per_s"] < distill_tps
        student.load_state_dict(initial_student)
        optimizer, loss_fn = make_distill(student, precision, device)
        t_steps = Schedule(num_steps=N_STEPS).t_steps()
        t0, done = time.perf_counter(), 0
        for b in TrajectoryDataset(path, spec, batch_size=args.distill_batch, verify=True, drop_last=True):
            with precision_context(precision, device):
                sfd_batch(student, optimizer, b, t_steps, loss_fn, afs=True, device=device)
            done += len(b.seeds)
        sync(device)
        out["distill_from_store_traj_per_s"] = done / (time.perf_counter() - t0)  # includes the first-batch warm-up
        out["distill_in_memory_traj_per_s"] = distill_tps
        return out
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def project(teacher_tps: float, distill_tps: float) -> dict:
    """Wall time of 200k teacher trajectories + 200 kimg of NFE-2 distillation at the given rates."""
    teacher_s = PAPER_KIMG * 1000 / teacher_tps
    distill_s = PAPER_KIMG * 1000 / distill_tps
    return {"teacher_s": teacher_s, "distill_s": distill_s, "total_s": teacher_s + distill_s}


def device_info(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}  # fmt: skip
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(name=p.name, memory_gib=round(p.total_memory / 2**30, 1), sm_count=p.multi_processor_count,
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())  # fmt: skip
    else:
        info["name"] = platform.processor() or platform.machine()
    return info


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny network, tiny batches, on the CPU (a few seconds)")
    ap.add_argument("--device", default=None, help="default: cuda if available (cpu with --smoke)")
    ap.add_argument("--precisions", default=None, help=f"comma list of {', '.join(PRECISIONS)} (default: all; cpu: no tf32)")
    ap.add_argument("--batches", default=None, help="comma list (default 128,256,512,1024; --smoke: 2,4)")
    ap.add_argument("--fp32-max-batch", type=int, default=256, help="strict fp32 is slow: skip larger batches")
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds of timed calls per point (after 1 warm-up)")
    ap.add_argument("--min-repeats", type=int, default=2)
    ap.add_argument("--max-repeats", type=int, default=20)
    ap.add_argument("--channels-last", action="store_true", help="convert the networks to channels-last")
    ap.add_argument("--no-cudnn-benchmark", action="store_true")
    ap.add_argument("--store-precision", default="bf16", help="precision of the store-bottleneck runs")
    ap.add_argument("--store-trajectories", type=int, default=16384)
    ap.add_argument("--store-batch", type=int, default=1024, help="teacher batch of the store run (the preset's 1024)")
    ap.add_argument("--store-dtype", default="float32", choices=["float32", "float16"])
    ap.add_argument("--chunk", type=int, default=256, help="store chunk size (the presets' 256)")
    ap.add_argument("--store-dir", default=None, help="scratch directory for the store (default: the system temp)")
    ap.add_argument("--skip-store", action="store_true")
    ap.add_argument("--distill-batch", type=int, default=PAPER_BATCH, help="distillation batch of the projection (SFD's 128)")
    ap.add_argument("--out", type=Path, default=Path("gpu-bench-out"))
    args = ap.parse_args(argv)

    if args.smoke:
        net, shape = SMOKE_NET, (3, 8, 8)
        device = torch.device(args.device or "cpu")
        batches = [int(b) for b in (args.batches or "2,4").split(",")]
        timing = {"min_time": 0.0, "min_repeats": 1, "max_repeats": 1}
        args.store_trajectories, args.store_batch, args.chunk, args.distill_batch = 8, 4, 4, min(batches)
    else:
        net, shape = DDPMPP_CIFAR10, (3, 32, 32)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        batches = [int(b) for b in (args.batches or "128,256,512,1024").split(",")]
        timing = {"min_time": args.min_time, "min_repeats": args.min_repeats, "max_repeats": args.max_repeats}
    if args.precisions:
        precisions = args.precisions.split(",")
    else:
        precisions = list(PRECISIONS) if device.type == "cuda" else ["fp32", "bf16", "fp16"]
    for p in precisions:
        if p not in PRECISIONS:
            ap.error(f"--precisions: unknown {p!r}; allowed: {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark

    torch.manual_seed(0)
    teacher = build_edm_model("VPPrecond", net).to(device).eval().requires_grad_(False)
    student = build_edm_model("VPPrecond", net).to(device).train()
    if args.channels_last:
        teacher, student = (m.to(memory_format=torch.channels_last) for m in (teacher, student))
    flops = count_flops(teacher, student, shape, device)
    initial_student = {k: v.detach().clone() for k, v in student.state_dict().items()}
    fwd, fwd_bwd = flops["forward_flop"], flops["forward_backward_flop"]
    teacher_nfe = (M_TEACHER + 1) * (N_STEPS - 1)
    flop_per_traj = {"teacher": teacher_nfe * fwd, "distill": 2 * fwd_bwd}  # NFE 2: 2 forward + backward
    info = device_info(device)
    peaks = PEAKS.get(peak_table_name(info["name"]) or "") if device.type == "cuda" else None
    spec = TrajectorySpec(teacher_hash="gpu-bench-random-ddpmpp", schedule=Schedule(num_steps=N_STEPS), M=M_TEACHER,
                          storage_dtype=args.store_dtype, sample_shape=shape)  # fmt: skip

    result: dict[str, Any] = {
        "mode": "cpu-smoke" if args.smoke else "full", "device": info, "peak_table": peak_table_name(info["name"]),
        "peaks_tflops": peaks, "network": {"config": net, "parameters": count_parameters(teacher), "sample_shape": list(shape)},
        "flops": {**flops, "per_trajectory": flop_per_traj}, "teacher_nfe": teacher_nfe,
        "settings": {"channels_last": args.channels_last, "cudnn_benchmark": device.type == "cuda" and not args.no_cudnn_benchmark,
                     "timing": timing, "batches": batches, "precisions": precisions, "fp32_max_batch": args.fp32_max_batch,
                     "distill_batch": args.distill_batch},
        "points": [], "notes": [],
    }  # fmt: skip
    if args.smoke:
        result["notes"].append("CPU smoke run with a tiny network: checks that the script works, says nothing about a GPU")
    for precision in precisions:
        for batch in batches:
            if precision == "fp32" and batch > args.fp32_max_batch and not args.smoke:
                continue
            for kind in ("teacher", "distill"):
                point = {"precision": precision, "batch": batch, "kind": kind}
                try:
                    if kind == "teacher":
                        r = run_teacher(teacher, spec, batch, precision, device, timing)
                    else:
                        student.load_state_dict(initial_student)  # every point trains the same initial weights
                        r = run_distill(student, batch, shape, precision, device, timing)
                except OOM:
                    r = {"oom": True}
                except Exception as e:  # one failed point (e.g. a non-finite fp16 loss) must not lose the whole run
                    r = {"error": f"{type(e).__name__}: {e}"[:300]}
                if device.type == "cuda" and ("oom" in r or "error" in r):
                    torch.cuda.empty_cache()
                point.update(r)
                if "traj_per_s" in r:
                    achieved = r["traj_per_s"] * flop_per_traj[kind]
                    point["achieved_tflops"] = achieved / 1e12
                    if peaks:
                        point["fraction_of_peak"] = achieved / (peaks[precision] * 1e12)
                result["points"].append(point)
                print(json.dumps(point), flush=True)

    # projections: best teacher batch (the trajectories stage's batch_size is free) + distillation at batch 128
    result["projections"] = {}
    for precision in precisions:
        t = [p for p in result["points"] if p["precision"] == precision and p["kind"] == "teacher" and "traj_per_s" in p]
        d = [p for p in result["points"] if p["precision"] == precision and p["kind"] == "distill" and "traj_per_s" in p]
        if not t or not d:
            continue
        best_t = max(t, key=lambda p: p["traj_per_s"])
        d_paper = [p for p in d if p["batch"] == args.distill_batch]
        d_use = d_paper[0] if d_paper else max(d, key=lambda p: p["traj_per_s"])
        proj = project(best_t["traj_per_s"], d_use["traj_per_s"])
        proj.update(teacher_batch=best_t["batch"], teacher_traj_per_s=best_t["traj_per_s"], distill_batch=d_use["batch"],
                    distill_kimg_per_s=d_use["kimg_per_s"])  # fmt: skip
        result["projections"][precision] = proj

    if args.skip_store:
        result["store"] = {"skipped": "--skip-store"}
    elif args.store_precision not in result["projections"]:
        result["store"] = {"skipped": f"--store-precision {args.store_precision} was not measured"}
    else:
        distill_tps = result["projections"][args.store_precision]["distill_kimg_per_s"] * 1000
        try:
            result["store"] = run_store(teacher, student, initial_student, spec, args, args.store_precision, device, distill_tps)
            result["store"]["precision"] = args.store_precision
            bare = [p for p in result["points"] if p["precision"] == args.store_precision and p["kind"] == "teacher"
                    and p["batch"] == args.store_batch and "traj_per_s" in p]  # fmt: skip
            if bare:  # > 0: the store slows the teacher loop down (writer thread, GIL), < 0: noise
                result["store"]["teacher_slowdown_vs_bare"] = bare[0]["traj_per_s"] / result["store"]["traj_per_s_with_store"] - 1
            proj = result["projections"][args.store_precision]
            with_store = project(min(proj["teacher_traj_per_s"], result["store"]["traj_per_s_with_store"]),
                                 min(distill_tps, result["store"]["distill_from_store_traj_per_s"]))  # fmt: skip
            result["store"]["projection_with_store_rates"] = with_store
        except OOM:
            result["store"] = {"oom": True}
        except Exception as e:  # keep the measured points
            result["store"] = {"skipped": f"failed: {type(e).__name__}: {e}"[:300]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_bench.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "gpu_bench.md").write_text(markdown(result))
    print(markdown(result))
    return result


def _f(v: float | None, digits: int = 1) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:,.{digits}f}"


def markdown(r: dict) -> str:
    d = r["device"]
    smoke = r["mode"] == "cpu-smoke"
    lines = [f"# GPU benchmark{' — CPU SMOKE RUN (tiny network; not GPU numbers)' if smoke else ''}", ""]
    lines.append(f"Device: {d['name']} ({d['device']}), torch {d['torch']}, python {d['python']}; "
                 f"network {r['network']['parameters']:,} parameters, sample {r['network']['sample_shape']}; "
                 f"peak table: {r['peak_table'] or 'none (fractions of peak omitted)'}.")  # fmt: skip
    lines.append(f"FLOPs per forward {r['flops']['forward_flop'] / 1e9:.4g} GFLOP, forward + backward "
                 f"{r['flops']['forward_backward_flop'] / 1e9:.4g} GFLOP per image; teacher {r['teacher_nfe']} NFE per trajectory "
                 f"({r['flops']['per_trajectory']['teacher'] / 1e9:.4g} GFLOP), distillation NFE 2 "
                 f"({r['flops']['per_trajectory']['distill'] / 1e9:.4g} GFLOP per trajectory).")  # fmt: skip
    lines += ["", "| precision | batch | kind | traj/s | kimg/s | median s/batch | NFE or steps | peak GiB | TFLOP/s | % of peak |",
              "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for p in r["points"]:
        if p.get("oom") or p.get("error"):
            what = "out of memory" if p.get("oom") else f"error: {p['error']}".replace("|", "/")
            lines.append(f"| {p['precision']} | {p['batch']} | {p['kind']} | {what} | | | | | | |")
            continue
        steps = p.get("nfe", p.get("network_steps"))
        frac = p.get("fraction_of_peak")
        lines.append(f"| {p['precision']} | {p['batch']} | {p['kind']} | {_f(p['traj_per_s'])} | {_f(p['traj_per_s'] / 1000, 3)} | "
                     f"{p['median_s']:.4f} | {_f(float(steps), 0)} | {_f(p.get('peak_memory_gib'), 2)} | "
                     f"{p['achieved_tflops']:.3g} | {_f(100 * frac if frac is not None else None)} |")  # fmt: skip
    lines += ["", f"## Projected wall time of the CIFAR-10 SFD run ({PAPER_KIMG}k teacher trajectories + {PAPER_KIMG} kimg "
              f"NFE-2 distillation at batch {r['settings']['distill_batch']})", "",
              "| precision | teacher batch | teacher traj/s | distill kimg/s | teacher s | distill s | total s | total min |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for prec, p in r["projections"].items():
        lines.append(f"| {prec} | {p['teacher_batch']} | {_f(p['teacher_traj_per_s'])} | {_f(p['distill_kimg_per_s'], 3)} | "
                     f"{_f(p['teacher_s'])} | {_f(p['distill_s'])} | {_f(p['total_s'])} | {_f(p['total_s'] / 60, 2)} |")  # fmt: skip
    bf16 = r["projections"].get("bf16")
    lines.append("")
    if smoke:
        lines.append("Targets (one H100, bf16: ≥ 600 teacher traj/s, full run ≤ 10 min): not applicable to a CPU smoke run.")
    elif bf16 and (r["peak_table"] or "").startswith("H100"):
        ok_t = bf16["teacher_traj_per_s"] >= TARGET_TEACHER_TPS
        ok_r = bf16["total_s"] <= TARGET_RUN_SECONDS
        lines.append(f"Targets on this H100 in bf16: teacher {bf16['teacher_traj_per_s']:.0f} traj/s "
                     f"({'meets' if ok_t else 'MISSES'} ≥ 600); full run {bf16['total_s'] / 60:.1f} min "
                     f"({'meets' if ok_r else 'MISSES'} ≤ 10 min).")  # fmt: skip
    else:
        lines.append("Targets are stated for one H100 in bf16; this device/precision set is not that.")
    s = r.get("store", {})
    lines += ["", "## Store writer / reader"]
    if "skipped" in s or s.get("oom"):
        lines.append(f"Skipped: {s.get('skipped', 'out of memory')}.")
    else:
        lines += ["", f"{s['precision']}: {s['trajectories']} trajectories, {s['storage_dtype']} storage, chunk {s['chunk_size']}, "
                  f"teacher batch {s['batch']}.", "",
                  f"- with the store: {s['traj_per_s_with_store']:,.1f} traj/s; solver {s['solver_seconds']:.2f} s, writer thread "
                  f"{s['writer_seconds']:.2f} s of {s['seconds']:.2f} s (busy {100 * s['writer_busy_fraction']:.0f} %): "
                  f"writer {'IS' if s['writer_is_bottleneck'] else 'is not'} the bottleneck"
                  + (f"; {100 * s['teacher_slowdown_vs_bare']:+.1f} % time against the bare teacher at that batch;"
                     if "teacher_slowdown_vs_bare" in s else ";"),
                  f"- reader (TrajectoryDataset, verify, batch {r['settings']['distill_batch']}): {s['reader_traj_per_s']:,.0f} traj/s against the "
                  f"distillation step's {s['distill_in_memory_traj_per_s']:,.0f} traj/s: reader "
                  f"{'IS' if s['reader_is_bottleneck'] else 'is not'} the bottleneck;",
                  f"- distillation fed by the reader: {s['distill_from_store_traj_per_s']:,.0f} traj/s (first batch's warm-up included);",
                  f"- projected run at the store-inclusive rates: {s['projection_with_store_rates']['total_s']:,.1f} s "
                  f"({s['projection_with_store_rates']['total_s'] / 60:.2f} min)."]  # fmt: skip
    for n in r["notes"]:
        lines.append(f"\nNote: {n}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
