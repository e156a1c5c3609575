"""The default teacher's trained weights ship in the repository (teachers/digits); this module retrains and checks them.

The shipped folder is an ordinary checkpoint folder (model.safetensors + model.json, imported by the
``teacher`` stage through ``teacher.pretrained``) plus ``training.json``: the summary of the run that
made it (the weights' hash, the first optimizer steps' losses, the machine and the wall time). Its
model.json keeps the recipe (``provenance.training``: the ``teacher`` params section it was trained
with). Training it again is opt-in:

- ``dvc exp run -S teacher.pretrained=null`` trains inside the pipeline (the ``teacher`` stage trains
  when ``teacher.pretrained`` is null), about ten minutes on two CPU cores;
- ``python bench/teacher_retrain.py`` retrains into a scratch folder and compares with the shipped
  file: the same weights hash on a machine with the same signature as the one that trained it
  (threads = 1 runs are deterministic), otherwise the largest weight difference;
- the test suite retrains the first steps and compares their losses with ``training.json``.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from pipeline.config.params import Params
from pipeline.config.teacher import TeacherParams
from pipeline.core.checkpoints import CheckpointError, load_checkpoint
from pipeline.config.validation import described

TRAINING_RECORD = "training.json"
NOT_RECIPE = ("device", "pretrained", "prompts", "checkpoint_every", "batch_gpu", "activation_checkpointing")


def recipe(params: TeacherParams) -> dict[str, Any]:
    """The part of the ``teacher`` section that determines the trained weights (run settings left out)."""
    return described(params, leave_out=NOT_RECIPE)


def read_shipped(folder: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model.json's provenance, training.json) of a shipped teacher folder; a clear error when either is missing."""
    folder = Path(folder)
    files = {name: folder / name for name in ("model.json", TRAINING_RECORD)}
    for name, path in files.items():
        if not path.is_file():
            raise CheckpointError(f"{path}: missing; {folder} is not a shipped teacher folder (model.json + {TRAINING_RECORD})")
    config = json.loads(files["model.json"].read_text())
    return config.get("provenance", {}), json.loads(files[TRAINING_RECORD].read_text())


def recipe_differences(params: TeacherParams, folder: str | Path) -> list[str]:
    """Keys whose value in ``params`` differs from the recipe the shipped weights were trained with ([] = same)."""
    provenance, _ = read_shipped(folder)
    shipped = {k: v for k, v in provenance.get("training", {}).items() if k not in NOT_RECIPE}
    mine = recipe(params)
    return [f"teacher.{k}: params {mine.get(k)!r}, shipped {shipped.get(k)!r}"
            for k in sorted(set(shipped) | set(mine)) if mine.get(k) != shipped.get(k)]


def training_params(params: TeacherParams, steps: int | None = None) -> TeacherParams:
    """The section with ``pretrained`` cleared (so it trains) and optionally fewer ``steps``."""
    update: dict[str, Any] = {"pretrained": None, "prompts": None}
    if steps is not None:
        update["steps"] = steps
    return dataclasses.replace(params, **update)


def retrain(params: Params, out_dir: str | Path, *, steps: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Train the ``teacher`` section's recipe on the ``data`` section's split into ``out_dir``, as the stage does
    with ``teacher.pretrained: null`` (optionally only ``steps`` steps); returns the training summary."""
    from pipeline.data.datasets import dataset_info, load_split, prepare_dataset
    from pipeline.teachers.training import data_description, train_teacher

    with tempfile.TemporaryDirectory(prefix="sfd-teacher-data-") as data:
        prepare_dataset(params.required("data"), data)
        info = dataset_info(data)
        images, labels = load_split(data, "train")
    return train_teacher(training_params(params.required("teacher"), steps), images, labels, info["num_classes"],
                         out_dir, data_description=data_description(info), progress=progress)


def weight_differences(shipped: str | Path, retrained: str | Path) -> dict[str, Any]:
    """Compare two checkpoints of the same network: equal hashes, the largest absolute weight difference."""
    a_tensors, a_config = load_checkpoint(shipped)
    b_tensors, b_config = load_checkpoint(retrained)
    if set(a_tensors) != set(b_tensors):
        raise CheckpointError(f"{retrained}: a different network from {shipped} (tensor names differ)")
    worst = max((float((a_tensors[k].double() - b_tensors[k].double()).abs().max()) for k in a_tensors), default=0.0)
    scale = max((float(t.double().abs().max()) for t in a_tensors.values()), default=1.0)
    a_hash, b_hash = (c.get("provenance", {}).get("weights_hash") for c in (a_config, b_config))
    return {"same_hash": a_hash == b_hash, "shipped_hash": a_hash, "retrained_hash": b_hash,
            "max_abs_diff": worst, "max_abs_weight": scale}


def first_losses_close(record: dict[str, Any], losses: list[float], rtol: float) -> tuple[bool, float]:
    """Do the retrained first losses match training.json's within ``rtol``? (ok, largest relative difference)."""
    want = torch.tensor(record["first_losses"][: len(losses)], dtype=torch.float64)
    got = torch.tensor(losses[: len(want)], dtype=torch.float64)
    if len(want) == 0 or len(got) != len(want):
        return False, float("inf")
    rel = float(((got - want).abs() / want.abs().clamp_min(1e-12)).max())
    return rel <= rtol, rel
