"""Read NVlabs/edm snapshot pickles (``network-snapshot-*.pkl``, the published ``edm-*.pkl``) safely.

An EDM snapshot is ``pickle.dump(dict(ema=..., loss_fn=..., augment_pipe=..., dataset_kwargs=...))``
where every network / loss / augment object is a "persistent class" instance: its pickle is a call
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with ``meta`` holding ``module_src``
(the whole source text of the defining module), ``class_name``, ``version`` and ``state`` (the
object's ``__dict__``: ``_parameters``, ``_buffers``, ``_modules``, ``_init_kwargs``, ...). EDM's own
loader executes ``module_src``. This reader never does: :class:`EDMUnpickler` resolves only the few
globals such files contain (see ``ALLOWED_GLOBALS``) to inert stand-ins, refuses every other global
with :class:`UnsafePickleError`, and reads tensor storages with ``torch.load(weights_only=True)``.
Nothing in this module calls ``pickle.load`` or ``torch.load(weights_only=False)``. The stand-ins
are sealed, so a BUILD opcode aimed at an allowed global cannot alter it (e.g. a function's
``__defaults__``), and tensors with backward hooks are refused.

API:

- :func:`read_edm_snapshot` (path) -> :class:`EDMSnapshot`: the ``ema`` preconditioner's class name
  (``VPPrecond``, ``VEPrecond``, ``iDDPMPrecond``, ``EDMPrecond``), its constructor kwargs (EDM's
  ``_init_kwargs`` as plain dicts; label_dim, use_fp16 and model_type filled in with EDM's defaults
  when absent), and its flat state dict with EDM's dotted names, in order (the keys of EDM's
  ``ema.state_dict()``: parameters and persistent buffers); ``loss_fn`` / ``augment_pipe`` by class
  name, ``dataset_kwargs`` as a dict;
- :func:`load_edm_pickle` (path, device) -> ``nn.Module``: that snapshot built with
  :func:`pipeline.networks.edm.build_edm_model` and loaded with ``load_state_dict(strict=True)``.
"""

from __future__ import annotations

import io
import pickle
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.param_checks import PipelineError

PRECONDITIONERS = ("VPPrecond", "VEPrecond", "iDDPMPrecond", "EDMPrecond")
# EDM's constructor signatures (training/networks.py): positional parameters, in order, and the
# defaults of the interface parameters that every built model needs.
PRECOND_POSITIONAL = {
    "VPPrecond": ("img_resolution", "img_channels", "label_dim", "use_fp16", "beta_d", "beta_min", "M", "epsilon_t", "model_type"),
    "VEPrecond": ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min", "sigma_max", "model_type"),
    "iDDPMPrecond": ("img_resolution", "img_channels", "label_dim", "use_fp16", "C_1", "C_2", "M", "model_type"),
    "EDMPrecond": ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min", "sigma_max", "sigma_data", "model_type"),
}
DEFAULT_MODEL_TYPE = {"VPPrecond": "SongUNet", "VEPrecond": "SongUNet", "iDDPMPrecond": "DhariwalUNet", "EDMPrecond": "DhariwalUNet"}
WHERE_EDM_PICKLES_COME_FROM = (
    "EDM snapshots are written by NVlabs/edm's train.py (network-snapshot-*.pkl in its run directory); "
    "the published teachers (e.g. edm-cifar10-32x32-uncond-vp.pkl) are downloaded from "
    "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"
)


class UnsafePickleError(PipelineError, pickle.UnpicklingError):
    """The pickle names a global outside the EDM snapshot allow-list; nothing of it was run."""


class EDMPickleError(PipelineError, ValueError):
    """The file is not a readable EDM snapshot (not a pickle, no ``ema``, unknown class, ...)."""


class EDMPickleMissing(PipelineError, FileNotFoundError):
    """The EDM snapshot file does not exist."""


# ----------------------------------------------------------------------------- inert stand-ins


class _SealedType(type):
    """Metaclass of the stand-in classes: a pickle's BUILD cannot set attributes on them."""

    def __setattr__(cls, name: str, value: Any) -> None:
        raise UnsafePickleError(f"refusing to set attribute {name!r} on {cls.__name__}")

    def __delattr__(cls, name: str) -> None:
        raise UnsafePickleError(f"refusing to delete attribute {name!r} of {cls.__name__}")


class _StandIn:
    """A stand-in callable handed to pickle: callable, but sealed against BUILD / setattr.

    (A plain function's ``__defaults__`` could be reassigned by a BUILD on the global itself.)
    """

    __slots__ = ("_fn", "_name")

    def __init__(self, fn: Any, name: str) -> None:
        object.__setattr__(self, "_fn", fn)
        object.__setattr__(self, "_name", name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)

    def __setstate__(self, state: Any) -> None:
        raise UnsafePickleError(f"refusing to modify the global {self._name}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise UnsafePickleError(f"refusing to set attribute {name!r} on the global {self._name}")

    def __repr__(self) -> str:
        return f"<stand-in for {self._name}>"


class PersistentRecord:
    """What ``_reconstruct_persistent_obj(meta)`` stands for: the class name, version and state.

    ``meta["module_src"]`` is dropped unread: the source text is never kept, compiled or executed.
    """

    __slots__ = ("class_name", "version", "state")

    def __init__(self, class_name: str, version: Any, state: Any):
        self.class_name = class_name
        self.version = version
        self.state = state

    @property
    def short_name(self) -> str:
        return self.class_name.rpartition(".")[2]

    def __repr__(self) -> str:
        return f"PersistentRecord({self.class_name!r}, version={self.version!r})"


def _reconstruct_persistent_record(meta: Any) -> PersistentRecord:
    if not isinstance(meta, dict):
        raise EDMPickleError(f"persistent object: expected a meta dict, got {type(meta).__name__}")
    class_name = meta.get("class_name")
    if not isinstance(class_name, str):
        raise EDMPickleError(f"persistent object: meta has no class_name string (keys: {sorted(map(str, meta))})")
    if meta.get("type", "class") != "class":
        raise EDMPickleError(f"persistent object {class_name}: unsupported type {meta.get('type')!r}")
    return PersistentRecord(class_name, meta.get("version"), meta.get("state"))


class InertModuleDict(metaclass=_SealedType):
    """Stands in for ``torch.nn.ModuleDict``: keeps the pickled ``__dict__`` and nothing else."""

    class_name = "torch.nn.modules.container.ModuleDict"
    short_name = "ModuleDict"

    def __init__(self) -> None:  # pickle creates it with cls.__new__(cls) and then __setstate__
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = state[0]
        self.state = state

    def __repr__(self) -> str:
        return "InertModuleDict()"


class EasyDict(dict, metaclass=_SealedType):
    """Stands in for ``dnnlib.util.EasyDict``: a plain dict (attribute access only for reading)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _load_storage_from_bytes(b: Any) -> Any:
    """``torch.storage._load_from_bytes`` without running code: the legacy stream, weights only."""
    if not isinstance(b, (bytes, bytearray)):
        raise EDMPickleError(f"_load_from_bytes: expected bytes, got {type(b).__name__}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
        return torch.load(io.BytesIO(bytes(b)), map_location="cpu", weights_only=True)


def _check_no_hooks(what: str, hooks: Any) -> None:
    if hooks:  # torch pickles an empty OrderedDict; anything else would be attached as a callable
        raise UnsafePickleError(f"{what}: refusing a tensor with backward hooks {hooks!r}")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    if type(storage) is not torch.storage.TypedStorage:
        raise EDMPickleError(f"_rebuild_tensor_v2: expected a tensor storage, got {type(storage).__name__}")
    _check_no_hooks("_rebuild_tensor_v2", backward_hooks)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
        return torch._utils._rebuild_tensor_v2(
            storage, storage_offset, size, stride, requires_grad, OrderedDict(), metadata
        )


def _rebuild_parameter(data, requires_grad, backward_hooks):
    if not isinstance(data, torch.Tensor):
        raise EDMPickleError(f"_rebuild_parameter: expected a tensor, got {type(data).__name__}")
    _check_no_hooks("_rebuild_parameter", backward_hooks)
    return torch._utils._rebuild_parameter(data, requires_grad, OrderedDict())


def _numpy_scalar():
    core = getattr(np, "_core", None)  # numpy >= 2; numpy 1.x has numpy.core
    return (core if core is not None else np.core).multiarray.scalar


_STAND_INS: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_record,
    ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar(),
    ("numpy.core.multiarray", "scalar"): _numpy_scalar(),  # as numpy 1.x wrote it (the 2022 files)
}
# module.name -> what the unpickler gets. Functions are wrapped (_StandIn); the classes are C types
# (OrderedDict, numpy.dtype) or sealed stand-ins, so a BUILD on a global cannot alter any of them.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **{key: _StandIn(fn, ".".join(key)) for key, fn in _STAND_INS.items()},
    ("collections", "OrderedDict"): OrderedDict,
    ("torch.nn.modules.container", "ModuleDict"): InertModuleDict,
    ("dnnlib.util", "EasyDict"): EasyDict,
    ("numpy", "dtype"): np.dtype,
}


class EDMUnpickler(pickle.Unpickler):
    """Unpickles an EDM snapshot, resolving only ``ALLOWED_GLOBALS`` (to the stand-ins above)."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise UnsafePickleError(
                f"refusing global {module}.{name}: an EDM snapshot may only name "
                + ", ".join(f"{m}.{n}" for m, n in ALLOWED_GLOBALS)
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"refusing persistent id {pid!r}: EDM snapshots contain none")


# ----------------------------------------------------------------------------- the snapshot


@dataclass
class EDMSnapshot:
    """What an EDM snapshot holds, as plain data (no EDM class is ever instantiated)."""

    path: Path
    precond_name: str  # "VPPrecond", "VEPrecond", "iDDPMPrecond" or "EDMPrecond"
    init_kwargs: dict[str, Any]  # the preconditioner's constructor kwargs (model kwargs included)
    state_dict: dict[str, torch.Tensor]  # EDM's ema.state_dict(): "model.enc.32x32_conv.weight", ...
    model_name: str  # the class of ema.model: "SongUNet" or "DhariwalUNet"
    attributes: dict[str, Any] = field(default_factory=dict)  # ema's plain attributes (sigma_min, M, ...)
    dataset_kwargs: dict[str, Any] | None = None
    loss_fn: str | None = None  # class name only
    augment_pipe: str | None = None  # class name only, None when the run had no augmentation
    version: Any = None  # torch_utils.persistence's format version of the ema record

    @property
    def numel(self) -> int:
        """Elements in the state dict: parameters and persistent buffers."""
        return sum(t.numel() for t in self.state_dict.values())


def _plain(value: Any) -> Any:
    """EasyDicts / OrderedDicts to plain dicts, tuples kept, recursively."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value


def _module_state(record: Any, where: str) -> dict:
    if not isinstance(record, (PersistentRecord, InertModuleDict)):
        raise EDMPickleError(f"{where}: expected a module, got {type(record).__name__}")
    state = record.state
    if not isinstance(state, dict):
        raise EDMPickleError(f"{where} ({record.class_name}): its state is not a dict")
    return state


def _collect_state_dict(record: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """Parameters and persistent buffers, recursively through ``_modules``, as ``state_dict`` names them."""
    where = prefix[:-1] or "ema"
    state = _module_state(record, where)
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    for attr in ("_parameters", "_buffers"):
        tensors = state.get(attr) or {}
        if not isinstance(tensors, dict):
            raise EDMPickleError(f"{where}: {attr} is not a dict")
        for name, tensor in tensors.items():
            if tensor is None or (attr == "_buffers" and name in non_persistent):
                continue
            if not isinstance(tensor, torch.Tensor):
                raise EDMPickleError(f"{where}.{name}: expected a tensor, got {type(tensor).__name__}")
            out[prefix + name] = tensor.detach()
    modules = state.get("_modules") or {}
    if not isinstance(modules, dict):
        raise EDMPickleError(f"{where}: _modules is not a dict")
    for name, child in modules.items():
        if child is not None:
            _collect_state_dict(child, f"{prefix}{name}.", out)


def _class_name_of(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (PersistentRecord, InertModuleDict)):
        return value.short_name
    return type(value).__name__


def _unpickle(path: Path) -> Any:
    with open(path, "rb") as f:
        head = f.read(2)
        if head[:2] == b"PK":
            raise EDMPickleError(
                f"{path}: is a zip archive (a torch.save checkpoint?), not an EDM snapshot pickle; "
                + WHERE_EDM_PICKLES_COME_FROM
            )
        if len(head) < 2 or head[0] != 0x80:
            raise EDMPickleError(f"{path}: not a pickle (EDM snapshots are pickles of protocol >= 2)")
        f.seek(0)
        try:
            return EDMUnpickler(f).load()
        except PipelineError:
            raise
        except Exception as exc:  # truncated / corrupt streams: UnpicklingError, EOFError, ...
            raise EDMPickleError(f"{path}: could not read it as an EDM snapshot pickle: {type(exc).__name__}: {exc}") from exc


def _constructor_arguments(path: Path, precond: str, state: dict[str, Any]) -> dict[str, Any]:
    """The preconditioner's constructor arguments: its ``_init_kwargs`` with the positional ``_init_args`` named,
    EDM's defaults for label_dim, use_fp16 and model_type filled in."""
    init_args = tuple(state.get("_init_args") or ())
    init_kwargs = _plain(dict(state.get("_init_kwargs") or {}))
    positional = PRECOND_POSITIONAL[precond]
    if len(init_args) > len(positional):
        raise EDMPickleError(f"{path}: {precond} was built with {len(init_args)} positional arguments")
    for name, value in zip(positional, init_args):
        init_kwargs[name] = _plain(value)
    for name in ("img_resolution", "img_channels"):
        if name not in init_kwargs:
            raise EDMPickleError(f"{path}: {precond}'s _init_kwargs lack {name} (have: {', '.join(init_kwargs)})")
    init_kwargs.setdefault("label_dim", 0)
    init_kwargs.setdefault("use_fp16", False)
    init_kwargs.setdefault("model_type", DEFAULT_MODEL_TYPE[precond])
    return init_kwargs


def read_edm_snapshot(path: str | Path) -> EDMSnapshot:
    """Read an EDM snapshot pickle without running any of its code."""
    path = Path(path)
    if not path.is_file():
        raise EDMPickleMissing(f"EDM snapshot not found: {path}. {WHERE_EDM_PICKLES_COME_FROM}")
    data = _unpickle(path)
    if not isinstance(data, dict):
        raise EDMPickleError(f"{path}: expected a dict (an EDM snapshot), got {type(data).__name__}")
    if "ema" not in data:
        raise EDMPickleError(
            f"{path}: has no 'ema' entry (keys: {', '.join(map(str, data))}); an EDM snapshot holds "
            "ema, loss_fn, augment_pipe and dataset_kwargs"
        )
    ema = data["ema"]
    if not isinstance(ema, PersistentRecord):
        raise EDMPickleError(f"{path}: 'ema' is a {type(ema).__name__}, not an EDM network")
    precond = ema.short_name
    if precond not in PRECONDITIONERS:
        raise EDMPickleError(
            f"{path}: 'ema' is a {ema.class_name}; supported EDM preconditioners: {', '.join(PRECONDITIONERS)}"
        )
    state = _module_state(ema, "ema")
    init_kwargs = _constructor_arguments(path, precond, state)
    modules = state.get("_modules") or {}
    model = modules.get("model") if isinstance(modules, dict) else None
    if not isinstance(model, PersistentRecord):
        raise EDMPickleError(f"{path}: {precond} has no 'model' network")
    if model.short_name != init_kwargs["model_type"]:
        raise EDMPickleError(
            f"{path}: {precond}.model is a {model.class_name} but its model_type is {init_kwargs['model_type']!r}"
        )
    state_dict: dict[str, torch.Tensor] = {}
    _collect_state_dict(ema, "", state_dict)
    attributes = {
        k: v for k, v in state.items()
        if not k.startswith("_") and k != "training" and isinstance(v, (bool, int, float, str, type(None)))
    }
    dataset_kwargs = data.get("dataset_kwargs")
    return EDMSnapshot(
        path=path,
        precond_name=precond,
        init_kwargs=init_kwargs,
        state_dict=state_dict,
        model_name=model.short_name,
        attributes=attributes,
        dataset_kwargs=_plain(dataset_kwargs) if isinstance(dataset_kwargs, dict) else None,
        loss_fn=_class_name_of(data.get("loss_fn")),
        augment_pipe=_class_name_of(data.get("augment_pipe")),
        version=ema.version,
    )


def load_edm_pickle(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The snapshot's ``ema`` network, rebuilt by our own port and loaded strictly, in eval mode.

    Needs :func:`pipeline.networks.edm.build_edm_model` (the project's port of EDM's networks).
    """
    snapshot = read_edm_snapshot(path)
    try:
        from pipeline.networks.edm import build_edm_model
    except ImportError as exc:  # the port is written separately; say so instead of a bare ImportError
        raise EDMPickleError(
            f"{path}: building an EDM network needs pipeline.networks.edm.build_edm_model ({exc})"
        ) from exc
    model = build_edm_model(snapshot.precond_name, dict(snapshot.init_kwargs))
    model.load_state_dict(snapshot.state_dict, strict=True)
    return model.to(device).eval().requires_grad_(False)
