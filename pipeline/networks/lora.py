"""LoRA students (peft): the teacher's weights frozen, low-rank adapters trained on chosen layers.

``lora_rank: r`` in a distill section puts a LoRA adapter (Hu et al. 2021: W x + (alpha / r) B A x, A drawn
Kaiming-uniform, B zero, so the student starts equal to its teacher) on every ``torch.nn.Linear`` /
``torch.nn.Conv2d`` layer whose name ends with one of ``lora_targets`` in the network the student copies:

- this project's U-Net (``EDMPrecond.net``): default targets ``conv0, conv1, affine, qkv, proj`` (every
  convolution and linear layer of the residual and attention blocks);
- a diffusers UNet (``DiffusersVP.unet``): default ``to_q, to_k, to_v, to_out.0``, the attention projections
  diffusers' and the authors' LoRA scripts train;
- EDM's networks use their own layer classes, which peft does not wrap: refused in one line.

Checkpoints and training states hold the adapters alone (peft's names without the adapter name, e.g.
``conv0.lora_A.weight``, relative to the network above); model.json keeps the architecture and a ``"lora"``
section (rank, alpha, targets, the base checkpoint's path and weights hash). :func:`load_lora_student`
rebuilds the base, checks its hash, loads the adapters and merges them (``W + (alpha / r) B A``), so every
consumer (sampling, evaluation, stage 2's trajectories, export) sees a plain network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.core.param_checks import ParamError

ADAPTER = "default"  # peft's adapter name inside the modules (not in saved names)
DEFAULT_TARGETS = {
    "unet": ["conv0", "conv1", "affine", "qkv", "proj"],
    "diffusers": ["to_q", "to_k", "to_v", "to_out.0"],
}


def require_peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ParamError("lora_rank: LoRA students need peft: pip install peft (part of the dev extra)") from None
    return peft


def lora_host(model: nn.Module) -> tuple[nn.Module, str]:
    """(the network the adapters go on, its kind): a diffusers UNet, or our U-Net inside EDMPrecond."""
    unet = getattr(model, "unet", None)
    if isinstance(unet, nn.Module) and hasattr(model, "unet_class"):
        return unet, "diffusers"
    net = getattr(model, "net", None)
    if isinstance(net, nn.Module) and hasattr(net, "network_kwargs"):
        return net, "unet"
    raise ParamError(f"lora_rank: LoRA adapters need torch.nn.Linear / Conv2d layers (this project's U-Net or a diffusers "
                     f"UNet); {type(model).__name__} (an EDM network) uses its own layer classes: set lora_rank: 0")


@dataclass
class LoraAdapters:
    """The adapters of one student: what they are and how to save them."""

    model: nn.Module
    rank: int
    alpha: float
    targets: list[str]
    kind: str

    def describe(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets), "host": self.kind}

    @staticmethod
    def is_adapter(name: str) -> bool:
        return ".lora_A." in name or ".lora_B." in name

    def host(self) -> nn.Module:
        return lora_host(self.model)[0]

    def adapter_state_dict(self, trainable: Any = None) -> dict[str, torch.Tensor]:
        """The adapters in saved names (relative to the host network, without peft's adapter name); whole tensors
        under FSDP2 (every rank takes part, rank 0 holds them)."""
        from pipeline.core.distributed import full_state_dict

        state = {k: v for k, v in self.host().state_dict().items() if self.is_adapter(k)}
        if trainable is not None and getattr(trainable, "sharding", None) == "fsdp":
            state = full_state_dict(state)
        return {k.replace(f".{ADAPTER}.", "."): v for k, v in state.items()}

    def load_adapter_state_dict(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        host = self.host()
        wanted = {k.replace(f".{ADAPTER}.", "."): k for k in host.state_dict() if self.is_adapter(k)}
        missing = sorted(set(wanted) - set(tensors))
        unexpected = sorted(set(tensors) - set(wanted))
        if missing or unexpected:
            raise ParamError(f"{where}: the LoRA adapters do not fit the network: missing {missing[:5]}, unexpected {unexpected[:5]}")
        host.load_state_dict({wanted[k]: v for k, v in tensors.items()}, strict=False)


def add_lora(model: nn.Module, *, rank: int, alpha: float | None = None, targets: list[str] | None = None,
             seed: int = 0, what: str = "lora_rank") -> LoraAdapters:
    """Put LoRA adapters on ``model`` in place (module docstring); every other weight is frozen."""
    peft = require_peft()
    if rank < 1:
        raise ParamError(f"{what}: must be >= 1 for a LoRA student, got {rank}")
    host, kind = lora_host(model)
    targets = list(targets) if targets else list(DEFAULT_TARGETS[kind])
    names = [n for n, m in host.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
             and any(n == t or n.endswith("." + t) for t in targets)]
    if not names:
        raise ParamError(f"lora_targets: none of {targets} names a Linear or Conv2d layer of the {kind} network")
    alpha = float(rank if alpha is None else alpha)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, init_lora_weights=True)
    model.requires_grad_(False)
    torch.manual_seed(seed)  # peft draws A (Kaiming-uniform) from the global generator
    peft.inject_adapter_in_model(config, host, adapter_name=ADAPTER)
    for name, p in host.named_parameters():
        p.requires_grad_(LoraAdapters.is_adapter(name))
    return LoraAdapters(model, rank, alpha, targets, kind)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer (W + (alpha / r) B A) and put the plain layer back; returns ``model``."""
    from peft.tuners.lora import LoraLayer

    host, _ = lora_host(model)
    for name, module in list(host.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent = host.get_submodule(name.rsplit(".", 1)[0]) if "." in name else host
            setattr(parent, name.rsplit(".", 1)[-1], module.get_base_layer())
    return model


def resolve_base(base: str, ckpt: Path) -> Path:
    """The base checkpoint a LoRA student names: as written (relative to the working directory), else beside the student."""
    for candidate in (Path(base), ckpt.parent / base, ckpt / base):
        if (candidate / "model.json").is_file() or candidate.suffix == ".pkl" and candidate.is_file():
            return candidate
    raise ParamError(f"{ckpt}/model.json: the LoRA student's base network {base} is not found (as written, nor beside the "
                     f"student); it holds the adapters only: put the teacher checkpoint it was trained on there")


def load_lora_student(ckpt: Path, config: dict[str, Any], adapters: dict[str, torch.Tensor],
                      base_model: nn.Module, base_hash: str) -> nn.Module:
    """``base_model`` (loaded from the base checkpoint) with the saved adapters merged in (module docstring)."""
    lora = config["lora"]
    if lora.get("base_weights_hash") not in (None, base_hash):
        raise ParamError(f"{ckpt}/model.json: the LoRA adapters were trained on a base network with weights hash "
                         f"{lora['base_weights_hash']}, {lora.get('base')} now has {base_hash}; retrain or restore the base")
    added = add_lora(base_model, rank=int(lora["rank"]), alpha=float(lora["alpha"]), targets=list(lora["targets"]))
    added.load_adapter_state_dict(adapters, f"{ckpt}/model.safetensors")
    merge_lora(base_model)
    return base_model.eval().requires_grad_(False)
