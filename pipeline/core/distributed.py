"""Several processes (torchrun) and mixed precision: the small helpers every stage shares.

Processes. Under ``torchrun`` (or ``python -m torch.distributed.run``) every process has RANK,
WORLD_SIZE and LOCAL_RANK in its environment; :func:`init_from_env` joins the process group
(``nccl`` for a CUDA device, else ``gloo``) once per process. Without those variables, or with
WORLD_SIZE 1, nothing is initialised and every helper here is a no-op that returns the
single-process answer, so a one-process run takes exactly today's code path.

- :func:`rank`, :func:`world_size`, :func:`is_main`, :func:`barrier`;
- :func:`share`: the rows ``[lo, hi)`` of a global batch that this rank computes (equal shares:
  the global batch size must be a multiple of the number of processes);
- :func:`mean_over_ranks` (a loss value), :func:`all_reduce_sum`, :func:`all_gather_objects`, :func:`main_first`,
  :func:`full_state_dict` (FSDP2's sharded tensors gathered whole on rank 0).
  Gradients are averaged by torch's DistributedDataParallel or FSDP2 (pipeline.training.parallel), never here.

Precision. :func:`autocast_context` (``fp32`` | ``bf16`` | ``fp16``) and :func:`grad_scaler`
(fp16 only) are the one place that turns the ``precision`` param into torch's autocast and
GradScaler; :func:`enable_tf32` turns on TF32 matmuls on GPUs that have them;
:func:`maybe_compile` and :func:`to_channels_last` are the optional ``compile`` and
``channels_last`` run settings (no-ops on a CPU, where they do not help).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

from pipeline.core.param_checks import ParamError

PRECISIONS = ("fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------ processes


def env_world_size() -> int:
    """WORLD_SIZE from the environment (torchrun sets it), 1 without it."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise ParamError(f"WORLD_SIZE: expected an integer, got {os.environ.get('WORLD_SIZE')!r}") from None


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_distributed() -> bool:
    """True when a process group with more than one process is initialised."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0)) if under_torchrun() else 0


def world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return env_world_size() if under_torchrun() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes checkpoints, metrics, logs and cost files."""
    return rank() == 0


def rank_device(device: torch.device) -> torch.device:
    """A CUDA device becomes this process's GPU (cuda:LOCAL_RANK) under torchrun; a CPU stays a CPU."""
    if device.type == "cuda" and under_torchrun() and env_world_size() > 1 and device.index is None:
        return torch.device("cuda", local_rank())
    return device


def init_from_env(device: torch.device | str = "cpu") -> bool:
    """Join torchrun's process group (once); False when not launched by torchrun with WORLD_SIZE > 1."""
    import torch.distributed as dist

    if not under_torchrun() or env_world_size() < 2:
        return False
    if dist.is_initialized():
        return True
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(rank_device(device))
    dist.init_process_group(backend)
    import atexit

    atexit.register(_shutdown)
    return True


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[bool]:
    """Rank 0 runs the block first (it may write files the others then read); yields is_main()."""
    main = is_main()
    if not main:
        barrier()
    try:
        yield main
    finally:
        if main:
            barrier()


def share(batch_size: int, what: str = "batch_size") -> tuple[int, int]:
    """This rank's rows [lo, hi) of a global batch of ``batch_size`` rows (all of it with one process)."""
    k = world_size()
    if k == 1:
        return 0, batch_size
    if batch_size % k:
        raise ParamError(f"{what}: {batch_size} is not a multiple of the {k} processes; every process computes an equal share")
    b = batch_size // k
    r = rank()
    return r * b, (r + 1) * b


def mean_over_ranks(value: torch.Tensor) -> float:
    """The mean of a scalar tensor over the processes (a loss value for logging and the finiteness check);
    ``float(value)`` with one process. Gradients are averaged by torch's DDP / FSDP2 (pipeline.training.parallel)."""
    if not is_distributed():
        return float(value)
    import torch.distributed as dist

    t = value.detach().to(torch.float64).reshape(1).to(_comm_device())
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def full_state_dict(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Whole tensors for a state dict whose values may be DTensors (FSDP2 shards): every rank gathers each
    tensor in the same order; rank 0 keeps them on the CPU, the others get an empty dict."""
    from torch.distributed.tensor import DTensor

    out: dict[str, torch.Tensor] = {}
    main = is_main()
    for key, value in state.items():
        whole = value.full_tensor() if isinstance(value, DTensor) else value
        if main:
            out[key] = whole.detach().cpu()
    return out


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable, small), in rank order; ``[obj]`` with one process."""
    if not is_distributed():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _comm_device() -> torch.device:
    """Where a small tensor for a collective lives: the current GPU for nccl (it has no CPU tensors), else the CPU."""
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(value: float | int) -> float:
    """Sum of a number over the processes (the number itself with one process)."""
    if not is_distributed():
        return value
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return float(t)


# ------------------------------------------------------------------ precision


def check_precision(precision: str, what: str = "precision") -> str:
    if precision not in PRECISIONS:
        raise ParamError(f"{what}: got {precision!r}; allowed values: {', '.join(map(repr, PRECISIONS))}")
    return precision


def autocast_context(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for bf16/fp16 on ``device``'s type; a null context for fp32 (today's path, untouched).

    fp16 autocast on a CPU needs a torch that supports it (2.x does, slowly); a torch that refuses
    raises a ParamError naming the setting.
    """
    check_precision(precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    try:
        return torch.autocast(device_type=device_type, dtype=AUTOCAST_DTYPES[precision])
    except (RuntimeError, ValueError) as e:
        raise ParamError(f"precision: {precision} autocast is not supported on {device_type} by this torch ({e})") from None


def autocast_denoiser(denoiser: Any, precision: str, device: torch.device | str) -> Any:
    """``D(x, sigma, labels, **kw)`` run under bf16/fp16 autocast with its output cast back to x's dtype (the
    solver around it stays float32); ``denoiser`` itself for fp32."""
    check_precision(precision)
    if precision == "fp32":
        return denoiser

    def run(x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        with autocast_context(precision, device):
            out = denoiser(x, sigma, labels, **kwargs)
        return out.to(x.dtype)

    return run


def grad_scaler(precision: str, device: torch.device | str) -> "torch.amp.GradScaler | None":
    """A GradScaler for fp16 training (dynamic loss scaling), None for fp32 and bf16 (they need none)."""
    check_precision(precision)
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def enable_tf32(device: torch.device | str) -> bool:
    """TF32 matmuls and convolutions on CUDA GPUs that have them (Ampere and later); False elsewhere.

    The stages call it for precision bf16/fp16 only: ``fp32`` stays strict float32 on every device."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def to_channels_last(module: torch.nn.Module, enabled: bool, device: torch.device | str) -> tuple[torch.nn.Module, str | None]:
    """Channels-last memory format on a GPU (convolutions with tensor cores); (module, note when skipped)."""
    if not enabled:
        return module, None
    if torch.device(device).type != "cuda":
        return module, "channels_last: skipped on the CPU (it helps GPU convolutions only)"
    return module.to(memory_format=torch.channels_last), None


def maybe_compile(fn: Any, enabled: bool, device: torch.device | str) -> tuple[Any, str | None]:
    """``torch.compile(fn)`` on a GPU when ``enabled``; (fn, note when skipped)."""
    if not enabled:
        return fn, None
    if torch.device(device).type != "cuda":
        return fn, "compile: skipped on the CPU (no compiler toolchain is assumed; it pays off on GPUs)"
    return torch.compile(fn), None
