"""Sampling: per-seed noise independent of batch size, sampler resolution, PNGs, grids, ``sfd sample``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pipeline.core.checkpoints import save_checkpoint
from pipeline.cli import app
from pipeline.diffusion.denoisers import EDMPrecond
from pipeline.networks.unet import build_network
from pipeline.core.param_checks import ParamError
from pipeline.core.images import image_grid, save_pngs
from pipeline.diffusion.sampling import SamplerSpec, generate, make_denoiser, resolve_labels, resolve_sampler
from pipeline.evaluation.samples import sample_from_checkpoint
from pipeline.diffusion.schedules import Schedule


NET = {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4], "label_dim": 3}


def _net(step_condition: bool = False):
    torch.manual_seed(0)
    net = build_network(**NET, step_condition=step_condition).eval()
    torch.nn.init.normal_(net.out_conv.weight, std=0.1)
    if step_condition:
        torch.nn.init.normal_(net.steps_layer1.weight, std=0.1)
    return net


def _ckpt(tmp_path, sampler=None, step_condition=False):
    net = _net(step_condition)
    cfg = {"network": {**NET, "step_condition": step_condition}, "sigma_data": 0.5,
           "data": {"sample_shape": [1, 8, 8], "num_classes": 3}, "sampler": sampler, "provenance": {}}
    return save_checkpoint(tmp_path / "ckpt", net.state_dict(), cfg), net


def test_sample_i_is_independent_of_batch_size():
    model = EDMPrecond(_net())
    spec = SamplerSpec("dpmpp", 3, Schedule(num_steps=4))
    seeds = [5, 6, 7, 8, 9, 10]
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    whole = generate(model, seeds, (1, 8, 8), spec, labels=labels, batch_size=6)
    pieces = generate(model, seeds, (1, 8, 8), spec, labels=labels, batch_size=4)
    alone = generate(model, seeds[3:4], (1, 8, 8), spec, labels=labels[3:4], batch_size=1)
    torch.testing.assert_close(pieces, whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(alone[0], whole[3], rtol=0, atol=1e-5)
    assert not torch.allclose(whole[0], whole[1])


def test_gmm_sampling_is_exact_per_seed(gmm_teacher_small):
    spec = SamplerSpec("heun", 2, Schedule(num_steps=8))
    a = generate(gmm_teacher_small.denoiser, [0, 1, 2], (1, 4, 4), spec, batch_size=3)
    b = generate(gmm_teacher_small.denoiser, [2], (1, 4, 4), spec, batch_size=1)
    torch.testing.assert_close(a[2], b[0], rtol=0, atol=1e-6)


def test_resolve_sampler_defaults_and_overrides():
    teacher = resolve_sampler(None)
    assert (teacher.solver, teacher.max_order, teacher.schedule.num_steps, teacher.nfe) == ("dpmpp", 3, 6, 5)
    assert teacher.schedule.t_min == 0.006 and teacher.schedule.t_max == 80.0 and not teacher.afs
    euler = resolve_sampler(None, solver="euler", num_steps=4, afs=True)
    assert (euler.solver, euler.nfe) == ("euler", 2)
    section = {"solver": "euler", "max_order": 1, "schedule": Schedule(num_steps=4).to_dict(), "afs": True,
               "step_condition": None, "guidance": 1.0}
    student = resolve_sampler(section)
    assert (student.solver, student.nfe, student.afs) == ("euler", 2, True)
    assert resolve_sampler(section, afs=False).nfe == 3
    # a saved sampler round-trips, append_zero included (Heun 18 + a final Euler step to 0 = 35 NFE)
    heun = SamplerSpec("heun", 2, Schedule(num_steps=18, t_min=0.002), append_zero=True)
    assert resolve_sampler(heun.to_dict()).nfe == 35 and resolve_sampler(heun.to_dict()).append_zero
    # guidance w != 1 evaluates both branches: twice the network calls at the same NFE
    guided_student = resolve_sampler(section, guidance=2.0)
    assert (guided_student.nfe, guided_student.network_calls) == (2, 4) and student.network_calls == 2
    sfdv = resolve_sampler({**section, "step_condition": [4, 5, 6, 7]}, num_steps=6)
    assert sfdv.schedule.num_steps == 6 and sfdv.nfe == 4 and sfdv.step_condition == (4, 5, 6, 7)
    with pytest.raises(ParamError, match="supports N in"):
        resolve_sampler({**section, "step_condition": [4, 5]}, num_steps=9)
    with pytest.raises(ParamError, match="solver"):
        resolve_sampler(None, solver="rk45")


def test_distilled_checkpoint_needs_no_options(tmp_path):
    section = {"solver": "euler", "max_order": 1, "schedule": Schedule(num_steps=4).to_dict(), "afs": True,
               "step_condition": [4, 5], "guidance": 1.0}
    ckpt, net = _ckpt(tmp_path, section, step_condition=True)
    images, labels, spec = sample_from_checkpoint(ckpt, "0-3")
    assert images.shape == (4, 1, 8, 8) and spec.nfe == 2 and labels is not None
    # the same as calling the network by hand with num_steps=4
    manual = generate(make_denoiser(EDMPrecond(net), spec), [0, 1, 2, 3], (1, 8, 8), spec, labels=labels)
    torch.testing.assert_close(images, manual, rtol=0, atol=0)
    five, _, spec5 = sample_from_checkpoint(ckpt, "0-3", num_steps=5)
    assert spec5.nfe == 3 and not torch.allclose(five, images)


def test_labels_resolution():
    seeds = [0, 1, 2]
    assert resolve_labels(None, seeds, 0) is None
    assert resolve_labels("none", seeds, 10) is None
    assert resolve_labels("4", seeds, 10).tolist() == [4, 4, 4]
    assert resolve_labels("1,2,3", seeds, 10).tolist() == [1, 2, 3]
    assert resolve_labels(None, seeds, 10).shape == (3,)
    with pytest.raises(ParamError, match="outside"):
        resolve_labels("12", seeds, 10)
    with pytest.raises(ParamError, match="unconditional"):
        resolve_labels("1", seeds, 0)


def test_pngs_and_grid(tmp_path):
    images = torch.linspace(-1, 1, 5 * 64).reshape(5, 1, 8, 8)
    paths = save_pngs(images, [3, 4, 5, 6, 7], tmp_path)
    assert [p.name for p in paths] == ["000003.png", "000004.png", "000005.png", "000006.png", "000007.png"]
    img = np.asarray(Image.open(paths[0]))
    assert img.shape == (8, 8) and img[0, 0] == 0
    grid = image_grid(images, columns=3, min_tile=16, pad=1)
    assert grid.shape == (2 * 17 + 1, 3 * 17 + 1, 1) and grid.dtype == np.uint8


def test_sfd_sample_cli(tmp_path):
    runner = CliRunner()
    out = tmp_path / "gmm"
    result = runner.invoke(app, ["sample", "--teacher", "gmm", "--seeds", "0-7", "--out", str(out), "--solver", "heun",
                                 "--num-steps", "5", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("0*.png"))) == 8 and (out / "grid.png").is_file()
    info = json.loads((out / "sampler.json").read_text())
    assert info["sampler"]["solver"] == "heun" and info["sampler"]["nfe"] == 8

    ckpt, _ = _ckpt(tmp_path)
    result = runner.invoke(app, ["sample", "--ckpt", str(ckpt), "--seeds", "0-3", "--out", str(tmp_path / "t"),
                                 "--guidance", "2", "--labels", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "t" / "sampler.json").read_text())
    assert info["sampler"]["solver"] == "dpmpp" and info["sampler"]["guidance"] == 2.0 and info["labels"] == [1] * 4
