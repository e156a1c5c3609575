"""Sharing a trajectory store: DVC push / pull through a local-directory remote and through S3 (moto's server on
localhost: push, pull, run-cache, dvc import), fsspec URLs, and distillation streaming straight from s3://."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.diffusion.schedules import Schedule
from pipeline.teachers.loader import gmm_teacher
from pipeline.trajectories.generation import generate_trajectories
from pipeline.trajectories.reader import TrajectoryDataset
from pipeline.trajectories.spec import TrajectorySpec
from pipeline.trajectories.store import open_store, verify_store

ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
       "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}  # fmt: skip


def sh(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    cmd = [sys.executable, "-m", "dvc", *args[1:]] if args[0] == "dvc" else list(args)
    r = subprocess.run(cmd, cwd=cwd, env=env or ENV, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def make_repo(path: Path) -> None:
    path.mkdir()
    sh("git", "init", "-q", cwd=path)
    sh("git", "config", "user.name", "t", cwd=path)
    sh("git", "config", "user.email", "t@example.com", cwd=path)
    sh("dvc", "init", "-q", cwd=path)
    sh("dvc", "config", "core.analytics", "false", cwd=path)
    sh("dvc", "config", "core.check_update", "false", cwd=path)


@pytest.fixture
def spec_and_teacher():
    t = gmm_teacher(num_components=3, sample_shape=(1, 4, 4), std=0.3, seed=1)
    spec = TrajectorySpec(teacher_hash=t.weights_hash, schedule=Schedule(num_steps=4), M=3, sample_shape=(1, 4, 4))
    return spec, t


def test_dvc_push_pull_and_import(tmp_path, spec_and_teacher):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    spec, teacher = spec_and_teacher
    repo, remote = tmp_path / "producer", tmp_path / "remote"
    make_repo(repo)
    store = repo / "data" / "traj.zarr"
    generate_trajectories(teacher, spec, range(24), store, chunk_size=8, progress=False)
    before = {p.relative_to(store): p.read_bytes() for p in store.rglob("*") if p.is_file()}
    sh("dvc", "add", "data/traj.zarr", cwd=repo)
    sh("dvc", "remote", "add", "-d", "local", str(remote), cwd=repo)
    sh("dvc", "push", cwd=repo)
    shutil.rmtree(store)
    shutil.rmtree(repo / ".dvc" / "cache")
    sh("dvc", "pull", cwd=repo)
    after = {p.relative_to(store): p.read_bytes() for p in store.rglob("*") if p.is_file()}
    assert after == before
    assert verify_store(open_store(store)) == (3, [])

    # Another team: dvc import from the producer repository (git history + its default remote).
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-q", "-m", "trajectories", cwd=repo)
    consumer = tmp_path / "consumer"
    make_repo(consumer)
    sh("dvc", "import", str(repo), "data/traj.zarr", "-o", "traj.zarr", cwd=consumer)
    assert verify_store(open_store(consumer / "traj.zarr")) == (3, [])
    ds = TrajectoryDataset(consumer / "traj.zarr", spec, batch_size=10)
    assert sorted(int(s) for b in ds for s in b.seeds) == list(range(24))


def test_open_from_fsspec_url(tmp_path, spec_and_teacher):
    spec, teacher = spec_and_teacher
    # write and read through file:// URLs (FsspecStore); memory:// shows any fsspec filesystem works
    url = f"file://{tmp_path}/url.zarr"
    generate_trajectories(teacher, spec, range(16), url, chunk_size=8, progress=False)
    assert verify_store(open_store(url)) == (2, [])
    assert open_store(tmp_path / "url.zarr").key(spec.key).committed_chunks() == [0, 1]
    generate_trajectories(teacher, spec, range(8), "memory://sfd-test/traj.zarr", chunk_size=8, progress=False)
    ds = TrajectoryDataset("memory://sfd-test/traj.zarr", spec, batch_size=8)
    assert sorted(int(s) for b in ds for s in b.seeds) == list(range(8))


# ------------------------------------------------------------------ S3-compatible object storage (moto's server)

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "sfd"


@pytest.fixture(scope="module")
def s3():
    """A real S3 endpoint on localhost: moto's server (HTTP, in a thread of this process), one bucket, and the
    environment every client here reads (boto3, s3fs, dvc-s3): credentials and AWS_ENDPOINT_URL. Yields
    (endpoint, env, requests): ``requests`` collects every HTTP request line the server logs."""
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    import logging
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    requests: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            requests.append(record.getMessage())

    log = logging.getLogger("werkzeug")
    handler = Collect()
    log.addHandler(handler)
    log.propagate, propagate = False, log.propagate
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    try:
        yield endpoint, env, requests
    finally:
        log.removeHandler(handler)
        log.propagate = propagate
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


DVC_YAML = """vars:
  - inventory.yaml
stages:
  trajectories:
    cmd: python -m stages.trajectories --params params.yaml --section trajectories --out data/traj.zarr
      --summary metrics/traj.json --cost cost.json --no-progress
    params: [trajectories]
    outs:
      - data/traj.zarr:
          persist: true
    metrics:
      - metrics/traj.json:
          cache: false
  inventory:
    cmd: python -m pipeline.cli store ls data/traj.zarr ${options} > inventory.txt
    deps: [data/traj.zarr]
    params:
      - inventory.yaml:
          - options
    outs: [inventory.txt]
"""
TRAJ = {"trajectories": {"teacher": {"source": "gmm", "num_components": 3, "sample_shape": [1, 4, 4], "std": 0.3, "seed": 1},
                         "seeds": "0-47", "chunk_size": 16, "batch_size": 16, "M": 1,
                         "schedule": {"kind": "polynomial", "num_steps": 4, "t_min": 0.006, "t_max": 80.0, "rho": 7.0}}}


def test_readme_sharing_commands_through_an_s3_remote(tmp_path, s3):
    """The README's commands against S3: the producer runs and pushes (cache and run-cache), a clone pulls the store
    and the run-cache; its `dvc repro` runs nothing, and forcing the trajectory stage generates 0 trajectories."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    import yaml

    endpoint, env, _ = s3
    env = {**ENV, **env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # `python` in dvc.yaml: this one
    run = lambda *args, cwd: sh(*args, cwd=cwd, env=env)  # noqa: E731
    producer = tmp_path / "producer"
    make_repo(producer)
    (producer / "dvc.yaml").write_text(DVC_YAML)
    (producer / "params.yaml").write_text(yaml.safe_dump(TRAJ))
    params = lambda options: yaml.safe_dump({"options": options})  # noqa: E731
    (producer / "inventory.yaml").write_text(params(""))
    (producer / ".gitignore").write_text("cost.json\n")
    run("dvc", "remote", "add", "-d", "shared", f"s3://{BUCKET}/sfd-cache", cwd=producer)
    run("dvc", "remote", "modify", "shared", "endpointurl", endpoint, cwd=producer)
    run("dvc", "repro", cwd=producer)
    assert json.loads((producer / "metrics" / "traj.json").read_text())["chunks_generated"] == 3
    table = (producer / "inventory.txt").read_text()  # an experiment the producer runs and pushes, never commits ...
    run("dvc", "push", cwd=producer)
    (producer / "inventory.yaml").write_text(params("--json"))
    run("dvc", "repro", cwd=producer)  # ... then the committed variant
    run("dvc", "push", cwd=producer)
    run("dvc", "push", "--run-cache", cwd=producer)
    run("git", "add", "-A", cwd=producer)
    run("git", "commit", "-q", "-m", "pipeline", cwd=producer)

    consumer = tmp_path / "consumer"
    run("git", "clone", "-q", str(producer), str(consumer), cwd=tmp_path)
    run("dvc", "pull", "data/traj.zarr", cwd=consumer)  # just the store
    assert not (consumer / "inventory.txt").exists()
    run("dvc", "pull", "--run-cache", cwd=consumer)
    assert (consumer / "inventory.txt").read_bytes() == (producer / "inventory.txt").read_bytes()
    (consumer / "inventory.yaml").write_text(params(""))  # the producer's uncommitted experiment
    out = run("dvc", "repro", "--pull", cwd=consumer)  # --pull: the outputs of runs found in the run-cache
    assert "'trajectories' didn't change, skipping" in out
    assert "'inventory' is cached - skipping run, checking out outputs" in out  # restored from the run-cache
    assert (consumer / "inventory.txt").read_text() == table
    store = consumer / "data" / "traj.zarr"
    produced = {p.relative_to(producer): p.read_bytes() for p in (producer / "data" / "traj.zarr").rglob("*") if p.is_file()}
    assert {p.relative_to(consumer): p.read_bytes() for p in store.rglob("*") if p.is_file()} == produced
    run("dvc", "repro", "-f", "trajectories", cwd=consumer)  # the stage itself, run again on the pulled store
    summary = json.loads((consumer / "metrics" / "traj.json").read_text())
    assert summary["chunks_generated"] == 0 and summary["trajectories_generated"] == 0
    assert summary["keys"][0]["chunks_reused"] == 3


def test_distill_streams_a_store_from_s3_reading_each_chunk_once(tmp_path, s3):
    """zarr over s3fs: the distill stage reads s3:// directly (no pull), every chunk object at most once, and trains
    the same student as from a local copy of the store (bit for bit)."""
    from pipeline.config.params import parse_params
    from pipeline.core.checkpoints import load_checkpoint
    from pipeline.distill.sfd import run_distill_stage
    from pipeline.trajectories.generation import run_trajectories_stage

    _, _, requests = s3
    raw = json.loads(json.dumps(TRAJ))
    raw["loss"] = "l1"
    raw["distill"] = {"student_network": {"model_channels": 8, "channel_mult": [1], "num_blocks": 1, "attn_resolutions": []},
                      "kimg": 0.048, "batch_size": 16, "lr": 1e-3, "checkpoint_every_kimg": 0.016, "device": "cpu"}
    p = parse_params(raw)
    url = f"s3://{BUCKET}/stream/traj.zarr"
    run_trajectories_stage(p.trajectories, url, name="trajectories", progress=False)  # written straight to S3 too
    local = tmp_path / "local.zarr"
    run_trajectories_stage(p.trajectories, local, name="trajectories", progress=False)
    results = {}
    for name, store in (("local", str(local)), ("s3", url)):
        requests.clear()
        results[name] = run_distill_stage(p.distill, trajectories=p.trajectories, loss="l1", name="distill", store=store,
                                          teacher_ckpt=None, out=tmp_path / name, state_dir=None, progress=False)
    chunk_gets = [g for g in (r.split('"GET ', 1)[1].split()[0] for r in requests if '"GET ' in r) if "/c/" in g]
    objects = set(chunk_gets)
    assert len(objects) == 3 * 2, sorted(objects)  # 3 chunks x (x_T, states), over HTTP
    first_pass = chunk_gets[: len(objects)]
    assert set(first_pass) == objects  # the epoch read every chunk object once before any again (later GETs:
    # the reader's prefetch of the next epoch, which this one-epoch budget never consumes)
    a, b = load_checkpoint(tmp_path / "local")[0], load_checkpoint(tmp_path / "s3")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert results["s3"]["rows_per_key"] == results["local"]["rows_per_key"]
