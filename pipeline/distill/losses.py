"""Distillation losses d(x_hat, y) between a student state and the teacher's (sfd-method.md section 6).

Every loss is per-sample over all pixels and averaged over the batch:
- ``l1``: sum_i |x_hat_i - y_i| (the SFD default);
- ``l2``: sum_i (x_hat_i - y_i)^2;
- ``pseudo_huber``: sqrt(||x_hat - y||^2 + c^2) - c with c = 0.00054 sqrt(dim) (dim = pixels per sample);
- ``lpips``: LPIPS (Zhang et al. 2018) through the ``lpips`` package, with the backbone's ImageNet
  weights read from a local file (nothing is downloaded; without the file it is an error, never
  random weights). Images are in [-1, 1], LPIPS's own range. LPIPS needs 3 channels and enough
  pixels for AlexNet/VGG's strided layers, so 1-channel images get their channel repeated 3
  times and images are resized bilinearly: to ``size`` x ``size`` when a size is given (the SFD
  authors: 224), else small images are upsampled to at least ``LPIPS_MIN_SIZE`` pixels.
  ``pooling="avg"`` swaps the backbone's max-pooling layers for 2x2 average pooling.

The stage-2 last-step term (sfd-method.md section 8, teachers.md): :func:`with_perceptual_term`
adds ``weight`` x the batch-mean LPIPS to the per-sample loss, i.e. ``weight`` is a per-sample weight
relative to the pixel-summed L1. The authors add the batch-mean LPIPS to every element of the
per-element L1 |x_hat - y| [B, C, H, W] and then sum over all elements and divide by B:

    sum_{b,c,h,w} (|x_hat - y|_{bchw} + mean_b LPIPS_b) / B = mean_b sum_i |x_hat - y|_{bi} + C H W mean_b LPIPS_b,

so their effective weight is C H W (3,072 on CIFAR-10): ``lpips_weight: chw`` (or the number).

The authors' LPIPS is piq's (``piq.LPIPS(replace_pooling=True)``): VGG16 features at relu1_2..relu5_3,
unit-normalised along channels, with the LPIPS paper's learned linear weights (piq downloads
them from its own release, ``lpips_weights.pt``), max pooling replaced by average pooling, inputs
expected in [0, 1] and standardised with ImageNet mean/std. The ``lpips`` package used here
(``lpips.LPIPS(net="vgg")``) has the same VGG16 layers and its own bundled linear weights (v0.1),
keeps VGG's max pooling (its linear weights were fitted on max-pooled features), and takes inputs
in [-1, 1] through its ScalingLayer (shift -0.030/-0.088/-0.188, scale 0.458/0.448/0.450, close to
ImageNet standardisation of [0, 1] images). ``lpips_pooling: avg`` reproduces piq's pooling swap on
the ``lpips`` network; ``lpips_scaling: piq`` replaces the ScalingLayer by piq's (x - mean) / std with
ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225), applied to the [-1, 1] images as the
authors pass them (so the map is (x - 0.485) / 0.229 on the first channel, not lpips' (x + 0.030) / 0.458);
``lpips_heads`` reads piq's linear heads (its ``lpips_weights.pt``, 5 tensors of C values) from a local
file instead of the ``lpips`` package's bundled v0.1 heads. With vgg, 224 px, avg, piq and piq's heads
the value is piq's ``LPIPS(replace_pooling=True, reduction="none")`` to float round-off (the same
operations: unit-normalised features, squared differences weighted per channel, spatial mean, sum over
the five layers; bench/authors checks it against piq itself).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.config.distill import LOSSES, LPIPS_NETS, LPIPS_POOLINGS, LPIPS_SCALINGS
from pipeline.core.param_checks import ParamError, PipelineError, check_choice

PSEUDO_HUBER_C = 0.00054  # c = 0.00054 sqrt(dim) (Song & Dhariwal 2023, as used by SFD)
LPIPS_MIN_SIZE = 64  # AlexNet's stride-4 first layer and max-pools leave 1 pixel at 32; 64 keeps some layout
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # piq's input standardisation (LPIPS_SCALINGS "piq")
IMAGENET_STD = (0.229, 0.224, 0.225)
LPIPS_HEAD_CHANNELS = {"vgg": (64, 128, 256, 512, 512), "alex": (64, 192, 384, 256, 256)}
TORCHVISION_WEIGHTS = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
}
# torchvision `features.N` index ranges that lpips puts into net.slice1..slice5
LPIPS_SLICES = {
    "alex": ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12)),
    "vgg": ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30)),
}

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class LPIPSWeightsError(PipelineError, FileNotFoundError):
    """The LPIPS backbone weights file is missing or does not hold the expected network."""


def _flat_diff(x_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if x_hat.shape != y.shape:
        raise ValueError(f"loss: student state {tuple(x_hat.shape)} and target {tuple(y.shape)} differ in shape")
    return (x_hat - y.to(x_hat.dtype)).flatten(1)


def l1_loss(x_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean_b sum_i |x_hat - y| (sum over pixels, mean over the batch)."""
    return _flat_diff(x_hat, y).abs().sum(1).mean()


def l2_loss(x_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean_b sum_i (x_hat - y)^2."""
    return _flat_diff(x_hat, y).square().sum(1).mean()


def pseudo_huber_loss(x_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean_b [sqrt(||x_hat - y||^2 + c^2) - c], c = 0.00054 sqrt(dim)."""
    d = _flat_diff(x_hat, y)
    c = PSEUDO_HUBER_C * math.sqrt(d.shape[1])
    return ((d.square().sum(1) + c * c).sqrt() - c).mean()


def _lpips_weights_help(net: str) -> str:
    return (
        f"LPIPS needs the ImageNet weights of its {net} backbone as a local file: torchvision's "
        f"{TORCHVISION_WEIGHTS[net]} (a state dict with features.N.* keys). Put it somewhere and give its path "
        f"as the section's `lpips_weights` in params.yaml (e.g. weights/{TORCHVISION_WEIGHTS[net]}); "
        "nothing is downloaded, and random backbone weights are never used"
    )


def load_backbone_state(path: str | Path, net: str = "alex") -> dict[str, torch.Tensor]:
    """torchvision ``features.N.*`` weights from a local .pth/.safetensors, remapped to lpips' ``net.sliceK.N.*``."""
    check_choice("lpips_net", net, LPIPS_NETS)
    path = Path(path)
    if not path.is_file():
        raise LPIPSWeightsError(f"LPIPS backbone weights file {path} does not exist. {_lpips_weights_help(net)}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise LPIPSWeightsError(f"LPIPS backbone weights file {path} cannot be read ({e}). {_lpips_weights_help(net)}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items() if isinstance(state, dict) else ():
        parts = name.split(".")
        if len(parts) != 3 or parts[0] != "features" or not parts[1].isdigit():
            continue  # the classifier head is not part of LPIPS
        idx = int(parts[1])
        for k, (lo, hi) in enumerate(LPIPS_SLICES[net], start=1):
            if lo <= idx < hi:
                out[f"net.slice{k}.{idx}.{parts[2]}"] = value
    if not out:
        raise LPIPSWeightsError(f"LPIPS backbone weights file {path} holds no features.N.* tensors. {_lpips_weights_help(net)}")
    return out


class LPIPSLoss(nn.Module):
    """mean_b LPIPS(x_hat, y) with a frozen backbone from a local weights file (module docstring)."""

    def __init__(self, weights: str | Path | None, net: str = "alex", *, size: int | None = None,
                 pooling: str = "max", scaling: str = "lpips", heads: str | Path | None = None) -> None:
        super().__init__()
        check_choice("lpips_net", net, LPIPS_NETS)
        check_choice("lpips_pooling", pooling, LPIPS_POOLINGS)
        check_choice("lpips_scaling", scaling, LPIPS_SCALINGS)
        if size is not None and (not isinstance(size, int) or size < 16):
            raise ParamError(f"lpips_size: expected an integer >= 16 (pixels) or null, got {size!r}")
        self.size = size
        if weights is None:
            raise LPIPSWeightsError(f"loss 'lpips': no backbone weights file given. {_lpips_weights_help(net)}")
        backbone = load_backbone_state(weights, net)
        import lpips

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torchvision's deprecation of lpips' `pretrained=False`
            self.model = lpips.LPIPS(net=net, pnet_rand=True, pretrained=True, verbose=False)
        expected = {k for k in self.model.state_dict() if k.startswith("net.")}
        missing = sorted(expected - set(backbone))
        if missing:
            raise LPIPSWeightsError(
                f"LPIPS backbone weights file {weights} lacks {len(missing)} tensors of the {net} backbone "
                f"(e.g. {missing[:3]}); is it the right network? {_lpips_weights_help(net)}"
            )
        try:
            self.model.load_state_dict(backbone, strict=False)
        except RuntimeError as e:
            raise LPIPSWeightsError(f"LPIPS backbone weights file {weights} does not fit the {net} backbone: {e}") from None
        if pooling == "avg":
            replace_max_pooling(self.model.net)
        if scaling == "piq":  # piq: (x - mean) / std with ImageNet statistics, whatever range x has
            self.model.scaling_layer.shift.copy_(torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
            self.model.scaling_layer.scale.copy_(torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        if heads is not None:
            for lin, head in zip(self.model.lins, load_lpips_heads(heads, net)):
                lin.model[-1].weight.data.copy_(head)
        self.model.eval().requires_grad_(False)

    @staticmethod
    def prepare(x: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """[B, C, H, W] in [-1, 1] -> 3 channels; bilinear to size x size, or (None) at least LPIPS_MIN_SIZE pixels."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != 3:
            raise ValueError(f"loss 'lpips': needs 1- or 3-channel images, got {x.shape[1]} channels")
        if size is not None:
            if tuple(x.shape[-2:]) != (size, size):
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            return x
        short = min(x.shape[-2:])
        if short < LPIPS_MIN_SIZE:
            scale = LPIPS_MIN_SIZE / short
            size = (round(x.shape[-2] * scale), round(x.shape[-1] * scale))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x

    def forward(self, x_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x_hat.shape != y.shape:
            raise ValueError(f"loss: student state {tuple(x_hat.shape)} and target {tuple(y.shape)} differ in shape")
        a, b = self.prepare(x_hat.float(), self.size), self.prepare(y.float(), self.size)
        return self.model(a, b).flatten().mean()


def load_lpips_heads(path: str | Path, net: str = "vgg") -> list[torch.Tensor]:
    """LPIPS's five linear heads from a local file: piq's ``lpips_weights.pt`` (a list of 5 tensors of C values
    each, C = 64, 128, 256, 512, 512 for VGG16), read without running code; as [1, C, 1, 1] conv weights."""
    path = Path(path)
    channels = LPIPS_HEAD_CHANNELS[net]
    what = (f"LPIPS heads file {path}: expected piq's lpips_weights.pt, a list of {len(channels)} tensors with "
            f"{', '.join(map(str, channels))} values (give it as `lpips_heads`, or null for the lpips package's v0.1 heads)")
    if not path.is_file():
        raise LPIPSWeightsError(f"{what}; the file does not exist")
    try:
        heads = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise LPIPSWeightsError(f"{what}; it cannot be read ({e})") from None
    if isinstance(heads, dict):
        heads = [heads[k] for k in sorted(heads)]
    if not isinstance(heads, (list, tuple)) or len(heads) != len(channels) or not all(
        isinstance(h, torch.Tensor) and h.numel() == c for h, c in zip(heads, channels)
    ):
        raise LPIPSWeightsError(f"{what}; it holds something else")
    return [h.detach().float().reshape(1, c, 1, 1) for h, c in zip(heads, channels)]


def replace_max_pooling(module: nn.Module) -> nn.Module:
    """Swap every MaxPool2d inside ``module`` for a 2x2 stride-2 AvgPool2d in place (piq's ``replace_pooling``)."""
    for name, child in module.named_children():
        if isinstance(child, nn.MaxPool2d):
            setattr(module, name, nn.AvgPool2d(kernel_size=2, stride=2, padding=0))
        else:
            replace_max_pooling(child)
    return module


def resolve_perceptual_weight(weight: float | str, sample_shape: tuple[int, ...]) -> float:
    """The per-sample weight of the batch-mean LPIPS: a number, or ``"chw"`` = C H W of one sample (the authors')."""
    if weight == "chw":
        return float(math.prod(sample_shape))
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
        raise ParamError(f"lpips_weight: expected a positive number or 'chw', got {weight!r}")
    return float(weight)


def perceptual_term(perceptual: Loss, weight: float) -> Loss:
    """weight x perceptual(x_hat, y): the term the SFD loop adds to the last step's loss (``last_step_extra``)."""

    def term(x_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return weight * perceptual(x_hat, y)

    return term


def with_perceptual_term(loss_fn: Loss, perceptual: Loss, weight: float) -> Loss:
    """d(x_hat, y) + weight x perceptual(x_hat, y): the per-sample loss (mean over the batch) plus ``weight`` times the
    batch-mean perceptual distance (module docstring: ``weight`` = C H W with L1 is the authors' stage-2 loss); the SFD
    loop's last step computes exactly this as ``loss_fn + perceptual_term(perceptual, weight)``."""
    term = perceptual_term(perceptual, weight)

    def loss(x_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(x_hat, y) + term(x_hat, y)

    return loss


def make_loss(
    name: str, *, lpips_weights: str | Path | None = None, lpips_net: str = "alex", device: torch.device | str = "cpu",
    lpips_size: int | None = None, lpips_pooling: str = "max", lpips_scaling: str = "lpips",
    lpips_heads: str | Path | None = None,
) -> Loss:
    """The loss d(x_hat, y) named by the ``loss`` param (l1 default, l2, pseudo_huber, lpips)."""
    check_choice("loss", name, LOSSES)
    return LOSS_REGISTRY[name](lpips_weights=lpips_weights, lpips_net=lpips_net, device=device, lpips_size=lpips_size,
                               lpips_pooling=lpips_pooling, lpips_scaling=lpips_scaling, lpips_heads=lpips_heads)


def _lpips_loss(*, lpips_weights, lpips_net, device, lpips_size, lpips_pooling, lpips_scaling, lpips_heads) -> Loss:
    return LPIPSLoss(lpips_weights, lpips_net, size=lpips_size, pooling=lpips_pooling, scaling=lpips_scaling,
                     heads=lpips_heads).to(device)


# loss name (pipeline.config.distill.LOSS_DESCRIPTIONS) -> a factory taking make_loss's options
LOSS_REGISTRY: dict[str, Callable[..., Loss]] = {
    "l1": lambda **_: l1_loss,
    "l2": lambda **_: l2_loss,
    "pseudo_huber": lambda **_: pseudo_huber_loss,
    "lpips": _lpips_loss,
}
if tuple(LOSS_REGISTRY) != LOSSES:
    raise AssertionError(f"pipeline.distill.losses.LOSS_REGISTRY {tuple(LOSS_REGISTRY)} != the params' loss names {LOSSES}")
