"""The one registry of model families (pipeline.teachers.families.base.ModelFamily): one line per family.

``family_for_config(model.json)`` and ``family_for_source(path)`` are how the rest of the pipeline learns what
to do with a network; nothing outside this package asks which family it holds. The first family that claims a
config or a source wins, so a more specific family comes before a more general one. A new family is one module
in this package and one line in :data:`FAMILIES` (or :func:`register_family` at run time, as the toy family of
tests/test_model_families.py does); docs/adding-a-model-family.md shows how.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.core.checkpoints import CheckpointError
from pipeline.teachers.families import diffusers_flow, diffusers_latent, diffusers_pixel, edm, pixel_flow, unet
from pipeline.teachers.families.base import ModelFamily, StepConditionOptions, TeacherFacts

FAMILIES: list[ModelFamily] = [
    unet.FAMILY,  # this project's U-Net, EDM preconditioning (model.json "network")
    pixel_flow.FAMILY,  # this project's U-Net as a rectified flow ("precond": "flow")
    edm.FAMILY,  # NVlabs/edm pickles and their converted folders ("architecture": "edm")
    diffusers_flow.FAMILY,  # SD3 / SD3.5 / Flux.1 transformers ("architecture": "diffusers", transformer_class)
    diffusers_latent.FAMILY,  # latent text-to-image UNets (a VAE / text encoder)
    diffusers_pixel.FAMILY,  # pixel UNet2DModel (any other diffusers folder or checkpoint)
]

__all__ = ["FAMILIES", "ModelFamily", "StepConditionOptions", "TeacherFacts", "family_for_config", "family_for_source",
           "register_family", "family_named", "describe_architecture"]


def register_family(family: ModelFamily, *, first: bool = True) -> None:
    """Add ``family`` to the registry (before the built-in ones unless ``first`` is false); a name is registered once."""
    if any(f.name == family.name for f in FAMILIES):
        raise ValueError(f"model family {family.name!r} is already registered")
    FAMILIES.insert(0, family) if first else FAMILIES.append(family)


def unregister_family(name: str) -> None:
    FAMILIES[:] = [f for f in FAMILIES if f.name != name]


def family_named(name: str) -> ModelFamily:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise KeyError(f"no model family {name!r} (registered: {', '.join(f.name for f in FAMILIES)})")


def family_for_source(path: str | Path) -> ModelFamily | None:
    """The family whose foreign file format ``path`` is (an EDM pickle, a diffusers folder); None for anything else
    (a checkpoint directory of ours)."""
    return next((f for f in FAMILIES if f.claims_source(Path(path))), None)


def family_for_config(config: dict[str, Any], where: str = "checkpoint") -> ModelFamily:
    """The family owning a model.json ``config``; a CheckpointError naming what is unknown otherwise."""
    for family in FAMILIES:
        if family.claims_config(config):
            return family
    if "architecture" in config:
        known = sorted({f.architecture for f in FAMILIES if f.architecture})
        raise CheckpointError(
            f"{where}: unknown architecture {config['architecture']!r} in model.json (known: "
            f"{', '.join(map(repr, known))}, or a 'network' section for this project's U-Net)"
        )
    if "network" not in config:
        raise CheckpointError(f"{where.removesuffix('/model.safetensors')}/model.json has no 'network' section; "
                              "it is not a network checkpoint")
    raise CheckpointError(f"{where.removesuffix('/model.safetensors')}/model.json: precond {config.get('precond')!r} "
                          "is not known (known: 'flow', or absent: EDM)")



def describe_architecture(config: dict[str, Any]) -> str:
    """A readable name of the network a model.json describes (the report's "This run"); never raises."""
    try:
        return family_for_config(config).describe(config)
    except CheckpointError as e:
        return f"unknown ({e})"
