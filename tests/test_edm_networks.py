"""EDM's networks (SongUNet, DhariwalUNet) and preconditioners rebuilt: counts, names, formulas, outputs.

The strongest check, ``test_matches_edm_reference_outputs``, compares with outputs of NVlabs/edm's
own ``training/networks.py`` stored in ``tests/data/edm_reference.safetensors`` (inputs and
denoiser outputs only; the weights are the deterministic ``formula_state_dict`` below, applied to
EDM's model and ours alike). ``tests/data/make_edm_reference.py`` wrote the file, run outside the
repository next to a checkout of NVlabs/edm; no test needs EDM's code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pipeline.core.param_checks import ParamError
from pipeline.diffusion.preconditioners import KarrasPrecond, PRECONDITIONERS, VEPrecond, VPPrecond, iDDPMPrecond
from pipeline.networks.edm import NETWORKS, DhariwalUNet, SongUNet, build_edm_model, count_parameters

DATA = Path(__file__).parent / "data" / "edm_reference.safetensors"

# EDM's train.py presets (--arch=ddpmpp / ncsnpp / adm), as in the published snapshots' _init_kwargs.
CIFAR_DDPMPP = dict(
    img_resolution=32, img_channels=3, label_dim=0, use_fp16=False, model_type="SongUNet",
    embedding_type="positional", encoder_type="standard", decoder_type="standard", channel_mult_noise=1,
    resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2], augment_dim=9, dropout=0.13,
)  # fmt: skip
CIFAR_NCSNPP = dict(
    CIFAR_DDPMPP, embedding_type="fourier", encoder_type="residual", channel_mult_noise=2, resample_filter=[1, 3, 3, 1]
)
IMAGENET_ADM = dict(
    img_resolution=64, img_channels=3, label_dim=1000, use_fp16=True, model_type="DhariwalUNet",
    model_channels=192, channel_mult=[1, 2, 3, 4], dropout=0.1,
)  # fmt: skip

# Parameter counts measured with EDM's own code (random init) on these configurations.
EDM_COUNTS = {
    ("VPPrecond", "ddpmpp-cifar10"): 55_733_891,
    ("VEPrecond", "ncsnpp-cifar10"): 56_397_827,
    ("EDMPrecond", "adm-imagenet64"): 295_899_267,
}
CONFIGS = {"ddpmpp-cifar10": CIFAR_DDPMPP, "ncsnpp-cifar10": CIFAR_NCSNPP, "adm-imagenet64": IMAGENET_ADM}


def on_meta(precond: str, kwargs: dict) -> torch.nn.Module:
    """Build without allocating or initialising weights (shapes and names only)."""
    with torch.device("meta"):
        return build_edm_model(precond, kwargs)


@pytest.mark.parametrize("precond,config", list(EDM_COUNTS))
def test_parameter_counts_equal_edm(precond, config):
    model = on_meta(precond, CONFIGS[config])
    assert count_parameters(model) == EDM_COUNTS[(precond, config)]


def test_ddpmpp_cifar10_count_on_cpu():
    """The real (allocated, initialised) CIFAR-10 DDPM++ teacher network has EDM's 55,733,891 parameters."""
    torch.manual_seed(0)
    model = build_edm_model("VPPrecond", CIFAR_DDPMPP)
    assert count_parameters(model) == 55_733_891
    assert isinstance(model, VPPrecond) and isinstance(model.model, SongUNet)
    assert model.model.map_layer0.weight.abs().max() > 0


def test_parameter_and_buffer_names_are_edms():
    shapes = {k: tuple(v.shape) for k, v in on_meta("VPPrecond", CIFAR_DDPMPP).state_dict().items()}
    expected = {
        "model.map_augment.weight": (128, 9),
        "model.map_layer0.weight": (512, 128),
        "model.map_layer1.bias": (512,),
        "model.enc.32x32_conv.weight": (128, 3, 3, 3),
        "model.enc.32x32_block0.conv0.weight": (256, 128, 3, 3),
        "model.enc.32x32_block0.skip.weight": (256, 128, 1, 1),
        "model.enc.32x32_block0.affine.weight": (256, 512),
        "model.enc.16x16_down.conv0.resample_filter": (1, 1, 2, 2),
        "model.enc.16x16_down.skip.weight": (256, 256, 1, 1),
        "model.enc.16x16_block0.qkv.weight": (768, 256, 1, 1),
        "model.enc.16x16_block0.proj.bias": (256,),
        "model.dec.8x8_in0.norm2.weight": (256,),
        "model.dec.16x16_up.conv0.resample_filter": (1, 1, 2, 2),
        "model.dec.16x16_block4.qkv.weight": (768, 256, 1, 1),
        "model.dec.32x32_block0.conv0.weight": (256, 512, 3, 3),
        "model.dec.32x32_aux_norm.weight": (256,),
        "model.dec.32x32_aux_conv.weight": (3, 256, 3, 3),
    }
    for name, shape in expected.items():
        assert shapes.get(name) == shape, name
    assert "model.map_label.weight" not in shapes  # unconditional
    assert "model.dec.16x16_block0.qkv.weight" not in shapes  # decoder attention: last block of a level only

    ncsn = {k: tuple(v.shape) for k, v in on_meta("VEPrecond", CIFAR_NCSNPP).state_dict().items()}
    assert ncsn["model.map_noise.freqs"] == (128,)
    assert ncsn["model.enc.16x16_aux_residual.weight"] == (256, 3, 3, 3)  # from the image
    assert ncsn["model.enc.8x8_aux_residual.weight"] == (256, 256, 3, 3)
    assert ncsn["model.enc.16x16_aux_residual.resample_filter"] == (1, 1, 4, 4)

    adm = {k: tuple(v.shape) for k, v in on_meta("EDMPrecond", IMAGENET_ADM).state_dict().items()}
    assert adm["model.map_label.weight"] == (768, 1000)
    assert adm["model.enc.64x64_conv.weight"] == (192, 3, 3, 3)
    assert adm["model.enc.32x32_block0.affine.weight"] == (768, 768)  # scale and shift
    assert adm["model.dec.8x8_in0.qkv.weight"] == (2304, 768, 1, 1)
    assert adm["model.out_conv.weight"] == (3, 192, 3, 3)
    assert "model.map_label.bias" not in adm


def test_iddpm_has_u_buffer_and_two_output_halves():
    model = build_edm_model("iDDPMPrecond", dict(TINY_ADM, img_channels=2))
    assert model.state_dict()["u"].shape == (1001,)
    assert model.model.out_conv.weight.shape[0] == 4
    assert model.u[-1] == 0 and bool((model.u[:-1] > model.u[1:]).all())
    assert model.sigma_min == pytest.approx(float(model.u[999])) and model.sigma_max == pytest.approx(float(model.u[0]))
    # the published iDDPM range (EDM paper Table 1 footnote: sigma in [0.0064, 80+]; u_0 ~ 2e4 unclipped)
    assert model.sigma_min == pytest.approx(0.0064, abs=1e-4)


# --- small configurations of every variant run forward and backward ---------------------------------
TINY_SONG = dict(
    img_resolution=8, img_channels=3, model_type="SongUNet", model_channels=16, channel_mult=[1, 2],
    num_blocks=1, attn_resolutions=[4], dropout=0.1,
)  # fmt: skip
TINY_ADM = dict(
    img_resolution=8, img_channels=3, model_type="DhariwalUNet", model_channels=16, channel_mult=[1, 4],
    num_blocks=1, attn_resolutions=[4], dropout=0.1,
)  # fmt: skip
VARIANTS = {
    "ddpmpp-vp": ("VPPrecond", dict(TINY_SONG, label_dim=4, augment_dim=9)),
    "ncsnpp-ve": ("VEPrecond", dict(TINY_SONG, embedding_type="fourier", encoder_type="residual", channel_mult_noise=2,
                                    resample_filter=[1, 3, 3, 1])),
    "skip-skip-ve": ("VEPrecond", dict(TINY_SONG, label_dim=3, embedding_type="fourier", encoder_type="skip",
                                       decoder_type="skip", resample_filter=[1, 3, 3, 1])),
    "ddpmpp-edm-labeldrop": ("EDMPrecond", dict(TINY_SONG, label_dim=3, label_dropout=0.5, channel_mult_emb=2)),
    "adm-edm": ("EDMPrecond", dict(TINY_ADM, label_dim=5, augment_dim=9, label_dropout=0.2)),
    "adm-iddpm": ("iDDPMPrecond", dict(TINY_ADM)),
    "adm-vp-3blocks": ("VPPrecond", dict(TINY_ADM, num_blocks=3, channel_mult=[1, 2, 4], img_resolution=16)),
}


def randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Zero-initialised output layers would hide bugs: give every parameter random values."""
    formula_state_dict(model, seed=seed)
    return model


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_small_variants_forward_backward(variant):
    precond, kwargs = VARIANTS[variant]
    torch.manual_seed(0)
    model = randomised(build_edm_model(precond, kwargs))
    res, ch, label_dim = kwargs["img_resolution"], kwargs["img_channels"], kwargs.get("label_dim", 0)
    x = torch.randn(3, ch, res, res)
    sigma = torch.tensor([0.01, 1.0, 50.0])
    labels = torch.tensor([0, 1, 2]) if label_dim else None
    extra = {"augment_labels": torch.randn(3, kwargs["augment_dim"])} if kwargs.get("augment_dim") else {}
    model.train()
    d = model(x, sigma, labels, **extra)
    assert d.shape == x.shape and d.dtype == torch.float32 and torch.isfinite(d).all()
    d.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, sigma, labels, **extra), model(x, sigma, labels, **extra))  # eval: no dropout


def test_build_accepts_edm_defaults_and_records_kwargs():
    kwargs = dict(img_resolution=8, img_channels=3, model_channels=64, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    model = build_edm_model("EDMPrecond", kwargs)
    assert isinstance(model, KarrasPrecond) and isinstance(model.model, DhariwalUNet)  # EDM's default model_type
    assert model.edm_class_name == "EDMPrecond" and model.edm_init_kwargs["model_channels"] == 64
    assert (model.sigma_min, model.sigma_max, model.sigma_data) == (0, float("inf"), 0.5)
    ve = build_edm_model("VEPrecond", dict(TINY_SONG, sigma_min=0.01, sigma_max=50))
    assert (ve.sigma_min, ve.sigma_max) == (0.01, 50)
    assert set(PRECONDITIONERS) == {"VPPrecond", "VEPrecond", "iDDPMPrecond", "EDMPrecond"}
    assert set(NETWORKS) == {"SongUNet", "DhariwalUNet"}


@pytest.mark.parametrize(
    "precond,kwargs",
    [
        ("Precond", dict(TINY_SONG)),
        ("VPPrecond", dict(TINY_SONG, model_type="os.system")),
        ("VPPrecond", dict(TINY_SONG, not_a_keyword=1)),
        ("VPPrecond", dict(TINY_SONG, sigma_data=0.5)),  # EDMPrecond's keyword, not VP's
        ("VPPrecond", {k: v for k, v in TINY_SONG.items() if k != "img_channels"}),
    ],
)
def test_build_refuses_unknown_names_and_keywords(precond, kwargs):
    with pytest.raises(ParamError):
        build_edm_model(precond, kwargs)


def test_state_dict_round_trip_strict():
    precond, kwargs = VARIANTS["ncsnpp-ve"]
    a = randomised(build_edm_model(precond, kwargs), seed=1)
    b = build_edm_model(precond, kwargs)
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(a.eval()(x, 2.0), b.eval()(x, 2.0))


# --- the preconditioning formulas (EDM paper, Table 1) on a probe network ------------------------------
class Probe(torch.nn.Module):
    """A raw network that records what it is given and returns ``self.out`` (or its input)."""

    def __init__(self, out_channels: int = 1) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.out_channels = out_channels
        self.out: torch.Tensor | None = None

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        self.seen = (x, noise_labels, class_labels, augment_labels)
        out = x if self.out is None else self.out.expand(x.shape[0], -1, *x.shape[2:])
        return out.repeat(1, self.out_channels, 1, 1)


def coefficients(wrapper, sigma: torch.Tensor):
    """(c_skip, c_out, c_in, c_noise) measured through the probe, each [B]."""
    x = torch.full((len(sigma), 1, 2, 2), 3.0)
    probe = wrapper.model
    probe.out = torch.zeros(1, 1, 1, 1)
    c_skip = wrapper(x, sigma)[:, 0, 0, 0] / 3
    c_in = probe.seen[0][:, 0, 0, 0] / 3
    c_noise = probe.seen[1]
    probe.out = torch.ones(1, 1, 1, 1)
    c_out = wrapper(x, sigma)[:, 0, 0, 0] - 3 * c_skip
    probe.out = None
    return c_skip, c_out, c_in, c_noise


SIGMAS = torch.tensor([0.002, 0.05, 0.5, 1.0, 7.0, 80.0], dtype=torch.float64)


def close(a, b, rtol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), rtol=rtol, atol=1e-6)


def test_vp_formulas():
    w = VPPrecond(Probe(), img_resolution=2, img_channels=1)
    c_skip, c_out, c_in, c_noise = coefficients(w, SIGMAS.float())
    s = SIGMAS
    close(c_skip, torch.ones_like(s))
    close(c_out, -s)
    close(c_in, 1 / (s**2 + 1).sqrt())
    # c_noise = (M-1) t with sigma(t) = sigma: beta_d t^2/2 + beta_min t = ln(1 + sigma^2) (closed form, by hand)
    # (EDM evaluates log(1 + sigma^2) in float32: ~1% off at sigma = 0.002, hence the looser check there)
    t = (-0.1 + (0.1**2 + 2 * 19.9 * torch.log1p(s**2)).sqrt()) / 19.9
    close(c_noise[1:], 999 * t[1:], rtol=1e-4)
    close(c_noise[:1], 999 * t[:1], rtol=3e-2)
    # sigma(1) and sigma(eps_t) bound the schedule
    close(w.sigma_max, math.sqrt(math.exp(0.5 * 19.9 + 0.1) - 1))
    # sigma(eps_t) ~ 1e-3; EDM evaluates it in float32, which gives 2^-10 (cancellation in exp(.) - 1)
    assert w.sigma_min == pytest.approx(math.sqrt(math.expm1(0.5 * 19.9 * 1e-10 + 0.1 * 1e-5)), rel=0.03)
    close(w.sigma(w.sigma_inv(torch.tensor(2.5))), 2.5)


def test_ve_formulas():
    w = VEPrecond(Probe(), img_resolution=2, img_channels=1)
    c_skip, c_out, c_in, c_noise = coefficients(w, SIGMAS.float())
    close(c_skip, torch.ones_like(SIGMAS))
    close(c_out, SIGMAS)
    close(c_in, torch.ones_like(SIGMAS))
    close(c_noise, torch.log(0.5 * SIGMAS))
    assert (w.sigma_min, w.sigma_max) == (0.02, 100)


def test_karras_formulas():
    w = KarrasPrecond(Probe(), img_resolution=2, img_channels=1, sigma_data=0.5)
    c_skip, c_out, c_in, c_noise = coefficients(w, SIGMAS.float())
    s, sd = SIGMAS, 0.5
    close(c_skip, sd**2 / (s**2 + sd**2))
    close(c_out, s * sd / (s**2 + sd**2).sqrt())
    close(c_in, 1 / (s**2 + sd**2).sqrt())
    close(c_noise, s.log() / 4)


def test_iddpm_formulas():
    w = iDDPMPrecond(Probe(out_channels=2), img_resolution=2, img_channels=1)
    u = w.u.double()
    # u_{j-1}^2 + 1 = (u_j^2 + 1) / max(alpha_bar(j-1) / alpha_bar(j), C_1), alpha_bar(j) = sin^2(pi j / (2 M (C_2 + 1)))
    ab = lambda j: math.sin(0.5 * math.pi * j / 1000 / 1.008) ** 2  # noqa: E731
    for j in (1, 2, 500, 999, 1000):
        close(u[j - 1] ** 2 + 1, (u[j] ** 2 + 1) / max(ab(j - 1) / ab(j), 0.001), rtol=1e-4)
    sigma = torch.stack([u[999], u[700], u[3], u[500]]).float()
    c_skip, c_out, c_in, c_noise = coefficients(w, sigma)
    close(c_skip, torch.ones(4))
    close(c_out, -sigma)
    close(c_in, 1 / (sigma.double() ** 2 + 1).sqrt())
    close(c_noise, torch.tensor([0.0, 299.0, 996.0, 499.0]))
    # nearest discrete sigma: slightly off-grid values round to the grid
    close(w.round_sigma(u[700].float() * 1.001), u[700])
    assert w.round_sigma(torch.tensor([u[10].item()]), return_index=True).tolist() == [10]


# --- label and sigma conventions --------------------------------------------------------------------
def test_label_indices_equal_one_hot_and_none_is_zero_vector():
    precond, kwargs = VARIANTS["adm-edm"]
    model = randomised(build_edm_model(precond, kwargs)).eval()
    x, sigma = torch.randn(3, 3, 8, 8), torch.tensor([0.3, 2.0, 20.0])
    idx = torch.tensor([4, 0, 2])
    with torch.no_grad():
        d_idx = model(x, sigma, idx)
        d_hot = model(x, sigma, torch.nn.functional.one_hot(idx, 5).float())
        d_none = model(x, sigma, None)
        d_zero = model(x, sigma, torch.zeros(3, 5))
    assert torch.equal(d_idx, d_hot) and torch.equal(d_none, d_zero)
    assert not torch.allclose(d_idx, d_none)
    with pytest.raises(ValueError):
        model(x, sigma, torch.tensor([0, 1, 5]))
    # the raw network sees EDM's one-hot rows
    probe = KarrasPrecond(Probe(), img_resolution=2, img_channels=1, label_dim=4)
    probe(torch.zeros(2, 1, 2, 2), 1.0, torch.tensor([3, 1]))
    assert probe.model.seen[2].tolist() == [[0, 0, 0, 1], [0, 1, 0, 0]]


@pytest.mark.parametrize("variant", ["ddpmpp-vp", "adm-iddpm"])
def test_scalar_sigma_equals_batch_sigma(variant):
    precond, kwargs = VARIANTS[variant]
    model = randomised(build_edm_model(precond, kwargs)).eval()
    x = torch.randn(2, 3, 8, 8)
    labels = torch.tensor([1, 2]) if kwargs.get("label_dim") else None
    with torch.no_grad():
        batch = model(x, torch.tensor([1.5, 1.5]), labels)
        for s in (1.5, torch.tensor(1.5), torch.tensor([1.5])):
            # a scalar sigma broadcasts one embedding row (as in EDM): equal up to GEMM round-off
            torch.testing.assert_close(model(x, s, labels), batch, rtol=1e-5, atol=1e-5 * float(batch.abs().max()))
    with pytest.raises(ValueError):
        model(x, torch.tensor([1.0, 2.0, 3.0]), labels)


def test_unconditional_wrapper_ignores_labels():
    precond, kwargs = VARIANTS["ncsnpp-ve"]
    model = randomised(build_edm_model(precond, kwargs)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x, 1.0, torch.tensor([3, 7])), model(x, 1.0))


# --- outputs of EDM's own code ----------------------------------------------------------------------
# Each case: (EDM preconditioner, its constructor keywords). The reference file holds, per case, the
# inputs (x, sigma, labels, augment_labels) and EDM's outputs with the formula weights below.
REFERENCE_CASES = {
    "vp_ddpmpp": ("VPPrecond", dict(TINY_SONG, label_dim=4, augment_dim=9, embedding_type="positional", encoder_type="standard",
                                    decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1])),
    "ve_ncsnpp": ("VEPrecond", dict(TINY_SONG, augment_dim=9, embedding_type="fourier", encoder_type="residual",
                                    decoder_type="standard", channel_mult_noise=2, resample_filter=[1, 3, 3, 1])),
    "ve_skip": ("VEPrecond", dict(TINY_SONG, label_dim=3, embedding_type="fourier", encoder_type="skip", decoder_type="skip",
                                  channel_mult_noise=2, resample_filter=[1, 3, 3, 1])),
    "edm_adm": ("EDMPrecond", dict(TINY_ADM, label_dim=5, augment_dim=9)),
    "iddpm_adm": ("iDDPMPrecond", dict(TINY_ADM)),
}  # fmt: skip


def formula_state_dict(model: torch.nn.Module, seed: int = 0) -> None:
    """Overwrite every parameter and buffer (but FIR filters and iDDPM's u) with a fixed formula.

    sin of an affine function of the element index, computed in float64: the same values on any
    machine and torch version, so reference outputs need no stored weights. Matrices are scaled
    by sqrt(2 / fan_in), norm weights are 1 + 0.2 sin, other vectors 0.2 sin, Fourier frequencies 4 sin.
    """
    with torch.no_grad():
        for i, (name, t) in enumerate(model.state_dict().items()):
            if name.endswith("resample_filter") or name == "u":
                continue
            n = t.numel()
            wave = torch.sin(0.7 * torch.arange(n, dtype=torch.float64) + 1.3 * i + 0.1 + 0.37 * seed).reshape(t.shape)
            if t.ndim > 1:
                wave = wave * math.sqrt(2 / (n // t.shape[0]))
            elif name.endswith("freqs"):
                wave = 4 * wave
            elif "norm" in name.rsplit(".", 2)[-2] and name.endswith("weight"):
                wave = 1 + 0.2 * wave
            else:
                wave = 0.2 * wave
            t.copy_(wave.to(t.dtype))


def reference_inputs(case: str, kwargs: dict) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(sorted(REFERENCE_CASES).index(case))
    res, ch, label_dim = kwargs["img_resolution"], kwargs["img_channels"], kwargs.get("label_dim", 0)
    sigma = torch.tensor([0.01, 0.6, 3.0, 40.0])
    out = {"x": torch.randn(4, ch, res, res, generator=g) * (1 + sigma.reshape(-1, 1, 1, 1)), "sigma": sigma}
    if label_dim:
        out["labels"] = torch.randint(0, label_dim, (4,), generator=g)
    if kwargs.get("augment_dim"):
        out["augment_labels"] = torch.randn(4, kwargs["augment_dim"], generator=g)
    return out


@pytest.mark.skipif(not DATA.exists(), reason="reference outputs of EDM's code not present")
@pytest.mark.parametrize("case", list(REFERENCE_CASES))
def test_matches_edm_reference_outputs(case):
    from safetensors import safe_open

    precond, kwargs = REFERENCE_CASES[case]
    with safe_open(str(DATA), "pt") as f:
        meta = json.loads(f.metadata()["cases"])
        stored = {k.split(".", 1)[1]: f.get_tensor(k) for k in f.keys() if k.startswith(case + ".")}
    assert meta[case] == [precond, kwargs]
    model = build_edm_model(precond, kwargs)
    formula_state_dict(model)
    model.eval()
    extra = {"augment_labels": stored["augment_labels"]} if "augment_labels" in stored else {}
    with torch.no_grad():
        d = model(stored["x"], stored["sigma"], stored.get("labels"), **extra)
        torch.testing.assert_close(d, stored["D"], rtol=1e-5, atol=2e-6 * float(stored["D"].abs().max()))
        if "D_uncond" in stored:
            d_u = model(stored["x"], stored["sigma"], None, **extra)
            torch.testing.assert_close(d_u, stored["D_uncond"], rtol=1e-5, atol=2e-6 * float(stored["D_uncond"].abs().max()))
        if "u" in stored:
            # iDDPM's u table is a float64 recursion: its last bits depend on the CPU's math library
            torch.testing.assert_close(model.u, stored["u"], rtol=1e-6, atol=0)
