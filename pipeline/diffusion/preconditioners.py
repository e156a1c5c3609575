"""The four preconditionings of EDM (Karras et al. 2022, Table 1) around a raw network, as denoisers.

Each class wraps an already built raw network ``model`` (in EDM's codebase the preconditioner
builds it from ``model_type``; here :func:`pipeline.networks.edm.build_edm_model` does, since this
layer does not know the networks) and computes

    D(x, sigma, labels) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma), one_hot(labels)).

=================  ================  ==============  ======================  =========================
class (EDM name)   c_skip            c_out           c_in                    c_noise
=================  ================  ==============  ======================  =========================
VPPrecond          1                 -sigma          1/sqrt(sigma^2+1)       (M-1) sigma_vp^-1(sigma)
VEPrecond          1                 sigma           1                       ln(sigma/2)
iDDPMPrecond       1                 -sigma          1/sqrt(sigma^2+1)       M-1-argmin_j |u_j - sigma|
KarrasPrecond      sd^2/(s^2+sd^2)   s sd/sqrt(..)   1/sqrt(s^2+sd^2)        ln(sigma)/4
(EDMPrecond)
=================  ================  ==============  ======================  =========================

The attributes (``img_resolution``, ``img_channels``, ``label_dim``, ``use_fp16``, ``sigma_min``,
``sigma_max``, the schedule constants, iDDPM's ``u`` buffer) and the submodule name ``model``
are EDM's, so the state dict of an EDM preconditioner (``model.…`` plus ``u``) loads one-to-one.

Differences from EDM's classes:

- Labels follow this project's convention: int64 class indices [B] (converted to EDM's one-hot),
  or None for the unconditional branch (EDM's all-zero one-hot). A float [B, label_dim] tensor is
  taken as a one-hot / soft label vector as in EDM.
- ``sigma`` may be a Python float, a 0-d tensor, a [1] or a [B] tensor (a single sigma is
  broadcast, as in EDM, not expanded: equal to the [B] call up to GEMM round-off).
- As in EDM: x is taken in float32 and D is float32; ``use_fp16`` runs the network in float16 on
  CUDA (weights stay float32 and are cast per layer) unless ``force_fp32=True``; further keyword
  arguments (``augment_labels``) go to the network.
- ``return_features=True`` returns (D, h), h the network's feature map before its output
  convolution (see :mod:`pipeline.networks.edm`); ``num_steps=[B]`` reaches a step-conditioned
  (SFD-v) network like any other network keyword.
- The distillation interface shared with :class:`pipeline.diffusion.denoisers.EDMPrecond`:
  ``step_condition``, ``checkpoint_module()`` / ``checkpoint_state_dict()`` (the whole
  preconditioner: EDM's ``model.…`` names, iDDPM's ``u``) and ``checkpoint_architecture()``
  (model.json's ``{"architecture": "edm", "edm": {"precond", "init_kwargs"}}``, from the
  ``edm_class_name`` / ``edm_init_kwargs`` that :func:`pipeline.networks.edm.build_edm_model` sets).
- :class:`KarrasPrecond` is EDM's ``EDMPrecond``; it is renamed so as not to be confused with
  :class:`pipeline.diffusion.denoisers.EDMPrecond`, which wraps this project's own U-Net (as
  ``net``) with the same formulas. ``PRECONDITIONERS`` maps EDM's class names to these classes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


EDM_ARCHITECTURE = "edm"  # model.json "architecture" of an EDM network (pipeline.teachers.loader reads it)


def _json_plain(value: Any) -> Any:
    """Constructor keywords as JSON values (tuples become lists, numpy / torch scalars Python numbers)."""
    if isinstance(value, dict):
        return {str(k): _json_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        return value.item()
    return value


def _tensor(value: Any) -> torch.Tensor:
    """A tensor as is (also under a device context, where as_tensor would move it), else as_tensor."""
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)


class _Preconditioner(nn.Module):
    """What the four preconditionings share: label and sigma handling, the network call in its dtype."""

    #: EDM's constructor keywords of this preconditioning other than the shared ones and the model's.
    SCHEDULE_KEYS: tuple[str, ...] = ()
    #: The raw network's default class (EDM's ``model_type`` default).
    DEFAULT_MODEL_TYPE = "SongUNet"
    #: The raw network's output channels per image channel (iDDPM also predicts variances).
    OUT_CHANNEL_FACTOR = 1

    def __init__(self, model: nn.Module, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False) -> None:
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.model = model

    # -- conditioning -------------------------------------------------------------------------
    def class_vectors(self, labels: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor | None:
        """EDM's class_labels for the network: None if unconditional, else float32 [B, label_dim]."""
        if self.label_dim == 0:
            return None
        if labels is None:
            return torch.zeros(batch, self.label_dim, dtype=torch.float32, device=device)
        labels = torch.as_tensor(labels, device=device)
        if labels.is_floating_point():
            return labels.to(torch.float32).reshape(-1, self.label_dim)
        if labels.ndim != 1:
            raise ValueError(f"labels: expected int64 class indices [B], got shape {tuple(labels.shape)}")
        # The range is checked on CPU tensors only: on an accelerator the check would synchronise
        # every call; there an out-of-range index gives an all-zero (unconditional) row.
        if labels.device.type == "cpu" and labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.label_dim):
            raise ValueError(f"labels: class indices must lie in [0, {self.label_dim}), got {labels.tolist()[:8]}")
        classes = torch.arange(self.label_dim, device=device)
        return (labels.long()[:, None] == classes[None, :]).to(torch.float32)

    @staticmethod
    def sigma_column(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        """sigma as a float32 [B or 1, 1, 1, 1] tensor on x's device."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        if sigma.numel() not in (1, x.shape[0]):
            raise ValueError(f"sigma: expected a scalar or {x.shape[0]} values, got {sigma.numel()}")
        return sigma.reshape(-1, *([1] * (x.ndim - 1)))

    def network_dtype(self, force_fp32: bool, device: torch.device) -> torch.dtype:
        return torch.float16 if (self.use_fp16 and not force_fp32 and device.type == "cuda") else torch.float32

    # -- the preconditioning --------------------------------------------------------------------
    def coefficients(self, sigma: torch.Tensor) -> tuple[Any, Any, Any, torch.Tensor]:
        """(c_skip, c_out, c_in, c_noise) for a float32 sigma column [N, 1, 1, 1]; c_noise [N, 1, 1, 1]."""
        raise NotImplementedError

    def model_output(self, out: torch.Tensor) -> torch.Tensor:
        return out

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        labels: torch.Tensor | None = None,
        force_fp32: bool = False,
        return_features: bool = False,
        **model_kwargs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = x.to(torch.float32)
        s = self.sigma_column(sigma, x)
        class_labels = self.class_vectors(labels, x.shape[0], x.device)
        dtype = self.network_dtype(force_fp32, x.device)
        c_skip, c_out, c_in, c_noise = self.coefficients(s)
        if return_features:
            model_kwargs["return_features"] = True
        f_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        features = None
        if return_features:
            f_x, features = f_x
        d = c_skip * x + c_out * self.model_output(f_x).to(torch.float32)
        return (d, features) if return_features else d

    # -- the distillation interface (shared with pipeline.diffusion.denoisers.EDMPrecond) --------
    @property
    def step_condition(self) -> bool:
        """Whether the network is step-conditioned (SFD-v): it then needs ``num_steps=[B]``."""
        return bool(getattr(self.model, "step_condition", False))

    def checkpoint_module(self) -> nn.Module:
        """The module whose state dict a checkpoint stores: the whole preconditioner (EDM's names)."""
        return self

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """model.safetensors of this network: the preconditioner's whole state dict."""
        return self.checkpoint_module().state_dict()

    def checkpoint_architecture(self) -> dict[str, Any]:
        """model.json's architecture part: ``{"architecture": "edm", "edm": {"precond", "init_kwargs"}}``."""
        if not hasattr(self, "edm_class_name") or not hasattr(self, "edm_init_kwargs"):
            raise ValueError(
                f"{type(self).__name__} has no edm_class_name / edm_init_kwargs: build it with "
                "pipeline.networks.edm.build_edm_model"
            )
        return {
            "architecture": EDM_ARCHITECTURE,
            "edm": {"precond": str(self.edm_class_name), "init_kwargs": _json_plain(dict(self.edm_init_kwargs))},
        }

    def round_sigma(self, sigma: Any) -> torch.Tensor:
        return torch.as_tensor(sigma)


class VPPrecond(_Preconditioner):
    """Variance preserving (Song et al. 2021): sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1)."""

    SCHEDULE_KEYS = ("beta_d", "beta_min", "M", "epsilon_t")
    DEFAULT_MODEL_TYPE = "SongUNet"

    def __init__(
        self,
        model: nn.Module,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        use_fp16: bool = False,
        beta_d: float = 19.9,
        beta_min: float = 0.1,
        M: int = 1000,
        epsilon_t: float = 1e-5,
    ) -> None:
        super().__init__(model, img_resolution, img_channels, label_dim, use_fp16)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        # on the CPU explicitly (in float32, as EDM), also when built under a meta / cuda device context
        self.sigma_min = float(self.sigma(torch.tensor(epsilon_t, device="cpu")))
        self.sigma_max = float(self.sigma(torch.tensor(1, device="cpu")))

    def sigma(self, t: Any) -> torch.Tensor:
        t = _tensor(t)
        return ((0.5 * self.beta_d * t**2 + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma: Any) -> torch.Tensor:
        """t with sigma(t) = sigma: the positive root of beta_d t^2/2 + beta_min t = ln(1 + sigma^2)."""
        sigma = _tensor(sigma)
        return ((self.beta_min**2 + 2 * self.beta_d * (1 + sigma**2).log()).sqrt() - self.beta_min) / self.beta_d

    def coefficients(self, sigma):
        return 1, -sigma, 1 / (sigma**2 + 1).sqrt(), (self.M - 1) * self.sigma_inv(sigma)


class VEPrecond(_Preconditioner):
    """Variance exploding (Song et al. 2021): the network predicts -eps scaled by sigma, c_noise = ln(sigma/2)."""

    SCHEDULE_KEYS = ("sigma_min", "sigma_max")
    DEFAULT_MODEL_TYPE = "SongUNet"

    def __init__(
        self,
        model: nn.Module,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        use_fp16: bool = False,
        sigma_min: float = 0.02,
        sigma_max: float = 100,
    ) -> None:
        super().__init__(model, img_resolution, img_channels, label_dim, use_fp16)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def coefficients(self, sigma):
        return 1, sigma, 1, (0.5 * sigma).log()


class iDDPMPrecond(_Preconditioner):  # noqa: N801 (EDM's class name)
    """Improved DDPM (Nichol & Dhariwal 2021): cosine schedule on M discrete steps, the step index as c_noise.

    ``u`` [M+1] holds the sigmas of the discrete steps (u_M = 0, decreasing in j is increasing
    noise), computed as in EDM (float32, alpha ratio clipped below at C_1). The network outputs
    2·img_channels channels (mean and variance); D uses the first img_channels.
    """

    SCHEDULE_KEYS = ("C_1", "C_2", "M")
    DEFAULT_MODEL_TYPE = "DhariwalUNet"
    OUT_CHANNEL_FACTOR = 2

    def __init__(
        self,
        model: nn.Module,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        use_fp16: bool = False,
        C_1: float = 0.001,  # noqa: N803
        C_2: float = 0.008,  # noqa: N803
        M: int = 1000,
    ) -> None:
        super().__init__(model, img_resolution, img_channels, label_dim, use_fp16)
        self.C_1 = C_1
        self.C_2 = C_2
        self.M = M
        cpu = torch.device("cpu")  # real values also under a meta / cuda device context
        u = torch.zeros(M + 1, device=cpu)
        for j in range(M, 0, -1):
            ratio = (self.alpha_bar(torch.tensor(j - 1, device=cpu)) / self.alpha_bar(torch.tensor(j, device=cpu))).clip(min=C_1)
            u[j - 1] = ((u[j] ** 2 + 1) / ratio - 1).sqrt()
        self.register_buffer("u", u)
        self.sigma_min = float(u[M - 1])
        self.sigma_max = float(u[0])

    def alpha_bar(self, j: Any) -> torch.Tensor:
        j = _tensor(j)
        return (0.5 * math.pi * j / self.M / (self.C_2 + 1)).sin() ** 2

    def round_sigma(self, sigma: Any, return_index: bool = False) -> torch.Tensor:
        """The nearest of the M+1 discrete sigmas (or its index j), shaped like sigma.

        Distances by ``torch.cdist`` as in EDM, so that near-ties resolve as in EDM's own sampler
        (cdist's matrix-product path differs from |sigma - u| in a few last-bit cases).
        """
        sigma = _tensor(sigma)
        flat = sigma.to(self.u.device, torch.float32).reshape(1, -1, 1)
        index = torch.cdist(flat, self.u.reshape(1, -1, 1)).argmin(2).flatten()
        result = index if return_index else self.u[index].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)

    def coefficients(self, sigma):
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)
        return 1, -sigma, 1 / (sigma**2 + 1).sqrt(), c_noise

    def model_output(self, out):
        return out[:, : self.img_channels]


class KarrasPrecond(_Preconditioner):
    """EDM's own preconditioning (EDM's class ``EDMPrecond``), unit-variance input and target for sigma_data."""

    SCHEDULE_KEYS = ("sigma_min", "sigma_max", "sigma_data")
    DEFAULT_MODEL_TYPE = "DhariwalUNet"

    def __init__(
        self,
        model: nn.Module,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        use_fp16: bool = False,
        sigma_min: float = 0,
        sigma_max: float = float("inf"),
        sigma_data: float = 0.5,
    ) -> None:
        super().__init__(model, img_resolution, img_channels, label_dim, use_fp16)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data

    def coefficients(self, sigma):
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4


#: EDM's preconditioner class names -> our classes (an allow-list: nothing else is built from a name).
PRECONDITIONERS: dict[str, type[_Preconditioner]] = {
    "VPPrecond": VPPrecond,
    "VEPrecond": VEPrecond,
    "iDDPMPrecond": iDDPMPrecond,
    "EDMPrecond": KarrasPrecond,
}
