"""The safe reader of NVlabs/edm snapshot pickles (pipeline/teachers/edm_pickle.py).

Most tests write a snapshot in EDM's format here, with no EDM code: small torch modules of our own
whose ``__reduce__`` follows EDM's persistence protocol (a call of
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with ``module_src``, ``class_name``,
``version`` and ``state``), pickled while stand-in modules ``torch_utils.persistence`` and
``dnnlib.util`` sit in ``sys.modules`` (removed right after the dump). Their ``module_src`` writes a
marker file if it were ever run. One test writes our own port of EDM's networks in that format and
reads it back with ``load_edm_pickle``. (The reader was also checked against snapshots written by
EDM's own code, outside this repository; no EDM code or source text is stored here.)
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
import pickle
import pickletools
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.core.param_checks import PipelineError
from pipeline.teachers.edm_pickle import (
    ALLOWED_GLOBALS,
    EDMPickleError,
    EDMPickleMissing,
    EDMSnapshot,
    UnsafePickleError,
    read_edm_snapshot,
)

FOREIGN_MODULES = ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util", "training", "training.networks")


# ----------------------------------------------------------------------------- EDM-format writer


def _reconstruct_persistent_obj(meta):  # pickled by reference as torch_utils.persistence._reconstruct_persistent_obj
    raise AssertionError("the stand-in is only ever pickled, never called")


_reconstruct_persistent_obj.__module__ = "torch_utils.persistence"


class EasyDict(dict):  # pickled by reference as dnnlib.util.EasyDict
    pass


EasyDict.__module__ = "dnnlib.util"
EasyDict.__qualname__ = "EasyDict"


@contextlib.contextmanager
def edm_globals():
    """Let pickle write EDM's global names: stand-in modules, present during the dump only."""
    persistence = types.ModuleType("torch_utils.persistence")
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    util = types.ModuleType("dnnlib.util")
    util.EasyDict = EasyDict
    fakes = {
        "torch_utils": types.ModuleType("torch_utils"),
        "torch_utils.persistence": persistence,
        "dnnlib": types.ModuleType("dnnlib"),
        "dnnlib.util": util,
    }
    assert not set(fakes) & set(sys.modules)
    sys.modules.update(fakes)
    try:
        yield
    finally:
        for name in fakes:
            del sys.modules[name]


class Persistent(nn.Module):
    """Pickles like an EDM persistent class: the state travels in meta, beside module_src."""

    edm_class_name = "?"
    module_src = ""

    def __init__(self, **init_kwargs):
        super().__init__()
        self._init_args = ()
        self._init_kwargs = EasyDict(init_kwargs)

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src=self.module_src, class_name=self.edm_class_name,
                    state=dict(self.__dict__))
        return (_reconstruct_persistent_obj, (meta,))


class Conv(Persistent):
    edm_class_name = "Conv2d"

    def __init__(self, cin, cout, filt=False):
        super().__init__(in_channels=cin, out_channels=cout)
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3))
        self.bias = nn.Parameter(torch.randn(cout)) if cout > 2 else None  # None parameters are skipped
        self.register_buffer("resample_filter", torch.tensor([[1.0, 1.0]]) if filt else None)


class TinyUNet(Persistent):
    edm_class_name = "SongUNet"

    def __init__(self, **kw):
        super().__init__(**kw)
        self.register_buffer("freqs", torch.randn(4) * 16)
        self.register_buffer("scratch", torch.ones(3), persistent=False)  # not in state_dict
        self.enc = nn.ModuleDict({"8x8_conv": Conv(3, 4, filt=True), "8x8_block0": Conv(4, 2)})
        self.dec = nn.ModuleDict()
        self.dec["8x8_aux_conv"] = Conv(4, 3)
        self.map_label = None
        self.fp16_gain = nn.Parameter(torch.randn(2, 3, dtype=torch.float16))
        self.strided = nn.Parameter(torch.randn(6, 4).t())  # non-contiguous storage view


class TinyPrecond(Persistent):
    edm_class_name = "VPPrecond"

    def __init__(self, **kw):
        super().__init__(img_resolution=8, img_channels=3, label_dim=0, use_fp16=False, model_type="SongUNet", **kw)
        self.img_resolution, self.sigma_min, self.M = 8, 0.002, 1000
        self.model = TinyUNet(img_resolution=8, in_channels=3, out_channels=3, **kw)


class Loss(Persistent):
    edm_class_name = "VPLoss"


class Exploit:
    """Reduces to a call of ``func(*args)``: what a malicious pickle would contain."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def marker_src(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('module_src ran')\n"


def make_precond(marker: Path, cls=TinyPrecond) -> nn.Module:
    torch.manual_seed(0)
    Persistent.module_src = marker_src(marker)  # shared by every class, as one module's source
    net = cls(model_channels=4, channel_mult=[1, 2], resample_filter=[1, 1], dropout=0.13)
    return net.eval().requires_grad_(False)


def write_snapshot(path: Path, *, ema=None, marker: Path | None = None, protocol: int = 4, **entries) -> nn.Module:
    marker = marker or path.with_suffix(".ran")
    ema = make_precond(marker) if ema is None else ema
    data = dict(ema=ema, loss_fn=Loss(), augment_pipe=None,
                dataset_kwargs=EasyDict(path="cifar10.zip", use_labels=False, resolution=8, max_size=np.int64(64)))
    data.update(entries)
    data = {k: v for k, v in data.items() if v is not _DROP}
    with edm_globals():
        path.write_bytes(pickle.dumps(data, protocol=protocol))
    return ema


_DROP = object()


def globals_in(data: bytes) -> set[str]:
    """The module.name globals a pickle names (GLOBAL, or STACK_GLOBAL on the two values pushed last)."""
    found, pushed, memo = set(), [], {}
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            pushed.append(arg)
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            pushed.append(memo.get(arg))
        elif op.name == "MEMOIZE":
            memo[len(memo)] = pushed[-1]
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = pushed[-1]
        elif op.name == "STACK_GLOBAL":
            found.add(f"{pushed[-2]}.{pushed[-1]}")
            pushed.append(None)
        elif op.name == "GLOBAL":
            found.add(arg.replace(" ", "."))
            pushed.append(None)
        elif op.name != "FRAME":
            pushed.append(None)  # some other value (close enough for naming the globals)
    return found


def rename_global_string(data: bytes, old: str, new: str) -> bytes:
    """Rewrite one string of a pickle, dropping FRAME opcodes (framing is optional)."""
    out = io.BytesIO()
    ops = list(pickletools.genops(data))
    for i, (op, arg, pos) in enumerate(ops):
        end = ops[i + 1][2] if i + 1 < len(ops) else len(data)
        if op.name == "FRAME":
            continue
        if op.name == "SHORT_BINUNICODE" and arg == old:
            enc = new.encode()
            out.write(b"\x8c" + bytes([len(enc)]) + enc)
        else:
            out.write(data[pos:end])
    return out.getvalue()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and a.contiguous().view(torch.uint8).flatten().tolist() == b.contiguous().view(torch.uint8).flatten().tolist())


# ----------------------------------------------------------------------------- tests


def test_reads_an_emulated_snapshot_without_running_module_src(tmp_path):
    path, marker = tmp_path / "network-snapshot-000000.pkl", tmp_path / "ran.txt"
    ema = write_snapshot(path, marker=marker)
    raw = path.read_bytes()
    assert marker_src(marker).encode() in raw  # the side effect is in the file...
    assert globals_in(raw) <= {f"{m}.{n}" for m, n in ALLOWED_GLOBALS}
    assert "torch_utils.persistence._reconstruct_persistent_obj" in globals_in(raw)

    snap = read_edm_snapshot(path)

    assert not marker.exists()  # ...and never ran
    assert not set(FOREIGN_MODULES) & set(sys.modules)
    assert isinstance(snap, EDMSnapshot)
    assert snap.precond_name == "VPPrecond" and snap.model_name == "SongUNet" and snap.version == 6
    assert snap.init_kwargs == dict(img_resolution=8, img_channels=3, label_dim=0, use_fp16=False,
                                    model_type="SongUNet", model_channels=4, channel_mult=[1, 2],
                                    resample_filter=[1, 1], dropout=0.13)
    assert type(snap.init_kwargs) is dict
    assert snap.attributes == dict(img_resolution=8, sigma_min=0.002, M=1000)
    assert snap.loss_fn == "VPLoss" and snap.augment_pipe is None

    expected = ema.state_dict()
    assert list(snap.state_dict) == list(expected)  # EDM's dotted names, torch's order
    assert "model.scratch" not in snap.state_dict and "model.enc.8x8_block0.bias" not in snap.state_dict
    assert "model.enc.8x8_conv.resample_filter" in snap.state_dict
    for key, tensor in expected.items():
        got = snap.state_dict[key]
        assert type(got) is torch.Tensor and not got.requires_grad
        assert same_bits(got, tensor), key
        assert got.stride() == tensor.stride(), key
    assert snap.numel == sum(t.numel() for t in expected.values())


def test_dataset_kwargs_easydict_and_numpy_scalar_load_as_plain_data(tmp_path):
    path = tmp_path / "snap.pkl"
    write_snapshot(path)
    snap = read_edm_snapshot(path)
    assert type(snap.dataset_kwargs) is dict
    assert snap.dataset_kwargs == dict(path="cifar10.zip", use_labels=False, resolution=8, max_size=64)
    assert isinstance(snap.dataset_kwargs["max_size"], np.int64)


def test_numpy_1x_scalar_spelling_loads(tmp_path):
    path = tmp_path / "snap.pkl"
    write_snapshot(path)
    raw = path.read_bytes()
    assert "numpy._core.multiarray.scalar" in globals_in(raw)
    old = rename_global_string(raw, "numpy._core.multiarray", "numpy.core.multiarray")
    assert "numpy.core.multiarray.scalar" in globals_in(old) and "numpy._core.multiarray.scalar" not in globals_in(old)
    path.write_bytes(old)
    snap = read_edm_snapshot(path)
    assert snap.dataset_kwargs["max_size"] == 64 and isinstance(snap.dataset_kwargs["max_size"], np.int64)


@pytest.mark.parametrize("func", [os.system, eval, exec], ids=["os.system", "eval", "exec"])
def test_a_foreign_global_is_refused_and_nothing_runs(tmp_path, func):
    path, marker = tmp_path / "evil.pkl", tmp_path / "evil-ran.txt"
    if func is os.system:
        payload = Exploit(os.system, f"touch {marker}")
    else:
        payload = Exploit(func, f"open({str(marker)!r}, 'w').write('x')")
    write_snapshot(path, dataset_kwargs=EasyDict(path="x.zip", hook=payload))
    name = f"{func.__module__}.{func.__name__}"  # os.system is written as posix.system on Linux
    with pytest.raises(UnsafePickleError) as info:
        read_edm_snapshot(path)
    assert name in str(info.value)
    assert isinstance(info.value, PipelineError)
    assert not marker.exists()


def test_a_foreign_class_in_the_network_is_refused(tmp_path):
    path = tmp_path / "snap.pkl"
    ema = make_precond(tmp_path / "ran")
    ema.model.extra = nn.Linear(2, 2)  # a torch class outside the allow-list
    write_snapshot(path, ema=ema)
    with pytest.raises(UnsafePickleError, match=r"torch\.nn\.modules\.linear\.Linear"):
        read_edm_snapshot(path)


def _build_on_global(module: str, name: str, attr: str, slot_state: bool) -> bytes:
    """A hand-written pickle: push the global, then BUILD with {attr: ()} (as __dict__ or slot state)."""
    enc = attr.encode()
    state = b"}X" + len(enc).to_bytes(4, "little") + enc + b")s"  # EMPTY_DICT, key, EMPTY_TUPLE, SETITEM
    state = b"N" + state + b"\x86" if slot_state else state  # (None, slotstate) via TUPLE2
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + state + b"b."  # BUILD, STOP


@pytest.mark.parametrize("slot_state", [True, False], ids=["slotstate", "dictstate"])
@pytest.mark.parametrize(
    "module,name,attr",
    [("torch._utils", "_rebuild_tensor_v2", "__defaults__"),
     ("torch_utils.persistence", "_reconstruct_persistent_obj", "__defaults__"),
     ("dnnlib.util", "EasyDict", "__getattr__"),
     ("torch.nn.modules.container", "ModuleDict", "__setstate__"),
     ("collections", "OrderedDict", "__init__"),
     ("numpy", "dtype", "__new__")],
)
def test_a_build_on_an_allowed_global_cannot_alter_it(tmp_path, module, name, attr, slot_state):
    path = tmp_path / "tamper.pkl"
    path.write_bytes(_build_on_global(module, name, attr, slot_state))
    with pytest.raises(PipelineError):
        read_edm_snapshot(path)
    write_snapshot(tmp_path / "ok.pkl")
    assert read_edm_snapshot(tmp_path / "ok.pkl").precond_name == "VPPrecond"  # still intact


def test_storages_saved_on_a_gpu_load_on_the_cpu():
    """A storage's legacy torch.save stream records its device; it is mapped to the CPU."""
    load = ALLOWED_GLOBALS[("torch.storage", "_load_from_bytes")]
    t = torch.randn(5, dtype=torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage is deprecated (but it is what tensors pickle)
        func, (blob,) = t._typed_storage().__reduce__()
    assert func is torch.storage._load_from_bytes
    cpu = b"X\x03\x00\x00\x00cpu"
    assert blob.count(cpu) == 1
    storage = load(blob.replace(cpu, b"X\x06\x00\x00\x00cuda:0"))
    assert storage._untyped_storage.device.type == "cpu" and storage.dtype == torch.float16
    assert torch.equal(torch.tensor([], dtype=torch.float16).set_(storage._untyped_storage), t)


def test_missing_file_names_it_and_where_snapshots_come_from(tmp_path):
    path = tmp_path / "edm-cifar10-32x32-uncond-vp.pkl"
    with pytest.raises(EDMPickleMissing) as info:
        read_edm_snapshot(path)
    assert str(path) in str(info.value) and "train.py" in str(info.value)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, PipelineError)


def test_not_a_pickle(tmp_path):
    text = tmp_path / "notes.pkl"
    text.write_text("hello")
    with pytest.raises(EDMPickleError, match="not a pickle"):
        read_edm_snapshot(text)
    zipped = tmp_path / "weights.pkl"
    torch.save({"w": torch.ones(1)}, zipped)
    with pytest.raises(EDMPickleError, match="zip"):
        read_edm_snapshot(zipped)
    truncated = tmp_path / "truncated.pkl"
    write_snapshot(truncated)
    truncated.write_bytes(truncated.read_bytes()[:3000])
    with pytest.raises(EDMPickleError, match="could not read"):
        read_edm_snapshot(truncated)


def test_no_ema_entry(tmp_path):
    path = tmp_path / "snap.pkl"
    write_snapshot(path, ema=_DROP)
    with pytest.raises(EDMPickleError, match="no 'ema' entry.*loss_fn"):
        read_edm_snapshot(path)
    listing = tmp_path / "list.pkl"
    listing.write_bytes(pickle.dumps([1, 2, 3], protocol=4))
    with pytest.raises(EDMPickleError, match="expected a dict"):
        read_edm_snapshot(listing)


def test_other_class_than_a_preconditioner(tmp_path):
    class StyleGANGenerator(TinyPrecond):
        edm_class_name = "Generator"

    path = tmp_path / "snap.pkl"
    write_snapshot(path, ema=make_precond(tmp_path / "ran", cls=StyleGANGenerator))
    with pytest.raises(EDMPickleError, match="Generator.*VPPrecond, VEPrecond, iDDPMPrecond, EDMPrecond"):
        read_edm_snapshot(path)


def test_the_module_never_runs_pickle_code():
    """No pickle.load(s), no exec/eval/compile/__import__, and every torch.load has weights_only=True."""
    src = (Path(__file__).resolve().parents[1] / "pipeline" / "teachers" / "edm_pickle.py").read_text()
    torch_loads = 0
    for node in ast.walk(ast.parse(src)):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
        owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
        if isinstance(f, ast.Name) or owner in ("builtins", "importlib"):
            assert name not in ("exec", "eval", "compile", "__import__", "import_module"), ast.unparse(node)
        assert not (owner == "pickle" and name in ("load", "loads")), ast.unparse(node)
        if owner == "torch" and name == "load":
            torch_loads += 1
            kw = {k.arg: k.value for k in node.keywords}
            assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
    assert torch_loads == 1


def write_port_snapshot(path: Path, model: nn.Module, marker: Path) -> None:
    """Our port of EDM's networks pickled the way EDM's persistence writes its classes: every network class
    a ``_reconstruct_persistent_obj(meta)`` call with EDM's class name, the state and a module_src."""
    from pipeline.diffusion import preconditioners
    from pipeline.networks import edm

    ours = tuple(c for mod in (edm, preconditioners) for c in vars(mod).values()
                 if isinstance(c, type) and issubclass(c, nn.Module) and c.__module__ == mod.__name__)

    class EDMFormat(pickle.Pickler):
        def reducer_override(self, obj):
            if not isinstance(obj, ours):
                return NotImplemented
            state = dict(obj.__dict__)
            if hasattr(obj, "edm_init_kwargs"):
                state["_init_kwargs"] = EasyDict(obj.edm_init_kwargs)
            name = {"KarrasPrecond": "EDMPrecond"}.get(type(obj).__name__, type(obj).__name__)
            meta = dict(type="class", version=6, module_src=marker_src(marker), class_name=f"training.networks.{name}",
                        state=state)
            return (_reconstruct_persistent_obj, (meta,))

    buf = io.BytesIO()
    with edm_globals():
        EDMFormat(buf, protocol=4).dump(dict(ema=model, loss_fn=None, augment_pipe=None,
                                             dataset_kwargs=EasyDict(resolution=8)))
    path.write_bytes(buf.getvalue())


@pytest.mark.parametrize("precond", ["VPPrecond", "VEPrecond", "EDMPrecond"])
def test_load_edm_pickle_rebuilds_our_port_bit_for_bit(tmp_path, precond):
    """A snapshot of our DDPM++-style port in EDM's format loads through the allow-list into the same network:
    the same state dict and the same outputs, bit for bit; module_src never runs."""
    from pipeline.networks.edm import build_edm_model
    from pipeline.teachers.edm_pickle import load_edm_pickle

    kw = dict(img_resolution=8, img_channels=3, label_dim=0, use_fp16=False, model_type="SongUNet", model_channels=4,
              channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], resample_filter=[1, 1], augment_dim=9,
              dropout=0.13)
    torch.manual_seed(0)
    model = build_edm_model(precond, kw).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # EDM zero-initialises some layers: make every weight matter
    path, marker = tmp_path / "port.pkl", tmp_path / "ran.txt"
    write_port_snapshot(path, model, marker)
    assert globals_in(path.read_bytes()) <= {f"{m}.{n}" for m, n in ALLOWED_GLOBALS}

    loaded = load_edm_pickle(path)

    assert not marker.exists() and not set(FOREIGN_MODULES) & set(sys.modules)
    assert type(loaded) is type(model) and list(loaded.state_dict()) == list(model.state_dict())
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 4.0])
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma), model(x, sigma))
        aug = torch.randn(2, 9)
        assert torch.equal(loaded(x, sigma, augment_labels=aug), model(x, sigma, augment_labels=aug))
