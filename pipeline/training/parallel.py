"""The model a training loop trains: torch's DDP or FSDP2 across processes, micro-batches, activation checkpointing.

:func:`prepare` wraps a built model once, before its optimizer exists, and returns a :class:`Trainable`:

- ``module``: the model as built (its checkpoint interface: ``step_condition``, ``checkpoint_state_dict()``...);
- ``forward``: what the loss calls. With one process it is ``module`` itself (today's code path, bit for bit);
  under torchrun with ``sharding: ddp`` (the default) it is ``torch.nn.parallel.DistributedDataParallel(module)``,
  which averages the gradients over the processes in buckets while the backward pass runs; with
  ``sharding: fsdp`` the module is sharded in place by FSDP2 (``torch.distributed.fsdp.fully_shard`` on every
  block, then the root): each rank holds 1/K of the weights, gradients and Adam state, the weights are
  all-gathered block by block for the forward and backward passes and the gradients reduce-scattered
  (averaged) after them.
- :meth:`Trainable.sync`: the context of one micro-batch's forward and backward; only the last micro-batch of an
  optimizer step synchronises the gradients (DDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync``).

Arithmetic: each process's loss is the mean over its rows (``pipeline.core.distributed.share``); DDP and FSDP2
average the gradients over the K processes, so the step is the one-process step on the global batch, to
float tolerance. Micro-batches (``batch_gpu``, :func:`micro_batches`) weight each micro-batch's mean by its
share of the process's rows, so the accumulated gradient is the gradient of the process's mean.

Checkpoints: :func:`full_state_dict` turns an FSDP2 module's sharded tensors (DTensors) into whole tensors (every
rank takes part, rank 0 keeps them), so training states and checkpoints are the same files whatever the
sharding; :func:`state_view` (:class:`ModuleState`, :class:`ShardedOptimizerState`) gives pipeline.training.state
the whole state dicts (or a LoRA student's adapters alone) and puts a saved one back into the shards.

Activation checkpointing (:func:`enable_activation_checkpointing`): the network's blocks recompute their
activations in the backward pass instead of keeping them (``torch.utils.checkpoint``, non-reentrant, RNG
state preserved); a diffusers model uses its own ``enable_gradient_checkpointing()``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.core.distributed import full_state_dict, is_distributed, is_main
from pipeline.core.param_checks import ParamError

SHARDINGS = ("ddp", "fsdp")
BLOCK_SUFFIXES = ("Block", "Block2D", "Transformer2DModel", "UNetMidBlock2D")  # modules FSDP2 shards one by one
CHECKPOINT_BLOCKS = ("ResBlock", "UNetBlock")  # our U-Net's and EDM's residual blocks (activation checkpointing)


@dataclass
class Trainable:
    """A model prepared for training (module docstring)."""

    module: nn.Module
    forward: Any
    sharding: str | None = None  # None: one process; "ddp" | "fsdp"

    def parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates (those that require gradients), in the module's order."""
        return [p for p in self.module.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def sync(self, last: bool) -> Iterator[None]:
        """Forward + backward of one micro-batch; gradients are synchronised only when ``last``."""
        if last or self.sharding is None:
            if self.sharding == "fsdp":
                self.module.set_requires_gradient_sync(True)
            yield
        elif self.sharding == "ddp":
            with self.forward.no_sync():
                yield
        else:
            self.module.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.module.set_requires_gradient_sync(True)

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """``module.checkpoint_state_dict()`` in whole tensors (under FSDP2 every rank takes part, rank 0 holds them)."""
        state = self.module.checkpoint_state_dict()
        return full_state_dict(state) if self.sharding == "fsdp" else state


def check_sharding(sharding: str, what: str = "sharding") -> str:
    if sharding not in SHARDINGS:
        raise ParamError(f"{what}: got {sharding!r}; allowed values: {', '.join(map(repr, SHARDINGS))}")
    return sharding


def prepare(module: nn.Module, *, sharding: str = "ddp", device: torch.device | str = "cpu",
            what: str = "sharding") -> Trainable:
    """Wrap ``module`` for training on this process group (module docstring); ``module`` itself with one process."""
    check_sharding(sharding, what)
    if not is_distributed():
        return Trainable(module, module, None)
    device = torch.device(device)
    if sharding == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
        # find_unused_parameters: EDM networks have layers a call may not use (map_augment without augment labels)
        ddp = DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True, broadcast_buffers=False)
        return Trainable(module, ddp, "ddp")
    from torch.distributed.fsdp import fully_shard

    inner = [m for name, m in module.named_modules() if name and type(m).__name__.endswith(BLOCK_SUFFIXES)]
    outer = _outermost(module, inner)
    for m in outer:
        fully_shard(m)
    fully_shard(module)
    return Trainable(module, module, "fsdp")


def _outermost(root: nn.Module, candidates: list[nn.Module]) -> list[nn.Module]:
    """The candidates not nested inside another candidate (FSDP2 shards each group once)."""
    chosen: set[int] = set()
    out = []

    def visit(m: nn.Module) -> None:
        for child in m.children():
            if any(child is c for c in candidates):
                if id(child) not in chosen:
                    chosen.add(id(child))
                    out.append(child)
                continue
            visit(child)

    visit(root)
    return out


class ModuleState:
    """``state_dict()`` / ``load_state_dict()`` of the part of a trained model that a training state stores: a submodule
    (``sub``, e.g. EDMPrecond's bare network), only the tensors ``keep`` accepts (a LoRA student: its adapters), in
    whole tensors under FSDP2 (gathered; a saved state is put back into the shards). pipeline.training.state uses it
    like a module."""

    def __init__(self, trainable: Trainable, sub: nn.Module | None = None, keep: Callable[[str], bool] | None = None) -> None:
        self.root = trainable.module
        self.sub = self.root if sub is None else sub
        self.prefix = next((name + "." for name, m in self.root.named_modules() if m is self.sub and name), "")
        self.keep, self.sharded = keep, trainable.sharding == "fsdp"

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {k: v for k, v in self.sub.state_dict().items() if self.keep is None or self.keep(k)}
        return full_state_dict(state) if self.sharded else state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = [k for k in self.sub.state_dict() if self.keep is None or self.keep(k)]
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in set(expected)]
        if missing or unexpected:
            raise RuntimeError(f"training state does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.root, {self.prefix + k: v for k, v in state.items()},
                                 options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            self.sub.load_state_dict(state, strict=self.keep is None)


class ShardedOptimizerState:
    """An optimizer over FSDP2 shards seen as the one-process optimizer: ``state_dict()`` gives whole tensors keyed
    by parameter index (the format pipeline.core.checkpoints writes), ``load_state_dict()`` shards a saved one."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.module, self.optimizer = module, optimizer
        self.names = _param_names(module, optimizer)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        sd = get_optimizer_state_dict(self.module, self.optimizer,
                                      options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not is_main():  # cpu_offload: rank 0 alone holds the whole state
            return {"state": {}, "param_groups": []}
        index = {name: i for i, name in enumerate(self.names)}
        state = {index[name]: dict(entry) for name, entry in sd.get("state", {}).items()}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[n] for n in g["params"]]}
                  for g in sd["param_groups"]]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = {self.names[int(i)]: entry for i, entry in sd["state"].items()}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [self.names[int(i)] for i in g["params"]]}
                  for g in sd["param_groups"]]
        set_optimizer_state_dict(self.module, self.optimizer, {"state": state, "param_groups": groups},
                                 options=StateDictOptions(full_state_dict=True))


def _param_names(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The fully qualified names of the optimizer's parameters, in its order (the index a state dict uses)."""
    by_id = {id(p): name for name, p in module.named_parameters()}
    return [by_id[id(p)] for g in optimizer.param_groups for p in g["params"]]


def state_view(trainable: Trainable, optimizer: torch.optim.Optimizer, sub: nn.Module | None = None,
               keep: Callable[[str], bool] | None = None) -> tuple[Any, Any]:
    """(module, optimizer) as pipeline.training.state saves them: the module itself and the optimizer with one process
    or DDP and a full model; a :class:`ModuleState` (submodule, kept tensors, whole tensors) and, under FSDP2, a
    :class:`ShardedOptimizerState` otherwise."""
    sub = trainable.module if sub is None else sub
    module: Any = sub if (trainable.sharding != "fsdp" and keep is None) else ModuleState(trainable, sub, keep)
    opt: Any = ShardedOptimizerState(trainable.module, optimizer) if trainable.sharding == "fsdp" else optimizer
    return module, opt


# ------------------------------------------------------------------ micro-batches


def micro_batches(rows: int, batch_gpu: int | None, what: str = "batch_gpu") -> list[tuple[int, int]]:
    """[lo, hi) of each micro-batch of a process's ``rows`` rows: one when ``batch_gpu`` is None or >= rows
    (the authors' rule); otherwise ``batch_gpu`` must divide ``rows`` (every micro-batch equal)."""
    if batch_gpu is None or batch_gpu >= rows:
        return [(0, rows)]
    if rows % batch_gpu:
        raise ParamError(f"{what}: {batch_gpu} does not divide the {rows} rows each process computes per batch "
                         "(batch_size / processes); choose a divisor")
    return [(lo, lo + batch_gpu) for lo in range(0, rows, batch_gpu)]


# ------------------------------------------------------------------ activation checkpointing


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Recompute activations block by block in the backward pass (module docstring); returns the blocks changed.

    A diffusers model inside (``enable_gradient_checkpointing``) uses its own switch; our U-Net's ResBlocks and EDM's
    UNetBlocks run under ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``. A network with neither is refused."""
    count = 0
    for m in model.modules():
        if hasattr(m, "enable_gradient_checkpointing") and getattr(m, "_supports_gradient_checkpointing", True):
            m.enable_gradient_checkpointing()
            count += sum(1 for sub in m.modules() if hasattr(sub, "gradient_checkpointing")) or 1
    for m in model.modules():
        if type(m).__name__ in CHECKPOINT_BLOCKS and not getattr(m, "_sfd_checkpointed", False):
            m.forward = functools.partial(_checkpointed, m, type(m).forward)
            m._sfd_checkpointed = True
            count += 1
    if not count:
        raise ParamError(f"activation_checkpointing: {type(model).__name__} has no blocks this project knows how to "
                         "checkpoint (our U-Net's ResBlock, EDM's UNetBlock, a diffusers model)")
    return count


def _checkpointed(module: nn.Module, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():
        return forward(module, *args, **kwargs)
    from torch.utils.checkpoint import checkpoint

    return checkpoint(forward, module, *args, use_reentrant=False, **kwargs)


def saved_activation_bytes(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(fn(), bytes of the tensors autograd keeps for the backward pass while fn runs): what checkpointing saves."""
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


