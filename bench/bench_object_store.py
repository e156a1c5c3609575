"""Read throughput of a trajectory store over S3 (zarr over s3fs) from a local S3-compatible endpoint, vs local disk.

Starts moto's S3 server on localhost (in a thread of this process; what tests/test_store_sharing.py uses), writes a
CIFAR-sized store (``--trajectories`` trajectories of 3x32x32, N = 4: x_T + 3 states, float32, Blosc-zstd,
``--chunk`` trajectories a chunk) once to ``s3://bench/traj.zarr`` and once to a local directory, then reads every
committed chunk (verified: checksum and finiteness, as the distill stage's reader does) through
``open_store(url).key(k).read_chunk(c)`` and reports chunks/s and MB/s of decoded data (and of stored bytes).

    python bench/bench_object_store.py --trajectories 4096 --chunk 256

Reading: moto is a single-threaded Python server keeping objects in memory, so its numbers bound what the client
side (s3fs, zarr, decompression, checksums) costs plus moto's own overhead; a real S3 endpoint adds network
latency per request and allows many requests in parallel.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def start_s3() -> tuple[object, str]:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint)
    import boto3

    boto3.client("s3").create_bucket(Bucket="bench")
    return server, endpoint


def write_store(location: str, trajectories: int, chunk: int) -> tuple[str, int]:
    import numpy as np

    from pipeline.diffusion.schedules import Schedule
    from pipeline.trajectories.spec import TrajectorySpec
    from pipeline.trajectories.store import open_store

    spec = TrajectorySpec(teacher_hash="bench", schedule=Schedule(num_steps=4), M=3, sample_shape=(3, 32, 32))
    key = open_store(location, mode="a").create_key(spec, chunk_size=chunk)
    rng = np.random.default_rng(0)
    for c in range(trajectories // chunk):
        data = {"x_T": (80 * rng.standard_normal((chunk, 3, 32, 32))).astype("float32"),
                "states": rng.standard_normal((chunk, 3, 3, 32, 32)).astype("float32")}
        key.write_chunk(c, data)
    return spec.key, trajectories // chunk


def read_all(location: str, key: str, chunks: int) -> tuple[float, int]:
    from pipeline.trajectories.store import open_store

    handle = open_store(location).key(key)
    start = time.perf_counter()
    nbytes = 0
    for c in range(chunks):
        out = handle.read_chunk(c)
        nbytes += sum(a.nbytes for a in out.values())
    return time.perf_counter() - start, nbytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trajectories", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    server, endpoint = start_s3()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            locations = {"local disk": str(Path(tmp) / "traj.zarr"), f"S3 (moto, {endpoint})": "s3://bench/traj.zarr"}
            print(f"{a.trajectories} trajectories of 3x32x32 (x_T + 3 states, float32), {a.chunk} per chunk")
            print("| store | chunks | best of | seconds | chunks/s | MB/s decoded |")
            print("|---|---|---|---|---|---|")
            for name, location in locations.items():
                key, chunks = write_store(location, a.trajectories, a.chunk)
                best = min(read_all(location, key, chunks) for _ in range(a.repeats))
                seconds, nbytes = best
                print(f"| {name} | {chunks} | {a.repeats} | {seconds:.2f} | {chunks / seconds:.1f} | "
                      f"{nbytes / seconds / 1e6:.0f} |", flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
