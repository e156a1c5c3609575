"""Denoisers D(x, sigma, labels=None) -> x0: EDM preconditioning, the step-condition binder, guidance."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

Denoiser = Callable[..., torch.Tensor]  # D(x, sigma, labels=None, **net_kwargs) -> x0; the one definition


class EDMPrecond(nn.Module):
    """EDM preconditioning (Karras et al. 2022, Table 1) around a raw network F.

    c_skip = sigma_d^2 / (sigma^2 + sigma_d^2), c_out = sigma sigma_d / sqrt(sigma^2 + sigma_d^2),
    c_in = 1 / sqrt(sigma^2 + sigma_d^2), c_noise = ln(sigma) / 4,
    D(x, sigma) = c_skip x + c_out F(c_in x, c_noise).
    The network runs in its own dtype; the skip path and the result are in x's dtype.
    This wraps this project's U-Net (model.json ``"network"``); NVlabs/edm's own class of this name is ported as
    :class:`pipeline.diffusion.preconditioners.KarrasPrecond` (the same formulas, EDM's constructor and weights).
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5) -> None:
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data)

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor | float, labels: torch.Tensor | None = None, **net_kwargs: Any
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        net_dtype = next(self.net.parameters()).dtype
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1)
        sigma = sigma.expand(x.shape[0]) if sigma.numel() == 1 else sigma
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        sd = self.sigma_data
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        c_in = 1 / (s**2 + sd**2).sqrt()
        c_noise = sigma.log() / 4
        out = self.net((c_in * x).to(net_dtype), c_noise.to(net_dtype), labels, **net_kwargs)
        features = None
        if isinstance(out, tuple):
            out, features = out
        d = c_skip * x + c_out * out.to(x.dtype)
        return d if features is None else (d, features)

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """EDM's training weight lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 of ||D - y||^2."""
        sd = self.sigma_data
        return (sigma**2 + sd**2) / (sigma * sd) ** 2

    # -- the distillation interface (shared with the EDM preconditioners of
    #    pipeline.diffusion.preconditioners), so pipeline.distill does not care which it holds -----
    @property
    def step_condition(self) -> bool:
        """Whether the network is step-conditioned (SFD-v): it then needs ``num_steps=[B]``."""
        return bool(getattr(self.net, "step_condition", False))

    def checkpoint_module(self) -> nn.Module:
        """The module whose state dict a checkpoint stores: the bare network ``net``."""
        return self.net

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """model.safetensors of this network: ``net.state_dict()`` (as every checkpoint of ours stores it)."""
        return self.checkpoint_module().state_dict()

    def checkpoint_architecture(self) -> dict[str, Any]:
        """model.json's architecture part: ``{"network": the U-Net's config, "sigma_data": ...}``.

        The network must carry its constructor config as ``network_kwargs`` (pipeline.networks.unet.UNet does).
        """
        kwargs = getattr(self.net, "network_kwargs", None)
        if kwargs is None:
            raise ValueError(f"{type(self.net).__name__} carries no network_kwargs; cannot describe it in model.json")
        return {"network": copy.deepcopy(kwargs), "sigma_data": self.sigma_data}


class StepBound(nn.Module):
    """A step-conditioned (SFD-v) denoiser with its number of timestamps N bound: D(x, sigma, labels) -> x0.

    The wrapped denoiser gets ``num_steps`` as an int64 [B] net kwarg filled with N. A module (the
    wrapped EDMPrecond is its submodule, so ``.to()`` / ``.eval()`` reach it); a plain callable works too.
    """

    def __init__(self, denoiser: Denoiser, num_steps: int) -> None:
        super().__init__()
        self.wrapped = denoiser
        self.num_steps = int(num_steps)

    def forward(self, x: torch.Tensor, sigma, labels: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        steps = torch.full((x.shape[0],), self.num_steps, dtype=torch.int64, device=x.device)
        return self.wrapped(x, sigma, labels, num_steps=steps, **kwargs)

    def extra_repr(self) -> str:
        return f"num_steps={self.num_steps}"


def bind_num_steps(denoiser: Denoiser, num_steps: int | None) -> Denoiser:
    """The one step-condition binder: ``denoiser`` called with N = ``num_steps`` (None: unchanged)."""
    return denoiser if num_steps is None else StepBound(denoiser, num_steps)


def guided(denoiser: Denoiser, scale: float) -> Denoiser:
    """Classifier-free guidance: D_w = D_u + w (D_c - D_u), w = scale (section 9).

    w = 1 is the conditional branch alone (one call). labels=None asks the unconditional branch.
    Since eps = (x - D) / sigma is affine in D, this equals eps_u + w (eps_c - eps_u).
    A model with its own ``with_guidance(w)`` applies it itself (a flow transformer: both branches in one batched
    forward, or a guidance-distilled Flux's embedded scale; pipeline.networks.flow).
    """
    own = getattr(denoiser, "with_guidance", None)
    if own is not None:
        return own(scale)
    if scale == 1.0:
        return denoiser

    def d_guided(x: torch.Tensor, sigma, labels=None, **kwargs) -> torch.Tensor:
        d_u = denoiser(x, sigma, None, **kwargs)
        if labels is None:
            return d_u
        d_c = denoiser(x, sigma, labels, **kwargs)
        return d_u + scale * (d_c - d_u)

    return d_guided
