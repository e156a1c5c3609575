"""Teacher training: the EDM loss decreases, runs are deterministic, resume equals an uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.core.checkpoints import load_checkpoint
from pipeline.data.datasets import load_digits_dataset
from pipeline.diffusion.denoisers import EDMPrecond
from pipeline.core.hashing import hash_state_dict
from pipeline.networks.unet import build_network
from pipeline.teachers.loader import load_network
from pipeline.core.param_checks import ParamError
from pipeline.teachers.training import TeacherParams, edm_loss, train_teacher
from pipeline.teachers.content import teacher_content_hash


TINY = {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": []}


@pytest.fixture(scope="module")
def digits():
    images, labels = load_digits_dataset()
    return images[:256], labels[:256]


def params(**kw) -> TeacherParams:
    return TeacherParams.from_dict({"network": TINY, "batch_size": 32, "steps": 6, "lr": 2e-3, "lr_rampup_steps": 0,
                                    "checkpoint_every": 3, "device": "cpu", **kw})


def fixed_loss(model: EDMPrecond, images, labels) -> float:
    with torch.no_grad():
        return float(edm_loss(model, images, labels, P_mean=-1.2, P_std=1.2, generator=torch.Generator().manual_seed(123)))


def test_a_few_steps_reduce_the_loss(digits, tmp_path):
    images, labels = digits
    p = params(steps=60, ema_halflife_kimg=0.001)  # EMA ~ the raw weights, so the checkpoint shows the training
    torch.manual_seed(p.seed)
    config = {**TINY, "img_resolution": 8, "in_channels": 1, "label_dim": 10}
    initial = EDMPrecond(build_network(**config)).eval()
    summary = train_teacher(p, images, labels, 10, tmp_path / "teacher", progress=False)
    trained, config_out = load_network(tmp_path / "teacher")
    before, after = fixed_loss(initial, images[:128], labels[:128]), fixed_loss(trained, images[:128], labels[:128])
    assert after < 0.8 * before, (before, after)
    assert summary["steps"] == 60 and summary["final_loss"] < summary["first_loss"]
    assert config_out["sampler"] is None and config_out["data"] == {"sample_shape": [1, 8, 8], "num_classes": 10}
    assert config_out["network"]["label_dim"] == 10 and config_out["sigma_data"] == 0.5
    assert config_out["provenance"]["weights_hash"] == hash_state_dict(trained.net.state_dict())


def test_deterministic_and_resume_equals_uninterrupted(digits, tmp_path):
    images, labels = digits
    train_teacher(params(steps=6), images, labels, 10, tmp_path / "full", state_dir=tmp_path / "s_full", progress=False)
    train_teacher(params(steps=6), images, labels, 10, tmp_path / "again", progress=False)
    full = load_checkpoint(tmp_path / "full")[0]
    assert hash_state_dict(full) == hash_state_dict(load_checkpoint(tmp_path / "again")[0])
    # interrupted after 3 steps (the saved state), then resumed to 6
    train_teacher(params(steps=3), images, labels, 10, tmp_path / "part", state_dir=tmp_path / "s", progress=False)
    state_meta = json.loads((tmp_path / "s" / "training_state.json").read_text())
    assert state_meta["counters"]["batch"] == 3
    train_teacher(params(steps=6), images, labels, 10, tmp_path / "resumed", state_dir=tmp_path / "s", progress=False)
    assert hash_state_dict(load_checkpoint(tmp_path / "resumed")[0]) == hash_state_dict(full)
    # a different configuration does not resume from that state
    other = train_teacher(params(steps=6, lr=1e-3), images, labels, 10, tmp_path / "other", state_dir=tmp_path / "s", progress=False)
    assert other["steps"] == 6 and json.loads((tmp_path / "s" / "training_state.json").read_text())["training_key"] != state_meta["training_key"]


def test_unconditional_when_asked(digits, tmp_path):
    images, labels = digits
    train_teacher(params(steps=2, conditional=False), images, labels, 10, tmp_path / "u", progress=False)
    _, config = load_network(tmp_path / "u")
    assert config["network"]["label_dim"] == 0 and config["data"]["num_classes"] == 0


def test_params_are_validated():
    with pytest.raises(ParamError, match="unknown key"):
        TeacherParams.from_dict({"stepz": 3})
    with pytest.raises(ParamError, match="teacher.network.label_dim"):
        TeacherParams.from_dict({"network": {"label_dim": 3}})
    with pytest.raises(ParamError, match="label_dropout"):
        TeacherParams.from_dict({"label_dropout": 1.0})
    with pytest.raises(ParamError, match="network"):
        TeacherParams.from_dict({"network": {"model_chanels": 8}})


def test_pretrained_teacher_is_checked_and_copied(digits, tmp_path):
    from pipeline.core.checkpoints import CheckpointError
    from pipeline.teachers.training import import_pretrained_teacher

    images, labels = digits
    trained = tmp_path / "elsewhere"
    train_teacher(params(steps=2), images, labels, 10, trained)
    desc = {"sample_shape": [1, 8, 8]}
    summary = import_pretrained_teacher(trained, tmp_path / "teacher", desc)
    assert (tmp_path / "teacher" / "model.safetensors").read_bytes() == (trained / "model.safetensors").read_bytes()
    model, _ = load_network(tmp_path / "teacher")
    assert summary["network_hash"] == hash_state_dict(model.net.state_dict())
    assert summary["weights_hash"] == teacher_content_hash(model)  # the store keys' teacher hash: weights + config
    with pytest.raises(CheckpointError, match="shape"):
        import_pretrained_teacher(trained, tmp_path / "t2", {"sample_shape": [3, 32, 32]})
    (trained / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"elsewhere/model\.safetensors is missing"):
        import_pretrained_teacher(trained, tmp_path / "t3", desc)
    assert TeacherParams.from_dict({"pretrained": "/models/edm-cifar10"}).pretrained == "/models/edm-cifar10"
    with pytest.raises(ParamError, match="teacher.pretrained"):
        TeacherParams.from_dict({"pretrained": 3})
