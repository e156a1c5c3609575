"""Fault injection: nothing wrong is ever committed, every failure is one line, a re-run after the fault is lifted
is bit-identical to a clean run (issue 20).

Every case drives the stages the way dvc.yaml calls them (``python -m stages.X ...`` in a subprocess where the
fault needs a process: a file-size limit, a SIGKILL at a checkpoint, an injected ENOSPC; in-process through
the same typer app, ``stages.common.stage_app``, otherwise) or the ``sfd`` CLI. Tiny sizes: a 12k-parameter
conditional U-Net teacher on 1x4x4 samples, 32 seeds, 8-batch distillation. Faults:

- a teacher giving NaN (NaN weights; NaN for one class label only) -> the trajectories stage commits nothing;
- an old store holding a committed NaN chunk, flipped bytes in a committed chunk -> verify / the stage find it;
- file-size limit (RLIMIT_FSIZE: EFBIG) and a full disk (ENOSPC, injected) during chunk writes and state saves;
- a read-only store (chmod; ``chattr +i`` as root, whom chmod does not stop; else an injected EROFS);
- a flipped bit, 16 overwritten bytes, a truncated file in the resume state after a SIGKILL;
- two writers creating one key with different chunk sizes;
- a dataset too small for its held-out split, num_classes without labels, a deleted params section.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from fault_injection import injected, read_only
from pipeline.core.checkpoints import save_checkpoint
from pipeline.networks.unet import build_network
from pipeline.trajectories.store import StoreError, checksum, open_store
from stages.common import stage_app

ROOT = Path(__file__).resolve().parents[1]
SCHEDULE = {"kind": "polynomial", "num_steps": 3, "t_min": 0.006, "t_max": 80.0, "rho": 7.0}
NET = {"img_resolution": 4, "in_channels": 1, "model_channels": 8, "channel_mult": [1], "num_blocks": 1,
       "attn_resolutions": [], "label_dim": 3}  # fmt: skip
NAN_CLASS = 0  # seed_labels(0-15, 3): class 0 is seeds 1, 4, 6, 7, 11, 12, 13
PARAMS = {
    "seed": 0, "device": "cpu", "loss": "l1",
    "trajectories": {"solver": "dpmpp", "M": 1, "seeds": "0-31", "chunk_size": 16, "batch_size": 16, "schedule": SCHEDULE,
                     "compressor": "none"},
    "distill": {"kimg": 0.064, "batch_size": 8, "lr": 1e-3, "checkpoint_every_kimg": 0.016, "log_every_kimg": 0.016},
}  # fmt: skip  8 batches of 8, a state every 2 batches


# --------------------------------------------------------------------------- helpers


def make_teacher(path: Path, fault: str | None = None) -> Path:
    torch.manual_seed(0)
    state = build_network(**NET).state_dict()
    if fault == "nan_class":
        state["map_label.weight"][NAN_CLASS] = float("nan")
    elif fault == "nan_weights":
        next(v for k, v in state.items() if k.endswith("weight") and v.dim() == 4).view(-1)[0] = float("nan")
    config = {"network": NET, "sigma_data": 0.5, "data": {"sample_shape": [1, 4, 4], "num_classes": 3}, "provenance": {}}
    save_checkpoint(path, state, config)
    return path


def write_params(path: Path, **sections) -> Path:
    raw = json.loads(json.dumps(PARAMS))
    for name, value in sections.items():
        if value is None:
            raw.pop(name)
        else:
            raw[name] = {**raw.get(name, {}), **value}
    path.write_text(yaml.safe_dump(raw))
    return path


def traj_args(tmp: Path, store: Path, teacher: Path, params: Path | None = None) -> list[str]:
    return ["--params", str(params or tmp / "params.yaml"), "--section", "trajectories", "--out", str(store),
            "--teacher-ckpt", str(teacher), "--summary", str(tmp / "summary.json"), "--cost", str(tmp / "cost.json"),
            "--no-progress"]  # fmt: skip


def distill_args(tmp: Path, store: Path, teacher: Path, run: Path) -> list[str]:
    return ["--params", str(tmp / "params.yaml"), "--section", "distill", "--store", str(store), "--teacher-ckpt",
            str(teacher), "--out", str(run / "out"), "--state", str(run / "state"), "--metrics", str(run / "m.json"),
            "--live", str(run / "live"), "--cost", str(run / "cost.json"), "--no-progress"]  # fmt: skip


def in_process(stage: str, args: list[str]):
    """``python -m stages.<stage> ARGS`` in this process, through the typer app stages.common.run executes."""
    return CliRunner().invoke(stage_app(importlib.import_module(f"stages.{stage}").main), args)


def subprocess_stage(stage: str, args: list[str], *, faults: str | None = None, fsize: int | None = None):
    """``python -m stages.<stage> ARGS`` in a child process; ``faults``: tests/fault_injection.py's SFD_FAULTS;
    ``fsize``: RLIMIT_FSIZE in bytes (a larger file write fails with EFBIG)."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", f"stages.{stage}", *args]
    if faults is not None:
        env["SFD_FAULTS"] = faults
        cmd = [sys.executable, str(ROOT / "tests" / "fault_injection.py"), f"stages.{stage}", *args]
    limit = None if fsize is None else (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize)))
    # run outside the project's checkout, as in a temporary folder: inside it DVCLive would open the checkout as its
    # DVC repository, whose state database the file-size limit can hit before the write under test
    return subprocess.run(cmd, cwd=tempfile.gettempdir(), env=env, capture_output=True, text=True, preexec_fn=limit,
                          timeout=300)


def sfd(args: list[str]):
    from pipeline.cli import app

    return CliRunner().invoke(app, args)


def exit_code(result) -> int:
    return result.returncode if isinstance(result, subprocess.CompletedProcess) else result.exit_code


def one_error_line(result) -> str:
    """The result's stderr is exactly one line, ``error: ...``, and the exit code is 2."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert exit_code(result) == 2 and len(lines) == 1 and lines[0].startswith("error: "), (exit_code(result), result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    return lines[0]


def store_content(store: Path) -> dict[str, dict[int, tuple[dict[str, str], str]]]:
    """Every committed chunk of every key: (its record's checksums, sha256 of its arrays' bytes). Records' wall
    times differ between runs; everything that is data must not."""
    handle = open_store(store)
    out = {}
    for name in handle.keys():
        key = handle.key(name)
        chunks = {}
        for c in key.committed_chunks():
            data = key.read_chunk(c, verify=True)
            digest = hashlib.sha256(b"".join(np.ascontiguousarray(data[a]).tobytes() for a in key.array_names)).hexdigest()
            chunks[c] = (key.read_record(c)["checksums"], digest)
        out[name] = chunks
    return out


def model_digest(directory: Path) -> str:
    from safetensors.torch import load_file

    from pipeline.core.hashing import hash_state_dict

    return hash_state_dict(load_file(str(directory / "model.safetensors")))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A good teacher, the params file, a clean store (seeds 0-31) and a clean distill run: the references."""
    tmp = tmp_path_factory.mktemp("faults")
    teacher = make_teacher(tmp / "teacher")
    write_params(tmp / "params.yaml")
    clean = tmp / "clean.zarr"
    r = in_process("trajectories", traj_args(tmp, clean, teacher))
    assert r.exit_code == 0, r.output
    run = in_process("distill", distill_args(tmp, clean, teacher, tmp / "clean_run"))
    assert run.exit_code == 0, run.output
    return {"tmp": tmp, "teacher": teacher, "clean": clean, "content": store_content(clean),
            "model": model_digest(tmp / "clean_run" / "out")}


def fresh(world, tmp_path, name: str = "t.zarr") -> Path:
    """A copy of the clean store to damage."""
    store = tmp_path / name
    shutil.copytree(world["clean"], store)
    return store


def the_key(store: Path):
    handle = open_store(store, mode="a")
    (name,) = handle.keys()
    return handle.key(name)


# --------------------------------------------------------------------------- trajectories: non-finite values


@pytest.mark.parametrize("fault", ["nan_class", "nan_weights"])
def test_nonfinite_teacher_commits_nothing_and_names_seeds_chunk_teacher(world, tmp_path, fault):
    bad_teacher = make_teacher(tmp_path / f"teacher_{fault}", fault)
    store = tmp_path / "t.zarr"
    r = in_process("trajectories", traj_args(world["tmp"], store, bad_teacher))
    line = one_error_line(r)
    assert "non-finite teacher states (NaN or inf)" in line and "chunk 0" in line and str(bad_teacher) in line
    if fault == "nan_class":  # only the seeds drawn with that class: 1, 4, 6, 7, 11, 12, 13 of chunk 0
        assert "for 7 of 16 seeds of chunk 0 (seeds 1, 4, 6, 7, 11, 12, 13)" in line
    else:
        assert "for 16 of 16 seeds" in line
    assert "nothing was committed" in line
    assert all(not chunks for chunks in store_content(store).values())  # the key exists, no chunk is committed
    # the fault lifted (the good teacher): the same store ends as a clean run's
    r = in_process("trajectories", traj_args(world["tmp"], store, world["teacher"]))
    assert r.exit_code == 0, r.output
    content = store_content(store)
    assert {k: v for k, v in content.items() if v} == world["content"]


def test_old_store_with_a_committed_nan_chunk_is_found_dropped_and_regenerated(world, tmp_path):
    store = fresh(world, tmp_path)
    key = the_key(store)
    rows = slice(16, 32)  # chunk 1, rewritten as a writer that did not check finiteness would have committed it
    states = key.array("states")[rows]
    states[3, 1, 0, 2, 2] = np.nan
    key.array("states")[rows] = states
    record = key.read_record(1)
    record["checksums"]["states"] = checksum(states)
    key._write_record(1, record)

    r = sfd(["store", "verify", str(store)])
    assert r.exit_code == 1
    assert f"BAD {key.name} chunk 1: non-finite values (NaN or inf) in 1 of 16 rows (seeds 19)" in r.stderr
    assert "run `sfd store verify`" not in r.output and f"`sfd store verify --drop-bad {store}` uncommits them" in r.stderr
    r = sfd(["store", "verify", "--drop-bad", str(store)])
    assert r.exit_code == 1 and "uncommitted" in r.stderr and open_store(store).key(key.name).committed_chunks() == [0]
    r = in_process("trajectories", traj_args(world["tmp"], store, world["teacher"]))
    assert r.exit_code == 0 and "1 chunks generated, 1 reused (verified)" in r.stdout, r.output
    assert store_content(store) == world["content"]
    assert sfd(["store", "verify", str(store)]).exit_code == 0


def test_distill_refuses_a_committed_nan_chunk_instead_of_a_nan_loss(world, tmp_path):
    store = fresh(world, tmp_path)
    key = the_key(store)
    states = key.array("states")[0:16]
    states[0] = np.inf
    key.array("states")[0:16] = states
    record = key.read_record(0)
    record["checksums"]["states"] = checksum(states)
    key._write_record(0, record)
    r = in_process("distill", distill_args(world["tmp"], store, world["teacher"], tmp_path / "run"))
    line = one_error_line(r)
    assert "chunk 0: non-finite values" in line and "--drop-bad" in line


# --------------------------------------------------------------------------- trajectories: reuse only what verifies


def test_stage_reverifies_reused_chunks_and_regenerates_a_corrupt_one(world, tmp_path):
    store = fresh(world, tmp_path)
    key = the_key(store)
    chunk_file = store / key.name / "states" / "c" / "1" / "0" / "0" / "0" / "0"
    data = bytearray(chunk_file.read_bytes())
    data[100:104] = bytes(b ^ 0xFF for b in data[100:104])  # flipped bytes, the record untouched
    chunk_file.write_bytes(bytes(data))

    r = sfd(["store", "verify", str(store)])
    assert r.exit_code == 1 and "states does not match its checksum (seeds 16-31)" in r.stderr
    assert "run `sfd store verify`" not in r.output  # the advice names --drop-bad and the stage instead

    r = in_process("trajectories", traj_args(world["tmp"], store, world["teacher"]))
    assert r.exit_code == 0, r.output
    assert f"warning: {store}/{key.name} chunk 1 (seeds 16-31): states does not match its checksum" in r.stderr
    assert "1 chunks generated (1 failed verification), 1 reused (verified)" in r.stdout
    summary = json.loads((world["tmp"] / "summary.json").read_text())
    assert (summary["chunks_reused"], summary["chunks_regenerated"], summary["chunks_generated"]) == (1, 1, 1)
    assert store_content(store) == world["content"]


# --------------------------------------------------------------------------- trajectories: OS errors


def test_file_size_limit_during_chunk_writes(world, tmp_path):
    """RLIMIT_FSIZE between the largest metadata file and the smallest states chunk: the first chunk write fails."""
    files = [p for p in world["clean"].rglob("*") if p.is_file()]
    metadata = max(p.stat().st_size for p in files if p.name.endswith(".json"))
    states = min(p.stat().st_size for p in files if "/states/c/" in str(p))
    assert metadata + 200 < states, (metadata, states)
    store = tmp_path / "t.zarr"
    r = subprocess_stage("trajectories", traj_args(world["tmp"], store, world["teacher"]), fsize=(metadata + states) // 2)
    line = one_error_line(r)
    assert f"cannot write {store}/" in line and "/states (chunk 0): file too large" in line and "[EFBIG]" in line
    assert all(not chunks for chunks in store_content(store).values())  # nothing committed
    assert not list(store.rglob("*.partial"))  # no half-written object left
    r = in_process("trajectories", traj_args(world["tmp"], store, world["teacher"]))
    assert r.exit_code == 0, r.output
    assert store_content(store) == world["content"]


def test_disk_full_during_chunk_writes(world, tmp_path):
    store = tmp_path / "t.zarr"
    r = subprocess_stage("trajectories", traj_args(world["tmp"], store, world["teacher"]), faults="enospc:/states/c/")
    line = one_error_line(r)
    assert "/states (chunk 0): no space left on device" in line and "[ENOSPC]" in line
    assert all(not chunks for chunks in store_content(store).values())
    r = in_process("trajectories", traj_args(world["tmp"], store, world["teacher"]))
    assert r.exit_code == 0 and store_content(store) == world["content"]


def run_read_only(stage: str, args: list[str], root: Path):
    """The stage with ``root`` read-only: for real (chmod, or chattr as root), else an injected EROFS."""
    with read_only(root) as real, (nullcontext() if real else injected(f"readonly:{root}")):
        return in_process(stage, args)


def test_read_only_store_that_needs_new_chunks(world, tmp_path):
    store = tmp_path / "t.zarr"
    params = write_params(tmp_path / "params.yaml", trajectories={"seeds": "0-15"})
    assert in_process("trajectories", traj_args(world["tmp"], store, world["teacher"], params)).exit_code == 0
    before = store_content(store)
    # complete for its seeds: a read-only store is fine, everything is reused
    r = run_read_only("trajectories", traj_args(world["tmp"], store, world["teacher"], params), store)
    assert r.exit_code == 0 and "0 chunks generated, 1 reused (verified)" in r.stdout, r.stderr
    # seeds 0-31 need chunk 1: refused before any generation, in one line naming the store and the chunks
    r = run_read_only("trajectories", traj_args(world["tmp"], store, world["teacher"]), store)
    line = one_error_line(r)
    assert f"cannot write {store}:" in line and "needs 1 chunk(s) written (seeds 16-31)" in line
    assert store_content(store) == before
    r = in_process("trajectories", traj_args(world["tmp"], store, world["teacher"]))  # writable again
    assert r.exit_code == 0 and store_content(store) == world["content"]


def test_verify_drop_bad_on_a_read_only_store_names_the_bad_chunks(world, tmp_path):
    store = fresh(world, tmp_path)
    key = the_key(store)
    chunk_file = store / key.name / "x_T" / "c" / "0" / "0" / "0" / "0"
    data = bytearray(chunk_file.read_bytes())
    data[-8] ^= 0x01
    chunk_file.write_bytes(bytes(data))
    with read_only(store) as real, (nullcontext() if real else injected(f"readonly:{store}")):
        r = sfd(["store", "verify", "--drop-bad", str(store)])  # chmod, chattr +i as root, else an injected EROFS
    line = one_error_line(r)
    assert f"1 of 2 committed chunks are bad and cannot be uncommitted: {key.name} chunk 0 (x_T does not match its checksum" in line
    assert f"cannot write {store}/{key.name}/commits/0.json" in line
    assert open_store(store).key(key.name).committed_chunks() == [0, 1]  # nothing changed


# --------------------------------------------------------------------------- key creation


def test_key_creation_refuses_another_chunk_size_every_time(tmp_path, monkeypatch):
    """Two writers create one fresh key with chunk sizes 8 and 16: whatever the interleaving, exactly one wins and
    the other is refused; the key's arrays are chunked by the key's own chunk_size."""
    from pipeline.diffusion.schedules import Schedule
    from pipeline.trajectories.spec import TrajectorySpec

    spec = TrajectorySpec(teacher_hash="0123456789abcdef", schedule=Schedule(num_steps=3), sample_shape=(1, 2, 2))
    # the race of issue 20, made deterministic: the second writer checked for the key before the first created it
    for first, second in ((8, 16), (16, 8)):
        path = tmp_path / f"race_{first}.zarr"
        a, b = open_store(path, mode="a"), open_store(path, mode="a")
        a.create_key(spec, chunk_size=first)
        monkeypatch.setattr(type(b), "keys", lambda self: [])
        with pytest.raises(StoreError, match=f"exists with chunk_size {first}, asked for {second}"):
            b.create_key(spec, chunk_size=second)
        monkeypatch.undo()
        key = open_store(path).key(spec.key)
        assert key.chunk_size == first and all(key.array(n).chunks[0] == first for n in key.array_names)
    # and truly concurrent, several times
    for attempt in range(6):
        path = tmp_path / f"threads_{attempt}.zarr"
        open_store(path, mode="a")
        barrier, outcome = threading.Barrier(2), {}

        def writer(size: int) -> None:
            handle = open_store(path, mode="a")
            barrier.wait()
            try:
                outcome[size] = handle.create_key(spec, chunk_size=size).chunk_size
            except StoreError as e:
                outcome[size] = str(e)

        threads = [threading.Thread(target=writer, args=(s,)) for s in (8, 16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [s for s, v in outcome.items() if v == s]
        assert len(winners) == 1, outcome
        loser = ({8, 16} - set(winners)).pop()
        assert f"exists with chunk_size {winners[0]}, asked for {loser}" in outcome[loser]
        key = open_store(path).key(spec.key)
        assert all(key.array(n).chunks[0] == winners[0] == key.chunk_size for n in key.array_names)


# --------------------------------------------------------------------------- the resume state


@pytest.fixture(scope="module")
def killed(world):
    """The distill stage SIGKILLed right after its second state save (batch 4 of 8): states at batches 4 and 2."""
    run = world["tmp"] / "killed"
    r = subprocess_stage("distill", distill_args(world["tmp"], world["clean"], world["teacher"], run),
                         faults="kill_after_saves:2")
    assert r.returncode == -9, r.stderr
    state = run / "state"
    assert json.loads((state / "training_state.json").read_text())["counters"]["batch"] == 4
    assert (state / "training_state.previous.safetensors").is_file()
    return state


def tensor_offset(path: Path, prefix: str) -> int:
    """The file offset of the first byte of the first tensor whose name starts with ``prefix``."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    name = sorted(k for k in header if k.startswith(prefix))[0]
    return 8 + n + header[name]["data_offsets"][0]


def resume(world, killed, tmp_path, damage) -> tuple:
    run = tmp_path / "run"
    shutil.copytree(killed, run / "state")
    damage(run / "state")
    return run, in_process("distill", distill_args(world["tmp"], world["clean"], world["teacher"], run))


def test_clean_resume_after_kill_is_bit_identical_and_names_units(world, killed, tmp_path):
    run, r = resume(world, killed, tmp_path, lambda state: None)
    assert r.exit_code == 0, r.output
    assert "resuming from" in r.stdout and "(verified) at batch 4 of 8 (0.032 of 0.064 kimg)" in r.stdout
    assert model_digest(run / "out") == world["model"]


@pytest.mark.parametrize("damage", ["flipped_bit", "truncated"])
def test_damaged_resume_state_falls_back_to_the_previous_verified_one(world, killed, tmp_path, damage):
    def hurt(state: Path) -> None:
        path = state / "training_state.safetensors"
        if damage == "flipped_bit":  # the lowest mantissa bit of one weight: before, a silently different model
            raw = bytearray(path.read_bytes())
            raw[tensor_offset(path, "net.")] ^= 0x01
            path.write_bytes(bytes(raw))
        else:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    run, r = resume(world, killed, tmp_path, hurt)
    assert r.exit_code == 0, r.output
    assert "training_state.safetensors" in r.stdout and "resuming from the previous verified state" in r.stdout
    assert "training_state.previous.safetensors (verified) at batch 2 of 8" in r.stdout
    assert model_digest(run / "out") == world["model"]


def test_damaged_resume_state_without_a_verified_one_stops_in_one_line(world, killed, tmp_path):
    def hurt(state: Path) -> None:
        path = state / "training_state.safetensors"
        raw = bytearray(path.read_bytes())
        start = tensor_offset(path, "net.")
        raw[start : start + 16] = b"\xff" * 16  # NaNs: before, every re-run stopped on a NaN loss "from the last good state"
        path.write_bytes(bytes(raw))
        (state / "training_state.previous.safetensors").write_bytes(b"")

    run, r = resume(world, killed, tmp_path, hurt)
    line = one_error_line(r)
    assert f"training state {run}/state/training_state.safetensors does not match its checksum" in line
    assert f"delete {run}/state to start this stage over" in line
    assert not (run / "out").exists()
    shutil.rmtree(run / "state")  # what the line says to do
    r = in_process("distill", distill_args(world["tmp"], world["clean"], world["teacher"], run))
    assert r.exit_code == 0 and model_digest(run / "out") == world["model"]


def test_file_size_limit_during_a_state_save(world, tmp_path):
    """The first state save (~150 kB) exceeds a 100 kB file-size limit: one line, no partial state, and the re-run
    ends as a clean run."""
    run = tmp_path / "run"
    r = subprocess_stage("distill", distill_args(world["tmp"], world["clean"], world["teacher"], run), fsize=100_000)
    line = one_error_line(r)
    assert f"cannot write {run}/state/training_state.safetensors: file too large" in line and "[EFBIG]" in line
    assert sorted(p.name for p in (run / "state").iterdir()) == []  # no state, no temporary file
    r = in_process("distill", distill_args(world["tmp"], world["clean"], world["teacher"], run))
    assert r.exit_code == 0 and model_digest(run / "out") == world["model"]


def test_disk_full_during_a_later_state_save_keeps_the_verified_state(world, killed, tmp_path):
    """ENOSPC at the first save of a resumed run: the states on disk are untouched and the next run resumes."""
    run = tmp_path / "run"
    shutil.copytree(killed, run / "state")
    before = {p.name: p.read_bytes() for p in (run / "state").iterdir() if p.name.startswith("training_state")}
    r = subprocess_stage("distill", distill_args(world["tmp"], world["clean"], world["teacher"], run),
                         faults="enospc:training_state")
    line = one_error_line(r)
    assert f"cannot write {run}/state/training_state.safetensors: no space left on device" in line
    after = {p.name: p.read_bytes() for p in (run / "state").iterdir() if p.name.startswith("training_state")}
    assert after == before and not list((run / "state").glob(".*tmp*"))
    r = in_process("distill", distill_args(world["tmp"], world["clean"], world["teacher"], run))
    assert r.exit_code == 0 and "at batch 4 of 8" in r.stdout and model_digest(run / "out") == world["model"]


def test_read_only_state_directory_is_refused_before_the_teacher_loads(world, tmp_path):
    run = tmp_path / "run"
    (run / "state").mkdir(parents=True)
    args = distill_args(world["tmp"], world["clean"], tmp_path / "no_such_teacher", run)
    r = run_read_only("distill", args, run / "state")
    line = one_error_line(r)  # the write check comes first: the missing teacher is never reached
    assert f"cannot write {run}/state:" in line and ("read-only" in line or "not permitted" in line or "denied" in line)


# --------------------------------------------------------------------------- data and params


def png_folder(path: Path, n: int, classes: int | None) -> Path:
    from PIL import Image

    path.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(path / f"img{i:03d}.png")
    if classes:
        (path / "dataset.json").write_text(json.dumps({"labels": [[f"img{i:03d}.png", i % classes] for i in range(n)]}))
    return path


def test_small_labelled_dataset_and_num_classes_without_labels(tmp_path):
    folder = png_folder(tmp_path / "pngs", 20, 10)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"dataset": "images", "path": str(folder), "held_out_fraction": 0.2}}))
    r = in_process("data", ["--params", str(params), "--out", str(tmp_path / "data")])
    line = one_error_line(r)
    assert "20 images in 10 classes are too few for a stratified held-out split with data.held_out_fraction 0.2" in line
    assert "set data.held_out_fraction between 0.5 and 0.5" in line and not (tmp_path / "data").exists()
    params.write_text(yaml.safe_dump({"data": {"dataset": "images", "path": str(folder), "held_out_fraction": 0.5}}))
    assert in_process("data", ["--params", str(params), "--out", str(tmp_path / "data")]).exit_code == 0

    bare = png_folder(tmp_path / "bare", 20, None)
    params.write_text(yaml.safe_dump({"data": {"dataset": "images", "path": str(bare), "num_classes": 10}}))
    line = one_error_line(in_process("data", ["--params", str(params), "--out", str(tmp_path / "bare_data")]))
    assert f"data.num_classes is 10 but {bare} has no labels" in line and not (tmp_path / "bare_data").exists()


def test_a_deleted_section_stops_the_stage(world, tmp_path):
    params = write_params(tmp_path / "params.yaml", trajectories=None)
    r = in_process("trajectories", traj_args(world["tmp"], tmp_path / "t.zarr", world["teacher"], params))
    assert "trajectories: the section is missing from the params file" in one_error_line(r)
    assert not (tmp_path / "t.zarr").exists()


def test_sfd_command_into_a_read_only_directory_is_one_line(world, tmp_path):
    out = tmp_path / "samples"
    out.mkdir()
    with read_only(out) as real, (nullcontext() if real else injected(f"readonly:{out}")):
        r = sfd(["sample", "--ckpt", str(world["teacher"]), "--seeds", "0-3", "--out", str(out), "--device", "cpu"])
    line = one_error_line(r)
    assert f"cannot write {out}:" in line
