"""Baselines (progressive distillation, SFDDM, vanilla trajectory distillation) and the comparison table.

The exact Gaussian-mixture teacher is the oracle; students are tiny U-Nets on 8x8 images.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline.distill.baselines.common import TrainingData
from pipeline.training.optim import frozen
from pipeline.distill.baselines.progressive import (
    PDParams,
    pd_loss,
    pd_round,
    pd_target,
    pd_weight,
    progressive_distillation,
    teacher_grid,
    two_teacher_steps,
)
from pipeline.distill.baselines.sfddm import (
    SFDDMParams,
    index_map,
    reparameterised_input,
    sfddm_distillation,
    sfddm_loss,
    student_alphas_cumprod,
    student_sigmas,
    train_sfddm_student,
)
from pipeline.distill.baselines.vanilla import VanillaParams, local_targets, train_vanilla, vanilla_distillation, vanilla_loss
from pipeline.evaluation.comparison import Cost, build_comparison, comparison_rows, headline
from pipeline.diffusion.denoisers import EDMPrecond
from pipeline.diffusion.gmm import GaussianMixture
from pipeline.networks.unet import build_network
from pipeline.teachers.loader import load_teacher
from pipeline.core.param_checks import ParamError
from pipeline.evaluation.samples import sample_from_checkpoint
from pipeline.diffusion.schedules import discrete_sigmas
from pipeline.diffusion.solvers import solve

SHAPE = (1, 8, 8)
TINY_NET = {"img_resolution": 8, "in_channels": 1, "label_dim": 0, "model_channels": 8, "channel_mult": [1],
            "num_blocks": 1, "attn_resolutions": []}


def tiny_model(seed: int = 0, *, perturb_output: bool = False) -> EDMPrecond:
    torch.manual_seed(seed)
    net = build_network(**TINY_NET)
    if perturb_output:  # the U-Net zero-initialises its output layer; a teacher must say something
        torch.nn.init.normal_(net.out_conv.weight, std=0.1)
    return EDMPrecond(net)


def tiny_config() -> dict:
    return {"network": TINY_NET, "sigma_data": 0.5, "data": {"sample_shape": list(SHAPE), "num_classes": 0},
            "sampler": None, "provenance": {"kind": "test teacher"}}


@pytest.fixture(scope="module")
def gmm() -> GaussianMixture:
    return GaussianMixture.random(num_components=3, sample_shape=SHAPE, std=0.3, seed=1)


@pytest.fixture(scope="module")
def gmm_data(gmm) -> TrainingData:
    return TrainingData(gmm.sample(512, generator=torch.Generator().manual_seed(0)).float(), None)


def probe(loss_fn, seed: int = 123) -> float:
    with torch.no_grad():
        return float(loss_fn(torch.Generator().manual_seed(seed)))


# ---------------------------------------------------------------- progressive distillation

@pytest.mark.parametrize("last_is_zero", [False, True])
def test_pd_target_one_student_euler_step_lands_on_two_teacher_steps(gmm, last_is_zero):
    """Exact teacher: D = x~ makes x_a + (s_b - s_a)(x_a - x~)/s_a equal x_b (float64, 1e-10)."""
    n = 4
    grid = teacher_grid(n, 0.006, 80.0)
    if last_is_zero:
        grid = torch.cat([grid[:-1], grid.new_zeros(1)])
    j = torch.arange(n).repeat(4)
    sa, sm, sb = grid[2 * j], grid[2 * j + 1], grid[2 * j + 2]
    g = torch.Generator().manual_seed(0)
    y = gmm.sample(len(j), generator=g)
    x_a = y + sa.reshape(-1, 1, 1, 1) * torch.randn(y.shape, generator=g, dtype=torch.float64)
    x_b, denoised_m = two_teacher_steps(gmm, x_a, sa, sm, sb)
    target = pd_target(x_a, x_b, sa, sb, denoised_m)
    col = lambda v: v.reshape(-1, 1, 1, 1)  # noqa: E731
    x_student = x_a + col(sb - sa) * (x_a - target) / col(sa)
    torch.testing.assert_close(x_student, x_b, rtol=0, atol=1e-10)
    # two teacher steps are the Euler solver on [s_a, s_m, s_b]
    ref = solve(gmm, x_a[:1], torch.stack([sa[0], sm[0], sb[0]]), "euler")
    torch.testing.assert_close(x_b[:1], ref, rtol=0, atol=1e-12)
    if last_is_zero:  # the last interval ends at 0: the target is the teacher's D at sigma_m
        last = sb == 0
        x_m = x_a + col(sm - sa) * (x_a - gmm(x_a, sa)) / col(sa)
        torch.testing.assert_close(target[last], gmm(x_m[last], sm[last]), rtol=0, atol=1e-12)


def test_pd_grids_are_nested_and_weight_is_truncated_snr():
    for n in (1, 2, 4, 32):
        fine = teacher_grid(n, 0.006, 80.0)
        coarse = PDParams().student_schedule(n).t_steps()
        torch.testing.assert_close(fine[::2], coarse, rtol=1e-12, atol=0)
    s = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    torch.testing.assert_close(pd_weight(s), torch.tensor([100.0, 1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(pd_weight(s, "snr_plus_one"), torch.tensor([101.0, 2.0, 1.01], dtype=torch.float64))
    assert PDParams(start_steps=64).round_steps() == [32, 16, 8, 4, 2, 1]


def test_pd_params_are_validated():
    with pytest.raises(ParamError, match="start_steps"):
        PDParams.from_dict({"start_steps": 48})
    with pytest.raises(ParamError, match="weighting"):
        PDParams.from_dict({"weighting": "snr"})
    with pytest.raises(ParamError, match="unknown key"):
        PDParams.from_dict({"rounds": 3})


def test_pd_round_lowers_its_loss_on_the_exact_teacher(gmm, gmm_data):
    student = tiny_model(0).train()
    params = PDParams(start_steps=4, updates_per_round=40, batch_size=64, lr=3e-3)
    grid = teacher_grid(2, params.t_min, params.t_max)
    y = gmm_data.images[:256]
    loss_fn = lambda g: pd_loss(student, gmm, y, None, grid, g)  # noqa: E731
    before = probe(loss_fn)
    summary = pd_round(student, gmm, gmm_data, 2, params, generator=torch.Generator().manual_seed(1), progress=False)
    after = probe(loss_fn)
    assert after < 0.7 * before, (before, after, summary)


def test_pd_checkpoints_sample_through_the_common_sampler(tmp_path, gmm_data):
    from pipeline.evaluation.evaluate import student_entries

    teacher = tiny_model(0, perturb_output=True)
    params = PDParams(start_steps=4, updates_per_round=2, batch_size=8)
    summary = progressive_distillation(teacher, tiny_config(), gmm_data, params, tmp_path / "pd", progress=False)
    assert summary["nfes"] == [2, 1]
    assert summary["rounds"][-1]["cumulative"]["teacher_forward_images"] == 2 * 2 * 2 * 8
    for n in (2, 1):
        images, labels, spec = sample_from_checkpoint(tmp_path / "pd" / f"nfe{n}", "0-5")
        assert images.shape == (6, *SHAPE) and torch.isfinite(images).all() and labels is None
        assert spec.nfe == n and spec.solver == "euler" and not spec.afs
        assert [e.key for e in student_entries("pd", tmp_path / "pd" / f"nfe{n}", "cpu")] == [f"pd/nfe{n}"]
    # a rerun writes byte-identical checkpoints (no wall times in them)
    progressive_distillation(tiny_model(0, perturb_output=True), tiny_config(), gmm_data, params, tmp_path / "again",
                             progress=False)
    for n in (2, 1):
        for name in ("model.json", "model.safetensors"):
            assert (tmp_path / "again" / f"nfe{n}" / name).read_bytes() == (tmp_path / "pd" / f"nfe{n}" / name).read_bytes()


# ---------------------------------------------------------------- SFDDM

def test_sfddm_schedule_mapping():
    assert index_map(2, 8) == [0, 4, 8]
    assert index_map(4, 1024) == [0, 256, 512, 768, 1024]
    with pytest.raises(ParamError, match="divide"):
        index_map(3, 8)
    p = SFDDMParams(teacher_steps=1024)
    teacher = p.teacher_sigmas()
    for t_prime in (1, 2, 4, 16):
        mapped = student_sigmas(teacher, t_prime)
        torch.testing.assert_close(mapped, p.student_schedule(t_prime).t_steps(), rtol=1e-12, atol=0)
        assert mapped[0] == 80.0 and mapped[-1] == 0.006


def test_sfddm_input_reparameterisation_on_a_discrete_vp_table():
    """abar'_{t'} = abar_{phi(t')}: the student's VP input at t' is the teacher's at phi(t'), and x_EDM = x_VP / sqrt(abar)."""
    T, t_prime = 1000, 4
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    abar = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])  # abar_0 .. abar_T
    abar_s = student_alphas_cumprod(abar, t_prime)
    phi = index_map(t_prime, T)
    torch.testing.assert_close(abar_s, abar[phi])
    sig_teacher = torch.cat([torch.zeros(1, dtype=torch.float64), discrete_sigmas(abar[1:])])
    sig_student = ((1 - abar_s) / abar_s).sqrt()
    torch.testing.assert_close(sig_student, student_sigmas(sig_teacher, t_prime))
    g = torch.Generator().manual_seed(0)
    y = torch.randn((t_prime + 1, *SHAPE), generator=g, dtype=torch.float64)
    eps = torch.randn(y.shape, generator=g, dtype=torch.float64)
    col = lambda v: v.reshape(-1, 1, 1, 1)  # noqa: E731
    x_vp_student = col(abar_s.sqrt()) * y + col((1 - abar_s).sqrt()) * eps
    x_vp_teacher = col(abar[phi].sqrt()) * y + col((1 - abar[phi]).sqrt()) * eps
    torch.testing.assert_close(x_vp_student, x_vp_teacher, rtol=0, atol=0)
    x_edm = reparameterised_input(y, eps, sig_student)
    torch.testing.assert_close(x_edm * col(abar_s.sqrt()), x_vp_student, rtol=1e-12, atol=1e-12)


def fit_to_denoiser(student: EDMPrecond, teacher, data: TrainingData, steps: int = 150, lr: float = 3e-3) -> EDMPrecond:
    """A network initialised from an analytic teacher: regress D_student(y + s eps, s) on the teacher's D (log-uniform s)."""
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        y = data.images[torch.randint(len(data.images), (64,), generator=g)]
        s = torch.exp(torch.empty(64, dtype=torch.float64).uniform_(math.log(0.006), math.log(80.0), generator=g))
        x = y + s.reshape(-1, 1, 1, 1).float() * torch.randn(y.shape, generator=g)
        loss = (student(x, s.float(), None) - teacher(x.double(), s).float()).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return student


def test_sfddm_target_one_student_step_lands_on_the_teachers_c_fine_steps(gmm):
    """Exact teacher: D = o~ makes the student's Euler step sigma'_{t'} -> sigma'_{t'+1} equal the teacher's c = T/T'
    Euler steps over sigma_{phi(t')} .. sigma_{phi(t'+1)} (float64, 1e-10); the loss is not zero at o_S = o_T."""
    from pipeline.distill.baselines.sfddm import sfddm_target, teacher_fine_steps

    T, t_prime_steps = 16, 4
    sig = SFDDMParams(teacher_steps=T).teacher_sigmas()
    phi = index_map(t_prime_steps, T)
    c = T // t_prime_steps
    g = torch.Generator().manual_seed(0)
    tp = torch.tensor([0, 1, 2, 3, 3, 0])
    fine = torch.stack([sig[phi[i]: phi[i] + c + 1] for i in tp.tolist()])
    y = gmm.sample(len(tp), generator=g)
    x_a = y + fine[:, :1].reshape(-1, 1, 1, 1) * torch.randn(y.shape, generator=g, dtype=torch.float64)
    x_b, o_first, h = teacher_fine_steps(gmm, x_a, None, fine, features=False)
    assert h is None
    for i in range(len(tp)):  # c Euler steps of the teacher's own sampler
        ref = solve(gmm, x_a[i:i + 1], fine[i], "euler")
        torch.testing.assert_close(x_b[i:i + 1], ref, rtol=0, atol=1e-10)
    target = sfddm_target(x_a, x_b, fine[:, 0], fine[:, -1])
    col = lambda v: v.reshape(-1, 1, 1, 1)  # noqa: E731
    x_student = x_a + col(fine[:, -1] - fine[:, 0]) * (x_a - target) / col(fine[:, 0])
    torch.testing.assert_close(x_student, x_b, rtol=0, atol=1e-10)
    torch.testing.assert_close(o_first, gmm(x_a, fine[:, 0]), rtol=0, atol=0)
    assert (target - o_first).abs().mean() > 1e-3  # the teacher's one-step output is not the target
    # c = 1: the target is the teacher's own output
    fine1 = torch.stack([sig[i: i + 2] for i in (0, 5, 15)])
    x1 = gmm.sample(3, generator=g) + fine1[:, :1].reshape(-1, 1, 1, 1) * torch.randn((3, *SHAPE), generator=g, dtype=torch.float64)
    xb1, o1, _ = teacher_fine_steps(gmm, x1, None, fine1, features=False)
    torch.testing.assert_close(sfddm_target(x1, xb1, fine1[:, 0], fine1[:, 1]), o1, rtol=0, atol=1e-9)


def test_sfddm_lowers_its_loss_from_a_teacher_initialisation_on_the_exact_mixture(gmm_data):
    """The exact mixture teacher (load_teacher("gmm")): the student starts as a network fitted to the teacher's
    denoiser (an analytic teacher has no weights to copy), its loss is > 0 there and SFDDM training lowers it."""
    teacher = load_teacher("gmm", sample_shape=SHAPE, num_components=3, std=0.3, seed=1)
    gmm_teacher = teacher.denoiser
    data = TrainingData(gmm_teacher.sample(512, generator=torch.Generator().manual_seed(0)).float(), None)
    student = fit_to_denoiser(tiny_model(1).train(), gmm_teacher, data)
    params = SFDDMParams(teacher_steps=8, student_steps=[2], budget="updates", updates=200, batch_size=32, lr=2e-3,
                         feature_weight=0.0)
    y = data.images[:128]
    double = lambda x, s, labels=None, **kw: gmm_teacher(x.double(), s.double(), labels).float()  # noqa: E731
    loss_fn = lambda g: sfddm_loss(student, double, y, None, params.teacher_sigmas(), 2, g, 0.0)  # noqa: E731
    before = probe(loss_fn)
    assert before > 0.05, before  # non-zero at the start: the student's one step is not the teacher's c steps
    summary = train_sfddm_student(student, double, data, 2, params, generator=torch.Generator().manual_seed(1),
                                  progress=False)
    after = probe(loss_fn)
    assert after < 0.8 * before, (before, after, summary)
    assert summary["teacher_steps_per_update"] == 4 and summary["updates"] == 200


def test_sfddm_budget_is_sfd_stage1s_on_the_default_params():
    """2,048 trajectories x 12 teacher NFE + 157 batches x 128 x 2 network steps x 3 = 145,152 forward equivalents."""
    from pipeline.config.params import load_params
    from pipeline.distill.baselines.sfddm import sfd_stage1_budget, updates_for_budget

    p = load_params("params.yaml")
    budget = sfd_stage1_budget(p.distill, p.trajectories_for("distill"))
    seen = math.ceil(p.distill.kimg * 1000 / p.distill.batch_size) * p.distill.batch_size
    assert budget["teacher_forward_images"] == 2048 * 12
    assert budget["student_forward_images"] == budget["student_backward_images"] == seen * 2
    assert budget["forward_equivalents"] == 2048 * 12 + seen * 2 * 3
    s = p.baseline_sfddm
    c = s.teacher_steps // s.student_steps[0]
    n = updates_for_budget(budget["forward_equivalents"], s, s.student_steps[0])
    per = s.batch_size * (c + 3)
    assert n * per <= budget["forward_equivalents"] < (n + 1) * per
    with pytest.raises(ParamError, match="buy no update"):
        updates_for_budget(10.0, s, s.student_steps[0])


def test_sfddm_round_lowers_its_loss_and_checkpoints_sample(tmp_path, gmm_data):
    teacher = frozen(tiny_model(0, perturb_output=True))
    params = SFDDMParams(teacher_steps=8, student_steps=[2], budget="updates", updates=30, batch_size=32, lr=3e-3,
                         init="random")
    student = tiny_model(1).train()
    y = gmm_data.images[:128]
    loss_fn = lambda g: sfddm_loss(student, teacher, y, None, params.teacher_sigmas(), 2, g)  # noqa: E731
    before = probe(loss_fn)
    train_sfddm_student(student, teacher, gmm_data, 2, params, generator=torch.Generator().manual_seed(1), progress=False)
    after = probe(loss_fn)
    assert after < 0.8 * before, (before, after)

    quick = SFDDMParams(teacher_steps=8, student_steps=[2, 4], budget="updates", updates=2, batch_size=8)
    sfddm_distillation(teacher, tiny_config(), gmm_data, quick, tmp_path / "sfddm", tmp_path / "control", progress=False)
    for t_prime in (2, 4):
        for root in ("sfddm", "control"):
            images, _, spec = sample_from_checkpoint(tmp_path / root / f"nfe{t_prime}", "0-3")
            assert images.shape == (4, *SHAPE) and torch.isfinite(images).all()
            assert spec.nfe == t_prime and spec.solver == "euler"
        control = load_teacher(tmp_path / "control" / f"nfe{t_prime}").model
        for a, b in zip(control.net.state_dict().values(), teacher.net.state_dict().values()):
            assert torch.equal(a, b)  # the control row is the teacher itself
    # the control row equals the teacher sampled by Euler on the student's grid
    images, _, spec = sample_from_checkpoint(tmp_path / "control" / "nfe2", "0-3")
    from pipeline.diffusion.seeds import seed_noise

    x = 80.0 * seed_noise(range(4), SHAPE)
    with torch.no_grad():
        ref = solve(teacher, x, quick.student_schedule(2).t_steps(), "euler")
    torch.testing.assert_close(images, ref, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- vanilla trajectory distillation

def test_vanilla_local_targets_match_the_teacher_solver_per_interval(gmm):
    params = VanillaParams()
    sched = params.student_schedule()
    t, fine = sched.t_steps(), sched.fine(params.M)
    g = torch.Generator().manual_seed(0)
    n = torch.tensor([1, 2, 1, 2, 0])
    x = gmm.sample(5, generator=g) + t[n].reshape(-1, 1, 1, 1) * torch.randn((5, *SHAPE), generator=g, dtype=torch.float64)
    got = local_targets(gmm, x, n, fine, params.M)
    for i in range(5):
        k = int(n[i])
        sub = fine[k * 4 : k * 4 + 5]
        assert sub[0] == t[k] and abs(float(sub[-1] - t[k + 1])) < 1e-12 * float(t[k])
        torch.testing.assert_close(got[i : i + 1], solve(gmm, x[i : i + 1], sub, "dpmpp", max_order=3), rtol=0, atol=1e-12)


def test_vanilla_round_lowers_its_loss_and_checkpoint_samples(tmp_path, gmm, gmm_data):
    params = VanillaParams(updates=40, batch_size=64, lr=3e-3)
    student = tiny_model(0).train()
    y = gmm_data.images[:256]
    loss_fn = lambda g: vanilla_loss(student, gmm, y, None, params, g)  # noqa: E731
    before = probe(loss_fn)
    train_vanilla(student, gmm, gmm_data, params, generator=torch.Generator().manual_seed(1), progress=False)
    after = probe(loss_fn)
    assert after < 0.9 * before, (before, after)

    teacher = tiny_model(0, perturb_output=True)
    vanilla_distillation(teacher, tiny_config(), gmm_data, VanillaParams(updates=2, batch_size=8), tmp_path / "vanilla",
                         progress=False)
    images, _, spec = sample_from_checkpoint(tmp_path / "vanilla", "0-3")
    assert images.shape == (4, *SHAPE) and torch.isfinite(images).all()
    assert spec.nfe == 2 and spec.afs and spec.schedule.num_steps == 4


# ---------------------------------------------------------------- resume (pipeline.training states)

class Crash(Exception):
    pass


def crash_after(monkeypatch, module, name: str, calls: int) -> None:
    """Make ``module.name`` (a loss function) raise on its ``calls``-th call: a run killed mid-update."""
    original, count = getattr(module, name), [0]

    def wrapped(*args, **kwargs):
        count[0] += 1
        if count[0] == calls:
            raise Crash(f"killed at call {calls}")
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


def count_calls(monkeypatch, module, name: str) -> list[int]:
    original, count = getattr(module, name), [0]

    def wrapped(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return count


def assert_same_checkpoints(a, b, names) -> None:
    for n in names:
        for f in ("model.safetensors", "model.json"):
            assert (a / n / f).read_bytes() == (b / n / f).read_bytes(), (n, f)


def test_pd_interrupted_inside_a_round_resumes_bit_exact(tmp_path, gmm_data, monkeypatch):
    from pipeline.distill.baselines import progressive

    params = PDParams(start_steps=4, updates_per_round=20, batch_size=8)  # rounds N=2, N=1; a state every 2 updates
    run = lambda name, **kw: progressive_distillation(  # noqa: E731
        tiny_model(0, perturb_output=True), tiny_config(), gmm_data, params, tmp_path / name, progress=False, **kw)
    full = run("full")
    with monkeypatch.context() as m:
        crash_after(m, progressive, "pd_loss", 20 + 8)  # round 2, update 8: its last state is at 6
        with pytest.raises(Crash):
            run("cut", state_dir=tmp_path / "state")
    assert json.loads((tmp_path / "state" / "nfe1" / "training_state.json").read_text())["counters"]["batch"] == 6
    torch.manual_seed(1234)  # the global RNG comes back from the state
    calls = count_calls(monkeypatch, progressive, "pd_loss")
    resumed = run("cut", state_dir=tmp_path / "state")
    assert calls[0] == 20 - 6  # round 1 was done, round 2 went on from update 6
    assert_same_checkpoints(tmp_path / "full", tmp_path / "cut", ["nfe2", "nfe1"])
    assert resumed["rounds"][1]["cumulative"]["teacher_forward_images"] == full["rounds"][1]["cumulative"]["teacher_forward_images"]


def test_sfddm_interrupted_resumes_bit_exact(tmp_path, gmm_data, monkeypatch):
    from pipeline.distill.baselines import sfddm

    teacher = frozen(tiny_model(0, perturb_output=True))
    params = SFDDMParams(teacher_steps=8, student_steps=[2, 4], budget="updates", updates=20, batch_size=8)
    run = lambda name, **kw: sfddm_distillation(  # noqa: E731
        teacher, tiny_config(), gmm_data, params, tmp_path / name, tmp_path / f"{name}_control", progress=False, **kw)
    run("full")
    with monkeypatch.context() as m:
        crash_after(m, sfddm, "sfddm_loss", 20 + 7)  # second student, update 7
        with pytest.raises(Crash):
            run("cut", state_dir=tmp_path / "state")
    calls = count_calls(monkeypatch, sfddm, "sfddm_loss")
    run("cut", state_dir=tmp_path / "state")
    assert calls[0] == 20 - 6
    assert_same_checkpoints(tmp_path / "full", tmp_path / "cut", ["nfe2", "nfe4"])


def test_vanilla_interrupted_resumes_bit_exact(tmp_path, gmm_data, monkeypatch):
    from pipeline.distill.baselines import vanilla

    params = VanillaParams(updates=20, batch_size=8)  # lr x 0.1 from update 10; a state every 2 updates
    run = lambda name, **kw: vanilla_distillation(  # noqa: E731
        tiny_model(0, perturb_output=True), tiny_config(), gmm_data, params, tmp_path / name / "nfe2", progress=False, **kw)
    full = run("full", live_dir=tmp_path / "full_live")
    with monkeypatch.context() as m:
        crash_after(m, vanilla, "vanilla_loss", 13)
        with pytest.raises(Crash):
            run("cut", state_dir=tmp_path / "state", live_dir=tmp_path / "cut_live")
    calls = count_calls(monkeypatch, vanilla, "vanilla_loss")
    resumed = run("cut", state_dir=tmp_path / "state", live_dir=tmp_path / "cut_live")
    assert calls[0] == 20 - 12
    assert_same_checkpoints(tmp_path / "full", tmp_path / "cut", ["nfe2"])  # the summary in model.json too
    assert resumed["teacher_images"] == full["teacher_images"] > 0
    for f in ("metrics.json", "plots/metrics/loss.tsv", "plots/metrics/lr.tsv"):
        assert (tmp_path / "full_live" / f).read_text() == (tmp_path / "cut_live" / f).read_text(), f


# ---------------------------------------------------------------- comparison

def _write_costs(cost_dir, records):
    cost_dir.mkdir(parents=True, exist_ok=True)
    for stage, rec in records.items():
        (cost_dir / f"{stage}.json").write_text(json.dumps({"stage": stage, **rec}))


def test_comparison_counts_every_method_the_same_way(tmp_path):
    evaluation = {"sfd/nfe2": {"fid": 5.0}, "pd/nfe2": {"fid": 6.0}, "pd/nfe1": {"fid": 9.0},
                  "sfddm/nfe2": {"fid": 50.0}, "sfddm_control/nfe2": {"fid": 40.0}, "euler/nfe2": {"fid": 40.0},
                  "teacher/nfe35": {"fid": 1.0}}
    pd_cum = {"2": {"teacher_forward_images": 2000, "student_forward_images": 1000, "student_backward_images": 1000,
                    "wall_seconds": 10.0},
              "1": {"teacher_forward_images": 3000, "student_forward_images": 1500, "student_backward_images": 1500,
                    "wall_seconds": 15.0}}
    _write_costs(tmp_path / "cost", {
        "trajectories": {"teacher_forward_images": 0, "wall_seconds": 0.1},  # a re-run that found every chunk committed
        "distill": {"student_forward_images": 5, "student_backward_images": 5, "wall_seconds": 0.5,
                    "consumed_trajectories": {"trajectories": 3, "teacher_forward_images": 30, "wall_seconds": 0.5,
                                              "unknown_trajectories": 0}},
        "baseline_pd": {"teacher_forward_images": 3000, "student_forward_images": 1500, "student_backward_images": 1500,
                        "wall_seconds": 15.0, "cumulative_by_nfe": pd_cum},
        "baseline_sfddm": {"teacher_forward_images": 10, "student_forward_images": 10, "student_backward_images": 10},
    })
    data, md = build_comparison(evaluation, tmp_path / "cost", plot_path=tmp_path / "cmp.png")
    rows = data["entries"]
    assert set(rows) == {"sfd/nfe2", "pd/nfe2", "pd/nfe1", "sfddm/nfe2", "sfddm_control/nfe2"}
    assert rows["sfd/nfe2"]["forward_equivalents"] == 30 + 5 + 2 * 5  # its trajectories' teacher cost + training
    assert rows["sfd/nfe2"]["teacher_forward_images"] == 30
    assert rows["sfd/nfe2"]["marginal"]["forward_equivalents"] == 5 + 2 * 5  # given the cache: training only
    assert rows["pd/nfe2"]["forward_equivalents"] == 2000 + 1000 + 2 * 1000  # rounds up to NFE 2 only
    assert rows["pd/nfe1"]["forward_equivalents"] == 3000 + 1500 + 2 * 1500
    assert "marginal" not in rows["pd/nfe2"]  # no cache: marginal = total
    assert rows["sfddm_control/nfe2"]["forward_equivalents"] == 0
    head = data["headline"]
    assert head["ratio"] == pytest.approx(5000 / 45) and head["ratio_kind"] == "lower bound"
    assert head["status"] == "met" and "5000" in head["statement"].replace(",", "")
    assert "| pd | 2 |" in md and (tmp_path / "cmp.png").is_file()


def test_comparison_headline_when_the_baseline_is_better_or_missing():
    from pipeline.evaluation.comparison import Row

    rows = [Row("sfd", 2, 5.0, Cost(100, 0, 0, 1.0)), Row("pd", 2, 4.0, Cost(500, 0, 0, 2.0))]
    head = headline(rows)
    assert head["ratio"] == pytest.approx(5.0) and head["ratio_kind"] == "upper bound" and head["status"] == "not met"
    head = headline(rows[:1])
    assert head["status"] == "incomplete" and head["missing"] == ["pd/nfe2"]
    assert comparison_rows({"sfd/nfe2": {"fid": 1.0}}, {})[0].cost is None
    assert math.isinf(headline([Row("sfd", 2, 5.0, Cost()), Row("pd", 2, 6.0, Cost(1, 0, 0, 0.0))])["ratio"])
