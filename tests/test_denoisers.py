import torch
from torch import nn

from pipeline.diffusion.denoisers import EDMPrecond, guided
from pipeline.diffusion.gmm import GaussianMixture


class Affine(nn.Module):
    """F(x_in, c_noise) = a * x_in + c_noise, optionally with a 'feature map'."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.5))

    def forward(self, x, c_noise, labels=None, return_features=False):
        out = self.a * x + c_noise.reshape(-1, 1, 1, 1)
        return (out, 2 * x) if return_features else out


def test_edm_preconditioning_formula():
    net = Affine()
    d = EDMPrecond(net, sigma_data=0.5)
    x = torch.randn(3, 1, 2, 2)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    s = sigma.reshape(-1, 1, 1, 1)
    c_skip = 0.25 / (s**2 + 0.25)
    c_out = s * 0.5 / (s**2 + 0.25).sqrt()
    c_in = 1 / (s**2 + 0.25).sqrt()
    expected = c_skip * x + c_out * (0.5 * c_in * x + sigma.log().reshape(-1, 1, 1, 1) / 4)
    assert torch.allclose(d(x, sigma), expected, atol=1e-6)
    assert torch.allclose(d(x, 1.0), d(x, torch.ones(3)))  # scalar sigma broadcasts
    out, feats = d(x, sigma, return_features=True)
    assert torch.allclose(out, expected, atol=1e-6) and torch.allclose(feats, 2 * c_in * x, atol=1e-6)


def test_float64_input_keeps_float64_output():
    d = EDMPrecond(Affine())
    assert d(torch.randn(2, 1, 2, 2, dtype=torch.float64), 1.0).dtype == torch.float64


def test_classifier_free_guidance():
    gmm = GaussianMixture(torch.tensor([[-1.0], [1.0]]), 0.3)
    x = torch.randn(4, 1, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1])
    assert guided(gmm, 1.0) is gmm
    w = 2.5
    d_u, d_c = gmm(x, 0.8), gmm(x, 0.8, labels)
    assert torch.allclose(guided(gmm, w)(x, 0.8, labels), d_u + w * (d_c - d_u))
    assert torch.allclose(guided(gmm, w)(x, 0.8, None), d_u)
    # eps-form equivalence: eps_u + w (eps_c - eps_u)
    eps = lambda d: (x - d) / 0.8  # noqa: E731
    assert torch.allclose(eps(guided(gmm, w)(x, 0.8, labels)), eps(d_u) + w * (eps(d_c) - eps(d_u)))
