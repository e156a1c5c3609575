"""NVlabs/edm networks: snapshot pickles (read safely by pipeline.teachers.edm_pickle) and their converted
checkpoint, model.json ``{"architecture": "edm", "edm": {"precond", "init_kwargs"}}``.

Every EDM preconditioner (VP, VE, iDDPM, EDM's own, in pipeline.diffusion.preconditioners) around SongUNet
or DhariwalUNet is rebuilt by :func:`pipeline.networks.edm.build_edm_model` from its class name and constructor
arguments; model.safetensors is the preconditioner's whole ``state_dict()`` (EDM's ``ema`` names), so the weights
hash is the same for the pickle and its converted folder.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.core.checkpoints import CheckpointError, save_checkpoint
from pipeline.core.hashing import hash_file
from pipeline.diffusion.preconditioners import EDM_ARCHITECTURE
from pipeline.networks.edm import build_edm_model, count_parameters
from pipeline.networks.step_condition import randomize_step_condition, zero_authors_step_modulation
from pipeline.teachers.content import network_weights_hash, teacher_content_hash
from pipeline.teachers.families.base import (
    ModelFamily, StepConditionOptions, TeacherFacts, check_data_shape, copy_into, replace_dir,
)  # fmt: skip

EDM_PICKLE_SUFFIX = ".pkl"
EDM_STEP_CONDITION_PREFIXES = ("model.map_steps_layer0.", "model.map_steps_layer1.",  # an EDM network's
                               "model.map_step.", "model.map_step_layer0.", "model.map_step_layer1.")  # sfd-main's


def is_edm_pickle_path(path: str | Path) -> bool:
    """Whether ``path`` names an EDM snapshot pickle (by its ``.pkl`` suffix; the file need not exist,
    but a directory so named is a checkpoint directory)."""
    path = Path(path)
    return path.suffix.lower() == EDM_PICKLE_SUFFIX and not path.is_dir()


def edm_checkpoint_config(model: nn.Module, *, provenance: dict[str, Any] | None = None,
                          sampler: dict[str, Any] | None = None) -> dict[str, Any]:
    """model.json of an EDM network (a preconditioner from :func:`build_edm_model`, which carries
    ``edm_class_name`` and ``edm_init_kwargs``): architecture, edm, data, sampler, provenance."""
    if not hasattr(model, "edm_class_name") or not hasattr(model, "edm_init_kwargs"):
        raise CheckpointError(
            f"{type(model).__name__} has no edm_class_name / edm_init_kwargs: build it with "
            "pipeline.networks.edm.build_edm_model"
        )
    resolution = int(model.img_resolution)
    return {
        **model.checkpoint_architecture(),
        "data": {"sample_shape": [int(model.img_channels), resolution, resolution], "num_classes": int(model.label_dim)},
        "sampler": sampler,
        "provenance": dict(provenance or {}),
    }


def edm_pickle_config(path: Path, model: nn.Module) -> dict[str, Any]:
    """The model.json that ``sfd teacher import`` writes for the EDM snapshot at ``path`` (loaded as ``model``)."""
    return edm_checkpoint_config(
        model,
        provenance={"kind": "teacher", "source_file": path.name, "source_hash": hash_file(str(path)),
                    "importer": "pipeline.teachers.edm_pickle (safe reader; no pickled code run)"},
    )


def _is_step_layer(name: str) -> bool:
    return name.startswith(EDM_STEP_CONDITION_PREFIXES) or ".affine_step." in name


class EDMFamily(ModelFamily):
    name = "edm"
    architecture = EDM_ARCHITECTURE
    source_name = "edm-pickle"
    source_what = "an EDM teacher pickle"
    supports_authors_step_condition = True

    def claims_source(self, path: Path) -> bool:
        return is_edm_pickle_path(path)

    def load_source(self, path: Path, device: str | torch.device, *, prompts: list[str] | None = None) -> tuple[nn.Module, dict[str, Any]]:
        from pipeline.teachers.edm_pickle import load_edm_pickle

        model = load_edm_pickle(path, device)
        return model, edm_pickle_config(path, model)

    def import_source(self, source: Path, out_dir: Path, *, prompts_file: Path | None = None,
                      data_description: dict[str, Any] | None = None) -> dict[str, Any]:
        model, config = self.load_source(source, "cpu")
        check_data_shape(source, config["data"]["sample_shape"], data_description)
        replace_dir(out_dir)
        save_checkpoint(out_dir, model.state_dict(), config)
        edm = config["edm"]
        return {"class": edm["precond"], "network": edm["init_kwargs"].get("model_type", type(model.model).__name__),
                "parameters": count_parameters(model), "weights_hash": teacher_content_hash(model),
                "network_hash": network_weights_hash(model), "sample_shape": list(config["data"]["sample_shape"]),
                "num_classes": config["data"]["num_classes"], "source_hash": config["provenance"]["source_hash"],
                "out": str(out_dir)}

    def pretrained_summary(self, info: dict[str, Any]) -> dict[str, Any]:
        return {"weights_hash": info["weights_hash"], "network_hash": info["network_hash"], "steps": 0,
                "architecture": EDM_ARCHITECTURE, "edm_class": info["class"], "source_hash": info["source_hash"]}

    def summary_entries(self, config: dict[str, Any]) -> dict[str, Any]:
        return {"architecture": config["architecture"], "edm_class": config["edm"]["precond"]}

    def import_line(self, source: Path, info: dict[str, Any], out: Path) -> str:
        return (f"teacher import: {source.name}: {info['class']}({info['network']}), {info['parameters']:,} parameters, "
                f"samples {'x'.join(map(str, info['sample_shape']))}, "
                f"{info['num_classes'] or 'no'} classes, weights hash {info['weights_hash']} -> {out}")

    def claims_config(self, config: dict[str, Any]) -> bool:
        return config.get("architecture") == EDM_ARCHITECTURE

    def build(self, config: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> nn.Module:
        edm = config.get("edm")
        if not isinstance(edm, dict) or "precond" not in edm or "init_kwargs" not in edm:
            raise CheckpointError(f"{where}: model.json has architecture 'edm' but no edm section with precond and init_kwargs")
        model = build_edm_model(edm["precond"], dict(edm["init_kwargs"]))
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{where}: the weights do not match the EDM network {edm['precond']}: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        return model

    def fresh(self, config: dict[str, Any]) -> nn.Module:
        return build_edm_model(config["edm"]["precond"], dict(config["edm"]["init_kwargs"]))

    def facts(self, model: nn.Module, config: dict[str, Any]) -> TeacherFacts:
        return TeacherFacts([model.img_channels, model.img_resolution, model.img_resolution], model.label_dim,
                            {"edm": config["edm"]}, {})

    def architecture_section(self, config: dict[str, Any]) -> dict[str, Any]:
        return {"architecture": config["architecture"], "edm": copy.deepcopy(config["edm"])}

    def describe(self, config: dict[str, Any]) -> str:
        return f"EDM {config['edm']['precond']} ({config['edm']['init_kwargs'].get('model_type', '?')})"

    def student_copy(self, teacher: Any, options: StepConditionOptions, device: str | torch.device) -> nn.Module:
        edm = teacher.config["edm"]
        kwargs = dict(edm["init_kwargs"])
        if options.enabled and not kwargs.get("step_condition", False):
            kwargs["step_condition"] = True if options.arch == "ours" else "authors"
        torch.manual_seed(options.seed)
        model = build_edm_model(edm["precond"], kwargs)
        new = copy_into(model, teacher.model.checkpoint_state_dict(), Path(teacher.path), _is_step_layer)
        if new and any(".affine_step." in k for k in new):  # sfd-main's layers: random as built (EDM's init)
            if options.init == "zero":
                zero_authors_step_modulation(model)
        elif new and options.init == "random":
            randomize_step_condition(model, options.seed)
        return model.to(device).train()


FAMILY = EDMFamily()
