"""Distilling EDM networks (SongUNet / DhariwalUNet in EDM's preconditioners): SFD-v step condition,
SFDDM features, the common model interface of pipeline.distill, the EDM checkpoint format, baselines.

Tiny CPU configs; the teachers get random weights everywhere (EDM zero-initialises its output layers,
which would make every denoiser the identity and hide bugs).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline.core.checkpoints import save_checkpoint
from pipeline.core.param_checks import ParamError
from pipeline.diffusion.schedules import Schedule
from pipeline.diffusion.solvers import solve
from pipeline.distill.baselines.common import TrainingData
from pipeline.distill.baselines.progressive import PDParams, progressive_distillation
from pipeline.distill.baselines.sfddm import SFDDMParams, init_student, sfddm_distillation
from pipeline.distill.baselines.vanilla import VanillaParams, vanilla_distillation
from pipeline.distill.losses import make_loss
from pipeline.distill.sfd import sfd_batch
from pipeline.distill.student import sampler_section, save_student, student_config, student_from_checkpoint
from pipeline.networks.edm import build_edm_model
from pipeline.trajectories.reader import TrajectoryBatch
from pipeline.training.optim import adam

SONG = dict(img_resolution=8, img_channels=3, label_dim=0, model_type="SongUNet", model_channels=4, channel_mult=[1, 2],
            num_blocks=1, attn_resolutions=[4], dropout=0.0, augment_dim=0, embedding_type="positional",
            resample_filter=[1, 1])
DHARIWAL = dict(img_resolution=8, img_channels=3, label_dim=3, model_type="DhariwalUNet", model_channels=8,
                channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
SHAPE = (3, 8, 8)


def randomised(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm0.weight") or "norm" in name and name.endswith(".weight"):
                p.copy_(1 + std * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def tiny_teacher(precond: str = "VPPrecond", kwargs: dict | None = None, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomised(build_edm_model(precond, dict(kwargs or SONG)), seed).eval().requires_grad_(False)


def write_teacher(directory, model) -> None:
    """The EDM checkpoint format: the preconditioner's whole state dict + model.json (architecture edm)."""
    config = {**model.checkpoint_architecture(),
              "data": {"sample_shape": [model.img_channels, model.img_resolution, model.img_resolution],
                       "num_classes": model.label_dim},
              "sampler": None, "provenance": {"kind": "test teacher"}}
    save_checkpoint(directory, model.checkpoint_state_dict(), config)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("edm_teacher") / "teacher"
    write_teacher(d, tiny_teacher())
    return d


def inputs(batch: int = 4, seed: int = 1, labels: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *SHAPE), generator=g) * 3
    sigma = torch.exp(torch.linspace(-3, 4, batch))
    lab = torch.randint(labels, (batch,), generator=g) if labels else None
    return x, sigma, lab


# ---------------------------------------------------------------- the step condition on EDM networks

def test_sfdv_student_on_songunet_equals_its_teacher_at_initialisation(teacher_dir):
    from pipeline.teachers.loader import load_teacher

    teacher = load_teacher(teacher_dir).model
    init = student_from_checkpoint(teacher_dir, step_condition=True, seed=3)
    student = init.model.eval()
    assert student.step_condition and not teacher.step_condition
    assert init.config["architecture"] == "edm" and init.config["edm"]["precond"] == "VPPrecond"
    assert init.config["edm"]["init_kwargs"]["step_condition"] is True
    assert init.config["data"] == {"sample_shape": list(SHAPE), "num_classes": 0}
    new = sorted(set(student.checkpoint_state_dict()) - set(teacher.checkpoint_state_dict()))
    assert new and all(k.startswith("model.map_steps_") for k in new), new
    x, sigma, _ = inputs()
    with torch.no_grad():
        ref = teacher(x, sigma)
        for n in (3, 4, 5, 7, 12):
            out = student(x, sigma, num_steps=torch.full((4,), n))
            assert torch.equal(out, ref), n
    with pytest.raises(ParamError, match="num_steps"):
        student(x, sigma)
    # the condition is live once its last layer moves off zero
    with torch.no_grad():
        student.model.map_steps_layer1.weight.normal_()
        a = student(x, sigma, num_steps=torch.full((4,), 4))
        b = student(x, sigma, num_steps=torch.full((4,), 6))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("precond", ["EDMPrecond", "iDDPMPrecond"])
def test_step_condition_on_dhariwalunet(precond):
    teacher = tiny_teacher(precond, DHARIWAL, seed=2)
    torch.manual_seed(5)
    student = build_edm_model(precond, {**DHARIWAL, "step_condition": True}).eval()
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and sorted(missing) == sorted(
        f"model.map_steps_layer{i}.{w}" for i in (0, 1) for w in ("weight", "bias"))
    assert torch.count_nonzero(student.model.map_steps_layer1.weight) == 0
    x, sigma, labels = inputs(labels=3)
    with torch.no_grad():
        ref = teacher(x, sigma, labels)
        for n in (3, 4, 7):
            assert torch.equal(student(x, sigma, labels, num_steps=torch.full((4,), n)), ref)
    with pytest.raises(ParamError, match="step-conditioned"):
        student(x, sigma, labels)


@pytest.mark.parametrize("precond,kwargs,channels", [
    ("VPPrecond", SONG, 4), ("VEPrecond", {**SONG, "decoder_type": "skip", "encoder_type": "residual",
                                           "embedding_type": "fourier", "resample_filter": [1, 3, 3, 1],
                                           "channel_mult_noise": 2}, 4),
    ("EDMPrecond", DHARIWAL, 8), ("iDDPMPrecond", DHARIWAL, 8),
])
def test_return_features_is_the_input_of_the_output_conv(precond, kwargs, channels):
    model = tiny_teacher(precond, kwargs)
    x, sigma, labels = inputs(labels=kwargs["label_dim"])
    with torch.no_grad():
        d, h = model(x, sigma, labels, return_features=True)
        assert torch.equal(d, model(x, sigma, labels))
    assert h.shape == (4, channels, 8, 8)
    # h is what the (last, full-resolution) output convolution reads
    conv = model.model.out_conv if hasattr(model.model, "out_conv") else model.model.dec["8x8_aux_conv"]
    captured = []
    handle = conv.register_forward_hook(lambda m, args, out: captured.append(args[0]))
    with torch.no_grad():
        model(x, sigma, labels)
    handle.remove()
    assert torch.equal(captured[-1], h)


# ---------------------------------------------------------------- SFD on an EDM teacher

def fake_batch(teacher, schedule: Schedule, batch: int = 6, M: int = 3) -> TrajectoryBatch:
    """Teacher states at the student timestamps from Euler on the teacher's fine grid (M + 1 steps per interval)."""
    g = torch.Generator().manual_seed(7)
    x_t = schedule.t_max * torch.randn((batch, *SHAPE), generator=g)
    fine = schedule.fine(M)
    states, x = [], x_t
    with torch.no_grad():
        for n in range(schedule.num_steps - 1):
            x = solve(teacher, x, fine[n * (M + 1): (n + 1) * (M + 1) + 1], "euler").to(torch.float32)
            states.append(x)
    return TrajectoryBatch(x_t, torch.stack(states, 1), None, torch.arange(batch))


@pytest.mark.parametrize("step_condition", [False, True])
def test_sfd_batches_run_and_lower_the_loss(teacher_dir, step_condition):
    from pipeline.teachers.loader import load_teacher

    teacher = load_teacher(teacher_dir).model
    schedule = Schedule(num_steps=4)
    batch = fake_batch(teacher, schedule)
    init = student_from_checkpoint(teacher_dir, step_condition=step_condition, seed=0)
    model = init.model.train()
    optimizer = adam(model, 3e-3)
    loss_fn = make_loss("l1")
    first = sfd_batch(model, optimizer, batch, schedule.t_steps(), loss_fn, afs=True)
    assert [n for n, _ in first] == [2, 3]  # AFS: 2 network steps, one optimizer step each
    for _ in range(6):
        last = sfd_batch(model, optimizer, batch, schedule.t_steps(), loss_fn, afs=True)
    assert sum(v for _, v in last) < 0.95 * sum(v for _, v in first), (first, last)
    assert init.init_hash != ""


def test_save_student_then_load_teacher_round_trip(tmp_path, teacher_dir):
    from pipeline.teachers.loader import load_teacher

    init = student_from_checkpoint(teacher_dir, step_condition=True, seed=0)
    model = init.model
    with torch.no_grad():  # as after training: the step condition says something
        model.model.map_steps_layer1.weight.normal_(std=0.1)
    schedule = Schedule(num_steps=5)  # SFD-v: the largest N trained on is the sampler's default
    config = student_config(init.config, sampler_section(schedule, afs=True, step_condition=[4, 5]), {"kind": "test"})
    save_student(tmp_path / "student", model, config)
    saved = json.loads((tmp_path / "student" / "model.json").read_text())
    assert saved["architecture"] == "edm" and "network" not in saved and "sigma_data" not in saved
    assert saved["edm"]["init_kwargs"]["step_condition"] is True and saved["sampler"]["step_condition"] == [4, 5]
    loaded = load_teacher(tmp_path / "student")
    assert loaded.is_distilled and loaded.num_steps == 5
    x, sigma, _ = inputs()
    model.eval()
    with torch.no_grad():
        for n in (4, 5):
            steps = torch.full((4,), n)
            assert torch.equal(loaded.model(x, sigma, num_steps=steps), model(x, sigma, num_steps=steps))
        assert torch.equal(loaded.denoiser(x, sigma), model(x, sigma, num_steps=torch.full((4,), 5)))
    # a student of a distilled EDM checkpoint (stage 2) keeps the step condition it has
    again = student_from_checkpoint(tmp_path / "student", step_condition=False, seed=1)
    assert again.model.step_condition
    for a, b in zip(again.model.checkpoint_state_dict().values(), model.checkpoint_state_dict().values()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- baselines on an EDM teacher

@pytest.fixture(scope="module")
def edm_data():
    g = torch.Generator().manual_seed(0)
    return TrainingData(torch.rand((32, *SHAPE), generator=g) * 2 - 1, None)


def teacher_config(model) -> dict:
    return {**model.checkpoint_architecture(), "data": {"sample_shape": list(SHAPE), "num_classes": 0},
            "sampler": None, "provenance": {"kind": "test teacher"}}


def check_edm_student(directory, teacher) -> None:
    from pipeline.teachers.loader import load_teacher

    saved = json.loads((directory / "model.json").read_text())
    assert saved["architecture"] == "edm" and saved["sampler"] is not None
    loaded = load_teacher(directory)
    x, sigma, _ = inputs()
    with torch.no_grad():
        assert torch.isfinite(loaded.model(x, sigma)).all()
    assert set(loaded.model.state_dict()) == set(teacher.state_dict())


def test_pd_on_an_edm_teacher(tmp_path, edm_data):
    teacher = tiny_teacher()
    params = PDParams(start_steps=4, final_steps=2, updates_per_round=2, batch_size=4)
    summary = progressive_distillation(teacher, teacher_config(teacher), edm_data, params, tmp_path / "pd", progress=False)
    assert summary["nfes"] == [2] and summary["rounds"][0]["updates"] == 2
    check_edm_student(tmp_path / "pd" / "nfe2", teacher)


@pytest.mark.parametrize("init", ["random", "teacher"])
def test_sfddm_on_an_edm_teacher(tmp_path, edm_data, init):
    teacher = tiny_teacher()
    params = SFDDMParams(teacher_steps=8, student_steps=[2], budget="updates", updates=2, batch_size=4, init=init)
    summary = sfddm_distillation(teacher, teacher_config(teacher), edm_data, params, tmp_path / "s", tmp_path / "c",
                                 progress=False)
    assert summary["students"][0]["updates"] == 2
    check_edm_student(tmp_path / "s" / "nfe2", teacher)
    if init == "teacher":
        assert summary["students"][0]["loss_first"] > 1e-4  # a copy: the c-step target still differs from its one step
    # random init: the teacher's architecture, seeded, not its weights
    a = init_student(teacher, teacher_config(teacher), "random", seed=4)
    b = init_student(teacher, teacher_config(teacher), "random", seed=4)
    assert type(a) is type(teacher) and set(a.state_dict()) == set(teacher.state_dict())
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.model.enc["8x8_conv"].weight, teacher.model.enc["8x8_conv"].weight)


def test_vanilla_on_an_edm_teacher(tmp_path, edm_data):
    teacher = tiny_teacher()
    params = VanillaParams(updates=2, batch_size=4)
    vanilla_distillation(teacher, teacher_config(teacher), edm_data, params, tmp_path / "v", progress=False)
    check_edm_student(tmp_path / "v", teacher)


# ---------------------------------------------------------------- the common interface on our U-Net

def test_our_unet_interface_matches_its_checkpoint_format():
    from pipeline.diffusion.denoisers import EDMPrecond
    from pipeline.networks.unet import build_network, network_config

    cfg = {"img_resolution": 8, "in_channels": 1, "model_channels": 8, "channel_mult": [1], "num_blocks": 1,
           "attn_resolutions": []}
    model = EDMPrecond(build_network(**cfg), sigma_data=0.5)
    assert model.checkpoint_module() is model.net and not model.step_condition
    assert model.checkpoint_architecture() == {"network": network_config(**cfg), "sigma_data": 0.5}
    assert list(model.checkpoint_state_dict()) == list(model.net.state_dict())
    stepped = EDMPrecond(build_network(**cfg, step_condition=True))
    assert stepped.step_condition and stepped.checkpoint_architecture()["network"]["step_condition"] is True
    base = {**model.checkpoint_architecture(), "data": {"sample_shape": [1, 8, 8], "num_classes": 0}}
    assert list(student_config(base, None, {})) == ["network", "sigma_data", "data", "sampler", "provenance"]


# ---------------------------------------------------------------- end to end: trajectories + SFD-v stage

def test_sfdv_stage_end_to_end_on_an_edm_teacher_checkpoint(tmp_path, teacher_dir):
    from pipeline.config.params import parse_params
    from pipeline.distill.sfd import run_distill_stage
    from pipeline.teachers.loader import load_student
    from pipeline.trajectories.generation import run_trajectories_stage

    schedule = {"kind": "polynomial", "num_steps": [3, 4], "t_min": 0.006, "t_max": 80.0, "rho": 7.0}
    p = parse_params({
        "loss": "l1",
        "trajectories_v": {"seeds": "0-15", "chunk_size": 8, "batch_size": 8, "M": 1, "schedule": schedule},
        "distill_v": {"trajectories": "trajectories_v", "step_condition": True, "kimg": 0.032, "batch_size": 8,
                      "lr": 1e-3, "checkpoint_every_kimg": 0.016, "log_every_kimg": 0.008, "device": "cpu"},
    })  # fmt: skip
    store = tmp_path / "trajectories.zarr"
    run_trajectories_stage(p.trajectories_v, store, name="trajectories_v", device="cpu", teacher_ckpt=teacher_dir,
                           progress=False)
    result = run_distill_stage(
        p.section("distill_v"), trajectories=p.trajectories_for("distill_v"), loss=p.loss, name="distill_v",
        store=store, teacher_ckpt=teacher_dir, out=tmp_path / "student", state_dir=tmp_path / "state", progress=False,
    )  # fmt: skip
    assert result["batches"] == 4 and all(v is not None and math.isfinite(v) for v in result["final_loss"].values())
    saved = json.loads((tmp_path / "student" / "model.json").read_text())
    assert saved["architecture"] == "edm" and saved["edm"]["init_kwargs"]["step_condition"] is True
    student = load_student(tmp_path / "student")
    assert student.sampler.step_condition == (3, 4) and student.model.step_condition
    x, sigma, _ = inputs()
    with torch.no_grad():
        assert torch.isfinite(load_student(tmp_path / "student", num_steps=3).denoiser(x, sigma)).all()


def test_student_from_an_edm_snapshot_pickle(tmp_path):
    from test_edm_pickle import write_port_snapshot

    teacher = tiny_teacher()
    pkl = tmp_path / "network-snapshot.pkl"
    write_port_snapshot(pkl, teacher, tmp_path / "ran")
    init = student_from_checkpoint(pkl, step_condition=True, seed=0)
    assert init.config["architecture"] == "edm" and init.config["edm"]["init_kwargs"]["step_condition"] is True
    x, sigma, _ = inputs()
    with torch.no_grad():
        assert torch.equal(init.model.eval()(x, sigma, num_steps=torch.full((4,), 4)), teacher(x, sigma))
    assert not (tmp_path / "ran").exists()  # no pickled code ran
