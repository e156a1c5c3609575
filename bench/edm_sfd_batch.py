"""Wall time of one SFD batch on the CIFAR-10 DDPM++ EDM network, its FLOP count, and the projected GPU cost.

One SFD batch = batch 8, N = 4 with AFS: 2 student network forwards + backwards (one Adam step each),
L1 loss (pipeline.distill.sfd.sfd_batch), on VPPrecond + SongUNet in EDM's CIFAR-10 DDPM++
configuration with random weights (no EDM file can be downloaded here), in train mode (dropout 0.13).
The targets are random tensors: the time of a batch does not depend on their values.

The FLOP count is torch.utils.flop_counter's (2 FLOPs per multiply-add; convolutions, matmuls,
attention; elementwise ops not counted) on one 32x32 image, forward; and on the batch, forward + backward.
The projection of the SFD stage-1 budget is arithmetic on those counts (see ``project``).

    .venv/bin/python bench/edm_sfd_batch.py [--threads 2] [--repeats 3] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

DDPMPP_CIFAR10 = dict(
    img_resolution=32, img_channels=3, label_dim=0, use_fp16=False, model_type="SongUNet", embedding_type="positional",
    encoder_type="standard", decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1], model_channels=128,
    channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], dropout=0.13, augment_dim=9,
)  # EDM's train.py --arch=ddpmpp --precond=vp for CIFAR-10

H100_BF16_DENSE = 989e12  # FLOP/s
PAPER_A100_HOURS = 0.64  # SFD, CIFAR-10, NFE 2 (N = 4 + AFS), 200 kimg
A100_BF16_DENSE = 312e12


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def project(forward_flop: float, *, kimg: float = 200, teacher_nfe: int = 12, student_steps: int = 2,
            backward_factor: float = 2.0) -> dict:
    """SFD stage 1: per trajectory teacher_nfe teacher forwards + student_steps student forward+backward."""
    per_traj = forward_flop * (teacher_nfe + student_steps * (1 + backward_factor))
    total = per_traj * kimg * 1000
    out = {"flop_per_trajectory": per_traj, "total_flop": total,
           "paper_effective_tflops_on_a100": total / (PAPER_A100_HOURS * 3600) / 1e12}
    for util in (0.3, 0.4):
        seconds = total / (util * H100_BF16_DENSE)
        out[f"h100_seconds_at_{int(util * 100)}pct"] = seconds
        out[f"h100_hours_at_{int(util * 100)}pct"] = seconds / 3600
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from pipeline.diffusion.schedules import Schedule
    from pipeline.distill.losses import make_loss
    from pipeline.distill.sfd import sfd_batch
    from pipeline.networks.edm import build_edm_model, count_parameters
    from pipeline.trajectories.reader import TrajectoryBatch
    from pipeline.training.optim import adam

    torch.manual_seed(0)
    model = build_edm_model("VPPrecond", DDPMPP_CIFAR10)
    params = count_parameters(model)

    model.eval()
    one = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        fwd_one = flops(lambda: model(one, torch.tensor([2.5])))
    model.train()
    xb = torch.randn(args.batch, 3, 32, 32)

    def fwd_bwd() -> None:
        model(xb, torch.full((args.batch,), 2.5)).square().mean().backward()

    fwd_bwd_batch = flops(fwd_bwd)
    model.zero_grad(set_to_none=True)

    schedule = Schedule(num_steps=4)
    g = torch.Generator().manual_seed(1)
    batch = TrajectoryBatch(80 * torch.randn((args.batch, 3, 32, 32), generator=g),
                            torch.randn((args.batch, 3, 3, 32, 32), generator=g), None, torch.arange(args.batch))
    optimizer = adam(model, 5e-5)
    loss_fn = make_loss("l1")
    times = []
    for i in range(args.repeats + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        steps = sfd_batch(model, optimizer, batch, schedule.t_steps(), loss_fn, afs=True)
        dt = time.perf_counter() - t0
        assert len(steps) == 2
        if i:
            times.append(dt)

    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "machine": platform.machine(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()},
        "parameters": params,
        "forward_gflop_per_image": fwd_one / 1e9,
        "forward_backward_gflop_per_image": fwd_bwd_batch / args.batch / 1e9,
        "backward_over_forward": (fwd_bwd_batch / args.batch - fwd_one) / fwd_one,
        "sfd_batch": {"batch": args.batch, "N": 4, "afs": True, "network_steps": 2, "loss": "l1",
                      "seconds": times, "median_seconds": statistics.median(times),
                      "achieved_gflops": 2 * fwd_bwd_batch / statistics.median(times) / 1e9},
        "projection_measured_flops": project(fwd_one),
        "projection_42.4_gflop": project(42.4e9),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
