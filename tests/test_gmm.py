import math

import pytest
import torch

from pipeline.diffusion.gmm import GaussianMixture
from pipeline.core.param_checks import ParamError


def test_denoiser_satisfies_tweedie():
    """D(x, sigma) = x + sigma^2 grad log p_sigma(x) for the exact mixture (to float64 rounding)."""
    gmm = GaussianMixture.random(num_components=3, sample_shape=(2, 3), std=0.3, seed=4)
    x = torch.randn(16, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1.5
    for sigma in (0.05, 0.7, 5.0):
        xr = x.clone().requires_grad_(True)
        var = gmm.stds**2 + sigma**2  # [K]
        flat = xr.reshape(16, -1)
        mu = gmm.means.reshape(3, -1)
        logp = torch.logsumexp(
            gmm.weights.log() - 0.5 * gmm.dim * torch.log(2 * math.pi * var) - torch.cdist(flat, mu) ** 2 / (2 * var),
            dim=1,
        ).sum()
        (grad,) = torch.autograd.grad(logp, xr)
        assert torch.allclose(gmm(x, sigma), x + sigma**2 * grad, atol=1e-10, rtol=1e-9)


def test_labels_condition_on_the_component():
    gmm = GaussianMixture(torch.tensor([[-1.0], [1.0]]), 0.1)
    x = torch.zeros(2, 1, dtype=torch.float64)
    d = gmm(x, 1.0, torch.tensor([0, 1]))
    # single Gaussian posterior mean: mu + s^2/(s^2+sigma^2) (x - mu)
    gain = 0.01 / 1.01
    assert torch.allclose(d.flatten(), torch.tensor([-1 + gain, 1 - gain], dtype=torch.float64))
    assert torch.allclose(gmm(x, 1.0).flatten(), torch.zeros(2, dtype=torch.float64), atol=1e-12)  # symmetric


def test_small_and_large_sigma_limits():
    gmm = GaussianMixture.random(num_components=4, sample_shape=(3,), std=0.2, seed=1)
    x = gmm.sample(8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(gmm(x, 1e-6), x, atol=1e-6)
    mean = (gmm.weights[:, None] * gmm.means).sum(0)
    assert torch.allclose(gmm(x, 1e5), mean.expand_as(x), atol=1e-4)


def test_dtype_is_preserved_and_sample_statistics():
    gmm = GaussianMixture(torch.tensor([[2.0, -2.0]]), 0.5)
    s = gmm.sample(20000, generator=torch.Generator().manual_seed(0))
    assert s.mean(0).sub(torch.tensor([2.0, -2.0], dtype=torch.float64)).abs().max() < 0.02
    assert (s.std(0) - 0.5).abs().max().item() < 0.01
    assert gmm(s[:4].float(), 1.0).dtype == torch.float32


def test_bad_parameters():
    with pytest.raises(ParamError, match="stds"):
        GaussianMixture(torch.zeros(2, 3), 0.0)
    with pytest.raises(ParamError, match="weights"):
        GaussianMixture(torch.zeros(2, 3), 1.0, torch.tensor([1.0, -1.0]))
    with pytest.raises(ParamError, match="num_components"):
        GaussianMixture.random(num_components=0, sample_shape=(2,))
