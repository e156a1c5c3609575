"""The project's own pixel-space rectified-flow teacher (teacher.objective: flow; pipeline.networks.flow.PixelFlow):
its training loss is the velocity loss, its D is x_tau - tau F(x_tau, 1000 tau), its checkpoint loads back as a flow
teacher whose samplers and evaluation run on the flow schedule from sigma = inf. (The whole SFD path through
`dvc repro` on it: the flow-digits case of tests/test_byo_presets.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config.params import parse_params
from pipeline.data.datasets import load_digits_dataset
from pipeline.diffusion.sampling import generate
from pipeline.diffusion.solvers import CountingDenoiser
from pipeline.networks.flow import PixelFlow
from pipeline.networks.unet import build_network
from pipeline.teachers.loader import load_teacher
from pipeline.teachers.training import TeacherParams, edm_loss, train_teacher

TINY = {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": []}


def test_the_flow_objective_is_the_velocity_loss():
    """lambda(sigma) ||D - y||^2 with lambda = ((1 + sigma) / sigma)^2 equals ||v_theta - (eps - y)||^2, where
    x_tau = (1 - tau) y + tau eps, tau = sigma / (1 + sigma) and ln sigma = logit tau ~ N(P_mean, P_std^2)."""
    torch.manual_seed(0)
    model = PixelFlow(build_network(**TINY, img_resolution=8, in_channels=1, label_dim=0))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the U-Net's output layer starts at zero
    y = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    with torch.no_grad():
        loss = edm_loss(model, y, None, P_mean=0.0, P_std=1.0, generator=torch.Generator().manual_seed(7))
        g = torch.Generator().manual_seed(7)  # the same draws: ln sigma, then the noise n = sigma eps
        sigma = torch.randn((16,), generator=g).exp()
        eps = torch.randn(y.shape, generator=g)
        tau = (sigma / (1 + sigma))[:, None, None, None]
        x_tau = (1 - tau) * y + tau * eps
        v = model.net(x_tau, 1000 * tau.flatten(), None)
        by_hand = ((v - (eps - y)) ** 2).mean()
    assert float(loss) == pytest.approx(float(by_hand), rel=1e-4)


@pytest.fixture(scope="module")
def flow_teacher(tmp_path_factory):
    images, labels = load_digits_dataset()
    out = tmp_path_factory.mktemp("flow") / "teacher"
    p = TeacherParams.from_dict({"network": TINY, "objective": "flow", "P_mean": 0.0, "P_std": 1.0, "batch_size": 32,
                                 "steps": 3, "lr_rampup_steps": 0, "checkpoint_every": 3, "device": "cpu"})
    train_teacher(p, images[:128], labels[:128], 10, out, progress=False)
    return out


def test_trained_flow_teacher_loads_as_a_flow_teacher(flow_teacher):
    teacher = load_teacher(flow_teacher)
    assert isinstance(teacher.model, PixelFlow) and teacher.config["precond"] == "flow"
    assert teacher.flow_shift == 1.0 and teacher.spec_options()["flow_shift"] == 1.0
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 3, 5, 9])
    with torch.no_grad():
        for sigma in (math.inf, 4.0, 0.05):
            tau = 1.0 if math.isinf(sigma) else sigma / (1 + sigma)
            x_tau = x if math.isinf(sigma) else x / (1 + sigma)
            hand = x_tau - tau * teacher.model.net(x_tau, torch.full((4,), 1000 * tau), labels)
            torch.testing.assert_close(teacher.denoiser(x, torch.full((4,), sigma), labels), hand, rtol=1e-6, atol=1e-6)
    spec = teacher.sampler_spec()  # a flow teacher's default sampler: the flow schedule from sigma = inf
    assert spec.schedule.kind == "flow" and math.isinf(float(spec.schedule.t_steps()[0]))


def test_evaluation_of_a_flow_teacher_runs_on_flow_schedules(flow_teacher):
    """The evaluation's specs are fitted to the flow teacher (its shift; every other kind refused); their NFE is what
    the sampler spends (Heun's last step to the data is Euler)."""
    teacher = load_teacher(flow_teacher)
    ev = parse_params({"evaluate": {"solvers": ["euler", "dpmpp3m"], "nfes": [2, 3], "schedule": {"kind": "flow"},
                                    "reference": {"solver": "heun", "num_steps": 6, "kind": "flow"}}}).evaluate
    specs = ev.solver_specs(teacher.alphas_cumprod, teacher.flow_shift)
    ref = ev.reference_spec(teacher.alphas_cumprod, teacher.flow_shift)
    assert sorted(specs) == ["dpmpp3m/nfe2", "dpmpp3m/nfe3", "euler/nfe2", "euler/nfe3"] and ref.nfe == 9
    for spec in [*specs.values(), ref]:
        counting = CountingDenoiser(teacher.denoiser)
        x = generate(counting, [0, 1], (1, 8, 8), spec, labels=torch.tensor([1, 2]))
        assert counting.calls == spec.nfe and torch.isfinite(x).all()
    default = parse_params({"evaluate": {}}).evaluate
    with pytest.raises(Exception, match="evaluate.schedule.kind: 'polynomial' starts at a finite t_max"):
        default.solver_specs(None, teacher.flow_shift)
