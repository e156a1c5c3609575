"""Sharing a trajectory store: DVC push / pull through a local-directory remote, dvc import, fsspec URLs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.diffusion.schedules import Schedule
from pipeline.teachers.loader import gmm_teacher
from pipeline.trajectories.generation import generate_trajectories
from pipeline.trajectories.reader import TrajectoryDataset
from pipeline.trajectories.spec import TrajectorySpec
from pipeline.trajectories.store import open_store, verify_store

ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
       "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}  # fmt: skip


def sh(*args: str, cwd: Path) -> str:
    cmd = [sys.executable, "-m", "dvc", *args[1:]] if args[0] == "dvc" else list(args)
    r = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True)
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
