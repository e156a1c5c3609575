"""The model-family registry: every built-in family owns its model.json, and a new family is one class and one
registry line. The toy family here is docs/adding-a-model-family.md's example: it is registered, saved as a
teacher checkpoint and run through the generic code (teacher loading, trajectories, SFD distillation, the
distilled checkpoint) with nothing else changed."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from pipeline.config.params import parse_params
from pipeline.core.checkpoints import CheckpointError, save_checkpoint
from pipeline.core.param_checks import ParamError
from pipeline.distill.sfd import run_distill_stage
from pipeline.teachers import families
from pipeline.teachers.content import teacher_content_hash
from pipeline.teachers.families import ModelFamily, StepConditionOptions, TeacherFacts, family_for_config
from pipeline.teachers.families.base import load_exact
from pipeline.teachers.loader import load_student, load_teacher
from pipeline.trajectories.generation import run_trajectories_stage


# ---- the toy family (docs/adding-a-model-family.md) ----------------------------------------------------------
class ToyDenoiser(nn.Module):
    """D(x, sigma) = c_skip x + c_out (w c_in x + b), one w and b per channel (EDM's preconditioning)."""

    def __init__(self, channels: int, resolution: int, sigma_data: float = 0.5) -> None:
        super().__init__()
        self.channels, self.resolution, self.sigma_data = channels, resolution, sigma_data
        self.w = nn.Parameter(torch.full((channels, 1, 1), 0.5))
        self.b = nn.Parameter(torch.zeros(channels, 1, 1))

    def forward(self, x: torch.Tensor, sigma: Any, labels: Any = None, **kwargs: Any) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
        sd = self.sigma_data
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        c_in = 1 / (s**2 + sd**2).sqrt()
        return c_skip * x + c_out * (self.w * c_in * x + self.b)

    # the distillation interface every family's network has
    step_condition = False

    def checkpoint_module(self) -> nn.Module:
        return self

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        return self.state_dict()

    def checkpoint_architecture(self) -> dict[str, Any]:
        return {"architecture": "toy", "toy": {"channels": self.channels, "resolution": self.resolution,
                                               "sigma_data": self.sigma_data}}


class ToyFamily(ModelFamily):
    name = "toy"
    architecture = "toy"

    def claims_config(self, config: dict[str, Any]) -> bool:
        return config.get("architecture") == "toy"

    def build(self, config: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> nn.Module:
        model = self.fresh(config)
        load_exact(model, tensors, f"{where} does not match its toy config")
        return model

    def fresh(self, config: dict[str, Any]) -> nn.Module:
        return ToyDenoiser(**config["toy"])

    def facts(self, model: nn.Module, config: dict[str, Any]) -> TeacherFacts:
        return TeacherFacts([model.channels, model.resolution, model.resolution], 0, {"toy": config["toy"]}, {})

    def architecture_section(self, config: dict[str, Any]) -> dict[str, Any]:
        return {"architecture": "toy", "toy": copy.deepcopy(config["toy"])}

    def student_copy(self, teacher: Any, options: StepConditionOptions, device: str | torch.device) -> nn.Module:
        if options.enabled:
            raise ParamError("step_condition: the toy family has no step-conditioned form")
        return copy.deepcopy(teacher.model).to(device).train().requires_grad_(True)


@pytest.fixture
def toy_family():
    families.register_family(ToyFamily())
    yield
    families.unregister_family("toy")


def save_toy_teacher(directory: Path) -> Path:
    model = ToyDenoiser(channels=1, resolution=4)
    with torch.no_grad():
        model.w.fill_(0.8)
        model.b.fill_(0.1)
    config = {**model.checkpoint_architecture(), "data": {"sample_shape": [1, 4, 4], "num_classes": 0},
              "sampler": None, "provenance": {"kind": "teacher"}}
    save_checkpoint(directory, model.state_dict(), config)
    return directory


SCHEDULE = {"kind": "polynomial", "num_steps": 4, "t_min": 0.006, "t_max": 80.0, "rho": 7.0}


def test_toy_family_runs_through_the_generic_pipeline(toy_family, tmp_path):
    ckpt = save_toy_teacher(tmp_path / "teacher")
    teacher = load_teacher(ckpt)
    assert teacher.description["toy"] == {"channels": 1, "resolution": 4, "sigma_data": 0.5}
    assert teacher.sample_shape == (1, 4, 4) and teacher.num_classes == 0
    assert teacher.weights_hash == teacher_content_hash(teacher.model)
    x = torch.randn(2, 1, 4, 4)
    c_skip, c_out, c_in = 0.25 / 1.25, 0.5 / 1.25**0.5, 1 / 1.25**0.5  # sigma = 1, sigma_data = 0.5
    torch.testing.assert_close(teacher.denoiser(x, 1.0), c_skip * x + c_out * (0.8 * c_in * x + 0.1), rtol=1e-6, atol=1e-6)

    params = parse_params({
        "loss": "l1",
        "trajectories": {"seeds": "0-31", "chunk_size": 16, "batch_size": 32, "M": 1, "schedule": SCHEDULE},
        "distill": {"kimg": 0.032, "batch_size": 16, "lr": 1e-2, "checkpoint_every_kimg": 0.016,
                    "log_every_kimg": 0.016, "device": "cpu"},
    })
    store = tmp_path / "trajectories.zarr"
    run_trajectories_stage(params.trajectories, store, teacher_ckpt=ckpt, progress=False)
    run_distill_stage(
        params.section("distill"), trajectories=params.trajectories_for("distill"), loss=params.loss, name="distill",
        store=store, teacher_ckpt=ckpt, out=tmp_path / "student", state_dir=tmp_path / "state",
        metrics=tmp_path / "metrics.json", live_dir=tmp_path / "live", cost_path=tmp_path / "cost.json", progress=False,
    )
    student = load_student(tmp_path / "student")
    assert family_for_config(student.config).name == "toy"
    assert student.config["toy"] == teacher.config["toy"] and student.sampler is not None
    assert not torch.equal(student.model.w, teacher.model.w)  # it trained
    out = student.sampling_denoiser()(x, 2.0)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_toy_family_refuses_what_it_cannot_do(toy_family, tmp_path):
    from pipeline.distill.student import student_from_checkpoint

    ckpt = save_toy_teacher(tmp_path / "teacher")
    with pytest.raises(ParamError, match="toy family has no step-conditioned form"):
        student_from_checkpoint(ckpt, step_condition=True)
    with pytest.raises(ValueError, match="already registered"):
        families.register_family(ToyFamily())


def test_unknown_architecture_names_the_known_ones(tmp_path):
    with pytest.raises(CheckpointError, match=r"unknown architecture 'toy'.*'diffusers', 'edm'"):
        family_for_config({"architecture": "toy"})
    with pytest.raises(CheckpointError, match="no 'network' section"):
        family_for_config({"data": {}})
    with pytest.raises(CheckpointError, match="precond 'velocity' is not known"):
        family_for_config({"network": {}, "precond": "velocity"})


@pytest.mark.parametrize("config, name", [
    ({"network": {}, "sigma_data": 0.5}, "unet"),
    ({"network": {}, "precond": "flow"}, "pixel_flow"),
    ({"architecture": "edm", "edm": {}}, "edm"),
    ({"architecture": "diffusers", "diffusers": {"unet_class": "UNet2DModel", "vae": None, "text_encoder": None}},
     "diffusers_pixel"),
    ({"architecture": "diffusers", "diffusers": {"unet_class": "UNet2DConditionModel", "vae": {"class": "AutoencoderKL"},
                                                 "text_encoder": {"class": "CLIPTextModel"}}}, "diffusers_latent"),
    ({"architecture": "diffusers", "diffusers": {"transformer_class": "SD3Transformer2DModel"}}, "diffusers_flow"),
])
def test_each_built_in_family_owns_its_model_json(config, name):
    assert family_for_config(config).name == name
    assert sum(f.claims_config(config) for f in families.FAMILIES) == 1  # exactly one family claims it
