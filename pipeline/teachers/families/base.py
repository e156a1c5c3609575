"""The model-family adapter: what the pipeline needs to know about one kind of network.

A family is one module in this package holding one :class:`ModelFamily` subclass: how a foreign file
or folder of that kind loads (``claims_source`` / ``load_source``), which model.json it owns
(``claims_config``), how that checkpoint becomes a network (``build``), how a student copy is made
(``student_copy``), its architecture part of a distilled checkpoint (``architecture_section``), the side
files it writes, how it reads in the report and how it exports. The registry
(:mod:`pipeline.teachers.families`) lists the families; the rest of the pipeline asks it, never which
family it holds. docs/adding-a-model-family.md walks through a new one.

The network a family returns is a denoiser ``D(x, sigma, labels, **kwargs) -> x0`` with the distillation
interface: ``step_condition``, ``checkpoint_module()``, ``checkpoint_state_dict()``,
``checkpoint_architecture()`` (the content key reads the last: pipeline.teachers.content).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.core.checkpoints import CheckpointError
from pipeline.core.param_checks import ParamError


@dataclass(frozen=True)
class StepConditionOptions:
    """How a student copy gains the SFD-v step condition (params ``step_condition*`` of a distill section)."""

    enabled: bool = False  # add the step condition if the copy lacks it
    seed: int = 0  # initialises the new layers (their last layer is zero unless init is random)
    init: str = "zero"  # random: the new layers' last layer drawn too (sfd-main)
    arch: str = "ours"  # authors: sfd-main's step embedding and per-block affine_step (EDM networks only)


@dataclass(frozen=True)
class TeacherFacts:
    """What a loaded network says about itself when model.json's ``data`` section is silent."""

    sample_shape: list[int]
    num_classes: int
    architecture: dict[str, Any]  # the readable architecture entry of Teacher.description
    data_overrides: dict[str, Any]  # data entries the network decides, not model.json (a bound prompt set)


class ModelFamily:
    """One model family. Subclasses override what differs; the defaults suit a plain network checkpoint."""

    name: str = "?"  # the registry name
    architecture: str | None = None  # model.json's "architecture" value, when the family has its own
    source_name: str = "checkpoint"
    source_what: str = "a foreign teacher file"  # what a foreign source is, in errors  # Teacher.description["source"] of a foreign file this family reads
    diffusers_export: str | None = None  # which diffusers export writes its students (pipeline.teachers.diffusers_export)
    takes_prompts: bool = False  # a text-to-image family: a prompt set binds to it
    supports_authors_step_condition: bool = False  # sfd-main's step layers (step_condition_arch: authors)

    # -- foreign files (an EDM pickle, a diffusers folder) ---------------------------------------------------
    def claims_source(self, path: Path) -> bool:
        """Whether ``path`` is a foreign file or folder of this family (not a checkpoint of ours)."""
        return False

    def load_source(self, path: Path, device: str | torch.device, *, prompts: list[str] | None = None) -> tuple[nn.Module, dict[str, Any]]:
        """(the network in eval mode, the model.json its import would write) of a foreign ``path``."""
        raise NotImplementedError(f"{self.name}: has no foreign source format")

    def import_source(self, source: Path, out_dir: Path, *, prompts_file: Path | None = None,
                      data_description: dict[str, Any] | None = None) -> dict[str, Any]:
        """``sfd teacher import`` / ``teacher.pretrained``: convert ``source`` into a checkpoint folder; a summary."""
        raise NotImplementedError(f"{self.name}: has no foreign source format")

    def pretrained_summary(self, info: dict[str, Any]) -> dict[str, Any]:
        """The teacher stage's summary entries (``teacher.pretrained``) of :meth:`import_source`'s summary."""
        return {"weights_hash": info["weights_hash"], "steps": 0}

    def import_line(self, source: Path, info: dict[str, Any], out: Path) -> str:
        """The line ``sfd teacher import`` prints for :meth:`import_source`'s summary."""
        return f"teacher import: {source}: {self.name}, weights hash {info.get('weights_hash')} -> {out}"

    # -- checkpoints of ours (model.safetensors + model.json) ---------------------------------------------------
    def claims_config(self, config: dict[str, Any]) -> bool:
        """Whether this family owns a model.json ``config``."""
        raise NotImplementedError

    def build(self, config: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> nn.Module:
        """The network of ``config`` with ``tensors`` loaded (not yet moved or in eval mode)."""
        raise NotImplementedError

    def load_checkpoint(self, path: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                        device: str | torch.device) -> nn.Module:
        """The network of a checkpoint directory in eval mode (families with side files override)."""
        model = self.build(config, tensors, where=f"{path}/model.safetensors")
        return model.to(device).eval().requires_grad_(False)

    def fresh(self, config: dict[str, Any]) -> nn.Module:
        """A freshly initialised network of ``config``'s architecture (the caller seeds the RNG)."""
        raise NotImplementedError

    def facts(self, model: nn.Module, config: dict[str, Any]) -> TeacherFacts:
        """Sample shape, classes and the architecture entry of a loaded teacher."""
        raise NotImplementedError

    def architecture_section(self, config: dict[str, Any]) -> dict[str, Any]:
        """The architecture part of a model.json (what a distilled checkpoint keeps of its base)."""
        raise NotImplementedError

    def save_side_files(self, model: nn.Module, directory: Path, config: dict[str, Any]) -> None:
        """Files written beside model.safetensors (a VAE, text encoders, a prompt set); none by default."""

    def summary_entries(self, config: dict[str, Any]) -> dict[str, Any]:
        """What the teacher stage's summary says about the architecture of a checkpoint ``config``."""
        return {}

    def describe(self, config: dict[str, Any]) -> str:
        """A readable name of the architecture in ``config`` (the report's "This run")."""
        return self.name

    # -- students -----------------------------------------------------------------------------------------------
    def student_copy(self, teacher: Any, options: StepConditionOptions, device: str | torch.device) -> nn.Module:
        """A trainable copy of the loaded ``teacher`` (pipeline.teachers.loader.Teacher), with the step condition
        added when ``options.enabled`` and the copy lacks it."""
        raise NotImplementedError


def copy_into(model: nn.Module, tensors: dict[str, torch.Tensor], where: Path, new_layer: Any) -> list[str]:
    """Load ``tensors`` into ``model.checkpoint_module()`` where only new step-condition layers (``new_layer(name)``
    true) may be missing; returns the names of the missing (new) layers."""
    missing, unexpected = model.checkpoint_module().load_state_dict(tensors, strict=False)
    bad_missing = [k for k in missing if not new_layer(k)]
    if bad_missing or unexpected:
        raise CheckpointError(
            f"{where}/model.safetensors does not fit its network config: missing {bad_missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return list(missing)


def load_exact(module: nn.Module, tensors: dict[str, torch.Tensor], message: str) -> None:
    """Load ``tensors`` into ``module``; a CheckpointError ``message: missing [...], unexpected [...]`` otherwise."""
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{message}: missing {missing[:5]}, unexpected {unexpected[:5]}")


def check_data_shape(source: Path, shape: list[int], data_description: dict[str, Any] | None) -> None:
    """A pretrained teacher's sample shape must equal the data's (a clear error names both)."""
    want = list((data_description or {}).get("sample_shape", []))
    if shape and want and list(shape) != want:
        raise CheckpointError(
            f"teacher.pretrained: {source} was trained on samples of shape {list(shape)}, the data has {want}"
            + (f" (dataset {data_description['name']})" if data_description.get("name") else "")
        )


def replace_dir(path: Path) -> None:
    """Remove ``path`` (a previous output) so the writer starts from nothing."""
    import shutil

    if Path(path).exists():
        shutil.rmtree(path)


def refuse_authors(family: ModelFamily, options: StepConditionOptions, where: Path) -> None:
    if options.enabled and options.arch == "authors" and not family.supports_authors_step_condition:
        raise ParamError("step_condition_arch: 'authors' (sfd-main's step layers) exists for EDM networks only; "
                         f"{where} holds another architecture")
