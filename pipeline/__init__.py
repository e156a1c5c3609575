"""Simple and Fast Distillation (SFD) of diffusion models: library behind the DVC stages.

The public API, imported lazily (PEP 562) so that ``import pipeline.core.x`` does not load torch:

    from pipeline import load_teacher, generate, parse_seeds
    teacher = load_teacher("models/sfd_v")  # a teacher or distilled checkpoint directory, or "gmm"
    spec = teacher.sampler_spec(num_steps=5)  # its own sampler (a teacher: DPM-Solver++(3M) default)
    images = generate(teacher.sampling_denoiser(spec), parse_seeds("0-63"), teacher.sample_shape, spec)

Nothing inside the package imports from here (the layers import each other); pipeline/cli.py may.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {  # public name -> defining module
    "Teacher": "pipeline.teachers.loader",
    "load_teacher": "pipeline.teachers.loader",
    "load_student": "pipeline.teachers.loader",
    "SamplerSpec": "pipeline.diffusion.sampling",
    "resolve_sampler": "pipeline.diffusion.sampling",
    "make_denoiser": "pipeline.diffusion.sampling",
    "generate": "pipeline.diffusion.sampling",
    "Schedule": "pipeline.diffusion.schedules",
    "time_steps": "pipeline.diffusion.schedules",
    "solve": "pipeline.diffusion.solvers",
    "Denoiser": "pipeline.diffusion.denoisers",
    "EDMPrecond": "pipeline.diffusion.denoisers",
    "bind_num_steps": "pipeline.diffusion.denoisers",
    "guided": "pipeline.diffusion.denoisers",
    "parse_seeds": "pipeline.diffusion.seeds",
    "sample_teacher": "pipeline.evaluation.samples",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on first use
    from pipeline.diffusion.denoisers import Denoiser, EDMPrecond, bind_num_steps, guided
    from pipeline.diffusion.sampling import SamplerSpec, generate, make_denoiser, resolve_sampler
    from pipeline.diffusion.schedules import Schedule, time_steps
    from pipeline.diffusion.seeds import parse_seeds
    from pipeline.diffusion.solvers import solve
    from pipeline.evaluation.samples import sample_teacher
    from pipeline.teachers.loader import Teacher, load_student, load_teacher


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
