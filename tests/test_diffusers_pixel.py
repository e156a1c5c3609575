"""diffusers pixel teachers: D derived by hand from diffusers' own UNet output, DDIM (eta 0) = our Euler,
bad folders, converted folders, the sigma-range defaults of discrete teachers."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from pipeline.core.param_checks import PipelineError  # noqa: E402
from pipeline.diffusion.solvers import solve  # noqa: E402
from pipeline.teachers.loader import load_teacher  # noqa: E402


def tiny_unet(**extra):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=4, **extra,
    )


def save_pixel_folder(path, *, prediction_type="epsilon", beta_schedule="linear", num_train_timesteps=1000, **unet_extra):
    unet = tiny_unet(**unet_extra)
    sched = diffusers.DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                                    prediction_type=prediction_type)
    diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(path)
    return unet.eval(), sched


def hand_d(unet, sched, x, tau, prediction_type, class_labels=None):
    """x0 from diffusers' own UNet output at integer timestep tau, in the VE view (teachers.md)."""
    abar = sched.alphas_cumprod[tau].double()
    sigma = ((1 - abar) / abar).sqrt()
    x_vp = (x.double() * abar.sqrt()).float()
    with torch.no_grad():
        o = unet(x_vp, torch.full((x.shape[0],), tau), class_labels=class_labels).sample.double()
    if prediction_type == "epsilon":
        return x.double() - sigma * o
    if prediction_type == "v_prediction":
        return abar.sqrt() * x_vp.double() - (1 - abar).sqrt() * o
    return o


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_denoiser_equals_hand_derived(tmp_path, prediction_type, beta_schedule):
    unet, sched = save_pixel_folder(tmp_path, prediction_type=prediction_type, beta_schedule=beta_schedule)
    teacher = load_teacher(tmp_path)
    model = teacher.model
    assert teacher.sample_shape == (3, 8, 8) and teacher.num_classes == 0
    # our float64 abar table matches diffusers' float32 one
    torch.testing.assert_close(model.alphas_cumprod.float(), sched.alphas_cumprod, rtol=1e-5, atol=1e-6)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 3
    for tau in (0, 17, 500, 999):
        sigma = model.sigmas[tau]
        assert float(model.sigma_to_t(sigma.reshape(1))) == tau  # exact on the grid
        d = teacher.denoiser(x, torch.full((2,), float(sigma)))
        # diffusers' abar is float32: near the end of squaredcos_cap_v2 (sigma ~ 1e4) x - sigma o cancels,
        # so the tolerance scales with sigma
        tol = 1e-4 * (1 + float(sigma))
        torch.testing.assert_close(d.double(), hand_d(unet, sched, x, tau, prediction_type), rtol=1e-4, atol=tol)


def test_sigma_between_grid_points_interpolates_log_sigma(tmp_path):
    save_pixel_folder(tmp_path)
    model = load_teacher(tmp_path).model
    s = model.sigmas
    mid = (s[100].log() * 0.25 + s[101].log() * 0.75).exp()
    assert float(model.sigma_to_t(mid.reshape(1))) == pytest.approx(100.75, abs=1e-9)
    # DDPM linear betas: sigma range 0.0100 ... 157.4 (teachers.md)
    assert model.sigma_min == pytest.approx(0.0100, abs=1e-4) and model.sigma_max == pytest.approx(157.4, abs=0.1)


def test_class_labels(tmp_path):
    unet, sched = save_pixel_folder(tmp_path, num_class_embeds=5)
    teacher = load_teacher(tmp_path)
    assert teacher.num_classes == 5
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 3, 4])
    tau = 250
    d = teacher.denoiser(x, teacher.model.sigmas[tau].float().expand(3), labels)
    torch.testing.assert_close(d.double(), hand_d(unet, sched, x, tau, "epsilon", labels), rtol=1e-4, atol=1e-4)
    with pytest.raises(PipelineError, match="class embedding"):
        teacher.denoiser(x, 1.0, None)


def test_ddim_eta0_equals_euler(tmp_path):
    unet, _ = save_pixel_folder(tmp_path, beta_schedule="scaled_linear", prediction_type="v_prediction")
    teacher = load_teacher(tmp_path)
    ddim = diffusers.DDIMScheduler.from_pretrained(tmp_path / "scheduler", clip_sample=False, set_alpha_to_one=True)
    assert ddim.config.prediction_type == "v_prediction"
    num_steps = 6
    ddim.set_timesteps(num_steps)
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    x_vp = z.clone()
    with torch.no_grad():
        for t in ddim.timesteps:
            x_vp = ddim.step(unet(x_vp, t).sample, t, x_vp, eta=0.0).prev_sample
    sig = teacher.model.sigmas
    grid = torch.cat([sig[ddim.timesteps.long()], torch.zeros(1, dtype=torch.float64)])  # ends at abar = 1
    x0 = z.double() * math.sqrt(1 + float(grid[0]) ** 2)  # x_ve = x_vp / sqrt(abar)
    with torch.no_grad():
        ours = solve(teacher.denoiser, x0, grid, "euler")
    torch.testing.assert_close(ours, x_vp.double(), rtol=1e-4, atol=1e-4)


def test_bad_folders_fail_with_one_line(tmp_path):
    empty = tmp_path / "empty"
    (empty / "unet").mkdir(parents=True)
    (empty / "unet" / "config.json").write_text("{}")
    with pytest.raises(PipelineError, match="model_index.json is missing") as e:
        load_teacher(empty)
    assert "\n" not in str(e.value)

    bad_pred = tmp_path / "pred"
    save_pixel_folder(bad_pred)
    cfg_path = bad_pred / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "prediction_type": "flow"}))
    with pytest.raises(PipelineError, match=r"scheduler_config.json: prediction_type 'flow'") as e:
        load_teacher(bad_pred)
    assert "\n" not in str(e.value)

    no_abar = tmp_path / "noabar"
    save_pixel_folder(no_abar)
    cfg_path = no_abar / "scheduler" / "scheduler_config.json"
    cfg = {k: v for k, v in json.loads(cfg_path.read_text()).items() if k not in ("beta_schedule", "trained_betas")}
    cfg_path.write_text(json.dumps({**cfg, "_class_name": "ScoreSdeVeScheduler"}))
    with pytest.raises(PipelineError, match=r"scheduler_config.json: no 'beta_schedule' key") as e:
        load_teacher(no_abar)
    assert "\n" not in str(e.value)

    pickled = tmp_path / "bin"
    save_pixel_folder(pickled)
    (pickled / "unet" / "diffusion_pytorch_model.safetensors").rename(pickled / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(PipelineError, match="must be safetensors.*never loads"):
        load_teacher(pickled)


def test_schedule_defaults_to_teacher_sigma_range_and_discrete_kind(tmp_path):
    from pipeline.config.trajectories import TrajectoryParams
    from pipeline.trajectories.spec import trajectory_specs

    save_pixel_folder(tmp_path)
    teacher = load_teacher(tmp_path)
    lo, hi = teacher.sigma_range
    params = TrajectoryParams.from_dict({"schedule": {"kind": "polynomial", "num_steps": 4}, "seeds": "0-3"})
    (spec,) = trajectory_specs(params, teacher_hash=teacher.weights_hash, num_classes=0,
                               sample_shape=teacher.sample_shape, **teacher.spec_options())
    t = spec.schedule.t_steps()
    assert float(t[0]) == pytest.approx(hi, rel=1e-12) and float(t[-1]) == pytest.approx(lo, rel=1e-12)
    assert "prompt_set" not in spec.description()  # only text-to-image teachers add it

    # the discrete kind runs on the teacher's own sigma grid
    params = TrajectoryParams.from_dict({"schedule": {"kind": "discrete", "num_steps": 5, "rho": 1.0}, "M": 1})
    (spec,) = trajectory_specs(params, teacher_hash=teacher.weights_hash, num_classes=0,
                               sample_shape=teacher.sample_shape, **teacher.spec_options())
    grid = teacher.model.sigmas
    for s in spec.schedule.fine(spec.M):
        assert torch.isclose(grid, s.to(torch.float64), rtol=1e-12, atol=0).any()
    assert float(spec.schedule.t_steps()[0]) == pytest.approx(hi, rel=1e-12)

    # a schedule asking for sigma outside the teacher's range: one line naming the key and the range
    params = TrajectoryParams.from_dict({"schedule": {"kind": "polynomial", "num_steps": 4, "t_min": 0.002, "t_max": 80.0}})
    with pytest.raises(PipelineError, match=r"trajectories.schedule.t_min: 0.002 is below the discrete teacher's smallest sigma 0.01"):
        trajectory_specs(params, teacher_hash="x", num_classes=0, sample_shape=(3, 8, 8), **teacher.spec_options())
    params = TrajectoryParams.from_dict({"schedule": {"kind": "polynomial", "num_steps": 4, "t_min": 0.02, "t_max": 200.0}})
    with pytest.raises(PipelineError, match=r"t_max: 200.0 is above the discrete teacher's largest sigma 157"):
        trajectory_specs(params, teacher_hash="x", num_classes=0, sample_shape=(3, 8, 8), **teacher.spec_options())


def test_import_cli_converted_folder_identical_and_teacher_stage(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.teachers.training import import_pretrained_teacher

    src = tmp_path / "ddpm"
    save_pixel_folder(src, prediction_type="v_prediction", num_class_embeds=3)
    result = CliRunner().invoke(app, ["teacher", "import", str(src), "--out", str(tmp_path / "conv")])
    assert result.exit_code == 0, result.output
    assert "diffusers UNet2DModel (v_prediction)" in result.output and "3 classes" not in result.output
    a, b = load_teacher(src), load_teacher(tmp_path / "conv")
    assert a.weights_hash == b.weights_hash and b.num_classes == 3 and b.sigma_range == a.sigma_range
    assert json.loads((tmp_path / "conv" / "model.json").read_text())["architecture"] == "diffusers"
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(5)) * 10
    labels = torch.tensor([0, 1, 2, 1])
    for sigma in (0.02, 0.7, 3.3, 150.0):  # between grid points too
        assert torch.equal(a.denoiser(x, sigma, labels), b.denoiser(x, sigma, labels))

    # the teacher stage with teacher.pretrained pointing at the diffusers folder
    info = import_pretrained_teacher(src, tmp_path / "models" / "teacher", {"sample_shape": [3, 8, 8]})
    assert info["architecture"] == "diffusers" and info["weights_hash"] == a.weights_hash
    assert load_teacher(tmp_path / "models" / "teacher").weights_hash == a.weights_hash
    with pytest.raises(PipelineError, match=r"makes samples of shape \[3, 8, 8\], the data has \[1, 8, 8\]"):
        import_pretrained_teacher(src, tmp_path / "other", {"sample_shape": [1, 8, 8]})

    bad = CliRunner().invoke(app, ["teacher", "import", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2


def test_pixel_student_export_samples_with_plain_diffusers(tmp_path):
    """Distilled pixel student -> sfd export --format diffusers -> the README loop equals sfd sample."""
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.diffusion.schedules import Schedule
    from pipeline.diffusion.seeds import seed_noise
    from pipeline.distill.student import sampler_section, save_student, student_config, student_from_checkpoint
    from pipeline.evaluation.samples import sample_teacher
    from pipeline.teachers.loader import load_student

    src = tmp_path / "ddpm"
    save_pixel_folder(src)
    CliRunner().invoke(app, ["teacher", "import", str(src), "--out", str(tmp_path / "teacher")])
    init = student_from_checkpoint(tmp_path / "teacher")
    with torch.no_grad():
        for p in init.model.unet.parameters():  # pretend distillation changed it
            p.add_(0.01 * torch.randn_like(p))
    schedule = Schedule("polynomial", 4, 0.02, 80.0, 7.0)
    save_student(tmp_path / "sfd", init.model, student_config(init.config, sampler_section(schedule, afs=True), {}))
    result = CliRunner().invoke(app, ["export", "--ckpt", str(tmp_path / "sfd"), "--format", "diffusers",
                                      "--out", str(tmp_path / "export")])
    assert result.exit_code == 0, result.output
    unet = diffusers.UNet2DModel.from_pretrained(tmp_path / "export" / "unet").eval()
    s = json.loads((tmp_path / "export" / "sfd_sampler.json").read_text())
    assert s["afs"] is True and s["guidance"] == 1.0 and s["nfe"] == 2 and len(s["sigmas"]) == 4
    sig, ts = s["sigmas"], s["timesteps"]
    x = sig[0] * seed_noise([0, 1], s["sample_shape"]).float()
    with torch.no_grad():
        for i in range(len(sig) - 1):
            eps = x / (1 + sig[0] ** 2) ** 0.5 if (i == 0 and s["afs"]) else unet(x / (1 + sig[i] ** 2) ** 0.5, torch.tensor(ts[i])).sample
            x = x + (sig[i + 1] - sig[i]) * eps
    ours, _, _ = sample_teacher(load_student(tmp_path / "sfd"), [0, 1])
    torch.testing.assert_close(x, ours, rtol=1e-4, atol=1e-4)

    # what the folder declares: DDPMPipeline + the SFD scheduler samples the student with its own steps
    from unittest import mock

    import pipeline.teachers.diffusers_scheduler  # noqa: F401  (diffusers loads only modules the caller imported)

    pipe = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "export")
    assert type(pipe).__name__ == "DDPMPipeline" and type(pipe.scheduler).__name__ == "SFDScheduler"
    calls = []
    pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    z = seed_noise([0, 1], s["sample_shape"]).float()  # the pipeline's own noise draw, replaced by the seeds' noise
    with mock.patch("diffusers.pipelines.ddpm.pipeline_ddpm.randn_tensor", return_value=z):
        images = pipe(batch_size=2, num_inference_steps=2, output_type="pt").images
    assert len(calls) == 3  # N - 1 = 3 UNet calls (AFS: the first is not used), not the scheduler's 1000 steps
    torch.testing.assert_close(images, (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
                               if not torch.is_tensor(images) else (ours / 2 + 0.5).clamp(0, 1), rtol=1e-4, atol=1e-4)
    with pytest.raises(PipelineError, match="not a distilled diffusers UNet|no sampler section"):
        from pipeline.teachers.diffusers_export import export_diffusers

        export_diffusers(tmp_path / "teacher", tmp_path / "bad")


def test_sfd_v_step_condition_on_a_diffusers_unet(tmp_path):
    """SFD-v: zero-initialised step layers on the UNet's time embedding; trajectories_v -> distill_v end to end."""
    from pipeline.config.params import parse_params
    from pipeline.distill.sfd import run_distill_stage
    from pipeline.distill.student import student_from_checkpoint
    from pipeline.teachers.diffusers_folder import convert_diffusers_folder
    from pipeline.teachers.loader import load_student
    from pipeline.trajectories.generation import run_trajectories_stage

    save_pixel_folder(tmp_path / "ddpm")
    convert_diffusers_folder(tmp_path / "ddpm", tmp_path / "teacher")
    teacher = load_teacher(tmp_path / "teacher")
    init = student_from_checkpoint(tmp_path / "teacher", step_condition=True)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        n = torch.tensor([4, 4])
        assert torch.equal(init.model(x, 2.0, None, num_steps=n), teacher.denoiser(x, 2.0))  # starts as the teacher
        init.model.map_steps[2].weight.normal_()
        assert not torch.allclose(init.model(x, 2.0, None, num_steps=n), init.model(x, 2.0, None, num_steps=n + 1))
    with pytest.raises(PipelineError, match="step-conditioned"):
        init.model(x, 2.0)

    params = parse_params({
        "loss": "l2",
        "trajectories_v": {"seeds": "0-7", "chunk_size": 8, "batch_size": 8, "M": 1, "solver": "euler",
                           "schedule": {"kind": "polynomial", "num_steps": [3, 4], "t_min": 0.02, "t_max": 80.0}},
        "distill_v": {"trajectories": "trajectories_v", "step_condition": True, "kimg": 0.016, "batch_size": 8,
                      "checkpoint_every_kimg": 0.008, "log_every_kimg": 0.008, "device": "cpu"},
    })
    store = tmp_path / "traj.zarr"
    run_trajectories_stage(params.trajectories_v, store, name="trajectories_v", device="cpu",
                           teacher_ckpt=tmp_path / "teacher", progress=False)
    run_distill_stage(params.distill_v, trajectories=params.trajectories_v, loss="l2", name="distill_v", store=store,
                      teacher_ckpt=tmp_path / "teacher", out=tmp_path / "sfd_v", state_dir=tmp_path / "state",
                      metrics=tmp_path / "m.json", live_dir=None, cost_path=None, progress=False)
    student = load_student(tmp_path / "sfd_v", num_steps=3)
    assert student.model.step_condition and student.sampler.step_condition == (3, 4) and student.num_steps == 3
    assert json.loads((tmp_path / "sfd_v" / "model.json").read_text())["diffusers"]["step_condition"] is True
    a = student.denoiser(x, 2.0)
    b = load_student(tmp_path / "sfd_v", num_steps=4).denoiser(x, 2.0)
    assert a.shape == (2, 3, 8, 8) and not torch.equal(a, b)  # the bound N matters after distillation


@pytest.mark.parametrize("field, value", [("prediction_type", "v_prediction"), ("beta_end", 0.03),
                                          ("timestep_spacing", "trailing"), ("clip_sample", False)])
def test_a_changed_scheduler_field_changes_the_teacher_hash_and_the_same_folder_does_not(tmp_path, field, value):
    """Every scheduler field enters the store key (the UNet's weights alone are not the teacher); loading the
    same folder twice, from another path, or as its import gives one hash."""
    from pipeline.teachers.diffusers_folder import convert_diffusers_folder

    save_pixel_folder(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    cfg_path = tmp_path / "b" / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg.get(field) != value
    cfg_path.write_text(json.dumps({**cfg, field: value}))
    shutil.copytree(tmp_path / "a", tmp_path / "a-copy")
    a, b = load_teacher(tmp_path / "a"), load_teacher(tmp_path / "b")
    assert a.network_hash == b.network_hash and a.weights_hash != b.weights_hash
    assert load_teacher(tmp_path / "a").weights_hash == load_teacher(tmp_path / "a-copy").weights_hash == a.weights_hash
    convert_diffusers_folder(tmp_path / "a", tmp_path / "a-import")
    assert load_teacher(tmp_path / "a-import").weights_hash == a.weights_hash


def test_sfddm_features_of_a_diffusers_unet(tmp_path):
    """return_features gives the map the UNet's output convolution reads (SFDDM's feature loss), D unchanged."""
    from pipeline.distill.baselines.sfddm import sfddm_loss

    save_pixel_folder(tmp_path)
    teacher = load_teacher(tmp_path)
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 4.0])
    with torch.no_grad():
        d, h = teacher.denoiser(x, sigma, None, return_features=True)
        assert torch.equal(d, teacher.denoiser(x, sigma, None))
    assert h.shape[0] == 2 and h.shape[-2:] == (8, 8) and h.shape[1] == teacher.model.unet.conv_out.in_channels
    sigmas = torch.tensor([80.0, 5.0, 0.5, 0.01], dtype=torch.float64)
    with torch.no_grad():  # the teacher as its own student: its features match themselves, the feature term is 0
        losses = [sfddm_loss(teacher.denoiser, teacher.denoiser, torch.zeros(2, 3, 8, 8), None, sigmas, 3,
                             torch.Generator().manual_seed(0), w) for w in (1.0, 0.0)]
    assert torch.isfinite(losses[0]) and torch.equal(losses[0], losses[1])
