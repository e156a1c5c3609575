"""Trajectory store: layout, commit protocol, resume after a kill, concurrent writers, corruption, bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.core.param_checks import ParamError
from pipeline.diffusion.schedules import Schedule
from pipeline.teachers.loader import gmm_teacher
from pipeline.trajectories.generation import generate_trajectories, teacher_trajectories
from pipeline.trajectories.spec import TrajectorySpec, diff
from pipeline.trajectories.store import (
    ChunkCorruptError,
    KeyMismatchError,
    StoreError,
    gc_store,
    open_store,
    store_info,
    verify_store,
)

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 8


def small_teacher():
    return gmm_teacher(num_components=3, sample_shape=(1, 4, 4), std=0.3, seed=1, conditional=True)


def small_spec(teacher, **overrides) -> TrajectorySpec:
    kw = dict(
        teacher_hash=teacher.weights_hash,
        schedule=Schedule(num_steps=4),
        solver="dpmpp",
        M=3,
        label_policy="uniform_per_seed",
        num_classes=teacher.num_classes,
        sample_shape=teacher.sample_shape,
    )
    kw.update(overrides)
    return TrajectorySpec(**kw)


def arrays_bytes(store_path: Path, key: str) -> dict[str, bytes]:
    """Decoded bytes of every written chunk of every array (by chunk file name)."""
    out = {}
    k = open_store(store_path).key(key)
    for c in k.committed_chunks():
        for name, a in k.read_chunk(c).items():
            out[f"{name}/{c}"] = a.tobytes()
    return out


# A writer run in a subprocess; KILL_AT makes it die (os._exit, no cleanup) right after the
# chunk's data is written and before its commit record is.
WRITER = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {root!r})
    from pipeline.diffusion.schedules import Schedule
    from pipeline.teachers.loader import gmm_teacher
    from pipeline.trajectories.generation import generate_trajectories
    from pipeline.trajectories.spec import TrajectorySpec
    import pipeline.trajectories.store as ts
    kill_at = {kill_at!r}
    if kill_at is not None:
        original = ts.TrajectoryKey._write_record
        def dying(self, chunk, record):
            if chunk == kill_at:
                os._exit(9)
            original(self, chunk, record)
        ts.TrajectoryKey._write_record = dying
    t = gmm_teacher(num_components=3, sample_shape=(1, 4, 4), std=0.3, seed=1, conditional=True)
    spec = TrajectorySpec(teacher_hash=t.weights_hash, schedule=Schedule(num_steps=4), solver="dpmpp", M=3,
                          label_policy="uniform_per_seed", num_classes=3, sample_shape=(1, 4, 4))
    generate_trajectories(t, spec, range({n}), {store!r}, batch_size={batch}, chunk_size={chunk},
                          shard=({i}, {n_shards}), progress=False)
    """
)


def run_writer(store: Path, *, n: int, kill_at=None, shard=(0, 1), batch=CHUNK, wait=True):
    code = WRITER.format(root=str(ROOT), kill_at=kill_at, n=n, store=str(store), batch=batch, chunk=CHUNK,
                         i=shard[0], n_shards=shard[1])  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if wait:
        out, err = proc.communicate(timeout=120)
        return proc.returncode, err.decode()
    return proc


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory):
    """An uninterrupted single-process run over seeds 0..31 (4 chunks)."""
    path = tmp_path_factory.mktemp("ref") / "traj.zarr"
    t = small_teacher()
    spec = small_spec(t)
    stats = generate_trajectories(t, spec, range(32), path, batch_size=CHUNK, chunk_size=CHUNK, progress=False)
    return path, spec, stats


def test_layout_rows_addressed_by_seed_and_values_match_solver(reference_store):
    path, spec, stats = reference_store
    assert stats["chunks_generated"] == 4 and stats["chunks_reused"] == 0
    # 12 NFE per trajectory for DPM++(3M), N=4, M=3 (13 fine timestamps)
    assert stats["teacher_forward_images"] == 32 * 12
    root = zarr.open_group(str(path), mode="r")
    assert root.attrs["sfd_trajectory_store"] == {"format": "sfd-trajectory-store", "version": 1}
    group = root[spec.key]
    assert group.attrs["sfd_trajectory_key"]["description"] == spec.description()
    assert group["states"].chunks == (CHUNK, 3, 1, 4, 4)
    key = open_store(path).key(spec.key)
    assert key.committed_chunks() == [0, 1, 2, 3]
    chunk = key.read_chunk(2)
    seeds = list(range(16, 24))
    direct = teacher_trajectories(small_teacher().denoiser, spec, seeds)
    for name in ("x_T", "states", "labels"):
        np.testing.assert_array_equal(chunk[name], direct[name])  # float32 storage: bit-exact
    # x_T = t_max * z(seed)
    assert abs(float(np.std(chunk["x_T"])) - 80.0) < 20.0


def test_batch_size_does_not_change_bytes(reference_store, tmp_path):
    path, spec, _ = reference_store
    other = tmp_path / "b.zarr"
    t = small_teacher()
    generate_trajectories(t, spec, range(32), other, batch_size=24, chunk_size=CHUNK, progress=False)
    assert arrays_bytes(other, spec.key) == arrays_bytes(path, spec.key)


def test_resume_after_kill_between_write_and_commit(reference_store, tmp_path):
    path, spec, _ = reference_store
    store = tmp_path / "killed.zarr"
    rc, err = run_writer(store, n=32, kill_at=2)
    assert rc == 9, err
    key = open_store(store).key(spec.key)
    assert key.committed_chunks() == [0, 1]  # chunk 2 has data but no record: not committed
    assert (store / spec.key / "states" / "c" / "2").exists()
    with pytest.raises(StoreError, match="not committed"):
        key.read_chunk(2)
    t = small_teacher()
    stats = generate_trajectories(t, spec, range(32), store, batch_size=CHUNK, chunk_size=CHUNK, progress=False)
    assert (stats["chunks_reused"], stats["chunks_generated"]) == (2, 2)
    records = sorted(p.name for p in (store / spec.key / "commits").glob("[0-9]*.json"))
    assert records == ["0.json", "1.json", "2.json", "3.json"]  # no duplicate, no loss
    assert arrays_bytes(store, spec.key) == arrays_bytes(path, spec.key)
    timing = ("wall_seconds", "write_seconds")
    for c in range(4):
        a = json.loads((store / spec.key / "commits" / f"{c}.json").read_text())
        b = json.loads((path / spec.key / "commits" / f"{c}.json").read_text())
        for r in (a, b):  # wall times and the device's thread count differ between runs; everything else is identical
            assert all(r["cost"][k] >= 0 for k in timing) and r["cost"]["device"].startswith("cpu")
            r["cost"] = {k: v for k, v in r["cost"].items() if k not in (*timing, "device")}
        assert a == b
    # cost records survive the kill: every chunk is counted once, whichever run committed it.
    # DPM-Solver++(3M) over the M=3 fine grid of N=4: 12 teacher forwards per trajectory.
    assert stats["teacher_forward_images"] == 2 * CHUNK * 12  # the resumed run paid for chunks 2 and 3 only
    cost = key.stored_cost()
    assert (cost["trajectories"], cost["teacher_forward_images"], cost["unknown_trajectories"]) == (32, 32 * 12, 0)
    assert cost == {**key.stored_cost(range(32)), "wall_seconds": cost["wall_seconds"]}
    assert stats["stored_cost"]["teacher_forward_images"] == 32 * 12


def test_two_processes_fill_one_key(reference_store, tmp_path):
    path, spec, _ = reference_store
    store = tmp_path / "shared.zarr"
    procs = [run_writer(store, n=32, shard=(i, 2), wait=False) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    key = open_store(store).key(spec.key)
    assert key.committed_chunks() == [0, 1, 2, 3]
    assert arrays_bytes(store, spec.key) == arrays_bytes(path, spec.key)
    assert verify_store(open_store(store)) == (4, [])


def test_larger_range_and_partial_chunk_reuse(reference_store, tmp_path):
    _, spec, _ = reference_store
    store = tmp_path / "grow.zarr"
    t = small_teacher()
    s1 = generate_trajectories(t, spec, range(0, 10), store, batch_size=CHUNK, chunk_size=CHUNK, progress=False)
    assert s1["chunks_generated"] == 2  # seeds 0-9 touch chunks 0 and 1: whole chunks are generated
    s2 = generate_trajectories(t, spec, range(0, 20), store, batch_size=CHUNK, chunk_size=CHUNK, progress=False)
    assert (s2["chunks_reused"], s2["chunks_generated"]) == (2, 1)
    assert store_info(open_store(store))[0]["committed_seeds"] == "0-23"


def test_corrupted_chunk_detected(reference_store, tmp_path):
    import shutil

    path, spec, _ = reference_store
    store = tmp_path / "corrupt.zarr"
    shutil.copytree(path, store)
    # Rewrite chunk 1 of states with other (valid, decodable) values: only the checksum can tell.
    arr = zarr.open_array(str(store / spec.key / "states"), mode="r+")
    arr[CHUNK : 2 * CHUNK] = arr[CHUNK : 2 * CHUNK] + 1e-3
    # Damage chunk 3 of x_T at the byte level.
    f = store / spec.key / "x_T" / "c" / "3" / "0" / "0" / "0"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    f.write_bytes(bytes(raw))
    checked, problems = verify_store(open_store(store))
    assert checked == 4
    assert sorted(p.chunk for p in problems) == [1, 3]
    key = open_store(store).key(spec.key)
    with pytest.raises(ChunkCorruptError, match="chunk 1: states does not match its checksum"):
        key.read_chunk(1)
    key.read_chunk(0)  # the others still read
    cli = subprocess.run([sys.executable, "-m", "pipeline.cli", "store", "verify", str(store)],
                         capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert cli.returncode == 1
    assert f"{spec.key} chunk 1" in cli.stderr and f"{spec.key} chunk 3" in cli.stderr
    # --drop-bad uncommits them; the next run regenerates exactly those, byte-identical
    verify_store(open_store(store, mode="a"), drop_bad=True)
    stats = generate_trajectories(small_teacher(), spec, range(32), store, batch_size=CHUNK, chunk_size=CHUNK, progress=False)
    assert stats["chunks_generated"] == 2
    assert arrays_bytes(store, spec.key) == arrays_bytes(path, spec.key)


def test_float16_storage_and_key(tmp_path):
    t = small_teacher()
    s32, s16 = small_spec(t), small_spec(t, storage_dtype="float16")
    assert s32.key != s16.key
    assert diff(s32.description(), s16.description()) == ["storage_dtype: expected 'float32', found 'float16'"]
    generate_trajectories(t, s32, range(8), tmp_path / "s", chunk_size=CHUNK, progress=False)
    generate_trajectories(t, s16, range(8), tmp_path / "s", chunk_size=CHUNK, progress=False)
    st = open_store(tmp_path / "s")
    a32, a16 = st.key(s32.key).read_chunk(0), st.key(s16.key).read_chunk(0)
    assert a16["states"].dtype == np.float16
    # fp16 keeps ~11 bits: relative error <= 2^-11 per value
    np.testing.assert_allclose(a16["states"].astype(np.float32), a32["states"], rtol=2**-11, atol=1e-4)


def test_bfloat16_storage_bits_checksums_and_key(tmp_path):
    """bfloat16: its own key; stored as the upper 16 bits of each float32 (a uint16 Zarr array), rounded to nearest
    even exactly as torch's bfloat16; read back as float32; checksums over the stored bits still catch a flip."""
    import torch

    t = small_teacher()
    s32, sbf = small_spec(t), small_spec(t, storage_dtype="bfloat16")
    assert diff(s32.description(), sbf.description()) == ["storage_dtype: expected 'float32', found 'bfloat16'"]
    generate_trajectories(t, s32, range(8), tmp_path / "s", chunk_size=CHUNK, progress=False)
    generate_trajectories(t, sbf, range(8), tmp_path / "s", chunk_size=CHUNK, progress=False)
    st = open_store(tmp_path / "s")
    a32, abf = st.key(s32.key).read_chunk(0), st.key(sbf.key).read_chunk(0)
    assert abf["states"].dtype == np.float32 and st.key(sbf.key).array("states").dtype == np.uint16
    expected = torch.from_numpy(a32["states"]).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(abf["states"], expected)  # bit for bit torch's rounding
    np.testing.assert_allclose(abf["states"], a32["states"], rtol=2**-8, atol=0)  # 8 mantissa bits
    arr = open_store(tmp_path / "s", mode="a").key(sbf.key).array("states")
    arr[0, 0, 0, 0, 0] = arr[0, 0, 0, 0, 0] ^ 1  # flip one stored bit
    with pytest.raises(ChunkCorruptError, match="does not match its checksum"):
        open_store(tmp_path / "s").key(sbf.key).read_chunk(0)


def test_ls_and_gc(reference_store, tmp_path):
    t = small_teacher()
    store = tmp_path / "gc.zarr"
    keep, drop = small_spec(t), small_spec(t, schedule=Schedule(num_steps=3))
    for spec in (keep, drop):
        generate_trajectories(t, spec, range(8), store, chunk_size=CHUNK, progress=False)
    info = {e["key"]: e for e in store_info(open_store(store))}
    assert set(info) == {keep.key, drop.key}
    assert info[keep.key]["committed_seeds"] == "0-7" and info[keep.key]["size_bytes"] > 0
    with pytest.raises(StoreError, match="at least one key"):
        gc_store(open_store(store, mode="a"), [])
    assert gc_store(open_store(store, mode="a"), [keep.key[:10]]) == [drop.key]
    assert open_store(store).keys() == [keep.key]
    ls = subprocess.run([sys.executable, "-m", "pipeline.cli", "store", "ls", str(store)],
                        capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert ls.returncode == 0 and keep.key in ls.stdout and "N=4" in ls.stdout
    assert f"cost {8 * 12} teacher forward images" in ls.stdout  # 8 seeds, 12 teacher forwards each


def test_bad_inputs_write_nothing(tmp_path):
    t = small_teacher()
    with pytest.raises(ParamError, match="solver: got 'rk4'"):
        small_spec(t, solver="rk4")
    # a path below a regular file cannot be created
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="is a file, not a directory"):
        generate_trajectories(t, small_spec(t), range(8), blocker / "traj.zarr", chunk_size=CHUNK, progress=False)
    # stores of another format
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(StoreError, match="not an SFD trajectory store"):
        generate_trajectories(t, small_spec(t), range(8), tmp_path / "plain.zarr", chunk_size=CHUNK, progress=False)
    assert sorted(p.name for p in (tmp_path / "plain.zarr").iterdir()) == ["zarr.json"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.csv").write_text("a,b\n")
    with pytest.raises(StoreError, match="non-empty directory without zarr.json"):
        open_store(other, mode="a")
    v2 = tmp_path / "v2.zarr"
    zarr.open_group(str(v2), mode="w", zarr_format=2)
    with pytest.raises(StoreError, match="Zarr v2"):
        open_store(v2, mode="a")
    with pytest.raises(StoreError, match="no trajectory store"):
        open_store(tmp_path / "missing.zarr")
    assert not (tmp_path / "missing.zarr").exists()
    # an existing key with another chunk size is refused, not silently re-chunked
    generate_trajectories(t, small_spec(t), range(8), tmp_path / "ok.zarr", chunk_size=CHUNK, progress=False)
    with pytest.raises(StoreError, match="chunk_size 8, asked for 4"):
        generate_trajectories(t, small_spec(t), range(8), tmp_path / "ok.zarr", chunk_size=4, progress=False)


def test_open_spec_names_differences(reference_store):
    path, spec, _ = reference_store
    st = open_store(path)
    stale = small_spec(small_teacher(), teacher_hash="0" * 32, schedule=Schedule(num_steps=4, rho=5.0))
    with pytest.raises(KeyMismatchError) as e:
        st.open_spec(stale)
    msg = str(e.value)
    assert "schedule.rho: expected 5.0, found 7.0" in msg
    assert f"teacher_hash: expected '{'0' * 32}', found '{spec.teacher_hash}'" in msg
