"""EDM's raw networks (Karras et al. 2022, NVlabs/edm) rebuilt so that their weights load one-to-one.

- :class:`SongUNet`: DDPM++ (positional embedding, standard encoder, box resampling) and NCSN++
  (Fourier embedding, residual encoder, [1,3,3,1] resampling) of Song et al. 2021.
- :class:`DhariwalUNet`: ADM of Dhariwal & Nichol 2021.

Module, parameter and buffer names and shapes are those of EDM's ``training/networks.py`` (e.g.
``enc.32x32_conv.weight``, ``enc.16x16_down.conv0.resample_filter``, ``dec.16x16_block3.qkv.weight``,
``map_noise.freqs`` for NCSN++), so a state dict maps one-to-one; the forward computes what EDM's
does, in the same order, so outputs agree to float32 round-off. Networks take EDM's arguments
``forward(x, noise_labels, class_labels, augment_labels=None)`` with one-hot ``class_labels``
[B, label_dim]; the preconditioners of :mod:`pipeline.diffusion.preconditioners` turn class
indices into one-hot vectors and sigma into ``noise_labels``.

Two additions of ours, both off by default (a network built without them is EDM's, name for name):

- ``step_condition=True`` (SFD-v, sfd-method.md section 7): the number of timestamps N, passed as
  ``forward(..., num_steps=[B])``, goes through a positional embedding (``map_steps``, no weights)
  -> ``map_steps_layer0`` -> SiLU -> ``map_steps_layer1`` (zero-initialised) and is added to the
  per-block embedding right before its final SiLU (after the label embedding). The new parameters'
  names start with ``map_steps_`` (none of EDM's does), so a teacher's state dict loads into a
  step-conditioned copy with exactly those keys missing, and the copy starts equal to the teacher.
  A step-conditioned network called without ``num_steps`` raises; a plain one ignores ``num_steps``.
  ``step_condition="authors"`` builds sfd-main's variant instead (its networks_edm.py): N through its own
  embedding ``map_step`` (SongUNet: positional with endpoint and the sin/cos swap, or Fourier for NCSN++;
  DhariwalUNet: positional) -> ``map_step_layer0`` -> SiLU -> ``map_step_layer1`` -> SiLU,
  and in every block an ``affine_step`` Linear whose output is a second shift (SongUNet: added next to
  the block's own before norm1) or scale-and-shift (DhariwalUNet: applied after the block's own, before
  the SiLU); all random (EDM's init), names as sfd-main's, so its SFD-v weights load one-to-one.
- ``return_features=True``: returns (output, h) with h the feature map the output convolution
  reads: SongUNet: the input of the last (full-resolution) ``{res}x{res}_aux_conv``, i.e.
  SiLU(``aux_norm``(x)) of the decoder's last block output; DhariwalUNet: the input of ``out_conv``,
  SiLU(``out_norm``(x)). (SFDDM's feature loss; our own U-Net returns the map before its output
  norm instead.)

:func:`build_edm_model` builds a preconditioner with its network from EDM-style constructor
keywords (a snapshot's ``ema._init_kwargs``); ``NETWORKS`` and ``PRECONDITIONERS`` are the
allow-lists of class names it accepts.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.functional import silu

from pipeline.core.param_checks import ParamError
from pipeline.diffusion.preconditioners import PRECONDITIONERS

__all__ = [
    "Linear",
    "Conv2d",
    "GroupNorm",
    "UNetBlock",
    "PositionalEmbedding",
    "FourierEmbedding",
    "SongUNet",
    "DhariwalUNet",
    "NETWORKS",
    "PRECONDITIONERS",
    "build_edm_model",
    "count_parameters",
]


def _init_tensor(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """Random initial values: uniform / normal, Xavier (fan_in + fan_out) or Kaiming (fan_in) scaled."""
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (2 * torch.rand(*shape) - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (2 * torch.rand(*shape) - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"unknown init mode {mode!r}")


class Linear(nn.Module):
    """y = x W^T + b; weights cast to the input's dtype (EDM runs the network in fp16 that way)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1,
        init_bias: float = 0,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(_init_tensor([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(_init_tensor([out_features], **fans) * init_bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            x = x.add_(self.bias.to(x.dtype))
        return x


class Conv2d(nn.Module):
    """Same-padded convolution (``kernel`` 0: none) with optional 2x up/down resampling by a FIR filter.

    The filter (outer product of ``resample_filter``, normalised to sum 1) is the buffer
    ``resample_filter`` when up or down (None otherwise, as in EDM). Unfused: resample, then
    convolve; ``fused_resample``: one transposed / strided pass with the filter next to the weights.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        bias: bool = True,
        up: bool = False,
        down: bool = False,
        resample_filter: Sequence[float] = (1, 1),
        fused_resample: bool = False,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1,
        init_bias: float = 0,
    ) -> None:
        if up and down:
            raise ValueError("Conv2d: up and down are exclusive")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = nn.Parameter(_init_tensor([out_channels, in_channels, kernel, kernel], **fans) * init_weight) if kernel else None
        self.bias = nn.Parameter(_init_tensor([out_channels], **fans) * init_bias) if kernel and bias else None
        taps = torch.as_tensor(list(resample_filter), dtype=torch.float32)
        filt = torch.outer(taps, taps)[None, None] / taps.sum().square()
        self.register_buffer("resample_filter", filt if up or down else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, conv_t = nn.functional.conv2d, nn.functional.conv_transpose2d
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.fused_resample and self.up and w is not None:
            x = conv_t(x, (4 * f).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=max(f_pad - w_pad, 0))
            x = conv(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = conv(x, w, padding=w_pad + f_pad)
            x = conv(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = conv_t(x, (4 * f).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if self.down:
                x = conv(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = conv(x, w, padding=w_pad)
        if b is not None:
            x = x.add_(b.reshape(1, -1, 1, 1))
        return x


class GroupNorm(nn.Module):
    """Group normalisation with min(num_groups, C / min_channels_per_group) groups."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def _attention_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax_k(q·k / sqrt(c)) over [N, C, Q] x [N, C, K] -> [N, Q, K], computed in float32."""
    scale = 1 / math.sqrt(k.shape[1])
    logits = torch.einsum("ncq,nck->nqk", q.to(torch.float32), (k * scale).to(torch.float32))
    return logits.softmax(dim=2).to(q.dtype)


class UNetBlock(nn.Module):
    """Residual block (GroupNorm-SiLU-conv, embedding as shift or scale+shift, dropout-conv) with
    optional up/down resampling and multi-head self-attention, the union of DDPM++, NCSN++ and ADM."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        num_heads: int | None = None,
        channels_per_head: int = 64,
        dropout: float = 0,
        skip_scale: float = 1,
        eps: float = 1e-5,
        resample_filter: Sequence[float] = (1, 1),
        resample_proj: bool = False,
        adaptive_scale: bool = True,
        init: dict | None = None,
        init_zero: dict | None = None,
        init_attn: dict | None = None,
    ) -> None:
        super().__init__()
        init = dict(init or {})
        init_zero = dict(init_weight=0) if init_zero is None else dict(init_zero)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down, resample_filter=resample_filter, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, emb_step: torch.Tensor | None = None) -> torch.Tensor:
        orig = x
        x = self.conv0(silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if emb_step is not None:  # sfd-main's SFD-v block (step_condition="authors"): a second modulation by N
            step = self.affine_step(emb_step)[:, :, None, None].to(x.dtype)
            if self.adaptive_scale:
                scale, shift = params.chunk(2, dim=1)
                x = torch.addcmul(shift, self.norm1(x), scale + 1)
                scale_step, shift_step = step.chunk(2, dim=1)
                x = silu(torch.addcmul(shift_step, x, scale_step + 1))
            else:
                x = silu(self.norm1(x.add_(params).add_(step)))
        elif self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = silu(self.norm1(x.add_(params)))
        x = self.conv1(nn.functional.dropout(x, p=self.dropout, training=self.training))
        x = x.add_(self.skip(orig) if self.skip is not None else orig)
        x = x * self.skip_scale
        if self.num_heads:
            # qkv channels are laid out [head, channel, (q, k, v)], as in EDM
            heads = self.num_heads
            q, k, v = self.qkv(self.norm2(x)).reshape(x.shape[0] * heads, x.shape[1] // heads, 3, -1).unbind(2)
            w = _attention_weights(q, k)
            a = torch.einsum("nqk,nck->ncq", w, v)
            x = self.proj(a.reshape(*x.shape)).add_(x)
            x = x * self.skip_scale
        return x


class PositionalEmbedding(nn.Module):
    """[cos(x f_j), sin(x f_j)], f_j = max_positions^(-j / (C/2 - endpoint)) (DDPM++, ADM)."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """[cos(2 pi x f_j), sin(2 pi x f_j)] with random frequencies f_j ~ N(0, scale^2), a buffer (NCSN++)."""

    def __init__(self, num_channels: int, scale: float = 16) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


def _label_dropout(class_labels: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if training and p:
        keep = torch.rand([class_labels.shape[0], 1], device=class_labels.device) >= p
        return class_labels * keep.to(class_labels.dtype)
    return class_labels


def _build_step_condition(owner: nn.Module, num_channels: int, emb_channels: int, init: dict) -> None:
    """SFD-v step condition layers on ``owner``: ``map_steps`` (positional embedding of N, no weights)
    -> ``map_steps_layer0`` -> SiLU -> ``map_steps_layer1`` (zero-initialised: adds exactly 0 at start)."""
    owner.map_steps = PositionalEmbedding(num_channels, max_positions=100)
    owner.map_steps_layer0 = Linear(num_channels, emb_channels, **init)
    owner.map_steps_layer1 = Linear(emb_channels, emb_channels, init_mode=init.get("init_mode", "kaiming_normal"), init_weight=0, init_bias=0)


STEP_CONDITIONS = (False, True, "authors")


def _check_step_condition(value: Any) -> str | None:
    """None (off), "ours" (True) or "authors"."""
    if value is False or value is None:
        return None
    if value is True:
        return "ours"
    if value == "authors":
        return "authors"
    raise ParamError(f"step_condition: expected false, true or 'authors', got {value!r}")


def _build_authors_step_condition(owner: nn.Module, embedding: nn.Module, num_channels: int, emb_channels: int,
                                  init: dict) -> None:
    """sfd-main's SFD-v layers on ``owner`` (module docstring), built after EDM's so its random weights are unchanged."""
    owner.map_step = embedding
    owner.map_step_layer0 = Linear(num_channels, emb_channels, **init)
    owner.map_step_layer1 = Linear(emb_channels, emb_channels, **init)
    for blocks in (owner.enc, owner.dec):
        for block in blocks.values():
            if isinstance(block, UNetBlock):
                block.affine_step = Linear(emb_channels, block.out_channels * (2 if block.adaptive_scale else 1), **init)


def _authors_step_embedding(owner: nn.Module, num_steps: torch.Tensor | None, dtype: torch.dtype, swap: bool) -> torch.Tensor:
    """sfd-main's embedding of N ([1 or B, C]) that every block's ``affine_step`` reads: SiLU after both layers;
    SongUNet swaps sin/cos as for the noise level (``swap``), DhariwalUNet does not."""
    if num_steps is None:
        _step_embedding(owner, None, None)  # raises the one-line error
    n = torch.as_tensor(num_steps, device=owner.map_step_layer0.weight.device).reshape(-1).to(dtype)
    e = owner.map_step(n)
    if swap:
        e = e.reshape(e.shape[0], 2, -1).flip(1).reshape(*e.shape)  # [sin, cos] order, as the noise embedding
    return silu(owner.map_step_layer1(silu(owner.map_step_layer0(e))))


def _step_embedding(owner: nn.Module, num_steps: torch.Tensor | None, emb: torch.Tensor) -> torch.Tensor:
    """The step embedding of ``num_steps`` ([B] or one value) to add to the per-block embedding ``emb``."""
    if num_steps is None:
        raise ParamError(
            f"num_steps: this {type(owner).__name__} is step-conditioned (SFD-v); pass num_steps=[B] tensor of "
            "the number of timestamps N (e.g. through pipeline.diffusion.denoisers.bind_num_steps)"
        )
    n = torch.as_tensor(num_steps, device=emb.device).reshape(-1).to(torch.float32)
    if n.numel() != 1 and emb.shape[0] not in (1, n.numel()):
        raise ParamError(f"num_steps: expected one value or {emb.shape[0]}, got {n.numel()}")
    # [1 or B, C]: broadcasts against emb (one row when the preconditioner got a single sigma)
    return owner.map_steps_layer1(silu(owner.map_steps_layer0(owner.map_steps(n).to(emb.dtype))))


class SongUNet(nn.Module):
    """DDPM++ / NCSN++ (Song et al. 2021) as in EDM; see EDM's ``train.py`` for the two presets.

    Encoder names ``{res}x{res}_conv`` / ``_down`` / ``_block{i}`` / ``_aux_*``; decoder ``_in0``,
    ``_in1`` at the lowest resolution, ``_up``, ``_block{i}`` (attention only in the last block of
    a level) and the output head ``_aux_norm`` / ``_aux_conv`` (plus ``_aux_up`` for the skip decoder).
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.10,
        label_dropout: float = 0,
        embedding_type: str = "positional",
        channel_mult_noise: int = 1,
        encoder_type: str = "standard",
        decoder_type: str = "standard",
        resample_filter: Sequence[float] = (1, 1),
        step_condition: bool | str = False,  # SFD-v: True (ours) or "authors" (sfd-main's); see the module docstring
    ) -> None:
        if embedding_type not in ("fourier", "positional"):
            raise ValueError(f"embedding_type: {embedding_type!r} (fourier | positional)")
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(f"encoder_type: {encoder_type!r} (standard | skip | residual)")
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f"decoder_type: {decoder_type!r} (standard | skip)")
        super().__init__()
        self.label_dropout = label_dropout
        self.step_condition_arch = _check_step_condition(step_condition)
        self.step_condition = self.step_condition_arch is not None
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block = dict(
            emb_channels=emb_channels,
            num_heads=1,
            dropout=dropout,
            skip_scale=math.sqrt(0.5),
            eps=1e-6,
            resample_filter=resample_filter,
            resample_proj=True,
            adaptive_scale=False,
            init=init,
            init_zero=init_zero,
            init_attn=init_attn,
        )

        # mapping: noise level (+ class, augmentation) -> embedding
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # encoder
        self.enc = nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cout, model_channels, kernel=3, **init)
                cout = model_channels
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, kernel=0, down=True, resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(
                        caux, cout, kernel=3, down=True, resample_filter=resample_filter, fused_resample=True, **init
                    )
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skips = [m.out_channels for name, m in self.enc.items() if "aux" not in name]

        # decoder
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, kernel=0, up=True, resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, kernel=3, **init_zero)

        # last, so that building with step_condition draws EDM's random weights first, unchanged
        if self.step_condition_arch == "ours":
            _build_step_condition(self, noise_channels, emb_channels, init)
        elif self.step_condition_arch == "authors":
            embedding = (PositionalEmbedding(noise_channels, endpoint=True) if embedding_type == "positional"
                         else FourierEmbedding(noise_channels))
            _build_authors_step_condition(self, embedding, noise_channels, emb_channels, init)

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None,
        augment_labels: torch.Tensor | None = None,
        *,
        num_steps: torch.Tensor | None = None,
        return_features: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # [sin, cos] order
        if self.map_label is not None:
            labels = _label_dropout(class_labels, self.label_dropout, self.training)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.step_condition_arch == "ours":
            emb = emb + _step_embedding(self, num_steps, emb)
        emb = silu(emb)
        emb_step = None
        if self.step_condition_arch == "authors":
            emb_step = _authors_step_embedding(self, num_steps, x.dtype, swap=True)

        skips = []
        aux = x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb, emb_step) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        aux = tmp = features = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                features = silu(tmp)  # the last one (full resolution) is what return_features gives
                tmp = block(features)
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb, emb_step)
        return (aux, features) if return_features else aux


class DhariwalUNet(nn.Module):
    """ADM (Dhariwal & Nichol 2021) as in EDM: scale+shift conditioning, 64 channels per attention head."""

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        channel_mult_emb: int = 4,
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (32, 16, 8),
        dropout: float = 0.10,
        label_dropout: float = 0,
        step_condition: bool | str = False,  # SFD-v: True (ours) or "authors" (sfd-main's); see the module docstring
    ) -> None:
        super().__init__()
        self.label_dropout = label_dropout
        self.step_condition_arch = _check_step_condition(step_condition)
        self.step_condition = self.step_condition_arch is not None
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero)

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (
            Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal", init_weight=math.sqrt(label_dim)) if label_dim else None
        )

        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cout, model_channels * mult, kernel=3, **init)
                cout = model_channels * mult
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skips = [m.out_channels for m in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

        # last, so that building with step_condition draws EDM's random weights first, unchanged
        if self.step_condition_arch == "ours":
            _build_step_condition(self, model_channels, emb_channels, init)
        elif self.step_condition_arch == "authors":
            _build_authors_step_condition(self, PositionalEmbedding(model_channels), model_channels, emb_channels, init)

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None,
        augment_labels: torch.Tensor | None = None,
        *,
        num_steps: torch.Tensor | None = None,
        return_features: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            emb = emb + self.map_label(_label_dropout(class_labels, self.label_dropout, self.training))
        if self.step_condition_arch == "ours":
            emb = emb + _step_embedding(self, num_steps, emb)
        emb = silu(emb)
        emb_step = None
        if self.step_condition_arch == "authors":
            emb_step = _authors_step_embedding(self, num_steps, x.dtype, swap=False)

        skips = []
        for block in self.enc.values():
            x = block(x, emb, emb_step) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb, emb_step)
        features = silu(self.out_norm(x))
        out = self.out_conv(features)
        return (out, features) if return_features else out


#: EDM's raw network class names -> our classes (an allow-list: nothing else is built from a name).
NETWORKS: dict[str, type[nn.Module]] = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}

_SHARED_KEYS = ("img_resolution", "img_channels", "label_dim", "use_fp16")


def _network_keys(cls: type[nn.Module]) -> set[str]:
    params = inspect.signature(cls.__init__).parameters
    return set(params) - {"self", "img_resolution", "in_channels", "out_channels", "label_dim"}


def build_edm_model(precond_name: str, init_kwargs: dict[str, Any]) -> nn.Module:
    """A preconditioner with its raw network from EDM's constructor keywords (``ema._init_kwargs``).

    ``precond_name`` is EDM's class name (a key of ``PRECONDITIONERS``); ``init_kwargs`` holds
    img_resolution, img_channels, label_dim, use_fp16, the preconditioner's schedule constants,
    ``model_type`` (a key of ``NETWORKS``, default EDM's per preconditioner) and the network's
    keywords. Unknown names or keywords raise :class:`ParamError`. The result carries
    ``edm_class_name`` and ``edm_init_kwargs`` (a copy of the keywords) for writing it back.
    """
    if precond_name not in PRECONDITIONERS:
        raise ParamError(f"EDM preconditioner {precond_name!r} is not supported; allowed: {', '.join(PRECONDITIONERS)}")
    precond_cls = PRECONDITIONERS[precond_name]
    kwargs = dict(init_kwargs)
    model_type = kwargs.pop("model_type", precond_cls.DEFAULT_MODEL_TYPE)
    if model_type not in NETWORKS:
        raise ParamError(f"EDM network {model_type!r} is not supported; allowed: {', '.join(NETWORKS)}")
    net_cls = NETWORKS[model_type]
    for key in ("img_resolution", "img_channels"):
        if key not in kwargs:
            raise ParamError(f"{precond_name}: missing constructor keyword {key!r}")
    precond_kwargs = {k: kwargs.pop(k) for k in (*_SHARED_KEYS, *precond_cls.SCHEDULE_KEYS) if k in kwargs}
    unknown = sorted(set(kwargs) - _network_keys(net_cls))
    if unknown:
        raise ParamError(
            f"{precond_name}/{model_type}: unknown keyword(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(_network_keys(net_cls) | set(_SHARED_KEYS) | set(precond_cls.SCHEDULE_KEYS)))}"
        )
    img_channels = int(precond_kwargs["img_channels"])
    model = net_cls(
        img_resolution=precond_kwargs["img_resolution"],
        in_channels=img_channels,
        out_channels=img_channels * precond_cls.OUT_CHANNEL_FACTOR,
        label_dim=precond_kwargs.get("label_dim", 0),
        **{k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()},
    )
    wrapped = precond_cls(model, **precond_kwargs)
    wrapped.edm_class_name = precond_name
    wrapped.edm_init_kwargs = dict(init_kwargs)
    return wrapped


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

