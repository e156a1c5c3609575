"""``SFDScheduler``: the distilled student's own sampler as a diffusers scheduler, so that the folder
``sfd export`` writes samples correctly through the pipeline class it declares.

A stock scheduler cannot express the student: its time points are the distillation schedule's (not a
scheduler grid), and with AFS its first step uses no network output (eps = x / sqrt(1 + sigma_0^2)). This
class steps Euler in the VE view, exactly as ``sfd sample`` does: x_{i+1} = x_i + (sigma_{i+1} - sigma_i) eps_i,
with eps_i from the UNet's output by its prediction type. With AFS the pipeline still calls the UNet at the
first step (diffusers' loops always do); its output is not used.

Two pipeline conventions, set by ``sample_space`` in the config:

- ``"vp"`` (``DDPMPipeline``): the pipeline draws unit noise z, feeds its sample to the UNet unscaled and
  never calls ``scale_model_input``. The scheduler reads the first sample as z (x_0 = sigma_0 z), returns
  x / sqrt(1 + sigma^2) between steps (the UNet's input) and the final state x itself (the image).
- ``"ve"`` (``StableDiffusionPipeline``): the pipeline multiplies its noise by ``init_noise_sigma`` =
  sigma_0 and calls ``scale_model_input`` (x / sqrt(1 + sigma^2)) before the UNet; samples stay in the VE view.
- ``"flow"`` (``StableDiffusion3Pipeline``, ``FluxPipeline``: a flow-matching transformer predicting the velocity
  v): samples are the flow states x_tau and ``sigmas`` are the flow times tau_0 = 1 > ... > tau_{N-1} (diffusers'
  FlowMatch convention), ``timesteps`` tau_i T. Euler in tau, x_{tau_{i+1}} = x_{tau_i} + (tau_{i+1} - tau_i) v,
  is the VE Euler step exactly; AFS at tau_0 = 1 takes v = x_tau (the data mean 0), so x_{tau_1} = tau_1 z. The
  pipelines' own ``sigmas`` and ``mu`` (FluxPipeline always passes them) are ignored: the student samples on its
  own points.

diffusers imports a component's module only when the caller has imported it: ``import
pipeline.teachers.diffusers_scheduler`` (this project installed) before ``DiffusionPipeline.from_pretrained``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

SAMPLE_SPACES = ("vp", "ve", "flow")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


@dataclass
class SFDSchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor


class SFDScheduler(SchedulerMixin, ConfigMixin):
    """Euler on the student's time points sigma_0 > ... > sigma_{N-1}, analytical first step optional."""

    order = 1
    _compatibles: list[str] = []

    @register_to_config
    def __init__(
        self,
        sigmas: list[float] | None = None,  # the VE noise levels t_0 = t_max > ... > t_{N-1} = t_min (flow: the flow times)
        timesteps: list[float] | None = None,  # the UNet timestep of each sigma (fractional between grid points)
        afs: bool = True,  # analytical first step: no network output used at sigma_0
        prediction_type: str = "epsilon",  # the UNet's output: epsilon | v_prediction | sample (flow: the velocity)
        sample_space: str = "vp",  # how the pipeline hands samples over (module docstring)
        num_train_timesteps: int = 1000,  # the teacher's (kept for pipelines that read it)
    ) -> None:
        if not sigmas or not timesteps or len(sigmas) != len(timesteps) or len(sigmas) < 2:
            raise ValueError("SFDScheduler needs sigmas and timesteps of one length >= 2 (sfd export writes them)")
        if sample_space not in SAMPLE_SPACES or prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"SFDScheduler: sample_space in {SAMPLE_SPACES}, prediction_type in {PREDICTION_TYPES}")
        if (sample_space == "flow") != (prediction_type == "flow"):
            raise ValueError("SFDScheduler: sample_space 'flow' goes with prediction_type 'flow' (a velocity model)")
        self.timesteps = torch.tensor(timesteps[:-1], dtype=torch.float32)
        self._index = 0

    @property
    def num_steps(self) -> int:
        """Network steps of the student: N - 1 (one UNet call each; with AFS the first is not used)."""
        return len(self.config.sigmas) - 1

    @property
    def nfe(self) -> int:
        """Network evaluations the student's sampler uses: N - 1, minus one with AFS."""
        return self.num_steps - int(bool(self.config.afs))

    @property
    def init_noise_sigma(self) -> float:
        return float(self.config.sigmas[0]) if self.config.sample_space == "ve" else 1.0

    def set_begin_index(self, begin_index: int = 0) -> None:
        """FluxPipeline calls it; the student always starts at its first point."""
        self._index = 0

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas: list[float] | None = None, mu: float | None = None, timesteps: list[float] | None = None,
                      **kwargs: Any) -> None:
        """The student's own steps; another count is not a choice a distilled sampler has (a warning says so). A flow
        pipeline's ``sigmas`` / ``mu`` are ignored (FluxPipeline passes its default grid every time)."""
        if timesteps is not None or (sigmas is not None and self.config.sample_space != "flow"):
            raise ValueError("SFDScheduler: the student samples on its own time points; pass no timesteps or sigmas")
        if num_inference_steps is not None and num_inference_steps not in (self.num_steps, self.nfe):
            warnings.warn(f"SFDScheduler: this student was distilled for NFE {self.nfe} ({self.num_steps} pipeline "
                          f"step(s)); num_inference_steps={num_inference_steps} is ignored", stacklevel=2)
        self.timesteps = torch.tensor(self.config.timesteps[:-1], dtype=torch.float32, device=device)
        self._index = 0

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        if self.config.sample_space in ("vp", "flow"):
            return sample
        return sample / math.sqrt(1.0 + float(self.config.sigmas[self._index]) ** 2)

    def _eps(self, model_output: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """eps of the VE view from the UNet's output at x (its input was x / sqrt(1 + sigma^2))."""
        kind = self.config.prediction_type
        if kind == "epsilon":
            return model_output
        scale = 1.0 / math.sqrt(1.0 + sigma**2)  # sqrt(abar)
        if kind == "v_prediction":  # x0 = sqrt(abar) x_vp - sqrt(1 - abar) v, x_vp = scale x
            x0 = scale * (scale * x) - sigma * scale * model_output
        else:  # sample
            x0 = model_output
        return (x - x0) / sigma

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, generator: Any = None,
             return_dict: bool = True, **kwargs: Any) -> SFDSchedulerOutput | tuple[torch.Tensor]:
        i = self._index
        if i >= self.num_steps:
            raise ValueError(f"SFDScheduler: all {self.num_steps} step(s) are done; call set_timesteps again")
        sigmas = self.config.sigmas
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        if self.config.sample_space == "flow":  # Euler in the flow time (FlowMatchEuler's arithmetic, float32)
            x_tau = sample.to(torch.float32)
            v = x_tau if (i == 0 and self.config.afs) else model_output.to(torch.float32)
            prev = (x_tau + (sigma_next - sigma) * v).to(model_output.dtype)
            self._index = i + 1
            return SFDSchedulerOutput(prev_sample=prev) if return_dict else (prev,)
        if self.config.sample_space == "ve":
            x = sample
        else:
            x = sigma * sample if i == 0 else sample * math.sqrt(1.0 + sigma**2)
        if i == 0 and self.config.afs:
            eps = x / math.sqrt(1.0 + sigma**2)
        else:
            eps = self._eps(model_output.to(x.dtype), x, sigma)
        x = x + (sigma_next - sigma) * eps
        self._index = i + 1
        last = self._index == self.num_steps
        prev = x if (self.config.sample_space == "ve" or last) else x / math.sqrt(1.0 + sigma_next**2)
        return SFDSchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
