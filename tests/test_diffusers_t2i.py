"""Latent text-to-image diffusers teachers on a tiny random model (CPU): prompts, cond / labels, conversion,
the whole pipeline trajectories -> distill -> sample at w = 1 and w = 3 -> decode, and the diffusers export."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers_fixtures import save_tiny_t2i_folder  # noqa: E402

from pipeline.config.params import parse_params  # noqa: E402
from pipeline.core.param_checks import PipelineError  # noqa: E402
from pipeline.distill.sfd import run_distill_stage  # noqa: E402
from pipeline.evaluation.samples import sample_command, sample_teacher  # noqa: E402
from pipeline.teachers.diffusers_folder import convert_diffusers_folder  # noqa: E402
from pipeline.teachers.loader import load_student, load_teacher  # noqa: E402
from pipeline.teachers.prompts import prompt_set_hash, read_prompts  # noqa: E402
from pipeline.trajectories.generation import run_trajectories_stage  # noqa: E402
from pipeline.trajectories.store import open_store  # noqa: E402

PROMPTS = ["a red cat", "a blue dog on grass", "two green birds"]


@pytest.fixture(scope="module")
def t2i(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    pipe = save_tiny_t2i_folder(root / "sd")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n")
    info = convert_diffusers_folder(root / "sd", root / "converted", prompts_file=root / "prompts.txt")
    return root, pipe, info


def test_prompt_files(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({"annotations": [{"caption": "x y"}, {"caption": "z"}]}))
    (tmp_path / "q.json").write_text(json.dumps(["a", {"prompt": "b"}]))
    (tmp_path / "p.csv").write_text("id,caption\n1,hello there\n2,\"a, b\"\n")
    assert read_prompts(tmp_path / "p.json") == ["x y", "z"]
    assert read_prompts(tmp_path / "q.json") == ["a", "b"]
    assert read_prompts(tmp_path / "p.csv") == ["hello there", "a, b"]
    with pytest.raises(PipelineError, match="missing.txt does not exist"):
        read_prompts(tmp_path / "missing.txt")


def test_encode_prompts_and_cond_denoiser_equal_hand_derived(t2i):
    root, pipe, _ = t2i
    teacher = load_teacher(root / "sd", prompts=root / "prompts.txt")
    assert teacher.num_classes == 3 and teacher.latent and teacher.sample_shape == (4, 8, 8)
    assert teacher.sigma_range[0] == pytest.approx(0.0292, abs=1e-4) and teacher.sigma_range[1] == pytest.approx(14.615, abs=1e-3)
    cond = teacher.encode_prompts(PROMPTS)
    with torch.no_grad():
        ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        torch.testing.assert_close(cond, pipe.text_encoder(ids)[0], rtol=0, atol=0)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 2
    tau = 400
    abar = pipe.scheduler.alphas_cumprod[tau].double()
    sigma = float(((1 - abar) / abar).sqrt())
    s = torch.full((3,), sigma)
    with torch.no_grad():
        o = pipe.unet((x.double() * abar.sqrt()).float(), torch.full((3,), tau), encoder_hidden_states=cond).sample
    hand = x.double() - sigma * o.double()
    torch.testing.assert_close(teacher.denoiser(x, s, cond).double(), hand, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(teacher.denoiser(x, s, torch.tensor([0, 1, 2])), teacher.denoiser(x, s, cond))
    null = teacher.encode_prompts([""])
    torch.testing.assert_close(teacher.denoiser(x, s, None), teacher.denoiser(x, s, null.expand(3, -1, -1)))


def test_converted_folder_gives_identical_outputs(t2i):
    root, _, info = t2i
    a = load_teacher(root / "sd", prompts=root / "prompts.txt")
    b = load_teacher(root / "converted")
    assert a.weights_hash == b.weights_hash == info["weights_hash"]
    assert b.prompts == PROMPTS and b.prompt_set_hash == prompt_set_hash(PROMPTS)
    for f in ("model.safetensors", "model.json", "vae.safetensors", "text_encoder.safetensors", "prompts.json"):
        assert (root / "converted" / f).is_file()
    assert not list((root / "converted").rglob("*.bin")) and not list((root / "converted").rglob("*.pkl"))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    for labels in (None, torch.tensor([2, 0])):
        assert torch.equal(a.denoiser(x, 3.0, labels), b.denoiser(x, 3.0, labels))
    assert torch.equal(a.encode_prompts(["hello"]), b.encode_prompts(["hello"]))
    assert torch.equal(a.decode(x), b.decode(x))


def test_whole_pipeline_trajectories_distill_sample_decode(t2i, tmp_path):
    root, _, _ = t2i
    ckpt = root / "converted"
    params = parse_params({
        "loss": "l2",
        "trajectories": {"seeds": "0-15", "chunk_size": 8, "batch_size": 8, "M": 1, "solver": "euler",
                         "schedule": {"kind": "polynomial", "num_steps": 3, "t_min": 0.1, "rho": 7.0}},
        "distill": {"kimg": 0.032, "batch_size": 8, "lr": 1e-4, "checkpoint_every_kimg": 0.016,
                    "log_every_kimg": 0.008, "device": "cpu", "afs": True},
    })
    store = tmp_path / "traj.zarr"
    run_trajectories_stage(params.trajectories, store, name="trajectories", device="cpu", teacher_ckpt=ckpt, progress=False)
    (key,) = open_store(store).keys()
    handle = open_store(store).key(key)
    desc = handle.description
    assert desc["prompt_set"] == prompt_set_hash(PROMPTS)  # the prompt set keys the store
    assert desc["sample_shape"] == [4, 8, 8] and desc["labels"] == {"policy": "uniform_per_seed", "num_classes": 3}
    assert desc["schedule"]["t_max"] == pytest.approx(14.6146, abs=1e-3)  # default: the teacher's sigma_max
    from pipeline.trajectories.reader import TrajectoryDataset

    batch = next(iter(TrajectoryDataset(store, key, batch_size=16, shuffle=False)))
    assert batch.labels is not None and set(batch.labels.tolist()) <= {0, 1, 2}  # each seed's prompt index

    out = tmp_path / "student"
    run_distill_stage(params.distill, trajectories=params.trajectories, loss=params.loss, name="distill", store=store,
                      teacher_ckpt=ckpt, out=out, state_dir=tmp_path / "state", metrics=tmp_path / "m.json",
                      live_dir=None, cost_path=None, progress=False)
    student = load_student(out)
    assert student.latent and student.prompts == PROMPTS and student.sampler.guidance == 1.0
    teacher = load_teacher(ckpt)
    changed = [k for k, v in student.model.unet.state_dict().items() if not torch.equal(v, teacher.model.unet.state_dict()[k])]
    assert changed  # the same UNet, fine-tuned

    images = {}
    for w in (1.0, 3.0):
        info = sample_command(ckpt=str(out), teacher=None, seeds="0-3", out=tmp_path / f"w{w:g}", labels="0,1,2,0",
                              device="cpu", guidance=w)
        assert info["sampler"]["guidance"] == w and info["sampler"]["network_calls"] == info["sampler"]["nfe"] * (1 if w == 1 else 2)
        assert (tmp_path / f"w{w:g}" / "grid.png").is_file()
        imgs, _, _ = sample_teacher(student, [0, 1, 2, 3], labels="0,1,2,0", guidance=w)
        assert imgs.shape == (4, 3, 16, 16) and imgs.abs().max() <= 1  # decoded by the VAE
        images[w] = imgs
    assert (images[1.0] - images[3.0]).abs().max() > 1e-4  # guidance changes the samples

    # w = 3 by hand: the distilled UNet on both branches, eps_u + w (eps_c - eps_u), Euler with AFS, then decode
    lat, _, spec = sample_teacher(student, [0], labels="1", guidance=3.0, decode=False)
    from pipeline.diffusion.seeds import seed_noise

    t = spec.t_steps().tolist()
    x = t[0] * seed_noise([0], (4, 8, 8))
    with torch.no_grad():
        for i in range(len(t) - 1):
            if i == 0:
                d = x / math.sqrt(1 + t[0] ** 2)
            else:
                du = student.model(x, t[i], None)
                dc = student.model(x, t[i], torch.tensor([1]))
                d = (x - (du + 3.0 * (dc - du))) / t[i]
            x = x + (t[i + 1] - t[i]) * d
    torch.testing.assert_close(lat, x.float(), rtol=1e-5, atol=1e-5)

    # export as a diffusers folder and sample with plain diffusers code (the README's loop)
    from pipeline.teachers.diffusers_export import export_diffusers

    export_diffusers(out, tmp_path / "export")
    import diffusers
    import transformers

    exp = tmp_path / "export"
    unet = diffusers.UNet2DConditionModel.from_pretrained(exp / "unet").eval()
    vae = diffusers.AutoencoderKL.from_pretrained(exp / "vae").eval()
    tok = transformers.CLIPTokenizer.from_pretrained(exp / "tokenizer")
    enc = transformers.CLIPTextModel.from_pretrained(exp / "text_encoder").eval()
    s = json.loads((exp / "sfd_sampler.json").read_text())
    w = 3.0
    with torch.no_grad():
        ids = tok([PROMPTS[1], ""], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        cond, uncond = enc(ids)[0].chunk(2)
        sig, ts = s["sigmas"], s["timesteps"]
        x = sig[0] * seed_noise([0], s["sample_shape"])[0][None].float()
        for i in range(len(sig) - 1):
            if i == 0 and s["afs"]:
                eps = x / (1 + sig[0] ** 2) ** 0.5
            else:
                x_in = x / (1 + sig[i] ** 2) ** 0.5
                e_c = unet(x_in, torch.tensor(ts[i]), encoder_hidden_states=cond).sample
                e_u = unet(x_in, torch.tensor(ts[i]), encoder_hidden_states=uncond).sample
                eps = e_u + w * (e_c - e_u)
            x = x + (sig[i + 1] - sig[i]) * eps
        image = vae.decode(x / s["vae_scaling_factor"]).sample.clamp(-1, 1)
    torch.testing.assert_close(x, lat, rtol=1e-4, atol=1e-4)
    ours, _, _ = sample_teacher(student, [0], labels="1", guidance=3.0)
    torch.testing.assert_close(image, ours, rtol=1e-4, atol=1e-4)

    # what the folder declares: StableDiffusionPipeline + the SFD scheduler, the student's own steps at any w
    import pipeline.teachers.diffusers_scheduler  # noqa: F401  (diffusers loads only modules the caller imported)

    pipe = diffusers.DiffusionPipeline.from_pretrained(exp)
    assert type(pipe).__name__ == "StableDiffusionPipeline" and type(pipe.scheduler).__name__ == "SFDScheduler"
    z = seed_noise([0], s["sample_shape"]).float()
    with torch.no_grad():
        out = pipe(PROMPTS[1], num_inference_steps=s["nfe"], guidance_scale=w, latents=z, output_type="latent").images
    torch.testing.assert_close(out, lat, rtol=1e-4, atol=1e-4)


class PooledFeatures:
    """A stand-in feature space: per-channel means and stds of the decoded images (6-d)."""

    kind, layer = "inception", "f"

    def extract(self, images):
        x = images.double().flatten(2)
        return {"f": torch.cat([x.mean(-1), x.std(-1)], dim=1)}


def test_evaluation_decodes_and_samples_students_at_any_w(t2i, tmp_path):
    """The evaluate stage's entries: VAE-decoded images, extra guidance entries, CLIP score with a local CLIP."""
    import transformers
    from diffusers_fixtures import save_tiny_tokenizer

    from pipeline.distill.student import sampler_section, save_student, student_config, student_from_checkpoint
    from pipeline.diffusion.schedules import Schedule
    from pipeline.evaluation.clip_score import ClipScorer
    from pipeline.evaluation.evaluate import evaluate_entries, student_entries

    root, _, _ = t2i
    init = student_from_checkpoint(root / "converted")
    schedule = Schedule("polynomial", 3, 0.1, 14.6, 7.0)
    save_student(tmp_path / "s", init.model, student_config(init.config, sampler_section(schedule, afs=True), {}))
    entries = student_entries("sfd", tmp_path / "s", "cpu", guidance=[1.0, 3.0])
    assert [e.key for e in entries] == ["sfd/nfe1", "sfd-w3/nfe1"] and entries[1].spec.guidance == 3.0
    assert entries[0].prompts == PROMPTS and entries[0].decode is not None

    tok, vocab = save_tiny_tokenizer()
    torch.manual_seed(0)
    clip_model = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8), projection_dim=8)).eval()
    clip_model.save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    clip = ClipScorer(tmp_path / "clip")

    seeds = list(range(6))
    reference = {"f": torch.randn(32, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))}
    results = evaluate_entries(entries, seeds, PooledFeatures(), reference, batch_size=6, kid_subsets=2,
                               kid_subset_size=4, grids_dir=tmp_path / "grids", clip=clip)
    assert set(results) == {"sfd/nfe1", "sfd-w3/nfe1"}
    for r in results.values():
        assert math.isfinite(r["fid"]) and 0 <= r["clip_score"] <= 100
    assert results["sfd/nfe1"]["fid"] != results["sfd-w3/nfe1"]["fid"]
    assert (tmp_path / "grids" / "sfd-w3_nfe1.png").is_file()

    # the CLIP score by hand for the w = 3 entry's decoded images
    from pipeline.diffusion.seeds import seed_labels

    student = load_student(tmp_path / "s")
    labels = seed_labels(seeds, 3)
    imgs, _, _ = sample_teacher(student, seeds, labels=labels, guidance=3.0)
    texts = [PROMPTS[i] for i in labels.tolist()]
    with torch.no_grad():
        x = torch.nn.functional.interpolate((imgs + 1) / 2, size=(32, 32), mode="bicubic", antialias=True)
        x = (x.clamp(0, 1) - torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)) / torch.tensor(
            [0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
        img = clip_model.vision_model(pixel_values=x).pooler_output
        img = clip_model.visual_projection(img)
        ids = tok(texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
        txt = clip_model.text_projection(clip_model.text_model(input_ids=ids).pooler_output)
        cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    assert results["sfd-w3/nfe1"]["clip_score"] == pytest.approx(float((100 * cos).clamp(min=0).mean()), abs=1e-3)
    assert clip.score(imgs, texts) == pytest.approx(float((100 * cos).clamp(min=0).mean()), abs=1e-3)
    assert (cos > 0).any() and (cos < 0).any()  # the clamp matters on these samples


def test_teacher_stage_import_of_a_latent_folder(t2i, tmp_path):
    from pipeline.teachers.training import import_pretrained_teacher

    root, _, _ = t2i
    info = import_pretrained_teacher(root / "sd", tmp_path / "teacher", {"sample_shape": [3, 16, 16]}, prompts=root / "prompts.txt")
    assert info["prompts"] == 3 and load_teacher(tmp_path / "teacher").prompts == PROMPTS
    with pytest.raises(PipelineError, match=r"decodes its \[4, 8, 8\] latents to images of shape \[3, 16, 16\], the data has \[3, 32, 32\]"):
        import_pretrained_teacher(root / "sd", tmp_path / "t2", {"sample_shape": [3, 32, 32]})
    with pytest.raises(PipelineError, match="teacher.prompts: .*nope.txt does not exist"):
        import_pretrained_teacher(root / "sd", tmp_path / "t3", {}, prompts=root / "nope.txt")
    with pytest.raises(PipelineError, match="missing-folder/model.safetensors is missing.*a diffusers folder"):
        import_pretrained_teacher(root / "missing-folder", tmp_path / "t4", {})
