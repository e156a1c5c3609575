"""The compact EDM U-Net: shapes, conditioning, step condition, checkpoints (safetensors only)."""

from __future__ import annotations

import pytest
import torch

from pipeline.core.checkpoints import CheckpointError, save_checkpoint
from pipeline.diffusion.denoisers import EDMPrecond
from pipeline.core.hashing import hash_state_dict
from pipeline.networks.unet import build_network, drop_labels
from pipeline.teachers.loader import load_network, load_teacher
from pipeline.core.param_checks import ParamError
from pipeline.teachers.content import teacher_content_hash


SHAPES = [  # (C, resolution, channel_mult, attn_resolutions)
    (1, 8, [1, 2], [4]),
    (3, 16, [1, 2, 2], [8]),
    (3, 32, [1, 2, 2], [8]),
    (1, 28, [1, 2, 2], [7]),
    (3, [16, 24], [1, 2], []),
]


def tiny(**kw) -> dict:
    return {"model_channels": 8, "num_blocks": 1, **kw}


def _randomise_output(net: torch.nn.Module) -> None:
    # the output layer is zero-initialised; give it weights so outputs depend on everything
    torch.nn.init.normal_(net.out_conv.weight, std=0.1)
    for block in net.modules():
        if hasattr(block, "conv1"):
            torch.nn.init.normal_(block.conv1.weight, std=0.05)


@pytest.mark.parametrize("c,res,mult,attn", SHAPES)
def test_forward_backward_every_shape(c, res, mult, attn):
    torch.manual_seed(0)
    net = build_network(**tiny(img_resolution=res, in_channels=c, channel_mult=mult, attn_resolutions=attn, label_dim=3, dropout=0.1))
    _randomise_output(net)
    h, w = (res, res) if isinstance(res, int) else res
    x = torch.randn(2, c, h, w)
    out, feats = net(x, torch.randn(2), torch.tensor([0, 2]), return_features=True)
    assert out.shape == x.shape and feats.shape[0] == 2 and feats.shape[2:] == (h, w)
    out.square().mean().backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert net.conv_in.weight.grad.abs().sum() > 0


def test_resolution_must_divide_levels():
    with pytest.raises(ParamError, match="divisible"):
        build_network(**tiny(img_resolution=10, channel_mult=[1, 2, 2]))
    with pytest.raises(ParamError, match="unknown key"):
        build_network(**tiny(channels=3))


def test_labels_none_uses_the_null_class_and_dropout():
    torch.manual_seed(0)
    net = build_network(**tiny(label_dim=4)).eval()
    _randomise_output(net)
    x, c = torch.randn(3, 1, 8, 8), torch.zeros(3)
    null = net(x, c, torch.full((3,), 4))
    assert torch.allclose(net(x, c, None), null, atol=1e-6)
    assert not torch.allclose(net(x, c, torch.tensor([0, 1, 2])), null, atol=1e-4)
    g = torch.Generator().manual_seed(0)
    dropped = drop_labels(torch.zeros(10000, dtype=torch.int64), 4, 0.1, generator=g)
    assert set(dropped.unique().tolist()) == {0, 4}
    assert abs((dropped == 4).float().mean().item() - 0.1) < 0.015  # binomial sd 0.003


def test_step_condition_starts_equal_to_the_teacher():
    torch.manual_seed(0)
    config = tiny(label_dim=3)
    teacher = build_network(**config).eval()
    _randomise_output(teacher)
    student = build_network(**{**config, "step_condition": True}).eval()
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("steps_layer") for k in missing)
    x, c, lab = torch.randn(2, 1, 8, 8), torch.randn(2), torch.tensor([1, 2])
    for n in (4, 7):
        torch.testing.assert_close(student(x, c, lab, num_steps=torch.full((2,), n)), teacher(x, c, lab), rtol=0, atol=0)
    with pytest.raises(ParamError, match="num_steps"):
        student(x, c, lab)
    # once trained (non-zero last layer) the step count changes the output
    torch.nn.init.normal_(student.steps_layer1.weight, std=0.1)
    assert not torch.allclose(student(x, c, lab, num_steps=torch.full((2,), 4)), student(x, c, lab, num_steps=torch.full((2,), 7)))


def test_checkpoint_round_trip_is_safetensors(tmp_path):
    torch.manual_seed(0)
    config = tiny(label_dim=10)
    net = build_network(**config)
    _randomise_output(net)
    cfg = {"network": config, "sigma_data": 0.5, "data": {"sample_shape": [1, 8, 8], "num_classes": 10},
           "sampler": None, "provenance": {"test": True}}
    save_checkpoint(tmp_path / "ckpt", net.state_dict(), cfg)
    raw = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert raw[8:9] == b"{" and header_len < len(raw)  # a safetensors header, not a pickle (b"\x80")
    model, loaded_cfg = load_network(tmp_path / "ckpt")
    assert isinstance(model, EDMPrecond) and not model.training and loaded_cfg["data"]["num_classes"] == 10
    x, sigma, lab = torch.randn(4, 1, 8, 8), torch.tensor([0.01, 0.5, 3.0, 80.0]), torch.tensor([0, 3, 5, 9])
    expected = EDMPrecond(net.eval(), 0.5)(x, sigma, lab)
    torch.testing.assert_close(model(x, sigma, lab), expected, rtol=0, atol=0)

    teacher = load_teacher(tmp_path / "ckpt")
    assert teacher.network_hash == hash_state_dict(net.state_dict())
    assert teacher.weights_hash == teacher_content_hash(teacher.model)  # weights and the whole config
    assert teacher.sample_shape == (1, 8, 8) and teacher.num_classes == 10
    via_source = load_teacher("checkpoint", path=str(tmp_path / "ckpt"))  # the old form, still accepted
    assert via_source.weights_hash == teacher.weights_hash


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path / "nowhere")):
        load_network(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_network(tmp_path / "half")
