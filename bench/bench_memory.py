"""Peak memory of SFD student training on the CPU: network size x precision x {full, LoRA r=16/64} x
{plain, activation checkpointing} x {1 process, FSDP2 on 2 processes (gloo)}; writes bench/memory.md's table rows.

Each configuration runs in a fresh process (per rank under FSDP2): build the student (this project's U-Net in EDM
preconditioning at 3x32x32, class-conditional), optionally LoRA adapters / checkpointing / FSDP2, Adam, then
``--steps`` SFD optimizer steps (forward at one sigma, L1 against a target, backward, step) on ``--batch`` rows
(each FSDP2 rank its half), exactly the calls pipeline.distill.sfd makes (pipeline.training.parallel, the optimizer
step of pipeline.training.loop). Measured per process: the resident set before training (``base``: torch, the
weights) and its peak (VmHWM) after; the training memory is peak - base (weights' gradients, Adam state,
activations). On a GPU (``--device cuda``) it reports torch.cuda.max_memory_allocated instead.

    python bench/bench_memory.py                  # small and medium nets, batch 32 (activations dominate)
    python bench/bench_memory.py --sizes large --batch 4 --precisions fp32   # a wide net, small batch (weights + Adam dominate)
    python bench/bench_memory.py --one small fp32 full plain 1   # one row
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {  # this project's U-Net (pipeline.networks.unet) at 3x32x32, 10 classes
    "small": {"model_channels": 32, "channel_mult": [1, 2, 2], "num_blocks": 2, "attn_resolutions": [16]},
    "medium": {"model_channels": 96, "channel_mult": [1, 2, 2], "num_blocks": 2, "attn_resolutions": [16]},
    "large": {"model_channels": 192, "channel_mult": [1, 2, 2], "num_blocks": 2, "attn_resolutions": [16]},
}


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def run_one(size: str, precision: str, mode: str, ckpt: str, procs: int, steps: int, batch: int, device: str) -> dict:
    import torch

    from pipeline.core.distributed import autocast_context, init_from_env, is_main, share
    from pipeline.diffusion.denoisers import EDMPrecond
    from pipeline.networks.unet import build_network
    from pipeline.training.loop import optimizer_step
    from pipeline.training.optim import adam
    from pipeline.training.parallel import enable_activation_checkpointing, prepare

    torch.set_num_threads(1)
    init_from_env(device)
    torch.manual_seed(0)
    model = EDMPrecond(build_network(img_resolution=32, in_channels=3, label_dim=10, **SIZES[size])).to(device).train()
    params = sum(p.numel() for p in model.parameters())
    lora = None
    if mode != "full":
        from pipeline.networks.lora import add_lora

        lora = add_lora(model, rank=int(mode.removeprefix("lora")))
    if ckpt == "checkpointing":
        enable_activation_checkpointing(model)
    trainable = prepare(model, sharding="fsdp", device=device)
    optimizer = adam(model, 1e-4, trainable.parameters() if lora is not None else None)
    lo, hi = share(batch)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(batch, 3, 32, 32, generator=g) * 2.0)[lo:hi].to(device)
    y = torch.randn(batch, 3, 32, 32, generator=g)[lo:hi].to(device)
    labels = torch.randint(10, (batch,), generator=g)[lo:hi].to(device)
    sigma = torch.full((hi - lo,), 2.0, device=device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_kib("VmRSS") * 1024
    for _ in range(steps):
        with autocast_context(precision, device):
            d = trainable.forward(x, sigma, labels)
        loss = (x + (0.5 - 2.0) * (x - d.float()) / 2.0 - y).abs().flatten(1).sum(1).mean()
        optimizer_step(optimizer, loss, model=trainable)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else rss_kib("VmHWM") * 1024
    trained = sum(p.numel() for p in trainable.parameters())
    return {"rank_main": is_main(), "params": params, "trained": trained, "base_mib": base / 2**20,
            "peak_mib": peak / 2**20, "training_mib": (peak - base) / 2**20}


def launch(args: list[str], procs: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    with tempfile.TemporaryDirectory() as rows:
        me = [str(Path(__file__).resolve()), "--worker", "--rows", rows, *args]
        cmd = [sys.executable, *me] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                         f"--nproc-per-node={procs}", *me]
        subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        return [json.loads(f.read_text()) for f in sorted(Path(rows).glob("*.json"))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--rows", help="(worker) folder for this process's result")
    ap.add_argument("--one", nargs=5, metavar=("SIZE", "PRECISION", "MODE", "CKPT", "PROCS"))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default="small,medium")
    ap.add_argument("--precisions", default="fp32,bf16")
    a = ap.parse_args()
    if a.worker:
        size, precision, mode, ckpt, procs = a.one
        row = run_one(size, precision, mode, ckpt, int(procs), a.steps, a.batch, a.device)
        rank = os.environ.get("RANK", "0")
        (Path(a.rows) / f"{rank}.json").write_text(json.dumps({**row, "size": size, "precision": precision,
                                                               "mode": mode, "ckpt": ckpt, "procs": int(procs)}))
        return
    grid = [a.one] if a.one else list(itertools.product(a.sizes.split(","), a.precisions.split(","), ["full", "lora16", "lora64"],
                                                        ["plain", "checkpointing"], ["1", "2"]))
    print("| network (params) | precision | student | activations | processes | trained params | base RSS MiB | "
          "peak RSS MiB | training MiB (peak - base) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size, precision, mode, ckpt, procs in grid:
        extra = ["--steps", str(a.steps), "--batch", str(a.batch), "--device", a.device]
        rows = launch(["--one", size, precision, mode, ckpt, procs, *extra], int(procs))
        r = max(rows, key=lambda r: r["peak_mib"])  # the largest rank
        student = "full" if mode == "full" else f"LoRA r={mode.removeprefix('lora')}"
        procs_txt = "1" if procs == "1" else f"{procs} (FSDP2), per rank"
        print(f"| {size} ({r['params'] / 1e6:.1f} M) | {precision} | {student} | {ckpt} | {procs_txt} | "
              f"{r['trained'] / 1e6:.2f} M | {r['base_mib']:.0f} | {r['peak_mib']:.0f} | {r['training_mib']:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
