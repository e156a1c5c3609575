"""SFD distillation on the exact Gaussian-mixture teacher with a tiny student network (CPU, 1 thread)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline.config.params import parse_params
from pipeline.core.checkpoints import load_checkpoint
from pipeline.distill.sfd import run_distill_stage
from pipeline.training.loop import NonFiniteLossError
from pipeline.teachers.loader import load_student
from pipeline.trajectories.generation import run_trajectories_stage
from pipeline.trajectories.reader import TrajectoryDataset
from pipeline.trajectories.store import KeyMismatchError, open_store

TEACHER = {"source": "gmm", "num_components": 4, "sample_shape": [1, 4, 4], "std": 0.2, "seed": 0}
TINY_NET = {"model_channels": 8, "channel_mult": [1], "num_blocks": 1, "attn_resolutions": []}
SCHEDULE = {"kind": "polynomial", "num_steps": 4, "t_min": 0.006, "t_max": 80.0, "rho": 7.0}



def make_params(**distill) -> dict:
    base = {
        "student_network": TINY_NET, "kimg": 0.128, "batch_size": 16, "lr": 1e-3,
        "checkpoint_every_kimg": 0.032, "log_every_kimg": 0.016, "device": "cpu",
    }  # fmt: skip
    return {
        "loss": "l1",
        "trajectories": {"teacher": TEACHER, "seeds": "0-63", "chunk_size": 32, "batch_size": 64, "M": 1, "schedule": SCHEDULE},
        "trajectories_v": {"teacher": TEACHER, "seeds": "0-63", "chunk_size": 32, "batch_size": 64, "M": 1,
                           "schedule": {**SCHEDULE, "num_steps": [3, 4]}},
        "distill": {**base, **distill},
        "distill_v": {**base, "trajectories": "trajectories_v", "step_condition": True, **distill},
    }  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "trajectories.zarr"
    params = make_params()
    p = parse_params(params)
    run_trajectories_stage(p.trajectories, path, name="trajectories", progress=False)
    run_trajectories_stage(p.trajectories_v, path, name="trajectories_v", progress=False)
    return path


def distill(params, store, tmp_path, section="distill", name="run", **kwargs):
    p = parse_params(params)  # as stages/distill.py: the whole file validated, the typed sections passed on
    return run_distill_stage(
        p.section(section), trajectories=p.trajectories_for(section), loss=p.loss, name=section,
        store=store, teacher_ckpt=None, out=tmp_path / name / "student",
        state_dir=tmp_path / name / "state", metrics=tmp_path / name / "metrics.json",
        live_dir=tmp_path / name / "live", cost_path=tmp_path / name / "cost.json", progress=False, **kwargs,
    )  # fmt: skip


def rollout_loss(student, store, num_steps: int = 4) -> float:
    """Mean L1 of the student's own rollout against the teacher states, over every cached trajectory."""
    key = open_store(store).keys()
    ds = TrajectoryDataset(store, [k for k in key if open_store(store).key(k).description["schedule"]["num_steps"] == num_steps][0],
                           batch_size=64, shuffle=False)
    b = next(iter(ds))
    t = student.sampler.schedule.t_steps().tolist()
    x, total = b.x_T, 0.0
    d = student.sampling_denoiser()
    with torch.no_grad():
        for n in range(num_steps - 1):
            eps = x / math.sqrt(1 + t[0] ** 2) if n == 0 else (x - d(x, torch.full((len(x),), t[n]), b.labels)) / t[n]
            x = x + (t[n + 1] - t[n]) * eps
            if n > 0:
                total += float((x - b.states[:, n]).abs().flatten(1).sum(1).mean())
    return total


def test_student_loss_falls(store, tmp_path):
    params = make_params(kimg=0.512, lr=2e-3)
    zero = make_params(kimg=0.016, lr=1e-12)  # one batch at a negligible lr: the initial student
    before = rollout_loss(load_student(distill(zero, store, tmp_path, name="zero")["checkpoint"]), store)
    result = distill(params, store, tmp_path)
    after = rollout_loss(load_student(result["checkpoint"]), store)
    assert after < 0.75 * before, (before, after)  # measured: 12.2 -> 7.7
    live = tmp_path / "run" / "live"  # DVCLive: one row per log window (0.016 kimg), x axis kimg
    log = json.loads((live / "plots" / "custom" / "loss.json").read_text())
    assert list(log[0]) == ["step", "kimg", "lr", "loss"] and len(log) == 32 and log[-1]["kimg"] == 0.512
    step2, step3 = ([float(line.split("\t")[1]) for line in (live / "plots" / "metrics" / "loss" / f"{k}.tsv").read_text().splitlines()[1:]]
                    for k in ("step2", "step3"))
    assert len(step2) == 32 and log[0]["loss"] == pytest.approx((step2[0] + step3[0]) / 2, rel=1e-6)  # the steps' mean
    assert log[-1]["loss"] < log[0]["loss"]
    summary = json.loads((live / "metrics.json").read_text())
    assert summary["final"]["final_loss"] == result["final_loss"] and summary["final"]["kimg"] == 0.512
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["loss_used"] == "l1" and metrics["epochs_over_cache_max"] == pytest.approx(512 / 64)
    assert set(metrics["final_loss"]) == {"step2", "step3"}
    cost = json.loads((tmp_path / "run" / "cost.json").read_text())
    assert cost["student_forward_images"] == cost["student_backward_images"] == 512 * 2
    assert cost["teacher_forward_images"] == 0


def test_rollout_continues_from_the_students_own_state(store, tmp_path, monkeypatch):
    """The network's input at step n must be the student's previous x_hat, never the teacher's y_n."""
    from pipeline.distill import sfd as sfd_distillation

    calls: list[tuple[torch.Tensor, torch.Tensor, float]] = []
    batches: list = []
    original = sfd_distillation.sfd_batch

    def spy(model, optimizer, batch, t_steps, loss_fn, **kwargs):
        batches.append((batch, t_steps))
        hook = model.register_forward_hook(lambda m, args, out: calls.append((args[0].detach().clone(), out.detach().clone(), float(args[1][0]))))
        try:
            return original(model, optimizer, batch, t_steps, loss_fn, **kwargs)
        finally:
            hook.remove()

    monkeypatch.setattr(sfd_distillation, "sfd_batch", spy)
    distill(make_params(kimg=0.016), store, tmp_path)
    (batch, t_steps), t = batches[0], batches[0][1].tolist()
    assert len(calls) == 2  # N = 4 with AFS: network steps 1 and 2
    x1 = batch.x_T + (t[1] - t[0]) * batch.x_T / math.sqrt(1 + t[0] ** 2)  # AFS
    (in1, d1, s1), (in2, _, s2) = calls
    assert s1 == pytest.approx(t[1]) and s2 == pytest.approx(t[2])
    torch.testing.assert_close(in1, x1, rtol=1e-6, atol=1e-5)  # float32 rounding
    x2 = x1 + (t[2] - t[1]) * (x1 - d1) / t[1]  # the student's own Euler step with the weights before the update
    torch.testing.assert_close(in2, x2, rtol=1e-5, atol=1e-4)
    assert (in2 - batch.states[:, 1]).abs().max() > 0.1  # the teacher's state is elsewhere: a restart would fail


@pytest.mark.parametrize("afs", [True, False])
def test_one_optimizer_step_per_non_afs_student_step(store, tmp_path, monkeypatch, afs):
    steps = []
    original = torch.optim.Adam.step

    def counting(self, *args, **kwargs):
        steps.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", counting)
    result = distill(make_params(kimg=0.048, afs=afs), store, tmp_path)
    batches = 3
    assert result["batches"] == batches
    assert len(steps) == result["optimizer_steps"] == batches * (4 - 1 - int(afs))


def test_resume_equals_uninterrupted(store, tmp_path):
    params = make_params(kimg=0.128)  # 8 batches, a checkpoint every 2
    full = distill(params, store, tmp_path, name="full")
    assert distill(params, store, tmp_path, name="cut", stop_after_batches=5) == {"interrupted_at_batch": 5}
    _, meta = load_checkpoint(tmp_path / "cut" / "state", name="training_state")
    assert meta["counters"]["batch"] == 4  # the run resumes from the last checkpoint, before the interruption
    resumed = distill(params, store, tmp_path, name="cut")
    a, _ = load_checkpoint(tmp_path / "full" / "student")
    b, _ = load_checkpoint(tmp_path / "cut" / "student")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["final_loss"] == full["final_loss"] and resumed["optimizer_steps"] == full["optimizer_steps"]
    live = {d: sorted(f.relative_to(tmp_path / d / "live") for f in (tmp_path / d / "live").rglob("*") if f.is_file())
            for d in ("full", "cut")}
    assert live["full"] == live["cut"] and len(live["full"]) == 6  # metrics.json, loss plot, kimg, lr, step2, step3
    for f in live["full"]:  # the resumed run replays the rows logged before the interruption
        assert (tmp_path / "full" / "live" / f).read_bytes() == (tmp_path / "cut" / "live" / f).read_bytes(), f


def test_stale_store_key_is_refused(store, tmp_path):
    params = make_params()
    params["trajectories"]["teacher"] = {**TEACHER, "seed": 1}  # the teacher changed since the store was filled
    with pytest.raises(KeyMismatchError, match="teacher_hash"):
        distill(params, store, tmp_path)
    assert not (tmp_path / "run" / "student").exists()


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(store, tmp_path, monkeypatch):
    from pipeline.distill import sfd as sfd_distillation
    from pipeline.distill.losses import l1_loss

    count = [0]

    def failing(x_hat, y):
        count[0] += 1
        return l1_loss(x_hat, y) * (float("nan") if count[0] > 9 else 1.0)  # step 10 = batch 5

    monkeypatch.setattr(sfd_distillation, "make_loss", lambda name, **kw: failing)
    with pytest.raises(NonFiniteLossError, match=r"nan.*last verified state .*batch 4"):
        distill(make_params(), store, tmp_path)
    tensors, meta = load_checkpoint(tmp_path / "run" / "state", name="training_state")
    assert meta["counters"]["batch"] == 4 and all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith("net."))
    student = load_student(tmp_path / "run" / "state")  # the last good checkpoint samples
    assert student.config["provenance"]["kimg_done"] == pytest.approx(0.064)
    assert not (tmp_path / "run" / "student").exists()


def test_sfd_v_one_model_for_every_n(store, tmp_path):
    result = distill(make_params(kimg=0.128), store, tmp_path, section="distill_v")
    assert set(result["final_loss"]) == {"N3/step2", "N4/step2", "N4/step3"}
    assert all(v is not None for v in result["final_loss"].values())  # both N were drawn
    assert sum(result["rows_per_key"].values()) == 128
    student = load_student(result["checkpoint"])
    assert student.sampler.step_condition == (3, 4) and student.sampler.schedule.num_steps == 4
    assert student.model.net.step_condition
    for n in (3, 4):
        s = load_student(result["checkpoint"], num_steps=n)
        assert s.sampler.nfe == n - 2


def test_loss_param_selects_the_loss(store, tmp_path):
    params = make_params(kimg=0.016)
    params["loss"] = "pseudo_huber"
    assert distill(params, store, tmp_path)["loss_used"] == "pseudo_huber"
    params["loss"] = "lpips"  # no lpips_weights in the section: a clear error, never random weights
    with pytest.raises(FileNotFoundError, match="lpips_weights"):
        distill(params, store, tmp_path, name="lpips")


def test_stage2_from_a_distilled_student(store, tmp_path):
    """Stage-1 student -> Euler M=2 AFS trajectories keyed by its hash -> 1-NFE student."""
    stage1 = distill(make_params(kimg=0.032), store, tmp_path, name="stage1")["checkpoint"]
    params = make_params()
    params["trajectories_stage2"] = {
        "solver": "euler", "max_order": 1, "afs": True, "M": 2, "seeds": "0-31", "chunk_size": 32, "batch_size": 32,
        "schedule": {**SCHEDULE, "num_steps": 3},
    }  # fmt: skip
    params["distill_stage2"] = {"trajectories": "trajectories_stage2", "lr": 5e-4, "kimg": 0.032, "batch_size": 16,
                                "lpips_last_step": True, "loss": "l1", "device": "cpu"}  # fmt: skip
    p = parse_params(params)
    summary, images = run_trajectories_stage(p.trajectories_stage2, store, name="trajectories_stage2", teacher_ckpt=stage1,
                                             progress=False)  # fmt: skip
    assert images == 32 * 5  # the stage-1 model's own N=7 AFS sampler: 5 NFE per trajectory
    result = run_distill_stage(p.distill_stage2, trajectories=p.trajectories_stage2, loss=p.loss, name="distill_stage2",
                               store=store, teacher_ckpt=stage1, out=tmp_path / "s2", state_dir=None, progress=False)  # fmt: skip
    assert result["loss_used"] == result["stage2_loss"] == "l1 (no local LPIPS weights: lpips_weights is null, the last step keeps l1)"
    assert result["optimizer_steps"] == 2 and result["nfe"] == {"3": 1}
    student = load_student(tmp_path / "s2")
    assert student.sampler.nfe == 1
    assert student.config["provenance"]["teacher_hash"] == load_student(stage1).weights_hash  # weights + architecture (+ bound N)
    assert student.config["provenance"]["store_keys"]["3"] == summary["keys"][0]["key"]
