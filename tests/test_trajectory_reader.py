"""Streaming reader: every seed once per epoch, epoch-aware shuffles, workers, checksums, key checks."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader

from pipeline.diffusion.schedules import Schedule
from pipeline.teachers.loader import gmm_teacher
from pipeline.trajectories.generation import generate_trajectories
from pipeline.trajectories.reader import TrajectoryBatch, TrajectoryDataset
from pipeline.trajectories.spec import TrajectorySpec
from pipeline.trajectories.store import ChunkCorruptError, KeyMismatchError, open_store

CHUNK = 8
NUM_SEEDS = 40  # 5 chunks


def small_teacher():
    return gmm_teacher(num_components=3, sample_shape=(1, 4, 4), std=0.3, seed=1, conditional=True)


def small_spec(teacher, **overrides) -> TrajectorySpec:
    kw = dict(teacher_hash=teacher.weights_hash, schedule=Schedule(num_steps=4), M=3, label_policy="uniform_per_seed",
              num_classes=teacher.num_classes, sample_shape=teacher.sample_shape)  # fmt: skip
    kw.update(overrides)
    return TrajectorySpec(**kw)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("reader") / "traj.zarr"
    t = small_teacher()
    spec = small_spec(t)
    generate_trajectories(t, spec, range(NUM_SEEDS), path, batch_size=16, chunk_size=CHUNK, progress=False)
    return path, spec


def all_seeds(ds) -> list[int]:
    return [int(s) for b in ds for s in b.seeds]


def test_batches_cover_every_seed_once_with_stored_values(store):
    path, spec = store
    ds = TrajectoryDataset(path, spec, batch_size=12)
    batches = list(ds)
    assert len(batches) == len(ds) == 4  # 40 = 12 + 12 + 12 + 4
    b = batches[0]
    assert isinstance(b, TrajectoryBatch)
    assert b.x_T.shape == (12, 1, 4, 4) and b.x_T.dtype == torch.float32
    assert b.states.shape == (12, 3, 1, 4, 4) and b.states.dtype == torch.float32
    assert b.labels.dtype == torch.int64 and b.seeds.dtype == torch.int64
    seeds = [int(s) for x in batches for s in x.seeds]
    assert sorted(seeds) == list(range(NUM_SEEDS))
    assert seeds != sorted(seeds)  # shuffled
    key = open_store(path).key(spec.key)
    for x in batches:
        for i, s in enumerate(x.seeds.tolist()):
            chunk = key.read_chunk(s // CHUNK)
            np.testing.assert_array_equal(x.states[i].numpy(), chunk["states"][s % CHUNK])
            np.testing.assert_array_equal(x.x_T[i].numpy(), chunk["x_T"][s % CHUNK])
            assert int(x.labels[i]) == int(chunk["labels"][s % CHUNK])


def test_shuffle_is_a_function_of_seed_and_epoch(store):
    path, spec = store
    a = TrajectoryDataset(path, spec, batch_size=8, shuffle_seed=3)
    b = TrajectoryDataset(path, spec, batch_size=8, shuffle_seed=3)
    assert all_seeds(a) == all_seeds(b)
    first = all_seeds(a)
    a.set_epoch(1)
    second = all_seeds(a)
    assert second != first and sorted(second) == sorted(first)
    unshuffled = TrajectoryDataset(path, spec.key, batch_size=8, shuffle=False)
    assert all_seeds(unshuffled) == list(range(NUM_SEEDS))


def test_seed_subset_and_missing_seeds(store):
    path, spec = store
    ds = TrajectoryDataset(path, spec, batch_size=5, seeds=range(3, 14))
    assert sorted(all_seeds(ds)) == list(range(3, 14))
    with pytest.raises(KeyMismatchError, match="seeds not generated yet"):
        list(TrajectoryDataset(path, spec, batch_size=5, seeds=range(35, 50)))


def test_cycle_runs_past_one_epoch(store):
    path, spec = store
    ds = TrajectoryDataset(path, spec, batch_size=16, cycle=True, drop_last=True)
    batches = list(itertools.islice(iter(ds), 7))  # 112 rows > 40
    counts = np.bincount(torch.cat([b.seeds for b in batches]).numpy(), minlength=NUM_SEEDS)
    assert counts.sum() == 112 and counts.min() >= 2  # two full epochs inside, each seed once per epoch


def test_dataloader_workers_split_chunks(store):
    path, spec = store
    ds = TrajectoryDataset(path, spec, batch_size=8)
    loader = DataLoader(ds, batch_size=None, num_workers=2)
    seeds = sorted(int(s) for b in loader for s in b.seeds)
    assert seeds == list(range(NUM_SEEDS))


def test_mismatched_key_refused_with_differences(store):
    path, spec = store
    stale = small_spec(small_teacher(), teacher_hash="f" * 32)
    with pytest.raises(KeyMismatchError, match=f"teacher_hash: expected '{'f' * 32}', found '{spec.teacher_hash}'"):
        list(TrajectoryDataset(path, stale, batch_size=8))
    other = small_spec(small_teacher(), schedule=Schedule(num_steps=5))
    with pytest.raises(KeyMismatchError, match="schedule.num_steps: expected 5, found 4"):
        list(TrajectoryDataset(path, other, batch_size=8))


def test_corrupted_chunk_raises_while_reading(store, tmp_path):
    import shutil

    path, spec = store
    bad = tmp_path / "bad.zarr"
    shutil.copytree(path, bad)
    arr = zarr.open_array(str(bad / spec.key / "states"), mode="r+")
    arr[2 * CHUNK : 3 * CHUNK] = 0.0
    with pytest.raises(ChunkCorruptError, match="chunk 2: states does not match its checksum"):
        list(TrajectoryDataset(bad, spec, batch_size=8))
    assert sorted(all_seeds(TrajectoryDataset(bad, spec, batch_size=8, verify=False))) == list(range(NUM_SEEDS))


def test_fsspec_url(store):
    path, spec = store
    ds = TrajectoryDataset(f"file://{path}", spec, batch_size=16)
    assert sorted(all_seeds(ds)) == list(range(NUM_SEEDS))
