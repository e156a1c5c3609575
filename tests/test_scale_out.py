"""Memory and scale-out options of the training stages on one process (CPU): micro-batches with gradient
accumulation (``batch_gpu``), activation checkpointing, LoRA students (peft) -- each against the plain run, and
each resumed after an interruption.

Tolerances: micro-batches sum the batch mean in another order, so weights agree to rtol 1e-4, atol 2e-6 after
8 batches of Adam (as several processes do, tests/test_distributed.py); activation checkpointing recomputes the
same operations on the same inputs, so its weights are bit-identical; resumed runs are bit-identical."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from pipeline.config.params import parse_params
from pipeline.core.checkpoints import load_checkpoint, save_checkpoint
from pipeline.distill.sfd import run_distill_stage
from pipeline.networks.unet import build_network
from pipeline.trajectories.generation import run_trajectories_stage
from stages.common import stage_app

NET = {"img_resolution": 8, "in_channels": 1, "model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1,
       "attn_resolutions": [4], "label_dim": 3}  # fmt: skip
PARAMS = {
    "seed": 0, "device": "cpu", "loss": "l1",
    "trajectories": {"solver": "dpmpp", "M": 1, "seeds": "0-63", "chunk_size": 16, "batch_size": 16,
                     "schedule": {"kind": "polynomial", "num_steps": 4, "t_min": 0.006, "t_max": 80.0, "rho": 7.0}},
    "distill": {"kimg": 0.064, "batch_size": 8, "lr": 1e-3, "checkpoint_every_kimg": 0.016, "log_every_kimg": 0.016},
}  # fmt: skip  8 batches of 8, a state every 2 batches


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny U-Net teacher checkpoint and its trajectory store."""
    tmp = tmp_path_factory.mktemp("scale")
    torch.manual_seed(0)
    net = build_network(**NET)
    torch.nn.init.normal_(net.out_conv.weight, std=0.05)  # a teacher that says something
    save_checkpoint(tmp / "teacher", net.state_dict(),
                    {"network": NET, "sigma_data": 0.5, "data": {"sample_shape": [1, 8, 8], "num_classes": 3}, "provenance": {}})
    p = parse_params(PARAMS)
    run_trajectories_stage(p.trajectories, tmp / "traj.zarr", name="trajectories", teacher_ckpt=tmp / "teacher",
                           device="cpu", progress=False)
    return tmp


def distill(world: Path, out: Path, stop_after: int | None = None, **section) -> dict:
    raw = json.loads(json.dumps(PARAMS))
    raw["distill"].update(section)
    p = parse_params(raw)
    return run_distill_stage(p.distill, trajectories=p.trajectories, loss=p.loss, name="distill", store=world / "traj.zarr",
                             teacher_ckpt=world / "teacher", out=out / "student", state_dir=out / "state",
                             metrics=out / "metrics.json", progress=False, stop_after_batches=stop_after)


def stage(world: Path, out: Path, **section) -> None:
    """``python -m stages.distill ...`` as dvc.yaml runs it (in this process, through the typer app)."""
    raw = json.loads(json.dumps(PARAMS))
    raw["distill"].update(section)
    (out / "params.yaml").parent.mkdir(parents=True, exist_ok=True)
    (out / "params.yaml").write_text(yaml.safe_dump(raw))
    args = ["--params", str(out / "params.yaml"), "--section", "distill", "--store", str(world / "traj.zarr"),
            "--teacher-ckpt", str(world / "teacher"), "--out", str(out / "student"), "--state", str(out / "state"),
            "--metrics", str(out / "metrics.json"), "--live", str(out / "live"), "--cost", str(out / "cost.json"),
            "--no-progress"]  # fmt: skip
    r = CliRunner().invoke(stage_app(importlib.import_module("stages.distill").main), args)
    assert r.exit_code == 0, r.output


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(directory)[0]


@pytest.fixture(scope="module")
def plain(world):
    out = world / "plain"
    stage(world, out)
    return weights(out / "student")


def test_batch_gpu_through_the_distill_stage_equals_the_plain_run(world, plain):
    stage(world, world / "micro", batch_gpu=2)  # batch_size 8 / 4: four micro-batches per optimizer step
    micro = weights(world / "micro" / "student")
    teacher = weights(world / "teacher")
    assert max(float((plain[k] - teacher[k]).abs().max()) for k in plain) > 1e-3  # it trained
    assert any(not torch.equal(micro[k], plain[k]) for k in plain)  # another summation order ...
    for k in plain:  # ... the same student to float tolerance (2 % of one Adam step of lr 1e-3)
        torch.testing.assert_close(micro[k], plain[k], rtol=1e-4, atol=2e-5)
    m = json.loads((world / "micro" / "metrics.json").read_text())
    m0 = json.loads((world / "plain" / "metrics.json").read_text())
    assert m["optimizer_steps"] == 8 * 2 and m["kimg"] == 0.064  # one optimizer step per student step, as without
    for k, v in m0["final_loss"].items():  # the logged loss is the batch mean, whatever the micro-batches
        assert m["final_loss"][k] == pytest.approx(v, rel=1e-4)
    with pytest.raises(Exception, match="batch_gpu: 3 does not divide the 8 rows"):
        distill(world, world / "odd", batch_gpu=3)


def test_accumulated_gradients_equal_the_whole_batch_gradients(world):
    """Adam hides a wrongly scaled gradient; the gradients themselves (SGD with lr 0 keeps them) do not."""
    from pipeline.distill.losses import make_loss
    from pipeline.distill.sfd import sfd_batch
    from pipeline.teachers.loader import load_teacher
    from pipeline.trajectories.reader import TrajectoryDataset
    from pipeline.trajectories.store import open_store

    (key,) = open_store(world / "traj.zarr").keys()
    batch = next(iter(TrajectoryDataset(world / "traj.zarr", key, batch_size=8, shuffle=False)))
    from pipeline.diffusion.schedules import Schedule

    t_steps = Schedule.from_dict(PARAMS["trajectories"]["schedule"]).t_steps()
    grads, losses = [], []
    for batch_gpu in (None, 2):
        model = load_teacher(world / "teacher").model.train().requires_grad_(True)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        losses.append(sfd_batch(model, opt, batch, t_steps, make_loss("l1"), afs=True, batch_gpu=batch_gpu))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert [n for n, _ in losses[0]] == [n for n, _ in losses[1]] == [2, 3]
    for (_, a), (_, b) in zip(*losses):
        assert b == pytest.approx(a, rel=1e-5)
    assert sorted(grads[0]) == sorted(grads[1])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6)


def test_activation_checkpointing_is_bit_identical_and_keeps_less(world, plain):
    stage(world, world / "ckpt", activation_checkpointing=True)
    ckpt = weights(world / "ckpt" / "student")
    for k in plain:
        assert torch.equal(ckpt[k], plain[k]), k  # the same operations on the same inputs, recomputed
    from pipeline.diffusion.denoisers import EDMPrecond
    from pipeline.training.parallel import enable_activation_checkpointing, saved_activation_bytes

    torch.manual_seed(0)
    model = EDMPrecond(build_network(**NET))
    x, sigma, labels = torch.randn(8, 1, 8, 8), torch.full((8,), 2.0), torch.arange(8) % 3
    out, full = saved_activation_bytes(lambda: model(x, sigma, labels))
    blocks = sum(type(m).__name__ == "ResBlock" for m in model.modules())
    assert enable_activation_checkpointing(model) == blocks > 0  # every residual block
    out2, kept = saved_activation_bytes(lambda: model(x, sigma, labels))
    assert torch.equal(out, out2) and kept < 0.6 * full, (kept, full)


def test_activation_checkpointing_on_edm_and_diffusers_networks():
    from pipeline.networks.edm import build_edm_model
    from pipeline.training.parallel import enable_activation_checkpointing, saved_activation_bytes

    torch.manual_seed(0)
    edm = build_edm_model("VPPrecond", {"img_resolution": 8, "img_channels": 1, "label_dim": 0, "model_type": "SongUNet",
                                        "model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1,
                                        "attn_resolutions": [4], "dropout": 0.0})  # fmt: skip
    x, sigma = torch.randn(4, 1, 8, 8), torch.full((4,), 1.5)
    out, full = saved_activation_bytes(lambda: edm(x, sigma))
    assert enable_activation_checkpointing(edm) > 0
    out2, kept = saved_activation_bytes(lambda: edm(x, sigma))
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    assert kept < 0.6 * full, (kept, full)
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D")).train()
    out, full = saved_activation_bytes(lambda: unet(x, 10).sample)
    assert enable_activation_checkpointing(unet) > 0 and unet.is_gradient_checkpointing
    out2, kept = saved_activation_bytes(lambda: unet(x, 10).sample)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    assert kept < 0.6 * full, (kept, full)


def test_micro_batches_and_checkpointing_resume_bit_identically(world):
    options = {"batch_gpu": 4, "activation_checkpointing": True}
    distill(world, world / "whole", **options)
    cut = distill(world, world / "cut", stop_after=3, **options)
    assert cut == {"interrupted_at_batch": 3}
    distill(world, world / "cut", **options)  # resumes from the state of batch 2
    a, b = weights(world / "whole" / "student"), weights(world / "cut" / "student")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ LoRA students


def test_lora_student_trains_adapters_only_and_resumes(world, plain):
    from pipeline.teachers.loader import load_student, load_teacher

    options = {"lora_rank": 4, "lora_alpha": 8.0}
    result = distill(world, world / "lora", **options)
    saved, config = load_checkpoint(world / "lora" / "student")
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)  # the adapters alone
    assert config["lora"]["rank"] == 4 and config["lora"]["base"] == str(world / "teacher")
    assert config["lora"]["targets"] == ["conv0", "conv1", "affine", "qkv", "proj"]
    assert result["trained_parameters"] == sum(t.numel() for t in saved.values())
    teacher_params = sum(t.numel() for t in weights(world / "teacher").values())
    assert result["trained_parameters"] < 0.5 * teacher_params
    state = load_checkpoint(world / "lora" / "state", name="training_state")[0]
    net = [k for k in state if k.startswith("net.")]
    assert net and all(".lora_" in k for k in net)  # the resume state holds the adapters (and their Adam moments)
    moments = [k for k in state if k.startswith("optimizer.optimizer.") and k.endswith(".exp_avg")]
    assert len(moments) == len(net)  # Adam's state for the adapters only

    student, teacher = load_student(world / "lora" / "student"), load_teacher(world / "teacher")
    merged, base = student.model.checkpoint_state_dict(), teacher.model.checkpoint_state_dict()
    assert sorted(merged) == sorted(base)  # a plain network once merged
    moved = [k for k in base if not torch.equal(merged[k], base[k])]
    assert moved and all(k.split(".")[-2] in ("conv0", "conv1", "affine", "qkv", "proj") for k in moved)
    # documented difference from the plain run: rank-4 updates only, so the student is another (nearby) one
    assert any(not torch.allclose(merged[k], plain[k], atol=1e-6) for k in plain)

    distill(world, world / "lora_cut", stop_after=3, **options)
    distill(world, world / "lora_cut", **options)
    a, b = weights(world / "lora" / "student"), weights(world / "lora_cut" / "student")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_student_starts_as_its_teacher_and_refuses_what_it_cannot_adapt(world):
    from pipeline.core.param_checks import ParamError
    from pipeline.networks.lora import add_lora, merge_lora
    from pipeline.teachers.loader import load_teacher

    teacher = load_teacher(world / "teacher").model
    student = load_teacher(world / "teacher").model
    adapters = add_lora(student, rank=2, targets=["qkv"])
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    x, sigma, labels = torch.randn(4, 1, 8, 8), torch.full((4,), 3.0), torch.tensor([0, 1, 2, 0])
    torch.testing.assert_close(student(x, sigma, labels), teacher(x, sigma, labels), rtol=0, atol=0)  # B = 0
    assert adapters.describe() == {"rank": 2, "alpha": 2.0, "targets": ["qkv"], "host": "unet"}
    with torch.no_grad():
        for n, p in student.named_parameters():
            if ".lora_B." in n:
                p.normal_()
    before = student(x, sigma, labels)
    merge_lora(student)
    torch.testing.assert_close(student(x, sigma, labels), before, rtol=1e-5, atol=1e-5)
    assert not any(".lora_" in k for k in student.state_dict())
    with pytest.raises(ParamError, match="lora_targets: none of"):
        add_lora(load_teacher(world / "teacher").model, rank=2, targets=["nothing_here"])
    with pytest.raises(ParamError, match="LoRA students are single-N"):
        distill(world, world / "lora_v", lora_rank=2, step_condition=True)



def test_trajectory_teacher_loop_makes_no_host_syncs_between_forwards(world, monkeypatch):
    """Between the first and the last teacher forward of a batch, nothing asks a tensor for a host value (item,
    float, bool, tolist, cpu, numpy): on a GPU the solver loop queues kernels without waiting (schedule coefficients
    are Python floats computed once from the float64 schedule). Checked for every solver the trajectories use."""
    from pipeline.diffusion.schedules import Schedule
    from pipeline.teachers.loader import load_teacher
    from pipeline.trajectories.generation import teacher_trajectories
    from pipeline.trajectories.spec import TrajectorySpec

    teacher = load_teacher(world / "teacher")
    events: list[str] = []

    def denoiser(x, sigma, labels=None, **kw):
        events.append("D")
        return teacher.denoiser(x, sigma, labels, **kw)

    for name in ("item", "__float__", "__bool__", "__int__", "tolist", "cpu", "numpy"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _r=real, _n=name, **k: (events.append(_n), _r(self, *a, **k))[1])
    for solver, order in (("dpmpp", 3), ("euler", 1), ("heun", 1), ("ipndm", 4)):
        events.clear()
        spec = TrajectorySpec(teacher_hash="t", schedule=Schedule(num_steps=4), M=3, solver=solver, max_order=order,
                              sample_shape=(1, 8, 8))
        teacher_trajectories(denoiser, spec, list(range(4)))
        first, last = events.index("D"), len(events) - 1 - events[::-1].index("D")
        assert events.count("D") >= 9 and set(events[first : last + 1]) == {"D"}, (solver, events)


def test_batch_gpu_in_teacher_training_and_a_baseline_equals_the_plain_run(tmp_path):
    """The teacher and the baselines replay the global batch's noise draws for every micro-batch: the same batch,
    the same step (to float tolerance), the same generator state afterwards."""
    from pipeline.config.baselines import VanillaParams
    from pipeline.config.teacher import TeacherParams
    from pipeline.diffusion.denoisers import EDMPrecond
    from pipeline.distill.baselines.common import TrainingData
    from pipeline.distill.baselines.vanilla import vanilla_distillation
    from pipeline.teachers.training import train_teacher

    g = torch.Generator().manual_seed(3)
    images, labels = torch.rand((64, 1, 8, 8), generator=g) * 2 - 1, torch.randint(3, (64,), generator=g)
    net = {k: NET[k] for k in ("model_channels", "channel_mult", "num_blocks", "attn_resolutions")}
    results = {}
    for batch_gpu in (None, 4):
        p = TeacherParams.from_dict({"network": net, "batch_size": 16, "steps": 6, "lr": 2e-3, "lr_rampup_steps": 2,
                                     "ema_halflife_kimg": 0.01, "device": "cpu", "batch_gpu": batch_gpu})
        s = train_teacher(p, images, labels, 3, tmp_path / f"teacher{batch_gpu}", progress=False)
        torch.manual_seed(0)
        teacher = EDMPrecond(build_network(**NET))
        torch.nn.init.normal_(teacher.net.out_conv.weight, std=0.05)
        config = {"network": NET, "sigma_data": 0.5, "data": {"sample_shape": [1, 8, 8], "num_classes": 3},
                  "sampler": None, "provenance": {}}
        va = VanillaParams.from_dict({"updates": 4, "batch_size": 8, "lr": 1e-3, "M": 1, "device": "cpu",
                                      "batch_gpu": None if batch_gpu is None else 2})
        v = vanilla_distillation(teacher, config, TrainingData(images, labels), va,
                                 tmp_path / f"vanilla{batch_gpu}", progress=False)
        results[batch_gpu] = (s, v)
    assert results[4][0]["final_loss"] == pytest.approx(results[None][0]["final_loss"], rel=1e-5)
    for sub in ("teacher", "vanilla"):
        a, b = weights(tmp_path / f"{sub}None"), weights(tmp_path / f"{sub}4")
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=2e-5, msg=lambda m: f"{sub}: {k}: {m}")
