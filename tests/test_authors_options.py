"""The options that give sfd-main's behaviour (issue 21; docs/sfd-vs-authors.md): lr decay timing, dynamic
thresholding of DPM-Solver++'s x0, the fp16_authors precision recipe, SFD-v's N draws and step-layer init,
and the authors' LPIPS variant. CPU, tiny configs; the side-by-side run against sfd-main is bench/authors/."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from pipeline.config.distill import DistillParams
from pipeline.config.params import parse_params
from pipeline.config.trajectories import TrajectoryParams
from pipeline.core.param_checks import ParamError
from pipeline.diffusion.schedules import Schedule
from pipeline.diffusion.solvers import DYNAMIC_THRESHOLD_QUANTILE, dynamic_threshold, solve
from pipeline.distill.sfd import AUTHORS_STEP_SEED, _step_drawer, run_distill_stage
from pipeline.training.loop import optimizer_step
from pipeline.trajectories.generation import run_trajectories_stage
from pipeline.trajectories.spec import TrajectorySpec, trajectory_specs
from test_sfd_distillation import make_params  # the tiny mixture-teacher setup: 8 batches of 16, N = 4 and [3, 4]

TEACHER = {"source": "gmm", "num_components": 4, "sample_shape": [1, 4, 4], "std": 0.2, "seed": 0}
TINY_NET = {"model_channels": 8, "channel_mult": [1], "num_blocks": 1, "attn_resolutions": []}
SCHEDULE = {"kind": "polynomial", "num_steps": 4, "t_min": 0.006, "t_max": 80.0, "rho": 7.0}


# ---------------------------------------------------------------- 1. lr decay timing


def sfd_main_lrs(lr: float, total_kimg: float, batch_size: int) -> list[float]:
    """The lr of each batch as sfd-main's training_loop.py sets it (lines ~233-305): train the batch, then
    `if cur_nimg / 1000 >= 0.5 * total_kimg: lr = lr / 10`, then `cur_nimg += batch_size`; stop when done."""
    lrs, cur_nimg, current = [], 0, lr
    while True:
        lrs.append(current)  # the batch's optimizer steps use the current lr
        if cur_nimg / 1000 >= 0.5 * total_kimg:
            current = lr / 10
        cur_nimg += batch_size
        if cur_nimg >= total_kimg * 1000:
            return lrs


@pytest.mark.parametrize("kimg,batch_size", [(0.128, 16), (1.28, 128), (200.0, 128), (0.1, 30), (1.0, 7)])
def test_lr_decays_at_sfd_mains_batch_and_before_batch_one_earlier(kimg, batch_size):
    p = DistillParams.from_dict({"kimg": kimg, "batch_size": batch_size, "lr": 5e-5}, section="distill")
    assert p.lr_decay_check == "after_batch"  # the default is sfd-main's timing
    ours = [p.lr_at(b) for b in range(p.total_batches())]
    assert ours == sfd_main_lrs(5e-5, kimg, batch_size)
    first = ours.index(5e-6)
    old = DistillParams.from_dict({"kimg": kimg, "batch_size": batch_size, "lr": 5e-5, "lr_decay_check": "before_batch"},
                                  section="distill")
    assert [old.lr_at(b) for b in range(p.total_batches())].index(5e-6) == first - 1
    assert first == math.ceil(0.5 * kimg * 1000 / batch_size) + 1


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "trajectories.zarr"
    p = parse_params(make_params())
    run_trajectories_stage(p.trajectories, path, name="trajectories", progress=False)
    run_trajectories_stage(p.trajectories_v, path, name="trajectories_v", progress=False)
    return path


def distill(params, store, tmp_path, section="distill", name="run", **kwargs):
    p = parse_params(params)
    return run_distill_stage(
        p.section(section), trajectories=p.trajectories_for(section), loss=p.loss, name=section, store=store,
        teacher_ckpt=None, out=tmp_path / name / "student", state_dir=None, metrics=tmp_path / name / "metrics.json",
        live_dir=tmp_path / name / "live", progress=False, **kwargs,
    )  # fmt: skip


def test_training_run_lowers_the_lr_at_sfd_mains_optimizer_step(store, tmp_path, monkeypatch):
    """8 batches of 16 (0.128 kimg), 2 optimizer steps each: sfd-main's first lr/10 step is step 10 (batch 5)."""
    import pipeline.distill.sfd as sfd

    seen = []
    original = sfd.optimizer_step

    def recording(optimizer, loss, **kw):
        seen.append(optimizer.param_groups[0]["lr"])
        return original(optimizer, loss, **kw)

    monkeypatch.setattr(sfd, "optimizer_step", recording)
    for check, first in (("after_batch", 10), ("before_batch", 8)):
        seen.clear()
        distill(make_params(lr_decay_check=check), store, tmp_path, name=check)
        assert len(seen) == 16 and seen.index(1e-4) == first and seen[first:] == [1e-4] * (16 - first), seen
        rows = json.loads((tmp_path / check / "metrics.json").read_text())
        assert rows["batches"] == 8


# ---------------------------------------------------------------- 2. dynamic thresholding


def test_dynamic_threshold_is_sfd_mains_formula():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, 8, 8, generator=g, dtype=torch.float64) * torch.tensor([0.2, 1.5, 4.0]).view(3, 1, 1, 1).double()
    out = dynamic_threshold(x0)
    for b in range(3):  # numpy's linear-interpolation quantile, floor 1, clamp, rescale
        q = float(np.quantile(np.abs(x0[b].numpy()).ravel(), DYNAMIC_THRESHOLD_QUANTILE))
        s = max(q, 1.0)
        expected = np.clip(x0[b].numpy(), -s, s) / s
        np.testing.assert_allclose(out[b].numpy(), expected, rtol=0, atol=1e-15)
    assert torch.equal(out[0], x0[0])  # every |x0| <= 1: unchanged
    assert out.abs().max() <= 1.0 and not torch.equal(out[1], x0[1])  # a value beyond 1: clamped at 1 (s = 1)
    assert float(out[2].abs().max()) == 1.0  # s = q > 1: clamped at s, divided by s


def test_thresholded_dpmpp_uses_the_thresholded_x0_in_every_update():
    t = Schedule("polynomial", 7, 0.006, 80.0, 7.0).t_steps()
    x = t[0] * torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    small = lambda x, sigma, labels=None: 0.5 * torch.tanh(x)  # noqa: E731  |x0| < 1: thresholding changes nothing
    assert torch.equal(solve(small, x, t, "dpmpp", dynamic_thresholding=True), solve(small, x, t, "dpmpp"))
    big = lambda x, sigma, labels=None: 3 * torch.tanh(x / 4) + 0 * sigma.view(-1, 1, 1, 1)  # noqa: E731
    thresholded = lambda x, sigma, labels=None: dynamic_threshold(big(x, sigma))  # noqa: E731
    ours = solve(big, x, t, "dpmpp", dynamic_thresholding=True)
    assert torch.equal(ours, solve(thresholded, x, t, "dpmpp"))  # same as thresholding inside the denoiser
    assert not torch.allclose(ours, solve(big, x, t, "dpmpp"))
    with pytest.raises(ParamError, match="dynamic_thresholding: only the dpmpp solver"):
        solve(big, x, t, "euler", dynamic_thresholding=True)


def test_thresholding_enters_the_store_key_only_when_on():
    base = {"schedule": SCHEDULE, "seeds": "0-7"}
    off = trajectory_specs(TrajectoryParams.from_dict(base, section="trajectories"), teacher_hash="0" * 32, num_classes=0,
                           sample_shape=(1, 4, 4))[0]
    explicit = trajectory_specs(TrajectoryParams.from_dict({**base, "dynamic_thresholding": False}, section="trajectories"),
                                teacher_hash="0" * 32, num_classes=0, sample_shape=(1, 4, 4))[0]
    on = trajectory_specs(TrajectoryParams.from_dict({**base, "dynamic_thresholding": True}, section="trajectories"),
                          teacher_hash="0" * 32, num_classes=0, sample_shape=(1, 4, 4))[0]
    assert "dynamic_thresholding" not in json.dumps(off.description()) and explicit.key == off.key
    assert on.key != off.key and on.description()["solver"]["dynamic_thresholding"] == {"quantile": 0.995, "floor": 1.0}
    assert TrajectorySpec.from_description(on.description()) == on and TrajectorySpec.from_description(off.description()) == off
    with pytest.raises(ParamError, match=r"trajectories\.dynamic_thresholding: only the dpmpp solver"):
        TrajectoryParams.from_dict({**base, "solver": "euler", "max_order": 1, "dynamic_thresholding": True}, section="trajectories")


# ---------------------------------------------------------------- 3. fp16_authors: sfd-main's use_fp16 recipe


def test_nan_to_num_step_never_stops_and_sanitises_the_gradients():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    opt = torch.optim.SGD([w], lr=1.0)
    loss = (w * torch.tensor([float("nan"), float("inf"), -float("inf")])).sum()
    value = optimizer_step(opt, loss, nan_to_num=True)
    assert math.isnan(value)
    assert w.grad.tolist() == [0.0, 1e5, -1e5] and w.tolist() == [1.0, 2.0 - 1e5, 3.0 + 1e5]


def test_fp16_authors_on_a_cpu_trains_as_fp32_and_survives_a_nan_loss(store, tmp_path, monkeypatch):
    """On a CPU EDM's use_fp16 (and so sfd-main's recipe) keeps float32: the same weights as fp32. A NaN loss
    does not stop the run: its gradients are zeroed, the step is taken, fp16 is off from then on."""
    from pipeline.core.checkpoints import load_checkpoint
    from pipeline.core.hashing import hash_state_dict
    import pipeline.distill.sfd as sfd

    fp32 = distill(make_params(), store, tmp_path, name="fp32")
    authors = distill(make_params(precision="fp16_authors"), store, tmp_path, name="authors")
    assert hash_state_dict(load_checkpoint(tmp_path / "fp32" / "student")[0]) == \
        hash_state_dict(load_checkpoint(tmp_path / "authors" / "student")[0])
    assert authors["fp16_off_at_batch"] is None and authors["final_loss"] == fp32["final_loss"]

    calls = {"n": 0}
    l1 = sfd.make_loss("l1")

    def flaky(x_hat, y):  # the 6th call (batch 2, last step) returns NaN
        calls["n"] += 1
        loss = l1(x_hat, y)
        return loss * float("nan") if calls["n"] == 6 else loss

    monkeypatch.setattr(sfd, "make_loss", lambda name, **kw: flaky)
    r = distill(make_params(precision="fp16_authors"), store, tmp_path, name="nan")
    assert r["batches"] == 8 and r["fp16_off_at_batch"] == 2
    assert all(math.isfinite(float(v.abs().sum())) for v in load_checkpoint(tmp_path / "nan" / "student")[0].values())


# ---------------------------------------------------------------- 4. SFD-v: N draws and step-layer init


def test_authors_step_draws_are_random_randint_after_seed_42_and_resume():
    random.seed(42)
    expected = [random.randint(3, 5) for _ in range(40)]
    assert AUTHORS_STEP_SEED == 42

    class Source:
        def __init__(self, n):
            self.schedule = Schedule("polynomial", n, 0.006, 80.0, 7.0)

    sources = [Source(n) for n in (3, 4, 5)]
    p = DistillParams.from_dict({"step_condition": True, "step_draw": "authors"}, section="distill_v")
    drawer = _step_drawer(sources, p, torch.Generator(), "distill_v")
    assert [sources[drawer(b)].schedule.num_steps for b in range(40)] == expected
    resumed = _step_drawer(sources, p, torch.Generator(), "distill_v")  # a run resumed at batch 25
    assert [sources[resumed(b)].schedule.num_steps for b in range(25, 40)] == expected[25:]
    with pytest.raises(ParamError, match=r"distill_v\.step_draw: 'authors' draws N with random\.randint\(3, 5\)"):
        _step_drawer([Source(3), Source(5)], p, torch.Generator(), "distill_v")


def test_authors_step_draws_in_a_training_run(store, tmp_path):
    r = distill(make_params(step_draw="authors"), store, tmp_path, section="distill_v", name="draws")
    random.seed(42)
    counts = {n: 0 for n in (3, 4)}
    for _ in range(8):
        counts[random.randint(3, 4)] += 1
    keys = parse_params(make_params())
    specs = trajectory_specs(keys.trajectories_v, teacher_hash=r_hash(tmp_path / "draws"), num_classes=0, sample_shape=(1, 4, 4))
    assert {s.key: 16 * counts[s.schedule.num_steps] for s in specs} == r["rows_per_key"]


def r_hash(run_dir):
    return json.loads((run_dir / "student" / "model.json").read_text())["provenance"]["teacher_hash"]


def test_step_condition_init_random_starts_away_from_the_teacher(tmp_path):
    from pipeline.distill.student import (
        sampler_section, save_student, student_config, student_from_checkpoint, student_from_scratch,
    )  # fmt: skip

    teacher = student_from_scratch(TINY_NET, sample_shape=(1, 8, 8), num_classes=0, seed=3)
    with torch.no_grad():  # a trained-looking teacher: its zero-initialised layers would hide the step embedding
        for p in teacher.model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    sampler = sampler_section(Schedule("polynomial", 4, 0.006, 80.0, 7.0), afs=True)
    save_student(tmp_path / "t", teacher.model, student_config(teacher.config, sampler, {}))
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.full((2,), 2.0)
    with torch.no_grad():
        ref = teacher.model(x, sigma)
        for init, equal in (("zero", True), ("random", False)):
            s = student_from_checkpoint(tmp_path / "t", step_condition=True, seed=0, step_condition_init=init)
            out = s.model(x, sigma, num_steps=torch.full((2,), 4))
            assert torch.equal(out, ref) == equal, init
    assert student_from_checkpoint(tmp_path / "t", step_condition=True, step_condition_init="random").init_hash != \
        student_from_checkpoint(tmp_path / "t", step_condition=True).init_hash


# ---------------------------------------------------------------- 5. the authors' LPIPS (piq's)

# docs/sfd-vs-authors.md: both variants on lpips_pair() with random_vgg16_features() (seed 0) and the lpips
# package's v0.1 heads, CPU float32, torch 2.14.1 / torchvision 0.29.1; rtol 1e-4 covers other CPUs' round-off
LPIPS_DOCUMENTED = {"lpips": 0.012028085999190807, "piq": 0.007758092135190964}
RELU_INDICES = (3, 8, 15, 22, 29)  # relu1_2 ... relu5_3 in torchvision's vgg16().features


def random_vgg16_features(seed: int = 0) -> torch.nn.Sequential:
    """torchvision's vgg16().features (its layer list, torch's default init), seeded; nothing downloaded."""
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(seed)
    return make_layers(cfgs["D"])


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "vgg16-397923af.pth"
    torch.save({f"features.{k}": v for k, v in random_vgg16_features().state_dict().items()}, path)
    return path


def lpips_pair() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.tanh(torch.randn(2, 3, 32, 32, generator=g))
    return x, (x + 0.2 * torch.randn(2, 3, 32, 32, generator=g)).clamp(-1, 1)


def piq_formula(x, y, features, heads):
    """piq's LPIPS(replace_pooling=True) written out: 224 px bilinear (as sfd-main resizes), (x - mean) / std,
    VGG with average pooling, features unit-normalised over channels (eps 1e-10), squared differences times
    each layer's head, mean over pixels, sum over channels and layers."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def feats(img):
        h = (torch.nn.functional.interpolate(img, size=224, mode="bilinear") - mean) / std
        out = []
        for i, layer in enumerate(features):
            h = torch.nn.functional.avg_pool2d(h, 2, 2) if isinstance(layer, torch.nn.MaxPool2d) else layer(h)
            if i in RELU_INDICES:
                out.append(h / (h.square().sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    return sum(((a - b).square() * w).mean(dim=[2, 3]).sum(1) for a, b, w in zip(feats(x), feats(y), heads))


def test_both_lpips_variants_give_their_documented_values(vgg_file, tmp_path):
    from pipeline.distill.losses import LPIPSLoss

    x, y = lpips_pair()
    ours = LPIPSLoss(vgg_file, "vgg")  # this project's default: max pooling, lpips scaling, >= 64 px
    authors = LPIPSLoss(vgg_file, "vgg", size=224, pooling="avg", scaling="piq")
    with torch.no_grad():
        v_ours, v_authors = float(ours(x, y)), float(authors(x, y))
        heads = [lin.model[-1].weight.detach().clone() for lin in authors.model.lins]
        by_formula = float(piq_formula(x, y, random_vgg16_features(), heads).mean())
    assert v_ours == pytest.approx(LPIPS_DOCUMENTED["lpips"], rel=1e-4)
    assert v_authors == pytest.approx(LPIPS_DOCUMENTED["piq"], rel=1e-4)
    assert v_authors == pytest.approx(by_formula, rel=1e-5)  # the authors' variant is piq's formula
    # piq's own heads file (5 tensors of C values) replaces the package's heads
    torch.manual_seed(1)
    custom = [torch.rand(c) for c in (64, 128, 256, 512, 512)]
    torch.save(custom, tmp_path / "lpips_weights.pt")
    with_heads = LPIPSLoss(vgg_file, "vgg", size=224, pooling="avg", scaling="piq", heads=tmp_path / "lpips_weights.pt")
    with torch.no_grad():
        expected = float(piq_formula(x, y, random_vgg16_features(), [h.view(1, -1, 1, 1) for h in custom]).mean())
        assert float(with_heads(x, y)) == pytest.approx(expected, rel=1e-5)
    torch.save(custom[:4], tmp_path / "bad.pt")
    from pipeline.distill.losses import LPIPSWeightsError

    with pytest.raises(LPIPSWeightsError, match="expected piq's lpips_weights.pt, a list of 5 tensors"):
        LPIPSLoss(vgg_file, "vgg", heads=tmp_path / "bad.pt")



# ---------------------------------------------------------------- 4b. SFD-v: sfd-main's step layers on EDM networks


@pytest.mark.parametrize("net", ["SongUNet", "DhariwalUNet"])
def test_authors_step_layers_on_edm_networks(tmp_path, net):
    """step_condition_arch authors: sfd-main's names (map_step*, per-block affine_step); zero init starts as the
    teacher, random (sfd-main's init) does not; the condition is live and survives save -> load. Output parity with
    sfd-main's own networks_edm.py is checked by bench/authors (it needs the sfd-main checkout)."""
    from pipeline.core.checkpoints import save_checkpoint
    from pipeline.distill.student import sampler_section, save_student, student_config, student_from_checkpoint
    from pipeline.networks.edm import build_edm_model
    from pipeline.teachers.loader import load_student, load_teacher

    kwargs = dict(img_resolution=8, img_channels=3, label_dim=0 if net == "SongUNet" else 3, model_type=net,
                  model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
    torch.manual_seed(0)
    teacher = build_edm_model("EDMPrecond", kwargs)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # no zero layer: every path of the network matters
        for p in teacher.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    config = {**teacher.checkpoint_architecture(), "data": {"sample_shape": [3, 8, 8], "num_classes": kwargs["label_dim"]},
              "sampler": None, "provenance": {}}
    save_checkpoint(tmp_path / "teacher", teacher.checkpoint_state_dict(), config)
    x = 3 * torch.randn(2, 3, 8, 8, generator=g)
    sigma = torch.tensor([0.5, 4.0])
    labels = None if net == "SongUNet" else torch.tensor([0, 2])
    with torch.no_grad():
        ref = load_teacher(tmp_path / "teacher").model(x, sigma, labels)
        zero = student_from_checkpoint(tmp_path / "teacher", step_condition=True, step_condition_arch="authors")
        rand = student_from_checkpoint(tmp_path / "teacher", step_condition=True, step_condition_arch="authors",
                                       step_condition_init="random")
        new = sorted(set(zero.model.checkpoint_state_dict()) - set(teacher.checkpoint_state_dict()))
        assert new and all(k.startswith(("model.map_step.", "model.map_step_layer")) or ".affine_step." in k for k in new), new
        assert zero.config["edm"]["init_kwargs"]["step_condition"] == "authors"
        four = torch.full((2,), 4)
        assert torch.equal(zero.model.eval()(x, sigma, labels, num_steps=four), ref)
        out4 = rand.model.eval()(x, sigma, labels, num_steps=four)
        assert not torch.allclose(out4, ref, atol=1e-3)
        assert not torch.allclose(out4, rand.model(x, sigma, labels, num_steps=torch.full((2,), 6)), atol=1e-4)
    sampler = sampler_section(Schedule("polynomial", 5, 0.006, 80.0, 7.0), afs=True, step_condition=[4, 5])
    save_student(tmp_path / "student", rand.model, student_config(rand.config, sampler, {}))
    with torch.no_grad():
        assert torch.equal(load_student(tmp_path / "student").model(x, sigma, labels, num_steps=four), out4)
    from pipeline.distill.student import student_from_scratch

    ours = student_from_scratch(TINY_NET, sample_shape=(1, 8, 8), num_classes=0)  # this project's U-Net: no such layers
    plain = sampler_section(Schedule("polynomial", 4, 0.006, 80.0, 7.0), afs=True)
    save_student(tmp_path / "ours", ours.model, student_config(ours.config, plain, {}))
    with pytest.raises(ParamError, match="step_condition_arch: 'authors' .* EDM networks only"):
        student_from_checkpoint(tmp_path / "ours", step_condition=True, step_condition_arch="authors")
