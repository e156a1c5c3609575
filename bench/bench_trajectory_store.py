"""Benchmark the trajectory store: generation overhead, reader throughput, bytes per trajectory.

    .venv/bin/python bench/bench_trajectory_store.py --seeds 1024 --batch 128 --chunk 128 --out /tmp/sfd-bench

Prints a markdown report (copied into bench/trajectory_store.md).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.diffusion.denoisers import EDMPrecond  # noqa: E402
from pipeline.core.devices import describe_device, resolve_device  # noqa: E402
from pipeline.diffusion.schedules import Schedule  # noqa: E402
from pipeline.teachers.loader import gmm_teacher  # noqa: E402
from pipeline.trajectories.generation import generate_trajectories, teacher_trajectories  # noqa: E402
from pipeline.trajectories.reader import TrajectoryDataset  # noqa: E402
from pipeline.trajectories.spec import TrajectorySpec  # noqa: E402
from pipeline.trajectories.store import open_store  # noqa: E402


def unet_teacher(device):
    from pipeline.networks.unet import build_network

    torch.manual_seed(0)
    net = build_network(img_resolution=32, in_channels=3, model_channels=32, channel_mult=[1, 2, 2],
                        num_blocks=1, attn_resolutions=[8], label_dim=10)  # fmt: skip
    return EDMPrecond(net).to(device).eval().requires_grad_(False), net


def bench_generation(name, denoiser, spec, n, batch, chunk, out: Path, device, compressor="blosc-zstd", repeats=3):
    seeds = list(range(n))
    teacher_trajectories(denoiser, spec, seeds[:batch], device=device)  # warm-up (first-call allocations)
    bare, store = [], []
    path = out / f"{name}-{spec.storage_dtype}.zarr"
    for _ in range(repeats):  # interleaved, best of each: the CPU is shared with other jobs
        t0 = time.perf_counter()
        for b in range(0, n, batch):
            teacher_trajectories(denoiser, spec, seeds[b : b + batch], device=device)
        bare.append(time.perf_counter() - t0)
        shutil.rmtree(path, ignore_errors=True)
        stats = generate_trajectories(denoiser, spec, seeds, path, batch_size=batch, chunk_size=chunk, device=device,
                                      progress=False, compressor=compressor)  # fmt: skip
        store.append(stats["seconds"])
    bare_s, store_s = min(bare), min(store)
    key = open_store(path).key(spec.key)
    raw_bytes = n * (1 + spec.num_targets) * int(np.prod(spec.sample_shape)) * (4 if spec.storage_dtype == "float32" else 2)
    disk = key.size_bytes()
    return {
        "name": name, "dtype": spec.storage_dtype, "n": n, "bare_s": bare_s, "store_s": store_s,
        "bare_tps": n / bare_s, "store_tps": n / store_s, "overhead": store_s / bare_s - 1,
        "write_s": stats["write_seconds"], "bytes_per_traj": disk / n, "ratio": raw_bytes / disk, "path": path, "key": spec.key,
    }  # fmt: skip


def bench_reading(path: Path, key_name: str, batch: int, repeats: int = 3):
    key = open_store(path).key(key_name)
    chunks = key.committed_chunks()
    n = len(chunks) * key.chunk_size
    decoded = sum(a.nbytes for a in key.read_chunk(chunks[0]).values()) * len(chunks)
    files = [f for f in (path / key_name).rglob("*") if f.is_file() and "/c/" in str(f)]
    best = {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        for f in files:
            f.read_bytes()
        best["files"] = min(best.get("files", 1e9), time.perf_counter() - t0)
        t0 = time.perf_counter()
        for c in chunks:
            rows = slice(c * key.chunk_size, (c + 1) * key.chunk_size)
            for name in key.array_names:
                key.array(name)[rows]
        best["zarr"] = min(best.get("zarr", 1e9), time.perf_counter() - t0)
        for verify in (True, False):
            ds = TrajectoryDataset(path, key_name, batch_size=batch, verify=verify)
            t0 = time.perf_counter()
            rows = sum(len(b.seeds) for b in ds)
            assert rows == n
            label = "reader" if verify else "reader_noverify"
            best[label] = min(best.get(label, 1e9), time.perf_counter() - t0)
    return {k: {"s": v, "mb_s": decoded / v / 1e6, "tps": n / v} for k, v in best.items()}, n, decoded


def student_step_tps(device, batch: int, num_steps: int = 4) -> float:
    """Trajectories/s a stage-1 student step consumes: (N-1) forward+backward passes per batch."""
    model, net = unet_teacher(device)
    model.requires_grad_(True).train()
    opt = torch.optim.Adam(net.parameters(), lr=5e-5)
    x = torch.randn(batch, 3, 32, 32, device=device) * 80
    labels = torch.randint(10, (batch,), device=device)
    sig = [80.0, 10.9, 0.67, 0.006]
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        for n in range(num_steps - 1):
            d = model(x, torch.full((batch,), sig[n], device=device), labels)
            loss = (d - x).abs().sum() / batch
            opt.zero_grad()
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return batch / min(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=1024)
    ap.add_argument("--unet-seeds", type=int, default=256)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=Path("/tmp/sfd-bench"))
    a = ap.parse_args()
    device = resolve_device(a.device)
    a.out.mkdir(parents=True, exist_ok=True)
    teacher = gmm_teacher(num_components=10, sample_shape=(3, 32, 32), std=0.2, seed=0, conditional=True)
    gen = []
    for dtype in ("float32", "float16"):
        spec = TrajectorySpec(teacher_hash=teacher.weights_hash, schedule=Schedule(num_steps=4), M=3,
                              storage_dtype=dtype, label_policy="uniform_per_seed", num_classes=10,
                              sample_shape=(3, 32, 32))  # fmt: skip
        gen.append(bench_generation("gmm", teacher.denoiser, spec, a.seeds, a.batch, a.chunk, a.out, device))
    try:
        model, net = unet_teacher(device)
        from pipeline.core.hashing import hash_state_dict

        spec = TrajectorySpec(teacher_hash=hash_state_dict(net.state_dict()), schedule=Schedule(num_steps=4), M=3,
                              label_policy="uniform_per_seed", num_classes=10, sample_shape=(3, 32, 32))  # fmt: skip
        gen.append(bench_generation("unet", model, spec, a.unet_seeds, min(a.batch, 64), min(a.chunk, 64), a.out, device))
    except ImportError:
        print("pipeline.networks.unet missing: U-Net generation skipped")
    reads = {g["dtype"]: bench_reading(g["path"], g["key"], a.batch) for g in gen if g["name"] == "gmm"}
    student = student_step_tps(device, a.batch)

    print(f"machine: {platform.machine()} {platform.processor() or ''}, {describe_device(device)}, "
          f"torch {torch.__version__}, python {platform.python_version()}")  # fmt: skip
    print(f"command: {' '.join(sys.argv)}\n")
    print("## Generation (DPM++(3M), N=4, M=3: 12 NFE, 3x32x32, blosc-zstd)\n")
    print("| teacher | storage | trajectories | bare solver traj/s | with store traj/s | overhead | writer thread s | bytes/traj | compression |")
    print("|---|---|---|---|---|---|---|---|---|")
    for g in gen:
        print(f"| {g['name']} | {g['dtype']} | {g['n']} | {g['bare_tps']:.1f} | {g['store_tps']:.1f} | "
              f"{100 * g['overhead']:+.1f}% | {g['write_s']:.2f} | {g['bytes_per_traj']:.0f} | {g['ratio']:.2f}x |")  # fmt: skip
    for dtype, (r, n, decoded) in reads.items():
        print(f"\n## Reading ({dtype} store, {n} trajectories, {decoded / 1e6:.1f} MB decoded, batch {a.batch})\n")
        print("| path | MB/s (decoded) | traj/s | vs raw zarr chunk reads |")
        print("|---|---|---|---|")
        names = {"files": "chunk files, bytes only (no decode)", "zarr": "raw zarr chunk reads (decode)",
                 "reader": "TrajectoryDataset (verify, shuffle, batches)", "reader_noverify": "TrajectoryDataset, verify=False"}  # fmt: skip
        for k in ("files", "zarr", "reader", "reader_noverify"):
            print(f"| {names[k]} | {r[k]['mb_s']:.0f} | {r[k]['tps']:.0f} | {r[k]['tps'] / r['zarr']['tps']:.2f} |")
    print(f"\nStudent stage-1 step (small U-Net, batch {a.batch}, N=4: 3 forward+backward): {student:.1f} traj/s consumed")


if __name__ == "__main__":
    main()
