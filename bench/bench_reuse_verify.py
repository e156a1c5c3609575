"""What re-verifying reused chunks costs the trajectories stage on a large store (issue 20).

Before the stage reuses a committed chunk it decodes it, compares the xxh3 checksums of its arrays with
the commit record and checks that every value is finite (pipeline.trajectories.generation._verify_reused,
the same TrajectoryKey.read_chunk(verify=True) the reader and `sfd store verify` use). This script
builds a CIFAR-sized store through the real write path (TrajectoryKey.write_chunk: 3x32x32, N = 4 so 3
states per trajectory, float32, blosc-zstd; random normal values, which compress like real teacher states,
~1.1x) and times that verification pass per chunk size, with the files in the page cache (warm: a re-run
right after generation) and evicted from it (cold: posix_fadvise DONTNEED on every file, no privileges
needed), and the parts of the pass (decode; + checksums; + finiteness).

    .venv/bin/python bench/bench_reuse_verify.py --trajectories 51200 --chunks 256 1024 --out /tmp/sfd-verify-bench

Prints a markdown report (copied into bench/reuse_verify.md). Deletes the stores afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.diffusion.schedules import Schedule  # noqa: E402
from pipeline.trajectories.generation import _verify_reused  # noqa: E402
from pipeline.trajectories.spec import TrajectorySpec  # noqa: E402
from pipeline.trajectories.store import checksum, nonfinite_rows, open_store  # noqa: E402

SHAPE = (3, 32, 32)


def build(path: Path, n: int, chunk: int) -> tuple[object, float]:
    spec = TrajectorySpec(teacher_hash="bench-reuse-verify", schedule=Schedule(num_steps=4), sample_shape=SHAPE,
                          label_policy="uniform_per_seed", num_classes=10)  # fmt: skip
    key = open_store(path, mode="a").create_key(spec, chunk_size=chunk)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for c in range(n // chunk):
        data = {
            "x_T": (80 * rng.standard_normal((chunk, *SHAPE))).astype(np.float32),
            "states": rng.standard_normal((chunk, 3, *SHAPE)).astype(np.float32),
            "labels": rng.integers(0, 10, chunk),
        }
        key.write_chunk(c, data, cost={"teacher_forward_images": 12 * chunk, "wall_seconds": 0.0, "device": "bench",
                                       "precision": "float32"})  # fmt: skip
    return open_store(path).key(spec.key), time.perf_counter() - t0


def evict(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def timed(fn, repeats: int, before=None) -> float:
    best = float("inf")
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trajectories", type=int, default=51200)
    ap.add_argument("--chunks", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("/tmp/sfd-verify-bench"))
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    load = os.getloadavg()
    import torch
    import zarr

    print(f"Machine: {cpu}, {os.cpu_count()} cores, load average {load[0]:.1f} at start; Python {platform.python_version()}, "
          f"zarr {zarr.__version__}, torch {torch.__version__}")
    print(f"Command: `.venv/bin/python bench/bench_reuse_verify.py --trajectories {args.trajectories} "
          f"--chunks {' '.join(map(str, args.chunks))} --repeats {args.repeats} --out {args.out}`\n")
    rows, parts = [], []
    for chunk in args.chunks:
        path = args.out / f"store-{chunk}.zarr"
        shutil.rmtree(path, ignore_errors=True)
        key, write_s = build(path, args.trajectories, chunk)
        chunks = key.committed_chunks()
        decoded = sum(key.read_chunk(chunks[0], verify=False)[a].nbytes for a in key.array_names) * len(chunks)
        disk = int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True).stdout.split()[0])
        verify = lambda: _verify_reused(key, chunks, progress=False)  # noqa: E731
        assert verify() == set()
        warm = timed(verify, args.repeats)
        cold = timed(verify, args.repeats, before=lambda: evict(path))

        def decode_only():
            for c in chunks:
                key.read_chunk(c, verify=False)

        def decode_checksum():
            for c in chunks:
                for a in key.read_chunk(c, verify=False).values():
                    checksum(a)

        def decode_checksum_finite():
            for c in chunks:
                data = key.read_chunk(c, verify=False)
                for a in data.values():
                    checksum(a)
                nonfinite_rows(data)

        t_decode = timed(decode_only, args.repeats)
        t_sum = timed(decode_checksum, args.repeats)
        t_all = timed(decode_checksum_finite, args.repeats)
        n = len(chunks)
        rows.append(f"| {chunk} | {n} | {n * chunk} | {decoded / 1e9:.2f} | {disk / 1e9:.2f} | {n / warm:.1f} | "
                    f"{decoded / 1e6 / warm:.0f} | {warm:.2f} | {n / cold:.1f} | {decoded / 1e6 / cold:.0f} | {cold:.2f} | "
                    f"{n / write_s:.1f} |")  # fmt: skip
        parts.append(f"| {chunk} | {t_decode:.2f} | {t_sum:.2f} ({t_sum - t_decode:+.2f}) | "
                     f"{t_all:.2f} ({t_all - t_sum:+.2f}) | {warm:.2f} |")  # fmt: skip
        if not args.keep:
            shutil.rmtree(path)
    print("## The stage's verification of reused chunks (all committed chunks of one key)\n")
    print("| chunk_size | chunks | trajectories | decoded GB | on disk GB | warm chunks/s | warm MB/s | warm s | "
          "cold chunks/s | cold MB/s | cold s | writing chunks/s (write_chunk) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\n## Where the time goes (warm, seconds for the whole key)\n")
    print("| chunk_size | decode | + xxh3 checksums | + finiteness | the stage's pass (_verify_reused) |")
    print("|---|---|---|---|---|")
    print("\n".join(parts))
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
