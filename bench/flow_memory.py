"""Bytes per stored trajectory of flow-matching latent teachers (issue 24): model, resolution, N, storage dtype.

A stored trajectory is x_T plus the N - 1 teacher states at the student's timestamps, each of the latent's shape
(SD3 / Flux: 16 channels, the image side over 8). This script writes real trajectories through the store's own
write path (TrajectoryKey.write_chunk, blosc-zstd, the key's storage dtype: float32, bfloat16 as its 16 bits,
float16) and reads the bytes on disk back (TrajectoryKey.size_bytes, commit records excluded). The trajectories
are DPM-Solver++(3M) from flow time 1 (M = 3) of a randomly initialised SD3Transformer2DModel at the real latent
shape with tiny widths (2 layers, 2 heads of 8; random text conditioning): noise-like values, which compress about
as badly as real latents do (a trained teacher's states are smoother only late in the trajectory), so the numbers
are close to what SD3 / Flux stores hold, and an upper bound where they differ.

    .venv/bin/python bench/flow_memory.py --seeds 8 --out /tmp/sfd-flow-memory

Prints the markdown table copied into docs/teachers.md. Deletes the stores afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.diffusion.schedules import Schedule, student_indices  # noqa: E402
from pipeline.diffusion.seeds import seed_noise  # noqa: E402
from pipeline.diffusion.solvers import solve  # noqa: E402
from pipeline.networks.flow import DiffusersFlow  # noqa: E402
from pipeline.trajectories.spec import TrajectorySpec  # noqa: E402
from pipeline.trajectories.store import open_store  # noqa: E402

CASES = [  # (model, image side in px, latent side, student N)
    ("SD3 / SD3.5 / Flux.1", 1024, 128, 4),
    ("SD3 / SD3.5 / Flux.1", 1024, 128, 7),
    ("SD3 / SD3.5 / Flux.1", 512, 64, 4),
]
DTYPES = ("float32", "bfloat16", "float16")


def teacher(latent: int) -> DiffusersFlow:
    import diffusers

    torch.manual_seed(0)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=latent, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, out_channels=16,
        pos_embed_max_size=latent // 2,
    ).eval()
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return DiffusersFlow(transformer, "SD3Transformer2DModel", {"shift": 3.0}, sample_size=(latent, latent))


def trajectories(model: DiffusersFlow, seeds: list[int], num_steps: int) -> dict:
    schedule = Schedule.flow(num_steps, 0.0, model.flow_shift)
    z = seed_noise(seeds, model.sample_shape)
    cond = (torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(1)), torch.randn(1, 32, generator=torch.Generator().manual_seed(2)))
    with torch.no_grad():
        _, states = solve(model, z, schedule.fine(3), "dpmpp", max_order=3, labels=cond,
                          record=student_indices(num_steps, 3)[1:])
    return {"x_T": z.numpy(), "states": torch.stack(states, dim=1).numpy()}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=8, help="trajectories per case (one chunk)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/sfd-flow-memory"))
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    start = time.perf_counter()
    for model_name, px, latent, n in CASES:
        model = teacher(latent)
        data = trajectories(model, list(range(args.seeds)), n)
        for dtype in DTYPES:
            path = args.out / f"{latent}-{n}-{dtype}.zarr"
            shutil.rmtree(path, ignore_errors=True)
            spec = TrajectorySpec(teacher_hash="bench", schedule=Schedule.flow(n, 0.0, 3.0), sample_shape=model.sample_shape,
                                  storage_dtype=dtype)
            key = open_store(path, mode="a").create_key(spec, chunk_size=args.seeds)
            key.write_chunk(0, data)
            stored = key.size_bytes() / args.seeds
            raw = math.prod(model.sample_shape) * n * (4 if dtype == "float32" else 2)
            rows.append((model_name, px, f"16x{latent}x{latent}", n, dtype, raw / 1e6, stored / 1e6, stored * 1e4 / 1e9))
            if not args.keep:
                shutil.rmtree(path)
    print(f"Measured {time.strftime('%Y-%m-%d')} on {cpu_name()} "
          f"({platform.python_version()}, torch {torch.__version__}), {args.seeds} trajectories per case, "
          f"{time.perf_counter() - start:.0f} s:\n")
    print("| model | image | latent | N (x_T + N-1 states) | dtype | raw MB/sample | stored MB/sample (blosc-zstd) | GB per 10k |")
    print("|---|---|---|---|---|---|---|---|")
    for m, px, shape, n, dtype, raw, stored, gb in rows:
        print(f"| {m} | {px} px | {shape} | {n} | {dtype} | {raw:.2f} | {stored:.2f} | {gb:.1f} |")


if __name__ == "__main__":
    main()
