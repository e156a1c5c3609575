"""The student: an exact copy of the teacher (also with the SFD-v step condition), its checkpoint and sampler."""

from __future__ import annotations

import pytest
import torch

from pipeline.core.checkpoints import CheckpointError, save_checkpoint
from pipeline.networks.unet import build_network, network_config
from pipeline.diffusion.sampling import generate
from pipeline.evaluation.samples import sample_from_checkpoint
from pipeline.diffusion.schedules import Schedule
from pipeline.diffusion.seeds import seed_labels
from pipeline.distill.student import sampler_section, save_student, student_config, student_from_checkpoint
from pipeline.teachers.loader import load_student, load_teacher

ARCH = {"img_resolution": 8, "in_channels": 1, "label_dim": 3, "model_channels": 8, "channel_mult": [1, 2],
        "num_blocks": 1, "attn_resolutions": [4]}  # fmt: skip



@pytest.fixture
def teacher_ckpt(tmp_path):
    """A small random conditional network saved as a teacher checkpoint (non-zero output layer)."""
    torch.manual_seed(0)
    net = build_network(**ARCH)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))  # zero-initialised layers would hide differences
    config = {"network": network_config(**ARCH), "sigma_data": 0.5, "data": {"sample_shape": [1, 8, 8], "num_classes": 3},
              "sampler": None, "provenance": {"kind": "teacher"}}  # fmt: skip
    save_checkpoint(tmp_path / "teacher", net.state_dict(), config)
    return tmp_path / "teacher"


def inputs(n=4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=g) * 3, torch.full((n,), 3.0), torch.tensor([0, 1, 2, 0])


@pytest.mark.parametrize("step_condition", [False, True])
def test_student_starts_equal_to_the_teacher(teacher_ckpt, step_condition):
    teacher = load_teacher(teacher_ckpt).denoiser
    init = student_from_checkpoint(teacher_ckpt, step_condition=step_condition)
    assert init.model.net.step_condition == step_condition
    x, sigma, labels = inputs()
    kwargs = [{"num_steps": torch.full((4,), n)} for n in (4, 7)] if step_condition else [{}]
    with torch.no_grad():
        expected = teacher(x, sigma, labels)
        for kw in kwargs:
            assert torch.equal(init.model(x, sigma, labels, **kw), expected)  # zero-initialised step layers
    assert any(p.requires_grad for p in init.model.parameters())


def test_missing_teacher_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist.*copy of it"):
        student_from_checkpoint(tmp_path / "nothing")


def save_distilled(teacher_ckpt, out, *, step_condition=None):
    init = student_from_checkpoint(teacher_ckpt, step_condition=bool(step_condition))
    with torch.no_grad():
        for p in init.model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # "trained"
    sched = Schedule(num_steps=max(step_condition) if step_condition else 4)
    config = student_config(init.config, sampler_section(sched, afs=True, step_condition=step_condition, guidance=1.0),
                            {"kind": "distill", "teacher_hash": "abc", "store_keys": {"4": "k"}})  # fmt: skip
    save_student(out, init.model, config)
    return init.model.eval()


def test_checkpoint_round_trip_reproduces_samples_bit_for_bit(teacher_ckpt, tmp_path):
    model = save_distilled(teacher_ckpt, tmp_path / "student")
    student = load_student(tmp_path / "student")
    assert student.sampler.solver == "euler" and student.sampler.afs and student.sampler.nfe == 2
    assert student.config["provenance"]["teacher_hash"] == "abc" and "weights_hash" in student.config["provenance"]
    seeds = list(range(10))
    labels = seed_labels(seeds, 3)
    from pipeline.diffusion.sampling import make_denoiser

    expected = generate(make_denoiser(model, student.sampler), seeds, (1, 8, 8), student.sampler, labels=labels, batch_size=4)
    images, lab, spec = sample_from_checkpoint(tmp_path / "student", seeds, batch_size=4)  # `sfd sample --ckpt`: no options
    assert torch.equal(lab, labels) and spec == student.sampler
    assert torch.equal(images, expected)


def test_sfd_v_checkpoint_samples_at_every_n(teacher_ckpt, tmp_path):
    save_distilled(teacher_ckpt, tmp_path / "v", step_condition=[4, 5, 6, 7])
    student = load_student(tmp_path / "v")
    assert student.sampler.step_condition == (4, 5, 6, 7) and student.sampler.schedule.num_steps == 7
    outs = [sample_from_checkpoint(tmp_path / "v", [0, 1], num_steps=n)[0] for n in (4, 5, 6, 7)]
    assert all(torch.isfinite(o).all() for o in outs)
    assert not torch.equal(outs[0], outs[3])


def test_guidance_uses_the_distilled_network_on_both_branches(teacher_ckpt, tmp_path):
    model = save_distilled(teacher_ckpt, tmp_path / "student")
    w = 2.5
    images, labels, spec = sample_from_checkpoint(tmp_path / "student", [0, 1, 2], guidance=w)
    assert spec.guidance == w

    def by_hand(x, sigma, lab=None):
        d_u, d_c = model(x, sigma, None), model(x, sigma, lab)
        return d_u + w * (d_c - d_u)

    expected = generate(by_hand, [0, 1, 2], (1, 8, 8), spec, labels=labels)
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)


def test_load_student_refuses_a_teacher(teacher_ckpt):
    with pytest.raises(CheckpointError, match="no sampler section"):
        load_student(teacher_ckpt)


def test_one_student_config_for_sfd_and_the_baselines(teacher_ckpt):
    from pipeline.distill.baselines import progressive, sfddm, vanilla
    from pipeline.teachers.loader import load_teacher

    assert progressive.student_config is sfddm.student_config is vanilla.student_config is student_config
    sampler, prov = sampler_section(Schedule(num_steps=4), afs=True), {"kind": "x"}
    init = student_from_checkpoint(teacher_ckpt)
    teacher_config = load_teacher(teacher_ckpt).config  # the baselines pass the teacher's model.json
    a, b = student_config(init.config, sampler, prov), student_config(teacher_config, sampler, prov)
    assert set(a) == set(b) == {"network", "sigma_data", "data", "sampler", "provenance"}
    assert a == b  # the teacher's own provenance and sampler: None are not carried over
