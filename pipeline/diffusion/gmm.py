"""Exact denoiser of a mixture of isotropic Gaussians: the test oracle and the ``gmm`` teacher.

Data y ~ sum_k w_k N(mu_k, s_k^2 I) in dimension d; x = y + sigma * eps. Then
p(x) = sum_k w_k N(x; mu_k, (s_k^2 + sigma^2) I) and the ideal denoiser is
D(x, sigma) = E[y | x] = sum_k r_k(x) (mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)),
with responsibilities r_k proportional to w_k N(x; mu_k, (s_k^2 + sigma^2) I). A class label
conditions on the component (r = one-hot).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pipeline.core.hashing import hash_description
from pipeline.core.param_checks import ParamError


class GaussianMixture:
    """Mixture of isotropic Gaussians over tensors of shape ``sample_shape``; callable as D(x, sigma, labels)."""

    def __init__(
        self,
        means: torch.Tensor,  # [K, *sample_shape]
        stds: torch.Tensor | float,  # per-component std s_k, scalar or [K]
        weights: torch.Tensor | None = None,  # [K], normalised here; None = uniform
    ) -> None:
        if means.ndim < 2:
            raise ParamError(f"means: expected [K, *sample_shape], got shape {tuple(means.shape)}")
        self.means = means.to(torch.float64)
        k = means.shape[0]
        self.stds = torch.as_tensor(stds, dtype=torch.float64).expand(k).clone()
        if (self.stds <= 0).any():
            raise ParamError("stds: every component std must be > 0")
        w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (k,) or (w <= 0).any():
            raise ParamError(f"weights: expected {k} positive weights, got {w.tolist()}")
        self.weights = w / w.sum()
        self.sample_shape = tuple(means.shape[1:])

    @classmethod
    def random(
        cls,
        *,
        num_components: int,
        sample_shape: Sequence[int],
        std: float = 0.2,
        spread: float = 1.0,
        seed: int = 0,
    ) -> "GaussianMixture":
        """Means drawn uniformly in [-spread, spread] from ``seed``; equal weights."""
        if num_components < 1:
            raise ParamError(f"num_components: must be >= 1, got {num_components}")
        g = torch.Generator().manual_seed(seed)
        means = (torch.rand((num_components, *sample_shape), generator=g, dtype=torch.float64) * 2 - 1) * spread
        return cls(means, std)

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means[0].numel()

    def description(self) -> dict[str, Any]:
        return {
            "kind": "gmm",
            "sample_shape": list(self.sample_shape),
            "num_components": self.num_classes,
            "means_hash": hash_description({"means": self.means.flatten().tolist()}),
            "stds": self.stds.tolist(),
            "weights": self.weights.tolist(),
        }

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, labels: torch.Tensor | None = None) -> torch.Tensor:
        """D(x, sigma) = E[y | x], computed in float64 and returned in x's dtype."""
        b = x.shape[0]
        xf = x.reshape(b, -1).to(torch.float64)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1)
        sigma = sigma.expand(b) if sigma.numel() == 1 else sigma
        mu = self.means.to(x.device).reshape(self.num_classes, -1)  # [K, d]
        s2 = self.stds.to(x.device) ** 2  # [K]
        var = s2[None, :] + sigma[:, None] ** 2  # [B, K]
        if labels is None:
            sq = torch.cdist(xf, mu) ** 2  # [B, K]
            logits = self.weights.to(x.device).log()[None] - 0.5 * self.dim * var.log() - sq / (2 * var)
            r = torch.softmax(logits, dim=1)
        else:
            r = torch.nn.functional.one_hot(labels.to(x.device).long(), self.num_classes).to(torch.float64)
        gain = s2[None, :] / var  # [B, K]
        # sum_k r_k (mu_k + gain_k (x - mu_k)) = sum_k r_k (1 - gain_k) mu_k + (sum_k r_k gain_k) x
        d = (r * (1 - gain)) @ mu + (r * gain).sum(1, keepdim=True) * xf
        return d.reshape(x.shape).to(x.dtype)

    def sample(self, n: int, *, generator: torch.Generator | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Draw n data samples (float64); labels pick the components, else drawn by weight."""
        if labels is None:
            labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn((n, *self.sample_shape), generator=generator, dtype=torch.float64)
        s = self.stds[labels].reshape(n, *([1] * len(self.sample_shape)))
        return self.means[labels] + s * eps
