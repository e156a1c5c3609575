"""Flow-matching transformer teachers (SD3 with and without T5, SD3.5-style blocks, Flux.1-dev and a Flux without
the guidance embedding) on tiny random pipelines saved with save_pretrained: D against diffusers' own components,
Euler against the stock pipelines' FlowMatchEuler loop, DPM-Solver++ against diffusers' flow DPM-Solver, the start
at flow time 1, store keys, and SFD from trajectories to an export the stock pipelines sample."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import diffusers  # noqa: E402
from diffusers_fixtures import save_tiny_flux_folder, save_tiny_sd3_folder  # noqa: E402

from pipeline.core.param_checks import PipelineError  # noqa: E402
from pipeline.diffusion.denoisers import guided  # noqa: E402
from pipeline.diffusion.schedules import Schedule, flow_unshift_time  # noqa: E402
from pipeline.diffusion.seeds import seed_noise  # noqa: E402
from pipeline.diffusion.solvers import solve  # noqa: E402
from pipeline.networks.flow import pack_latents, unpack_latents  # noqa: E402
from pipeline.teachers.diffusers_folder import convert_diffusers_folder  # noqa: E402
from pipeline.teachers.loader import load_teacher  # noqa: E402

PROMPTS = ["a red cat", "a blue dog on grass", "two green birds"]
FOLDERS = {  # name -> (writer, its options)
    "sd3": (save_tiny_sd3_folder, {}),
    "sd3-no-t5": (save_tiny_sd3_folder, {"t5": False}),
    "sd35": (save_tiny_sd3_folder, {"sd35": True}),
    "flux-dev": (save_tiny_flux_folder, {}),
    "flux-schnell": (save_tiny_flux_folder, {"guidance_embeds": False}),
}
LABELS = torch.tensor([1, 2])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each tiny pipeline folder, written once, with its pipeline object (diffusers' own components)."""
    root = tmp_path_factory.mktemp("flow")
    out = {}
    for name, (write, options) in FOLDERS.items():
        out[name] = (root / name, write(root / name, **options))
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return out


def reference_denoiser(pipe, x: torch.Tensor, sigma: float, prompts: list[str], guidance: float = 1.0) -> torch.Tensor:
    """D = x_tau - tau v(x_tau, tau T) computed with the pipeline's own encode_prompt, packing and transformer."""
    b, c, h, w = x.shape
    tau = 1.0 if math.isinf(sigma) else sigma / (1 + sigma)
    x_tau = x if math.isinf(sigma) else x / (1 + sigma)
    with torch.no_grad():
        if isinstance(pipe, diffusers.StableDiffusion3Pipeline):
            pe, npe, pp, npp = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, max_sequence_length=256,
                                                  do_classifier_free_guidance=guidance != 1.0)
            if guidance != 1.0:
                pe, pp, x_in = torch.cat([npe, pe]), torch.cat([npp, pp]), torch.cat([x_tau, x_tau])
            else:
                x_in = x_tau
            v = pipe.transformer(hidden_states=x_in, timestep=torch.full((x_in.shape[0],), tau * 1000.0),
                                 encoder_hidden_states=pe, pooled_projections=pp, return_dict=False)[0]
            if guidance != 1.0:
                v_u, v_c = v.chunk(2)
                v = v_u + guidance * (v_c - v_u)
        else:
            pe, pp, text_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, max_sequence_length=512)
            embedded = torch.full((b,), guidance) if pipe.transformer.config.guidance_embeds else None
            out = pipe.transformer(hidden_states=pipe._pack_latents(x_tau, b, c, h, w), timestep=torch.full((b,), tau),
                                   guidance=embedded, pooled_projections=pp, encoder_hidden_states=pe, txt_ids=text_ids,
                                   img_ids=pipe._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32),
                                   return_dict=False)[0]
            f = pipe.vae_scale_factor
            v = pipe._unpack_latents(out, h * f, w * f, f)
    return x_tau - tau * v


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("name", sorted(FOLDERS))
def test_denoiser_equals_the_formula_on_diffusers_components(folders, name):
    """D(x, sigma) = x_tau - tau v(x_tau, tau T), x_tau = x / (1 + sigma), tau = sigma / (1 + sigma), at sigma = inf
    (x = z, tau = 1), 30, 3, 0.3 and 0.01: max relative error < 1e-4 against the pipeline's own components."""
    path, pipe = folders[name]
    teacher = load_teacher(path, prompts=PROMPTS)
    assert teacher.num_classes == 3 and teacher.latent and teacher.sample_shape == (4, 8, 8)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 2
    for sigma in (math.inf, 30.0, 3.0, 0.3, 0.01):
        with torch.no_grad():
            d = teacher.denoiser(x, torch.full((2,), sigma), LABELS)
        assert rel_err(d, reference_denoiser(pipe, x, sigma, [PROMPTS[1], PROMPTS[2]])) < 1e-4, sigma
    # the empty prompt is the unconditional branch (labels None), an encoded cond works in place of labels
    with torch.no_grad():
        assert rel_err(teacher.denoiser(x, 3.0, None), reference_denoiser(pipe, x, 3.0, ["", ""])) < 1e-4
        cond = teacher.encode_prompts([PROMPTS[1], PROMPTS[2]])
        torch.testing.assert_close(teacher.denoiser(x, 3.0, cond), teacher.denoiser(x, 3.0, LABELS))


@pytest.mark.parametrize("name", ["sd3", "flux-dev", "flux-schnell"])
def test_guidance_one_batched_forward_or_the_embedding(folders, name):
    """SD3 (and a Flux without the guidance embedding): v_u + w (v_c - v_u) from one transformer call on the batched
    [uncond; cond]; Flux-dev: w is the transformer's embedded guidance, one pass of the conditional batch."""
    path, pipe = folders[name]
    teacher = load_teacher(path, prompts=PROMPTS)
    calls = []
    hook = teacher.model.transformer.register_forward_hook(lambda m, a, kw_out: calls.append(1))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            d = guided(teacher.denoiser, 4.0)(x, torch.full((2,), 2.0), LABELS)
    finally:
        hook.remove()
    assert len(calls) == 1  # one forward: a batch of 2B (CFG) or B (embedded)
    if name == "flux-schnell":  # FluxPipeline's true CFG: two passes there, the same formula
        ref_c = reference_denoiser(pipe, x, 2.0, [PROMPTS[1], PROMPTS[2]])
        ref_u = reference_denoiser(pipe, x, 2.0, ["", ""])
        ref = ref_u + 4.0 * (ref_c - ref_u)
    else:
        ref = reference_denoiser(pipe, x, 2.0, [PROMPTS[1], PROMPTS[2]], guidance=4.0)
    assert rel_err(d, ref) < 1e-4


@pytest.mark.parametrize("name,w", [("sd3", 3.0), ("sd35", 1.0), ("flux-dev", 3.5)])
def test_euler_trajectory_equals_the_stock_pipeline_flowmatch_euler_loop(folders, name, w):
    """The project's Euler on the flow schedule (sigma_0 = inf ... 0) equals StableDiffusion3Pipeline / FluxPipeline
    with their own FlowMatchEulerDiscreteScheduler (its shift or dynamic shift) given the same points as unshifted
    ``sigmas``: every state within 1e-5."""
    path, pipe = folders[name]
    teacher = load_teacher(path, prompts=PROMPTS)
    sig = Schedule.flow(6, 0.0, teacher.flow_shift).t_steps()
    taus = [1.0] + [s / (1 + s) for s in sig[1:].tolist()]
    u = [flow_unshift_time(t, teacher.flow_shift) for t in taus[:-1]]  # the pipeline shifts them back to taus
    z = seed_noise([0, 1], (4, 8, 8))
    states = []

    def record(_pipe, _i, _t, kwargs):
        states.append(kwargs["latents"].clone())
        return {}

    kwargs = dict(height=16, width=16, sigmas=u, guidance_scale=w, output_type="latent", callback_on_step_end=record)
    with torch.no_grad():
        if name.startswith("sd3"):
            pipe([PROMPTS[1], PROMPTS[2]], latents=z, **kwargs)
        else:
            pipe([PROMPTS[1], PROMPTS[2]], latents=pack_latents(z), **kwargs)
            states = [unpack_latents(s, 8, 8) for s in states]
        assert torch.allclose(pipe.scheduler.sigmas.double(), torch.tensor(taus, dtype=torch.float64), atol=1e-6)
        _, ours = solve(guided(teacher.denoiser, w), z, sig, "euler", labels=LABELS, record=list(range(1, len(sig))))
    assert len(states) == len(ours) == 5
    for x, s, ref in zip(ours, sig[1:].tolist(), states):
        assert float((x / (1 + s) - ref).abs().max()) < 1e-5  # x_tau = x / (1 + sigma)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("start", ["diffusers", "t=1"])
def test_dpmpp_equals_diffusers_flow_dpm_solver(folders, order, start):
    """DPM-Solver++(order) on diffusers' DPMSolverMultistepScheduler(prediction_type="flow_prediction",
    use_flow_sigmas=True, flow_shift=3) points: its own grid (first point 0.999 shifted), and the same grid
    started at tau = 1 exactly (its update formulas evaluated at alpha = 0 are our limit from sigma = inf).
    The model is evaluated at the exact points (diffusers passes the transformer integer timesteps there)."""
    path, _ = folders["sd3"]
    teacher = load_teacher(path, prompts=PROMPTS)
    sch = diffusers.DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                                solver_order=order, algorithm_type="dpmsolver++")
    sch.set_timesteps(8)
    if start == "t=1":
        sch.sigmas[0] = 1.0
    taus = sch.sigmas.double()
    z = seed_noise([0, 1], (4, 8, 8))
    x = z.clone()
    with torch.no_grad():
        for i, timestep in enumerate(sch.timesteps):
            tau = float(sch.sigmas[i])
            sigma = math.inf if tau == 1.0 else tau / (1 - tau)
            d = teacher.denoiser(x if tau == 1.0 else x / (1 - tau), torch.full((2,), sigma), LABELS)
            x = sch.step((x - d) / tau, timestep, x).prev_sample  # the velocity v = (x_tau - D) / tau
        sig = taus / (1 - taus)
        sig[-1] = 0.0
        if start == "t=1":
            sig[0] = math.inf
        x0 = z if start == "t=1" else z / (1 - float(taus[0]))
        ours = solve(teacher.denoiser, x0, sig, "dpmpp", max_order=order, labels=LABELS)
    assert float((ours - x).abs().max()) < 1e-5 * float(x.abs().max())


def test_heun_first_step_from_t1_is_flowmatch_heun(folders):
    """From sigma = inf the VE-sigma Heun has no limit; its first step is Heun's trapezoid in flow time from tau = 1,
    diffusers' FlowMatchHeunDiscreteScheduler's first (predictor + corrector) step."""
    path, _ = folders["sd3"]
    teacher = load_teacher(path, prompts=PROMPTS)
    sch = diffusers.FlowMatchHeunDiscreteScheduler(shift=3.0)
    sch.set_timesteps(4)
    tau1 = float(sch.sigmas[1])
    z = seed_noise([0, 1], (4, 8, 8))
    x = z.clone()
    with torch.no_grad():
        for k in range(2):  # predictor at tau = 1, corrector at tau_1
            tau = float(sch.sigmas[k])
            sigma = math.inf if tau == 1.0 else tau / (1 - tau)
            d = teacher.denoiser(x if tau == 1.0 else x / (1 - tau), torch.full((2,), sigma), LABELS)
            x = sch.step((x - d) / tau, sch.timesteps[k], x).prev_sample
        sig1 = tau1 / (1 - tau1)
        ours = solve(teacher.denoiser, z, torch.tensor([math.inf, sig1], dtype=torch.float64), "heun", labels=LABELS)
    assert float((ours / (1 + sig1) - x).abs().max()) < 1e-5


def test_store_key_covers_the_scheduler_shift_t5_and_latent_size(folders, tmp_path):
    """The teacher hash (the store key's) covers the scheduler config: only `shift` edited in scheduler_config.json
    gives another key; the same folder twice, and the folder and its import, give one key; dropping T5 or another
    latent size (data resolution) gives another."""
    from pipeline.config.params import parse_params
    from pipeline.trajectories.spec import trajectory_specs

    path, _ = folders["sd3"]
    params = parse_params({"trajectories": {"schedule": {"kind": "flow", "num_steps": 4}, "storage_dtype": "bfloat16"}}).trajectories

    def key(teacher):
        (spec,) = trajectory_specs(params, teacher_hash=teacher.weights_hash, num_classes=teacher.num_classes,
                                   sample_shape=teacher.sample_shape, **teacher.spec_options())
        return spec.key, spec.description()

    a, desc = key(load_teacher(path, prompts=PROMPTS))
    assert desc["storage_dtype"] == "bfloat16" and desc["schedule"] == {"kind": "flow", "num_steps": 4, "t_min": 0.0, "shift": 3.0}
    assert key(load_teacher(path, prompts=PROMPTS))[0] == a
    from typer.testing import CliRunner

    from pipeline.cli import app

    result = CliRunner().invoke(app, ["teacher", "import", str(path), "--out", str(tmp_path / "imported"),
                                      "--prompts", str(path.parent / "prompts.txt")])  # `sfd teacher import`
    assert result.exit_code == 0 and "SD3Transformer2DModel" in result.output, result.output
    imported = load_teacher(tmp_path / "imported")
    assert key(imported)[0] == a and imported.prompts == PROMPTS
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # the import gives identical outputs
        assert torch.equal(imported.denoiser(x, 2.0, LABELS), load_teacher(path, prompts=PROMPTS).denoiser(x, 2.0, LABELS))
    assert key(load_teacher(folders["sd3-no-t5"][0], prompts=PROMPTS))[0] != a
    convert_diffusers_folder(path, tmp_path / "at32", prompts_file=folders["sd3"][0].parent / "prompts.txt",
                             data_description={"sample_shape": [3, 32, 32]})
    bigger = load_teacher(tmp_path / "at32")
    assert bigger.sample_shape == (4, 16, 16) and key(bigger)[0] != a

    import shutil

    edited = tmp_path / "shift"
    shutil.copytree(path, edited)
    cfg_path = edited / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "shift": 2.5}))
    other = load_teacher(edited, prompts=PROMPTS)
    assert other.weights_hash != load_teacher(path, prompts=PROMPTS).weights_hash  # the teacher hash alone differs
    assert key(other)[0] != a and key(other)[1]["schedule"]["shift"] == 2.5
    with pytest.raises(PipelineError, match="starts at a finite t_max, but this flow-matching teacher"):
        parse_params({"trajectories": {}}).trajectories.schedules(flow_shift=3.0)  # the polynomial default is refused


def test_flux_dynamic_shift_follows_the_latent_size(folders, tmp_path):
    """Flux's shift is e^mu with mu linear in the packed token count (diffusers' calculate_shift)."""
    path, _ = folders["flux-dev"]
    teacher = load_teacher(path)
    assert teacher.sample_shape == (4, 8, 8)  # the VAE's sample_size (16 px) over its factor 2
    mu = 0.5 + (1.15 - 0.5) * (16 - 256) / (4096 - 256)  # 16 tokens of 2x2 patches
    assert teacher.flow_shift == pytest.approx(math.exp(mu), rel=1e-12)
    convert_diffusers_folder(path, tmp_path / "big", data_description={"sample_shape": [3, 32, 32]})
    big = load_teacher(tmp_path / "big")
    assert big.flow_shift == pytest.approx(math.exp(0.5 + 0.65 * (64 - 256) / 3840), rel=1e-12)


@pytest.mark.parametrize("name,afs", [("sd3", True), ("flux-dev", True), ("sd3", False)])
def test_exported_student_samples_through_the_stock_pipeline(folders, name, afs, tmp_path):
    """A flow student (the teacher's transformer with the student's sampler; SFD itself: test_sfd_on_a_flow_teacher)
    exported as a diffusers folder: the declared pipeline with the SFD scheduler (AFS), and the stock
    FlowMatchEulerDiscreteScheduler given sfd_sampler.json's sigmas and latent scale, both equal `sfd sample`
    (latents to 1e-5, decoded images to 1e-4, the PNGs of `sfd sample` to one 8-bit level), at guidance 1 and at w."""
    import pipeline.teachers.diffusers_scheduler  # noqa: F401  (the SFD scheduler's module, as a user imports it)
    from pipeline.distill.student import sampler_section, save_student, student_config, student_from_checkpoint
    from pipeline.evaluation.samples import sample_teacher
    from pipeline.teachers.diffusers_export import export_diffusers
    from pipeline.teachers.loader import load_student

    path, _ = folders[name]
    convert_diffusers_folder(path, tmp_path / "teacher", prompts_file=path.parent / "prompts.txt")
    init = student_from_checkpoint(tmp_path / "teacher")
    schedule = Schedule.flow(4, 0.0, load_teacher(tmp_path / "teacher").flow_shift)
    save_student(tmp_path / "student", init.model, student_config(init.config, sampler_section(schedule, afs=afs), {}))
    student = load_student(tmp_path / "student")
    info = export_diffusers(tmp_path / "student", tmp_path / "export")
    # AFS: the SFD scheduler (the stock one needs the scaled latents); else the stock scheduler, declared
    assert info["scheduler"] == ("SFDScheduler" if afs else "FlowMatchEulerDiscreteScheduler") and info["nfe"] == 3 - afs
    s = json.loads((tmp_path / "export" / "sfd_sampler.json").read_text())
    assert s["stock"]["latents_scale"] == (s["flow_times"][1] if afs else 1.0) and s["stock"]["num_inference_steps"] == 3 - afs
    z = seed_noise([0, 1], s["sample_shape"]).float()
    packed = (lambda t: t) if name.startswith("sd3") else pack_latents
    unpacked = (lambda t: t) if name.startswith("sd3") else (lambda t: unpack_latents(t, 8, 8))
    for w in (1.0, 3.0):
        ours, _, _ = sample_teacher(student, [0, 1], labels="1,2", guidance=w, decode=False)
        images, _, _ = sample_teacher(student, [0, 1], labels="1,2", guidance=w)
        pipe = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "export")
        assert type(pipe).__name__ == s["pipeline"] and type(pipe.scheduler).__name__ == info["scheduler"]
        call = dict(height=16, width=16, guidance_scale=w)
        with torch.no_grad():
            if afs:  # as declared: the student's own points, no sigmas to pass
                out = pipe([PROMPTS[1], PROMPTS[2]], num_inference_steps=s["nfe"], latents=packed(z), output_type="latent", **call)
                assert float((unpacked(out.images) - ours).abs().max()) < 1e-5
            stock = type(pipe).from_pretrained(tmp_path / "export", scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0))
            out = stock([PROMPTS[1], PROMPTS[2]], sigmas=s["stock"]["sigmas"], latents=packed(z * s["stock"]["latents_scale"]),
                        output_type="latent", **call)
            assert float((unpacked(out.images) - ours).abs().max()) < 1e-5
            decoded = stock([PROMPTS[1], PROMPTS[2]], sigmas=s["stock"]["sigmas"], output_type="pt",
                            latents=packed(z * s["stock"]["latents_scale"]), **call).images
        assert float((decoded * 2 - 1 - images).abs().max()) < 1e-4  # the pipeline's [0, 1] images, ours in [-1, 1]
        if w == 1.0:  # `sfd sample`'s PNGs and the stock pipeline's PIL images: the same 8-bit pixels (rounding: +-1)
            import numpy as np
            from PIL import Image

            from pipeline.evaluation.samples import sample_command

            sample_command(ckpt=str(tmp_path / "student"), teacher=None, seeds="0-1", out=tmp_path / "png", labels="1,2",
                           device="cpu")
            with torch.no_grad():
                pil = stock([PROMPTS[1], PROMPTS[2]], sigmas=s["stock"]["sigmas"], output_type="pil",
                            latents=packed(z * s["stock"]["latents_scale"]), **call).images
            for seed, img in zip((0, 1), pil):
                ours_png = np.asarray(Image.open(tmp_path / "png" / f"{seed:06d}.png"), dtype=np.int16)
                assert np.abs(ours_png - np.asarray(img, dtype=np.int16)).max() <= 1


def test_sfd_v_student_of_a_flow_transformer(folders, tmp_path):
    """SFD-v on a flow transformer: step layers added to the transformer's time embedding, zero-initialised (the
    student starts equal to its teacher at every N), stored as sfd_map_steps.* and loaded back with the N bound."""
    from pipeline.distill.student import sampler_section, save_student, student_config, student_from_checkpoint
    from pipeline.teachers.loader import load_student

    path, _ = folders["sd3"]
    convert_diffusers_folder(path, tmp_path / "teacher", prompts_file=path.parent / "prompts.txt")
    teacher = load_teacher(tmp_path / "teacher")
    init = student_from_checkpoint(tmp_path / "teacher", step_condition=True)
    model = init.model
    assert model.step_condition and any(k.startswith("sfd_map_steps.") for k in model.checkpoint_state_dict())
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    sigma = torch.full((2,), 1.5)
    with torch.no_grad():
        for n in (4, 7):
            torch.testing.assert_close(model(x, sigma, LABELS, num_steps=torch.full((2,), n)), teacher.denoiser(x, sigma, LABELS))
        model.map_steps[2].weight.normal_(0, 0.1)
        d4, d5 = (model(x, sigma, LABELS, num_steps=torch.full((2,), n)) for n in (4, 5))
    assert (d4 - d5).abs().max() > 1e-3
    with pytest.raises(PipelineError, match="step-conditioned"):
        model(x, sigma, LABELS)
    schedule = Schedule.flow(5, 0.0, teacher.flow_shift)
    save_student(tmp_path / "v", model, student_config(init.config, sampler_section(schedule, afs=True, step_condition=[4, 5]), {}))
    loaded = load_student(tmp_path / "v")
    assert loaded.num_steps == 5 and loaded.prompts == PROMPTS
    with torch.no_grad():
        torch.testing.assert_close(loaded.denoiser(x, sigma, LABELS), d5, rtol=1e-5, atol=1e-5)
