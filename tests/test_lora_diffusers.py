"""A LoRA student of a (tiny, random) Stable Diffusion teacher: distilled through the distill stage with adapters on
the attention projections, exported as diffusers LoRA weights, loaded into the stock StableDiffusionPipeline with
``pipe.load_lora_weights``: its UNet reproduces ``sfd sample`` (tolerance 1e-4: the same weights, merged in another
order). The merged folder (``--format diffusers``) holds the same UNet."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from diffusers_fixtures import save_tiny_t2i_folder  # noqa: E402

from pipeline.config.params import parse_params  # noqa: E402
from pipeline.distill.sfd import run_distill_stage  # noqa: E402
from pipeline.teachers.diffusers_folder import convert_diffusers_folder  # noqa: E402
from pipeline.trajectories.generation import run_trajectories_stage  # noqa: E402

PROMPTS = ["a red cat", "a blue dog on grass", "two green birds"]


def test_exported_lora_in_the_stock_pipeline_reproduces_sfd_sample(tmp_path):
    import diffusers

    from pipeline.core.checkpoints import load_checkpoint
    from pipeline.diffusion.seeds import seed_noise
    from pipeline.evaluation.samples import sample_teacher
    from pipeline.teachers.diffusers_export import export_command
    from pipeline.teachers.loader import load_student, load_teacher

    save_tiny_t2i_folder(tmp_path / "sd")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    teacher_dir = tmp_path / "converted"
    convert_diffusers_folder(tmp_path / "sd", teacher_dir, prompts_file=tmp_path / "prompts.txt")
    p = parse_params({
        "loss": "l2",
        "trajectories": {"seeds": "0-15", "chunk_size": 8, "batch_size": 8, "M": 1, "solver": "euler",
                         "schedule": {"kind": "polynomial", "num_steps": 3, "t_min": 0.1, "rho": 7.0}},
        "distill": {"kimg": 0.032, "batch_size": 8, "lr": 1e-2, "checkpoint_every_kimg": 0.016, "device": "cpu",
                    "afs": True, "lora_rank": 4, "lora_alpha": 8.0},
    })  # fmt: skip
    store = tmp_path / "traj.zarr"
    run_trajectories_stage(p.trajectories, store, name="trajectories", device="cpu", teacher_ckpt=teacher_dir, progress=False)
    out = tmp_path / "student"
    run_distill_stage(p.distill, trajectories=p.trajectories, loss=p.loss, name="distill", store=store,
                      teacher_ckpt=teacher_dir, out=out, state_dir=tmp_path / "state", progress=False)
    adapters, config = load_checkpoint(out)
    assert config["lora"]["targets"] == ["to_q", "to_k", "to_v", "to_out.0"] and config["lora"]["host"] == "diffusers"
    assert adapters and all(".lora_A." in k or ".lora_B." in k for k in adapters)
    student, teacher = load_student(out), load_teacher(teacher_dir)
    s_unet, t_unet = student.model.unet.state_dict(), teacher.model.unet.state_dict()
    assert sorted(s_unet) == sorted(t_unet)  # merged: a plain UNet
    moved = [k for k in t_unet if not torch.equal(s_unet[k], t_unet[k])]
    assert moved and all(any(t in k for t in ("to_q", "to_k", "to_v", "to_out.0")) for k in moved)

    info = export_command(out, "diffusers-lora", tmp_path / "lora")
    assert info["rank"] == 4 and (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "sd", safety_checker=None)
    pipe.load_lora_weights(tmp_path / "lora")
    s = json.loads((tmp_path / "lora" / "sfd_sampler.json").read_text())
    w = 3.0
    with torch.no_grad():
        ids = pipe.tokenizer([PROMPTS[1], ""], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        cond, uncond = pipe.text_encoder(ids)[0].chunk(2)
        sig, ts = s["sigmas"], s["timesteps"]
        x = sig[0] * seed_noise([0], s["sample_shape"])[0][None].float()
        for i in range(len(sig) - 1):  # the README's loop: Euler in sigma, AFS first, guidance w
            if i == 0 and s["afs"]:
                eps = x / (1 + sig[0] ** 2) ** 0.5
            else:
                x_in = x / (1 + sig[i] ** 2) ** 0.5
                e_c = pipe.unet(x_in, torch.tensor(ts[i]), encoder_hidden_states=cond).sample
                e_u = pipe.unet(x_in, torch.tensor(ts[i]), encoder_hidden_states=uncond).sample
                eps = e_u + w * (e_c - e_u)
            x = x + (sig[i + 1] - sig[i]) * eps
        image = pipe.vae.decode(x / s["vae_scaling_factor"]).sample.clamp(-1, 1)
    lat, _, _ = sample_teacher(student, [0], labels="1", guidance=w, decode=False)
    torch.testing.assert_close(x, lat, rtol=1e-4, atol=1e-4)
    ours, _, _ = sample_teacher(student, [0], labels="1", guidance=w)
    torch.testing.assert_close(image, ours, rtol=1e-4, atol=1e-4)

    export_command(out, "diffusers", tmp_path / "merged")  # the merged folder on request
    merged = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "merged" / "unet").state_dict()
    for k in s_unet:
        assert torch.equal(merged[k], s_unet[k]), k
