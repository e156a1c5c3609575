"""Evaluate samplers on the same evaluation seeds: FID, KID, precision/recall, label accuracy, grids.

Entries (keys ``"<sampler>/nfe<k>"``):
- ``teacher/nfe35``: the teacher's reference sampler, EDM's Heun over 18 polynomial timestamps
  (t_max 80, t_min 0.002, rho 7) plus a final Euler step to t = 0;
- the training-free solvers of ``evaluate.solvers`` at each NFE of ``evaluate.nfes`` on the
  student schedule (N picked with pipeline.diffusion.solvers.num_steps_for_nfe);
- every distilled checkpoint ``NAME=DIR`` with its own sampler (one key per supported N for a
  step-conditioned checkpoint).
Every entry samples the same seeds; labels come from pipeline.diffusion.seeds.seed_labels when the model
is conditional. Reference features are the training images' (cached, keyed by weights hash).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from tqdm import tqdm

from pipeline.core.checkpoints import has_checkpoint
from pipeline.core.cost import CostMeter
from pipeline.diffusion.denoisers import Denoiser
from pipeline.config.evaluation import EvalParams
from pipeline.evaluation.fidelity import (
    FeatureSpace, ReferenceStats, classifier_space, feature_space, fid_from_stats, fidelity_metrics, label_accuracy,
    load_reference_stats, reference_features,
)  # fmt: skip
from pipeline.core.param_checks import ParamError
from pipeline.core.images import save_grid
from pipeline.diffusion.sampling import SamplerSpec, generate, make_denoiser
from pipeline.diffusion.seeds import parse_seeds, seed_labels
from pipeline.diffusion.solvers import CountingDenoiser
from pipeline.teachers.loader import Teacher, load_teacher


@dataclass
class Entry:
    key: str
    model: Denoiser  # D(x, sigma, labels, **net_kwargs)
    spec: SamplerSpec
    sample_shape: tuple[int, ...]
    num_classes: int
    is_student: bool = False
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None  # latent models: the VAE decoder (samples -> images)
    prompts: list[str] | None = None  # text-to-image models: the prompt set the labels index (CLIP score)


def student_dirs(ckpt_dir: str | Path) -> list[Path]:
    """A checkpoint directory, or a directory of per-NFE checkpoints ``nfe<k>/`` (PD rounds, SFDDM's T')."""
    path = Path(ckpt_dir)
    if (path / "model.json").is_file():
        return [path]
    rounds = sorted(
        (d for d in path.glob("nfe*") if d.name[3:].isdigit() and (d / "model.json").is_file()),
        key=lambda d: int(d.name[3:]),
    )
    if not rounds:
        raise ParamError(f"--student {path}: neither a checkpoint (model.json) nor a directory of nfe<k>/ checkpoints")
    return rounds


def student_entries(name: str, ckpt_dir: str | Path, device: str | torch.device,
                    guidance: Sequence[float] = ()) -> list[Entry]:
    """Entries of a distilled checkpoint: its own sampler, at every supported N when step-conditioned.

    A directory of ``nfe<k>/`` checkpoints gives one entry per checkpoint. Each ``guidance`` w other than the
    checkpoint's own adds entries ``<name>-w<w>/nfe<k>``: the same network on both branches."""
    dirs = student_dirs(ckpt_dir)
    if len(dirs) > 1 or dirs[0] != Path(ckpt_dir):
        return [e for d in dirs for e in student_entries(name, d, device, guidance)]
    student = load_teacher(Path(ckpt_dir), device)
    if not student.is_distilled:
        raise ParamError(f"--student {name}={ckpt_dir}: the checkpoint has no sampler section (is it a teacher?)")
    base = student.sampler
    ns = base.step_condition or (base.schedule.num_steps,)
    entries = []
    for n in ns:
        spec = student.sampler_spec(num_steps=n) if base.step_condition else base
        extra = latent_options(student)
        entries.append(Entry(f"{name}/nfe{spec.nfe}", student.model, spec, student.sample_shape,
                             student.num_classes, is_student=True, **extra))
        for w in guidance:
            if float(w) != spec.guidance:
                entries.append(Entry(f"{name}-w{float(w):g}/nfe{spec.nfe}", student.model, replace(spec, guidance=float(w)),
                                     student.sample_shape, student.num_classes, is_student=True, **extra))
    return entries


def latent_options(model: Teacher) -> dict[str, Any]:
    """Entry fields of a diffusers latent / text-to-image model: its VAE decoder and its prompt set."""
    return {"decode": model.decode if model.latent else None, "prompts": model.prompts or None}


def parse_student_args(values: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path or "/" in name:
            raise ParamError(f"--student: expected NAME=CKPT_DIR (NAME without '/'), got {v!r}")
        out.append((name, path))
    return out


def evaluate_entries(
    entries: Sequence[Entry],
    seeds: Sequence[int],
    space: FeatureSpace,
    reference: dict[str, torch.Tensor] | ReferenceStats,  # reference features per layer, or FID statistics
    *,
    label_space: FeatureSpace | None = None,  # classifier for label_accuracy (None: not measured)
    grids_dir: str | Path | None = None,
    grid_seeds: int = 64,
    batch_size: int = 1000,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    device: str | torch.device = "cpu",
    cost: CostMeter | None = None,
    clip: Any = None,  # a pipeline.evaluation.clip_score.ClipScorer: CLIP score of text-to-image entries
) -> dict[str, dict[str, float | None]]:
    """Sample every entry on the same seeds and compute its metrics; grids named ``<sampler>_nfe<k>.png``.
    Latent entries are decoded by their VAE first; labels of text-to-image entries are prompt indices."""
    results: dict[str, dict[str, float | None]] = {}
    keys = [e.key for e in entries]
    if len(set(keys)) != len(keys):
        raise ParamError(f"evaluation: duplicate sampler keys {sorted(k for k in keys if keys.count(k) > 1)}")
    for entry in tqdm(entries, desc="evaluate", unit="sampler"):
        labels = seed_labels(seeds, entry.num_classes)
        counter = CountingDenoiser(make_denoiser(entry.model, entry.spec))
        images = generate(counter, seeds, entry.sample_shape, entry.spec, labels=labels, batch_size=batch_size, device=device)
        if entry.decode is not None:
            images = entry.decode(images)
        if cost is not None:
            (cost.add_student_forward if entry.is_student else cost.add_teacher_forward)(counter.images)
        feats = space.extract(images)
        metrics: dict[str, float | None]
        if isinstance(reference, ReferenceStats):
            metrics = {"fid": fid_from_stats(feats[space.layer], reference), "kid": None, "precision": None, "recall": None}
        else:
            metrics = fidelity_metrics(
                feats[space.layer], reference[space.layer], kid_subsets=kid_subsets, kid_subset_size=kid_subset_size
            )
        acc = None
        if labels is not None and label_space is not None:
            logits = (feats if label_space is space else label_space.extract(images))["logits"]
            acc = label_accuracy(logits, labels)
        metrics["label_accuracy"] = acc
        if clip is not None and entry.prompts and labels is not None:
            metrics["clip_score"] = clip.score(images, [entry.prompts[i] for i in labels.tolist()])
        results[entry.key] = metrics
        if grids_dir is not None and grid_seeds > 0:
            save_grid(Path(grids_dir) / f"{entry.key.replace('/', '_')}.png", images[:grid_seeds])
        tqdm.write(f"{entry.key}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if v is not None))
    return results


def run_evaluation(
    params: EvalParams,
    *,
    teacher_dir: str | Path,
    data_dir: str | Path,
    feature_net_dir: str | Path | None,
    students: Sequence[tuple[str, str]] = (),
    grids_dir: str | Path | None = None,
    cost: CostMeter | None = None,
    reference_and_solvers: bool = True,
) -> dict[str, dict[str, float | None]]:
    """The ``evaluate`` stages: teacher reference and training-free solvers (unless
    ``reference_and_solvers`` is false), then the distilled students."""
    from pipeline.data.datasets import load_image_folder, load_split
    from pipeline.core.devices import resolve_device
    device = resolve_device(params.device)
    seeds = parse_seeds(params.seeds)
    space = feature_space(params.features, feature_net=feature_net_dir, inception_weights=params.inception_weights, device=device)
    has_classifier = feature_net_dir is not None and has_checkpoint(feature_net_dir)  # none for unlabelled data
    label_space = space if space.kind == "classifier" else (classifier_space(feature_net_dir, device) if has_classifier else None)
    reference: dict[str, torch.Tensor] | ReferenceStats
    if params.reference_stats is None:
        ref_images, _ = load_split(data_dir, params.reference_split)
        reference = reference_features(space, ref_images, params.cache_dir)
    elif params.reference_stats.endswith(".npz"):
        reference = load_reference_stats(params.reference_stats)
    else:
        ref_images, _, _ = load_image_folder(params.reference_stats)
        reference = reference_features(space, ref_images, params.cache_dir)

    loaded = load_teacher(Path(teacher_dir), device)
    teacher, shape, k = loaded.model, loaded.sample_shape, loaded.num_classes
    abar = loaded.alphas_cumprod  # a discrete teacher: its sigma range bounds the schedules
    ref_spec = params.reference_spec(abar)
    extra = latent_options(loaded)
    entries = []
    if reference_and_solvers:
        entries += [Entry(f"teacher/nfe{ref_spec.nfe}", teacher, ref_spec, shape, k, **extra)]
        entries += [Entry(key, teacher, spec, shape, k, **extra) for key, spec in params.solver_specs(abar).items()]
    for name, path in students:
        entries += student_entries(name, path, device, params.student_guidance)
    clip = None
    if params.clip_weights is not None and any(e.prompts for e in entries):
        from pipeline.evaluation.clip_score import ClipScorer

        clip = ClipScorer(params.clip_weights, device=device)
    if not entries:
        raise ParamError("evaluation: nothing to evaluate (no students given and the reference/solvers are off)")
    results = evaluate_entries(
        entries, seeds, space, reference, label_space=label_space, grids_dir=grids_dir, grid_seeds=params.grid_seeds,
        batch_size=params.batch_size, kid_subsets=params.kid_subsets, kid_subset_size=params.kid_subset_size,
        device=device, cost=cost, clip=clip,
    )
    if cost is not None:
        cost.extra.update({"samples_per_sampler": len(seeds), "samplers": len(entries), "features": space.kind})
    return results


def write_results(path: str | Path, results: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
