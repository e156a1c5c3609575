"""The one teacher loader (``from pipeline import load_teacher``): checkpoints, distilled students, gmm."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from pipeline.core.checkpoints import CheckpointError, save_checkpoint
from pipeline.core.hashing import hash_description, hash_state_dict
from pipeline.core.param_checks import ParamError
from pipeline.diffusion.denoisers import EDMPrecond, StepBound, bind_num_steps
from pipeline.diffusion.schedules import Schedule
from pipeline.networks.unet import build_network, network_config
from pipeline.teachers.content import teacher_content_hash

ARCH = {"img_resolution": 8, "in_channels": 1, "label_dim": 3, "model_channels": 8, "channel_mult": [1, 2],
        "num_blocks": 1, "attn_resolutions": [4]}  # fmt: skip
SFDV_SAMPLER = {"solver": "euler", "max_order": 1, "afs": True, "step_condition": [4, 5, 6, 7], "guidance": 1.0,
                "schedule": Schedule(num_steps=7).to_dict()}  # fmt: skip


def save_net(path, *, step_condition=False, sampler=None):
    torch.manual_seed(0)
    net = build_network(**ARCH, step_condition=step_condition)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))  # zero-initialised layers would hide differences
    config = {"network": network_config(**ARCH, step_condition=step_condition), "sigma_data": 0.5,
              "data": {"sample_shape": [1, 8, 8], "num_classes": 3}, "sampler": sampler, "provenance": {}}  # fmt: skip
    save_checkpoint(path, net.state_dict(), config)
    return net.eval()


def inputs(n=4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=g) * 3, torch.full((n,), 3.0), torch.tensor([0, 1, 2, 0])


def test_public_api_loads_a_teacher_checkpoint(tmp_path):
    from pipeline import load_teacher

    net = save_net(tmp_path / "teacher")
    for where in (tmp_path / "teacher", str(tmp_path / "teacher")):
        t = load_teacher(where)
        assert isinstance(t.denoiser, nn.Module) and isinstance(t.denoiser, EDMPrecond) and t.model is t.denoiser
        assert t.sample_shape == (1, 8, 8) and t.num_classes == 3
        assert t.network_hash == hash_state_dict(net.state_dict()) and t.weights_hash == teacher_content_hash(t.model)
        assert not t.is_distilled and t.sampler is None and t.num_steps is None
        assert t.config["data"]["num_classes"] == 3
    x, sigma, labels = inputs()
    with torch.no_grad():
        torch.testing.assert_close(t.denoiser(x, sigma, labels), EDMPrecond(net, 0.5)(x, sigma, labels), rtol=0, atol=0)
    assert t.sampler_spec().solver == "dpmpp"  # a teacher gets the default sampler
    with pytest.raises(ParamError, match="no sampler section"):
        load_teacher(tmp_path / "teacher", num_steps=4)  # sampler options are a distilled student's


def test_distilled_sfd_v_checkpoint_binds_its_step_condition(tmp_path):
    from pipeline import load_student, load_teacher

    net = save_net(tmp_path / "sfd_v", step_condition=True, sampler=SFDV_SAMPLER)
    t = load_teacher(tmp_path / "sfd_v")
    assert t.is_distilled and t.sampler.step_condition == (4, 5, 6, 7) and t.num_steps == 7
    assert isinstance(t.denoiser, StepBound) and t.denoiser.num_steps == 7 and t.model.net.step_condition
    # the store-key hash of a step-conditioned distilled teacher: its content (weights + config) + bound N
    plain = hash_state_dict(net.state_dict())
    assert t.network_hash == plain
    assert t.weights_hash == hash_description({"weights_hash": teacher_content_hash(t.model), "num_steps": 7})
    x, sigma, labels = inputs()
    with torch.no_grad():
        expected = EDMPrecond(net, 0.5)(x, sigma, labels, num_steps=torch.full((4,), 7))
        torch.testing.assert_close(t.denoiser(x, sigma, labels), expected, rtol=0, atol=0)
        at5 = load_teacher(tmp_path / "sfd_v", num_steps=5)
        assert at5.num_steps == 5 and at5.weights_hash != t.weights_hash
        expected5 = EDMPrecond(net, 0.5)(x, sigma, labels, num_steps=torch.full((4,), 5))
        torch.testing.assert_close(at5.denoiser(x, sigma, labels), expected5, rtol=0, atol=0)
    assert load_student(tmp_path / "sfd_v").weights_hash == t.weights_hash
    assert t.sampler_spec(num_steps=4).nfe == 2  # euler + AFS at N = 4


def test_trajectory_teacher_and_stage2_detection_go_through_the_loader(tmp_path):
    from pipeline.teachers.loader import bound_teacher_hash, is_distilled_checkpoint, load_teacher
    from pipeline.trajectories.generation import load_trajectory_teacher

    net = save_net(tmp_path / "sfd_v", step_condition=True, sampler=SFDV_SAMPLER)
    save_net(tmp_path / "teacher")
    teacher, denoiser, key_hash = load_trajectory_teacher(None, tmp_path / "sfd_v")
    assert denoiser is teacher.denoiser and key_hash == bound_teacher_hash(teacher_content_hash(teacher.model), 7)
    assert is_distilled_checkpoint(tmp_path / "sfd_v") and not is_distilled_checkpoint(tmp_path / "teacher")
    assert teacher.is_distilled and not load_teacher(tmp_path / "teacher").is_distilled
    via_params, _, h = load_trajectory_teacher({"source": "checkpoint", "path": str(tmp_path / "sfd_v")}, None)
    assert h == key_hash == load_teacher(tmp_path / "sfd_v").weights_hash


def test_load_student_refuses_a_teacher(tmp_path):
    from pipeline import load_student

    save_net(tmp_path / "teacher")
    with pytest.raises(CheckpointError, match="no sampler section"):
        load_student(tmp_path / "teacher")


def test_gmm_source():
    from pipeline import load_teacher
    from pipeline.teachers.loader import gmm_teacher

    t = load_teacher("gmm", num_components=3, sample_shape=[1, 4, 4], std=0.3, seed=1, conditional=True)
    assert t.sample_shape == (1, 4, 4) and t.num_classes == 3 and not t.is_distilled and t.config is None
    assert t.weights_hash == gmm_teacher(num_components=3, sample_shape=(1, 4, 4), std=0.3, seed=1).weights_hash
    x = torch.randn(2, 1, 4, 4)
    assert t.denoiser(x, torch.full((2,), 1.0)).shape == x.shape
    with pytest.raises(ParamError, match="unknown key"):
        load_teacher("gmm", components=3)


def test_missing_checkpoint_names_the_file(tmp_path):
    from pipeline import load_teacher

    with pytest.raises(CheckpointError, match=r"nowhere does not exist.*model\.safetensors and model\.json"):
        load_teacher(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_teacher("gmmm")  # not a built-in source: taken as a path
    save_net(tmp_path / "half")
    (tmp_path / "half" / "model.json").unlink()
    with pytest.raises(CheckpointError, match=r"half/model\.json is missing \(its config"):
        load_teacher(tmp_path / "half")
    with pytest.raises(ParamError, match="teacher.path"):
        load_teacher("checkpoint")


def test_step_condition_binder_is_shared():
    seen = []

    def net(x, sigma, labels=None, num_steps=None):
        seen.append(num_steps.tolist())
        return x

    assert bind_num_steps(net, None) is net
    bind_num_steps(net, 3)(torch.zeros(2, 1, 2, 2), 1.0)
    from pipeline.diffusion.sampling import make_denoiser, resolve_sampler

    make_denoiser(net, resolve_sampler(SFDV_SAMPLER, num_steps=6))(torch.zeros(2, 1, 2, 2), 1.0)
    assert seen == [[3, 3], [6, 6]]


def test_package_top_is_lazy():
    code = ("import sys, pipeline, pipeline.core.param_checks; assert 'torch' not in sys.modules; "
            "assert 'load_teacher' in pipeline.__all__ and pipeline.__version__; "
            "from pipeline import load_teacher, Teacher, SamplerSpec, solve; print('ok')")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
    import pipeline

    with pytest.raises(AttributeError):
        pipeline.no_such_name  # noqa: B018
