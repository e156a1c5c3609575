"""A compact EDM-style U-Net F(c_in·x, c_noise, labels) for small images, and its checkpoints.

The raw network is wrapped by :class:`pipeline.diffusion.denoisers.EDMPrecond`, which computes
D = c_skip·x + c_out·F(c_in·x, c_noise) (EDM, Karras et al. 2022, eq. 7 / Table 1).

- Noise level: sinusoidal embedding of c_noise -> MLP, the per-block embedding e.
- Classes: an embedding table with one extra "null" row (index K) used when labels is None and,
  in training, for a fraction ``label_dropout`` of the examples (classifier-free guidance).
- Step condition (SFD-v): sinusoidal embedding of the number of timestamps N -> MLP whose last
  layer is zero-initialised, added to e; a student built from a teacher starts equal to it.
- Blocks: GroupNorm-SiLU-conv, scale/shift from e, GroupNorm-SiLU-dropout-conv, residual;
  self-attention at the chosen resolutions; average-pool down, nearest-neighbour up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.core.param_checks import ParamError, check_int, check_keys, check_positive

NETWORK_KEYS = (
    "img_resolution",
    "in_channels",
    "out_channels",
    "label_dim",
    "model_channels",
    "channel_mult",
    "num_blocks",
    "attn_resolutions",
    "dropout",
    "step_condition",
)


def _group_norm(channels: int) -> nn.GroupNorm:
    groups = math.gcd(channels, min(32, max(1, channels // 4)))
    return nn.GroupNorm(groups, channels, eps=1e-6)


class SinusoidalEmbedding(nn.Module):
    """[cos(x·f_j), sin(x·f_j)] with f_j = (1/max_positions)^(j/half) (transformer positions, as in EDM's DDPM++)."""

    def __init__(self, num_channels: int, max_positions: float = 10000.0) -> None:
        super().__init__()
        half = num_channels // 2
        self.register_buffer("freqs", (1.0 / max_positions) ** (torch.arange(half, dtype=torch.float32) / half), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)[:, None] * self.freqs[None, :]
        return torch.cat([x.cos(), x.sin()], dim=1)


class Attention(nn.Module):
    """Single-head self-attention over the H·W positions, residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return x + self.proj(a.transpose(1, 2).reshape(b, c, h, w))


class ResBlock(nn.Module):
    """h = conv(SiLU(GN(x))); h = GN(h)·(1 + scale(e)) + shift(e); out = skip(x) + conv(dropout(SiLU(h)))."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, dropout: float, attention: bool) -> None:
        super().__init__()
        self.norm0 = _group_norm(in_channels)
        self.conv0 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.affine = nn.Linear(emb_channels, 2 * out_channels)
        self.norm1 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv1.weight)
        nn.init.zeros_(self.conv1.bias)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        self.attn = Attention(out_channels) if attention else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        h = self.skip(x) + self.conv1(self.dropout(h))
        return self.attn(h)


class UNet(nn.Module):
    """F(x_in, c_noise, labels; num_steps) for EDM preconditioning; see the module docstring."""

    def __init__(
        self,
        *,
        img_resolution: int | Sequence[int] = 8,  # H (square) or [H, W]
        in_channels: int = 1,
        out_channels: int | None = None,  # None = in_channels
        label_dim: int = 0,  # number of classes; 0 = unconditional
        model_channels: int = 32,
        channel_mult: Sequence[int] = (1, 2),  # one entry per resolution level
        num_blocks: int = 2,  # residual blocks per level (encoder); decoder has num_blocks + 1
        attn_resolutions: Sequence[int] = (4,),  # feature-map heights that get self-attention
        dropout: float = 0.0,
        step_condition: bool = False,  # SFD-v: condition on the number of timestamps N
    ) -> None:
        super().__init__()
        res = [img_resolution, img_resolution] if isinstance(img_resolution, int) else list(img_resolution)
        levels = len(channel_mult)
        if levels < 1:
            raise ParamError("network.channel_mult: needs at least one level, e.g. [1, 2]")
        factor = 2 ** (levels - 1)
        if len(res) != 2 or any(r % factor for r in res):
            raise ParamError(
                f"network.img_resolution: {res} must be divisible by 2^(levels-1) = {factor} "
                f"for channel_mult {list(channel_mult)}"
            )
        self.img_resolution = res
        # the constructor config as network_config writes it (model.json's "network"; EDMPrecond.checkpoint_architecture)
        self.network_kwargs = {
            "img_resolution": int(img_resolution) if isinstance(img_resolution, int) else [int(r) for r in img_resolution],
            "in_channels": in_channels,
            "out_channels": out_channels,
            "label_dim": label_dim,
            "model_channels": model_channels,
            "channel_mult": [int(m) for m in channel_mult],
            "num_blocks": num_blocks,
            "attn_resolutions": [int(r) for r in attn_resolutions],
            "dropout": dropout,
            "step_condition": step_condition,
        }
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.label_dim = label_dim
        self.step_condition = step_condition
        emb_channels = 4 * model_channels

        self.map_noise = SinusoidalEmbedding(model_channels)
        self.map_layer0 = nn.Linear(model_channels, emb_channels)
        self.map_layer1 = nn.Linear(emb_channels, emb_channels)
        self.map_label = nn.Embedding(label_dim + 1, emb_channels) if label_dim > 0 else None
        if self.map_label is not None:
            nn.init.normal_(self.map_label.weight, std=0.02)
        if step_condition:
            self.map_steps = SinusoidalEmbedding(model_channels, max_positions=100.0)
            self.steps_layer0 = nn.Linear(model_channels, emb_channels)
            self.steps_layer1 = nn.Linear(emb_channels, emb_channels)
            nn.init.zeros_(self.steps_layer1.weight)  # starts as the teacher: the step embedding adds 0
            nn.init.zeros_(self.steps_layer1.bias)

        self.conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.enc = nn.ModuleList()
        skips = [model_channels]
        ch = model_channels
        for level, mult in enumerate(channel_mult):
            height = res[0] >> level
            if level > 0:
                self.enc.append(nn.AvgPool2d(2))
                skips.append(ch)
            for _ in range(num_blocks):
                self.enc.append(ResBlock(ch, model_channels * mult, emb_channels, dropout, height in attn_resolutions))
                ch = model_channels * mult
                skips.append(ch)
        self.mid = nn.ModuleList(
            [ResBlock(ch, ch, emb_channels, dropout, True), ResBlock(ch, ch, emb_channels, dropout, False)]
        )
        self.dec = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            height = res[0] >> level
            for _ in range(num_blocks + 1):
                self.dec.append(
                    ResBlock(ch + skips.pop(), model_channels * mult, emb_channels, dropout, height in attn_resolutions)
                )
                ch = model_channels * mult
            if level > 0:
                self.dec.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.out_norm = _group_norm(ch)
        self.out_conv = nn.Conv2d(ch, self.out_channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    def embedding(self, c_noise: torch.Tensor, labels: torch.Tensor | None, num_steps: torch.Tensor | None) -> torch.Tensor:
        b = c_noise.shape[0]
        emb = self.map_layer1(F.silu(self.map_layer0(self.map_noise(c_noise))))
        if self.map_label is not None:
            if labels is None:
                labels = torch.full((b,), self.label_dim, dtype=torch.int64, device=c_noise.device)
            elif labels.dtype != torch.int64 or labels.shape != (b,):
                raise ParamError(f"labels: expected int64 [B={b}] class indices, got {labels.dtype} {tuple(labels.shape)}")
            emb = emb + self.map_label(labels)
        if self.step_condition:
            if num_steps is None:
                raise ParamError(
                    "num_steps: this network is step-conditioned (SFD-v); pass num_steps=[B] tensor of the "
                    "number of timestamps N"
                )
            n = torch.as_tensor(num_steps, device=c_noise.device).reshape(-1).expand(b)
            emb = emb + self.steps_layer1(F.silu(self.steps_layer0(self.map_steps(n))))
        return F.silu(emb)

    def forward(
        self,
        x_in: torch.Tensor,
        c_noise: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        num_steps: torch.Tensor | None = None,
        return_features: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """F; with return_features, (F, the decoder's last feature map, right before the output layer)."""
        c_noise = c_noise.reshape(-1).expand(x_in.shape[0])
        emb = self.embedding(c_noise, labels, num_steps)
        h = self.conv_in(x_in)
        skips = [h]
        for layer in self.enc:
            h = layer(h) if isinstance(layer, nn.AvgPool2d) else layer(h, emb)
            skips.append(h)
        for block in self.mid:
            h = block(h, emb)
        for layer in self.dec:
            h = layer(h) if isinstance(layer, nn.Upsample) else layer(torch.cat([h, skips.pop()], dim=1), emb)
        features = h
        out = self.out_conv(F.silu(self.out_norm(features)))
        return (out, features) if return_features else out


def network_config(**config: Any) -> dict[str, Any]:
    """Validate architecture kwargs (unknown keys refused) and fill defaults; JSON-ready."""
    check_keys("network", config, NETWORK_KEYS)
    defaults = {
        "img_resolution": 8,
        "in_channels": 1,
        "out_channels": None,
        "label_dim": 0,
        "model_channels": 32,
        "channel_mult": [1, 2],
        "num_blocks": 2,
        "attn_resolutions": [4],
        "dropout": 0.0,
        "step_condition": False,
    }
    c = {**defaults, **config}
    check_int("network.in_channels", c["in_channels"], minimum=1)
    check_int("network.label_dim", c["label_dim"], minimum=0)
    check_int("network.model_channels", c["model_channels"], minimum=4)
    check_int("network.num_blocks", c["num_blocks"], minimum=1)
    check_positive("network.dropout", c["dropout"], allow_zero=True)
    if not isinstance(c["step_condition"], bool):
        raise ParamError(f"network.step_condition: expected true or false, got {c['step_condition']!r}")
    c["channel_mult"] = [check_int("network.channel_mult[]", int(m), minimum=1) for m in c["channel_mult"]]
    c["attn_resolutions"] = [int(r) for r in c["attn_resolutions"]]
    res = c["img_resolution"]
    c["img_resolution"] = int(res) if isinstance(res, int) else [int(r) for r in res]
    return c


def build_network(**config: Any) -> UNet:
    """The raw U-Net F from a checkpoint's ``"network"`` section (see :data:`NETWORK_KEYS`)."""
    return UNet(**network_config(**config))


def drop_labels(labels: torch.Tensor, label_dim: int, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each label by the null class (index label_dim) with probability p (classifier-free guidance)."""
    if p <= 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, label_dim), labels)
