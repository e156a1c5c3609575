"""The trajectory store at scale: plain Zarr chunks vs Zarr v3 sharding, under DVC.

For each layout this writes a CIFAR-sized store of N = 4 trajectories (x_T [3,32,32], states
y_1..y_3 [3,3,32,32], int64 labels; synthetic Gaussian states, which compress like real ones:
~1.1x) into a scratch git + DVC repository, then times

- the write (through the project's store API: ``TrajectoryKey.write_chunk`` for plain chunks),
- ``dvc add``, ``dvc push`` to a local directory remote, ``dvc pull`` after deleting the
  workspace copy and the DVC cache,
- ``sfd store verify`` on the pulled copy (the project's CLI, in a subprocess),

and counts files and bytes. The machine's load averages (``os.getloadavg``) are recorded next to
every timing: the development machine's 2 cores are shared.

Layouts:

- ``plain``: the store as ``pipeline.trajectories.store`` writes it (one object per chunk per array,
  one commit record per chunk).
- ``sharded``: the same key group and arrays, each array with a Zarr v3 sharding codec (one shard
  object = ``--shard-chunks`` chunks); every shard is written whole by one writer (concurrent
  writers of one shard lose rows, see docs/trajectory-store.md); commit records stay one per
  chunk (so the project's reader and ``sfd store verify`` read it unchanged). The number of files
  with one record per shard instead is reported too.

    /work/main/.venv/bin/python bench/store_scale.py --trajectories 200000 --work /tmp/sfd-store-scale \\
        --json bench/store_scale.json

The scratch directory is deleted at the end (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.diffusion.schedules import Schedule  # noqa: E402
from pipeline.trajectories.spec import TrajectorySpec  # noqa: E402
from pipeline.trajectories import store as store_mod  # noqa: E402
from pipeline.trajectories.store import checksum, make_compressors, open_store  # noqa: E402

T_STUDENT = (80.0, 10.9, 1.6, 0.006)  # rough student timestamps of N = 4: scales of the synthetic states


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def synthetic_chunk(chunk: int, chunk_size: int, num_targets: int, shape: tuple[int, ...], num_classes: int) -> dict:
    """Noise-like states of one chunk (a function of the chunk index), float32 (the store casts)."""
    rng = np.random.default_rng(chunk)
    x_T = T_STUDENT[0] * rng.standard_normal((chunk_size, *shape), dtype=np.float32)
    states = rng.standard_normal((chunk_size, num_targets, *shape), dtype=np.float32)
    states *= np.asarray(T_STUDENT[1 : 1 + num_targets], dtype=np.float32).reshape(1, -1, *([1] * len(shape)))
    labels = rng.integers(0, num_classes, chunk_size, dtype=np.int64)
    return {"x_T": x_T, "states": states, "labels": labels}


def spec_for(dtype: str) -> TrajectorySpec:
    return TrajectorySpec(
        teacher_hash="synthetic-store-scale-benchmark", schedule=Schedule(num_steps=4), M=3, storage_dtype=dtype,
        label_policy="uniform_per_seed", num_classes=10, sample_shape=(3, 32, 32),
    )  # fmt: skip


def write_plain(path: Path, spec: TrajectorySpec, chunks: int, chunk_size: int, compressor: str) -> None:
    key = open_store(path, mode="a").create_key(spec, chunk_size=chunk_size, compressor=compressor)
    for c in range(chunks):
        key.write_chunk(c, synthetic_chunk(c, chunk_size, spec.num_targets, spec.sample_shape, spec.num_classes))


def write_sharded(path: Path, spec: TrajectorySpec, chunks: int, chunk_size: int, compressor: str, shard_chunks: int) -> None:
    """The same key group as TrajectoryStore.create_key, arrays with a sharding codec; whole shards written."""
    store = open_store(path, mode="a")
    info = {
        "format_version": store_mod.FORMAT_VERSION, "key": spec.key, "description": spec.description(),
        "chunk_size": chunk_size, "capacity_seeds": store_mod.CAPACITY_SEEDS, "compressor": compressor,
        "checksum": store_mod.CHECKSUM, "arrays": ["x_T", "states", "labels"],
        "shard_chunks": shard_chunks,
    }  # fmt: skip
    group = store.root.create_group(spec.key, attributes={store_mod.KEY_ATTR: info})
    s, k = spec.sample_shape, spec.num_targets
    comp = make_compressors(compressor)
    rows = chunk_size * shard_chunks
    arrays = {
        "x_T": group.create_array("x_T", shape=(store_mod.CAPACITY_SEEDS, *s), chunks=(chunk_size, *s),
                                  shards=(rows, *s), dtype=spec.storage_dtype, compressors=comp, fill_value=0),
        "states": group.create_array("states", shape=(store_mod.CAPACITY_SEEDS, k, *s), chunks=(chunk_size, k, *s),
                                     shards=(rows, k, *s), dtype=spec.storage_dtype, compressors=comp, fill_value=0),
        "labels": group.create_array("labels", shape=(store_mod.CAPACITY_SEEDS,), chunks=(chunk_size,), shards=(rows,),
                                     dtype="int64", compressors=[], fill_value=0),
    }  # fmt: skip
    group.create_group("commits", attributes={"about": "one JSON commit record per chunk, written last"})
    key = store.key(spec.key)
    for first in range(0, chunks, shard_chunks):  # one writer per shard: the whole shard in one assignment
        members = list(range(first, min(first + shard_chunks, chunks)))
        parts = [synthetic_chunk(c, chunk_size, k, s, spec.num_classes) for c in members]
        lo, hi = members[0] * chunk_size, (members[-1] + 1) * chunk_size
        for name, arr in arrays.items():
            arr[lo:hi] = np.concatenate([p[name] for p in parts]).astype(arr.dtype, copy=False)
        for c, p in zip(members, parts):  # read back and commit, chunk by chunk, records last
            r = slice(c * chunk_size, (c + 1) * chunk_size)
            sums = {name: checksum(p[name].astype(arrays[name].dtype, copy=False)) for name in arrays}
            for name, arr in arrays.items():
                if checksum(arr[r]) != sums[name]:
                    raise RuntimeError(f"sharded store: chunk {c} {name} read back differs")
            key._write_record(c, {"chunk": c, "seeds": [r.start, r.stop], "checksums": sums, "algorithm": store_mod.CHECKSUM})


def count(path: Path) -> tuple[int, int, int]:
    """(files, bytes, commit-record files) under path."""
    files = size = records = 0
    for dirpath, _, names in os.walk(path):
        for n in names:
            files += 1
            size += os.path.getsize(os.path.join(dirpath, n))
            records += dirpath.endswith("/commits") and n != "zarr.json"
    return files, size, records


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> dict:
    before = load()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return {"seconds": round(seconds, 2), "load_before": before, "load_after": load(),
            "output": (proc.stdout.strip().splitlines() or [""])[-1][:300]}  # fmt: skip


def du(path: Path) -> int:
    return count(path)[1] if path.exists() else 0


def run_layout(layout: str, args: argparse.Namespace, env: dict[str, str]) -> dict:
    base = args.work / layout
    shutil.rmtree(base, ignore_errors=True)
    repo, remote = base / "repo", base / "remote"
    repo.mkdir(parents=True)
    dvc = [str(args.dvc)]
    for cmd in (["git", "init", "-q"], [*dvc, "init", "-q"], [*dvc, "config", "core.analytics", "false"],
                [*dvc, "config", "core.check_update", "false"], [*dvc, "remote", "add", "-d", "local", str(remote)]):  # fmt: skip
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    spec = spec_for(args.dtype)
    chunks = -(-args.trajectories // args.chunk)
    path = repo / "data" / "trajectories.zarr"
    out: dict = {"layout": layout, "chunks": chunks, "trajectories": chunks * args.chunk}
    before = load()
    t0 = time.perf_counter()
    if layout == "plain":
        write_plain(path, spec, chunks, args.chunk, args.compressor)
    else:
        write_sharded(path, spec, chunks, args.chunk, args.compressor, args.shard_chunks)
        out["shard_chunks"] = args.shard_chunks
        out["shards"] = -(-chunks // args.shard_chunks)
    out["write"] = {"seconds": round(time.perf_counter() - t0, 2), "load_before": before, "load_after": load()}
    files, size, records = count(path)
    out.update(files=files, bytes=size, record_files=records, data_files=files - records)
    if layout == "sharded":
        out["files_with_one_record_per_shard"] = files - records + out["shards"]
    out["write"]["mb_per_s"] = round(size / out["write"]["seconds"] / 1e6, 1)
    out["dvc_add"] = timed([*dvc, "add", "-q", "data/trajectories.zarr"], repo, env)
    out["dvc_push"] = timed([*dvc, "push", "-q"], repo, env)
    out["remote_files"], out["remote_bytes"], _ = count(remote)
    shutil.rmtree(path)
    shutil.rmtree(repo / ".dvc" / "cache")
    out["dvc_pull"] = timed([*dvc, "pull", "-q"], repo, env)
    out["dvc_status"] = timed([*dvc, "status"], repo, env)  # workspace against the cache
    out["dvc_status_cloud"] = timed([*dvc, "status", "-c"], repo, env)  # cache against the remote
    verify = [sys.executable, "-c", "from pipeline.cli import app; app()", "store", "verify", str(path)]
    out["store_verify"] = timed(verify, ROOT, env)
    out["peak_scratch_bytes"] = du(base)
    if not args.keep:
        shutil.rmtree(base)
    return out


def markdown(result: dict) -> str:
    lines = [
        f"{result['trajectories']} trajectories requested, chunk {result['chunk']}, {result['dtype']}, {result['compressor']}, "
        f"{result['shard_chunks']} chunks per shard; "
        f"machine {result['machine']}",
        "",
        "| layout | trajectories | files | data files | bytes | write s | dvc add s | dvc push s | dvc pull s | dvc status s "
        "| dvc status -c s | sfd store verify s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["layouts"]:
        def cell(name: str) -> str:
            return f"{r[name]['seconds']:.1f} (load {r[name]['load_before'][0]:.1f})"

        lines.append(f"| {r['layout']}{' (' + str(r['shard_chunks']) + ' chunks/shard)' if 'shard_chunks' in r else ''} | "
                     f"{r['trajectories']} | {r['files']} | {r['data_files']} | {r['bytes'] / 1e9:.2f} GB | {cell('write')} | "
                     f"{cell('dvc_add')} | {cell('dvc_push')} | {cell('dvc_pull')} | {cell('dvc_status')} | {cell('dvc_status_cloud')} | "
                     f"{cell('store_verify')} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trajectories", type=int, default=200_000)
    ap.add_argument("--chunk", type=int, default=256, help="trajectories per chunk (the presets' chunk_size)")
    ap.add_argument("--shard-chunks", type=int, default=64, help="chunks per shard in the sharded layout")
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--compressor", default="blosc-zstd")
    ap.add_argument("--layouts", default="plain,sharded")
    ap.add_argument("--work", type=Path, default=Path("/tmp/sfd-store-scale"))
    ap.add_argument("--dvc", type=Path, default=Path(shutil.which("dvc") or "/work/main/.venv/bin/dvc"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the scratch repositories")
    args = ap.parse_args(argv)
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PYTHONPATH=str(ROOT), GIT_AUTHOR_NAME="bench",
               GIT_AUTHOR_EMAIL="bench@example.com", GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@example.com")  # fmt: skip
    env["PATH"] = f"{args.dvc.parent}:{env.get('PATH', '')}"
    result = {
        "trajectories": args.trajectories, "chunk": args.chunk, "dtype": args.dtype, "compressor": args.compressor,
        "shard_chunks": args.shard_chunks,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}",
        "dvc": subprocess.run([str(args.dvc), "--version"], capture_output=True, text=True, env=env).stdout.strip(),
        "layouts": [],
    }  # fmt: skip
    import zarr

    result["zarr"] = zarr.__version__
    for layout in args.layouts.split(","):
        r = run_layout(layout, args, env)
        result["layouts"].append(r)
        print(json.dumps(r), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
