"""Distillation losses: values against their formulas, LPIPS from a local backbone file, clear errors."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.distill.losses import (
    LPIPS_MIN_SIZE,
    LPIPSLoss,
    LPIPSWeightsError,
    l1_loss,
    l2_loss,
    load_backbone_state,
    make_loss,
    pseudo_huber_loss,
)
from pipeline.core.param_checks import ParamError


@pytest.fixture(scope="module")
def fake_alexnet(tmp_path_factory):
    """A randomly initialised torchvision AlexNet's features.* saved like the real weights file (no download)."""
    import torchvision

    torch.manual_seed(0)
    state = {k: v for k, v in torchvision.models.alexnet().state_dict().items() if k.startswith("features.")}
    path = tmp_path_factory.mktemp("weights") / "alexnet-owt-7be5be79.pth"
    torch.save(state, path)
    return path


def pair():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)


def test_pixel_losses_match_their_formulas():
    x, y = pair()
    d = (x - y).flatten(1)
    assert float(l1_loss(x, y)) == pytest.approx(float(d.abs().sum(1).mean()), rel=1e-6)
    assert float(l2_loss(x, y)) == pytest.approx(float((d**2).sum(1).mean()), rel=1e-6)
    c = 0.00054 * math.sqrt(64)
    expected = sum(math.sqrt(float((row**2).sum()) + c * c) - c for row in d) / 3
    assert float(pseudo_huber_loss(x, y)) == pytest.approx(expected, rel=1e-6)
    for fn in (l1_loss, l2_loss, pseudo_huber_loss):
        assert float(fn(x, x)) == pytest.approx(0.0, abs=1e-9)
        xg = x.clone().requires_grad_(True)
        fn(xg, y).backward()
        assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


def test_l1_is_a_sum_over_pixels_and_a_mean_over_the_batch():
    x = torch.zeros(4, 1, 2, 2)
    assert float(l1_loss(x + 0.5, x)) == pytest.approx(2.0)  # 4 pixels x 0.5, same for every sample


def test_every_loss_option_computes(fake_alexnet):
    x, y = pair()
    for name in ("l1", "l2", "pseudo_huber", "lpips"):
        fn = make_loss(name, lpips_weights=fake_alexnet)
        xg = x.clone().requires_grad_(True)
        value = fn(xg, y)
        assert value.ndim == 0 and torch.isfinite(value.detach()) and float(value.detach()) > 0, name
        value.backward()
        assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0, name


def test_lpips_is_zero_on_equal_images_and_takes_small_gray_images(fake_alexnet):
    loss = LPIPSLoss(fake_alexnet)
    x, _ = pair()
    assert float(loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    prepared = LPIPSLoss.prepare(x)
    assert prepared.shape == (3, 3, LPIPS_MIN_SIZE, LPIPS_MIN_SIZE)  # channel repeated, upsampled
    assert all(not p.requires_grad for p in loss.parameters())


def test_backbone_keys_are_remapped_into_the_lpips_slices(fake_alexnet):
    state = load_backbone_state(fake_alexnet, "alex")
    assert "net.slice1.0.weight" in state and "net.slice2.3.weight" in state and "net.slice5.10.bias" in state
    raw = torch.load(fake_alexnet, weights_only=True)
    assert torch.equal(state["net.slice3.6.weight"], raw["features.6.weight"])


def test_lpips_without_weights_fails_clearly(tmp_path):
    with pytest.raises(LPIPSWeightsError, match="no backbone weights file given.*lpips_weights.*alexnet-owt-7be5be79.pth"):
        make_loss("lpips")
    missing = tmp_path / "nowhere" / "alexnet-owt-7be5be79.pth"
    with pytest.raises(LPIPSWeightsError, match=f"{missing} does not exist.*never used"):
        make_loss("lpips", lpips_weights=missing)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(LPIPSWeightsError, match="cannot be read"):
        make_loss("lpips", lpips_weights=garbage)
    wrong = tmp_path / "wrong.pth"
    torch.save({"classifier.1.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(LPIPSWeightsError, match="no features.N"):
        make_loss("lpips", lpips_weights=wrong)


def test_unknown_loss_is_refused():
    with pytest.raises(ParamError, match="loss: got 'l3'; allowed values: 'l1', 'l2', 'pseudo_huber', 'lpips'"):
        make_loss("l3")


def test_stage2_weighting_is_the_authors_formula_with_a_stand_in_perceptual_function():
    """The authors: per-element |x_hat - y| [B,C,H,W], + batch-mean LPIPS added to every element, summed over all elements
    and divided by B. Ours: mean_b sum_i |x_hat - y| + lambda mean_b LPIPS with lambda = C H W ("chw"). 1e-5 relative."""
    from pipeline.distill.losses import perceptual_term, resolve_perceptual_weight, with_perceptual_term

    g = torch.Generator().manual_seed(3)
    x_hat, y = torch.randn(4, 3, 5, 6, generator=g), torch.randn(4, 3, 5, 6, generator=g)
    w = torch.rand(3, 5, 6, generator=g)

    def stand_in(a, b):  # any per-sample perceptual distance, averaged over the batch (no weights needed)
        return ((a - b) ** 2 * w).flatten(1).sum(1).sqrt().mean()

    authors = ((x_hat - y).abs() + stand_in(x_hat, y)).sum() / x_hat.shape[0]
    lam = resolve_perceptual_weight("chw", tuple(x_hat.shape[1:]))
    assert lam == 3 * 5 * 6
    ours = with_perceptual_term(l1_loss, stand_in, lam)(x_hat, y)
    assert float(ours) == pytest.approx(float(authors), rel=1e-5)
    # the SFD loop's last step: loss_fn + perceptual_term, the same value
    assert float(l1_loss(x_hat, y) + perceptual_term(stand_in, lam)(x_hat, y)) == pytest.approx(float(authors), rel=1e-5)
    # a weight of 1 (the old default) is 90x smaller here, and the term is not the pixel sum
    assert float(with_perceptual_term(l1_loss, stand_in, 1.0)(x_hat, y)) < float(authors)
    assert resolve_perceptual_weight(2.5, (3, 32, 32)) == 2.5 and resolve_perceptual_weight("chw", (3, 32, 32)) == 3072
    with pytest.raises(ParamError, match="lpips_weight"):
        resolve_perceptual_weight("hw", (3, 32, 32))


def test_lpips_size_and_average_pooling(fake_alexnet):
    x, y = pair()
    assert LPIPSLoss.prepare(x, 224).shape == (3, 3, 224, 224)
    loss = LPIPSLoss(fake_alexnet, size=80, pooling="avg")
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in loss.model.net.modules())
    assert any(isinstance(m, torch.nn.AvgPool2d) for m in loss.model.net.modules())
    assert any(isinstance(m, torch.nn.MaxPool2d) for m in LPIPSLoss(fake_alexnet).model.net.modules())
    assert float(loss(x, x)) == pytest.approx(0.0, abs=1e-6) and float(loss(x, y)) > 0
    with pytest.raises(ParamError, match="lpips_pooling"):
        LPIPSLoss(fake_alexnet, pooling="min")
    with pytest.raises(ParamError, match="lpips_size"):
        LPIPSLoss(fake_alexnet, size=4)
