"""The teacher forward of the trajectory stage on this machine: throughput vs batch size, eager vs torch.compile.

Runs ``pipeline.trajectories.generation.teacher_trajectories`` (DPM-Solver++(3M), M = 3, N = 4: 10 teacher forwards
per trajectory, the embedded default's trajectories section) with the embedded default teacher's U-Net
architecture (random weights: the speed does not depend on them) at 1x8x8, and a CIFAR-sized U-Net at 3x32x32
(model_channels 64, channel_mult [1, 2, 2]). For each batch size: trajectories/s, eager and ``torch.compile`` of the
denoiser (inductor; on a CPU it needs a C++ compiler, which this machine has), after one warm-up batch (the
compilation is reported separately).

    python bench/bench_trajectory_forward.py --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NETS = {
    "default 1x8x8": ((1, 8, 8), {"model_channels": 32, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4]}),
    "cifar-sized 3x32x32": ((3, 32, 32), {"model_channels": 64, "channel_mult": [1, 2, 2], "num_blocks": 2,
                                          "attn_resolutions": [16]}),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", default="64,256,1024")
    ap.add_argument("--nets", default=",".join(NETS))
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    import torch

    from pipeline.diffusion.denoisers import EDMPrecond
    from pipeline.diffusion.schedules import Schedule
    from pipeline.networks.unet import build_network
    from pipeline.trajectories.generation import teacher_trajectories
    from pipeline.trajectories.spec import TrajectorySpec

    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.threads} thread(s)")
    print("| teacher | batch | eager traj/s | compiled traj/s | compile warm-up s |")
    print("|---|---|---|---|---|")
    for name in a.nets.split(","):
        shape, arch = NETS[name]
        torch.manual_seed(0)
        model = EDMPrecond(build_network(img_resolution=shape[1], in_channels=shape[0], label_dim=0, **arch)).eval()
        spec = TrajectorySpec(teacher_hash="bench", schedule=Schedule(num_steps=4), M=3, sample_shape=shape)
        compiled = torch.compile(model)
        for batch in map(int, a.batches.split(",")):
            if shape[1] >= 32 and batch > 256:
                continue  # minutes per batch on one CPU core
            seeds = list(range(batch))
            rates, warm = {}, None
            for label, fn in (("eager", model), ("compiled", compiled)):
                start = time.perf_counter()
                teacher_trajectories(fn, spec, seeds)  # warm-up (compilation for the compiled one)
                if label == "compiled":
                    warm = time.perf_counter() - start
                best = float("inf")
                for _ in range(a.repeats):
                    start = time.perf_counter()
                    teacher_trajectories(fn, spec, seeds)
                    best = min(best, time.perf_counter() - start)
                rates[label] = batch / best
            print(f"| {name} | {batch} | {rates['eager']:.1f} | {rates['compiled']:.1f} | {warm:.1f} |", flush=True)


if __name__ == "__main__":
    main()
