"""The params keys that name files from outside the pipeline, and the stages that read them.

One list: the ``inputs`` stage hashes what these keys name into ``data/inputs/<key>.json``
(:mod:`pipeline.core.inputs`); dvc.yaml makes each manifest a dependency of the stages in ``read_by``
(``tests/test_dvc_deps.py`` checks that it does). A key that is null (not used) gets a manifest too,
so a stage's dependencies are the same files whatever the preset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.core.inputs import ExternalInput


@dataclass(frozen=True)
class InputKey(ExternalInput):
    read_by: tuple[str, ...] = ()  # the dvc.yaml stages that read the file


EVALUATE_STAGES = ("evaluate_solvers", "evaluate_baselines", "evaluate")

EXTERNAL_INPUTS: tuple[InputKey, ...] = (
    InputKey("data.path", "the dataset: a folder or zip of PNGs in EDM's dataset_tool.py layout", ("data",)),
    InputKey("teacher.pretrained", "the teacher: an EDM .pkl, a diffusers folder, or a checkpoint folder "
             "(model.safetensors + model.json)", ("teacher",)),
    InputKey("teacher.prompts", "the prompt file of a text-to-image teacher (one per line, or JSON/CSV of captions)",
             ("teacher",)),
    InputKey("distill.lpips_weights", "torchvision's LPIPS backbone weights, e.g. alexnet-owt-7be5be79.pth", ("distill@distill",)),
    InputKey("distill_v.lpips_weights", "torchvision's LPIPS backbone weights, e.g. alexnet-owt-7be5be79.pth",
             ("distill@distill_v",)),
    InputKey("distill_stage2.lpips_weights", "torchvision's LPIPS backbone weights, e.g. alexnet-owt-7be5be79.pth",
             ("distill@distill_stage2",)),
    InputKey("evaluate.inception_weights", "torch-fidelity's FID Inception-v3, pt_inception-2015-12-05-6726825d.pth",
             EVALUATE_STAGES),
    InputKey("evaluate.reference_stats", "FID reference statistics (.npz with mu, sigma) or a folder/zip of reference "
             "images", EVALUATE_STAGES),
    InputKey("evaluate.clip_weights", "a transformers CLIPModel folder (CLIP score)", EVALUATE_STAGES),
)


def input_values(params: Any) -> list[tuple[InputKey, str | None]]:
    """(key, value) of every external input of validated ``params`` (a :class:`pipeline.config.params.Params`)."""
    out = []
    for inp in EXTERNAL_INPUTS:
        section, name = inp.key.split(".")
        out.append((inp, getattr(params.section(section), name)))
    return out


def inputs_read_by(stage: str) -> list[InputKey]:
    return [inp for inp in EXTERNAL_INPUTS if stage in inp.read_by]
