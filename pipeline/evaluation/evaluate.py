"""Evaluate samplers on the same evaluation seeds: FID, KID, precision/recall, label accuracy, grids.

Entries (keys ``"<sampler>/nfe<k>"``):
- ``teacher/nfe35``: the teacher's reference sampler, EDM's Heun over 18 polynomial timestamps
  (t_max 80, t_min 0.002, rho 7) plus a final Euler step to t = 0;
- the training-free solvers of ``evaluate.solvers`` at each NFE of ``evaluate.nfes`` on the
  student schedule (N picked with pipeline.diffusion.solvers.num_steps_for_nfe);
- every distilled checkpoint ``NAME=DIR`` with its own sampler (one key per supported N for a
  step-conditioned checkpoint).
Every entry samples the same seeds; labels come from pipeline.diffusion.seeds.seed_labels when the model
is conditional. Reference features are the training images' (cached, keyed by weights hash). With
``evaluate.bootstrap`` > 0 every entry also gets ``fid_sd``: the FID's bootstrap standard deviation
over resampled features (no new images). KID comes with ``kid_std``, the standard deviation over its subsets.

The paired teacher-fidelity metric (pipeline.evaluation.paired): ``evaluate_solvers`` keeps the reference entry's first
``evaluate.paired_seeds`` samples and features (``--paired-reference-out``), the other stages read them
(``--paired-reference``); every entry gets the mean and standard error of its per-seed pixel RMS and feature L2
distances to them (``paired_*``), and the per-seed distances go to ``--paired`` for the report's paired bootstrap.

The noise floor (:func:`noise_floor`, written by ``evaluate_solvers``): the FID between two
independent sample sets of the teacher's reference sampler (the evaluation seeds and
``evaluate.noise_floor_seeds``, same count), each set's FID against the reference, and the FID of
the held-out data against the reference. FID differences smaller than the floor are not significant.

Several processes (torchrun): the seeds are cut into blocks of ``batch_size`` (the batches one process
samples), the blocks dealt round-robin to the ranks, and rank 0 gathers the samples in seed order and
computes every metric, grid and file, so the results equal a one-process run's (the same batches give
the same samples). ``precision`` bf16/fp16 runs the networks' forwards under autocast.
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
from pipeline.core.distributed import (
    all_gather_objects, all_reduce_sum, autocast_denoiser, enable_tf32, is_main, rank, rank_device, world_size,
)  # fmt: skip
from pipeline.diffusion.denoisers import Denoiser
from pipeline.config.evaluation import EvalParams
from pipeline.evaluation.fidelity import (
    FeatureSpace, ReferenceStats, bootstrap_fid, classifier_space, feature_space, fid_between, fid_from_stats,
    fidelity_metrics, label_accuracy, load_reference_stats, reference_features,
)  # fmt: skip
from pipeline.core.param_checks import ParamError
from pipeline.evaluation.paired import PairedMeter, load_reference, save_reference
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


def student_dirs(ckpt_dir: str | Path, round_nfes: Sequence[int] | None = None) -> list[Path]:
    """A checkpoint directory, or a directory of per-NFE checkpoints ``nfe<k>/`` (PD rounds, SFDDM's T'), of
    those only the NFEs in ``round_nfes`` when given (``evaluate.round_nfes``)."""
    path = Path(ckpt_dir)
    if (path / "model.json").is_file():
        return [path]
    rounds = sorted(
        (d for d in path.glob("nfe*") if d.name[3:].isdigit() and (d / "model.json").is_file()),
        key=lambda d: int(d.name[3:]),
    )
    if not rounds:
        raise ParamError(f"--student {path}: neither a checkpoint (model.json) nor a directory of nfe<k>/ checkpoints")
    kept = [d for d in rounds if round_nfes is None or int(d.name[3:]) in round_nfes]
    if not kept:
        have = ", ".join(d.name[3:] for d in rounds)
        raise ParamError(f"evaluate.round_nfes: {list(round_nfes or [])} keeps none of {path}'s rounds (NFE {have})")
    return kept


def student_entries(name: str, ckpt_dir: str | Path, device: str | torch.device,
                    guidance: Sequence[float] = (), round_nfes: Sequence[int] | None = None) -> list[Entry]:
    """Entries of a distilled checkpoint: its own sampler, at every supported N when step-conditioned.

    A directory of ``nfe<k>/`` checkpoints gives one entry per checkpoint (of ``round_nfes`` when given). Each
    ``guidance`` w other than the checkpoint's own adds entries ``<name>-w<w>/nfe<k>``: the same network on both
    branches."""
    dirs = student_dirs(ckpt_dir, round_nfes)
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
    bootstrap: int = 0,  # resamples of the features for each FID's sd (0: none)
    features_out: dict[str, torch.Tensor] | None = None,  # filled with each entry's metric-layer features
    precision: str = "fp32",  # bf16/fp16: the forwards under autocast
    clip: Any = None,  # a pipeline.evaluation.clip_score.ClipScorer: CLIP score of text-to-image entries
    paired: PairedMeter | None = None,  # each entry's per-seed distances to the teacher's reference samples
) -> dict[str, dict[str, float | None]]:
    """Sample every entry on the same seeds and compute its metrics; grids named ``<sampler>_nfe<k>.png``.

    Latent entries are decoded by their VAE first; labels of text-to-image entries are prompt indices.
    Under torchrun every rank samples its seed blocks and only rank 0 computes metrics (the other ranks
    return an empty mapping)."""
    results: dict[str, dict[str, float | None]] = {}
    keys = [e.key for e in entries]
    if len(set(keys)) != len(keys):
        raise ParamError(f"evaluation: duplicate sampler keys {sorted(k for k in keys if keys.count(k) > 1)}")
    for entry in tqdm(entries, desc="evaluate", unit="sampler", disable=not is_main()):
        labels = seed_labels(seeds, entry.num_classes)
        counter = CountingDenoiser(autocast_denoiser(make_denoiser(entry.model, entry.spec), precision, device))
        images = generate_across_processes(counter, seeds, entry.sample_shape, entry.spec, labels=labels,
                                           batch_size=batch_size, device=device)
        if images is not None and entry.decode is not None:
            images = entry.decode(images)
        if cost is not None:
            count = counter.images if world_size() == 1 else int(all_reduce_sum(counter.images))
            (cost.add_student_forward if entry.is_student else cost.add_teacher_forward)(count)
        if images is None:  # not rank 0: its samples went to rank 0
            continue
        feats = space.extract(images)
        metrics = _fidelity(feats[space.layer], space, reference, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
                            bootstrap=bootstrap)
        if features_out is not None:
            features_out[entry.key] = feats[space.layer]
        acc = None
        if labels is not None and label_space is not None:
            logits = (feats if label_space is space else label_space.extract(images))["logits"]
            acc = label_accuracy(logits, labels)
        metrics["label_accuracy"] = acc
        if paired is not None:
            metrics.update(paired.measure(entry.key, list(seeds), images, feats[space.layer]))
        if clip is not None and entry.prompts and labels is not None:
            metrics["clip_score"] = clip.score(images, [entry.prompts[i] for i in labels.tolist()])
        results[entry.key] = metrics
        if grids_dir is not None and grid_seeds > 0:
            save_grid(Path(grids_dir) / f"{entry.key.replace('/', '_')}.png", images[:grid_seeds])
        tqdm.write(f"{entry.key}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if v is not None))
    return results


def _fidelity(feats: torch.Tensor, space: FeatureSpace, reference: "dict[str, torch.Tensor] | ReferenceStats", *,
              kid_subsets: int, kid_subset_size: int, bootstrap: int) -> dict[str, float | None]:
    """FID (against features, or EDM's reference statistics: then no KID, precision or recall), KID, precision,
    recall, and with ``bootstrap`` resamples each FID's sd."""
    metrics: dict[str, float | None]
    if isinstance(reference, ReferenceStats):
        metrics = {"fid": fid_from_stats(feats, reference), "kid": None, "kid_std": None,
                   "precision": None, "recall": None}
    else:
        metrics = fidelity_metrics(feats, reference[space.layer], kid_subsets=kid_subsets, kid_subset_size=kid_subset_size)
    if bootstrap > 0:
        ref = reference if isinstance(reference, ReferenceStats) else reference[space.layer]
        metrics["fid_sd"] = bootstrap_fid(feats, ref, resamples=bootstrap)["fid_sd"]
    return metrics


def generate_across_processes(
    denoiser: Denoiser,
    seeds: Sequence[int],
    sample_shape: Sequence[int],
    spec: SamplerSpec,
    *,
    labels: torch.Tensor | None,
    batch_size: int,
    device: str | torch.device,
) -> torch.Tensor | None:
    """pipeline.diffusion.sampling.generate, with the batches dealt round-robin to the ranks under torchrun
    and gathered on rank 0 in seed order (None on the other ranks); plain ``generate`` with one process."""
    k = world_size()
    if k == 1:
        return generate(denoiser, seeds, sample_shape, spec, labels=labels, batch_size=batch_size, device=device)
    starts = list(range(0, len(seeds), batch_size))
    mine = {}
    for i in starts[rank() :: k]:
        lab = None if labels is None else labels[i : i + batch_size]
        mine[i] = generate(denoiser, list(seeds[i : i + batch_size]), sample_shape, spec, labels=lab,
                           batch_size=batch_size, device=device)
    gathered = all_gather_objects(mine)
    if not is_main():
        return None
    merged = {i: t for part in gathered for i, t in part.items()}
    return torch.cat([merged[i] for i in starts]) if starts else torch.empty((0, *sample_shape))


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
    noise_floor_out: str | Path | None = None,  # JSON of :func:`noise_floor` (needs the reference entry)
    paired_reference: str | Path | None = None,  # read the teacher's reference samples (evaluate_solvers wrote them)
    paired_reference_out: str | Path | None = None,  # write the reference entry's first evaluate.paired_seeds samples
    paired_out: str | Path | None = None,  # every entry's per-seed paired distances (safetensors)
) -> dict[str, dict[str, float | None]]:
    """The ``evaluate`` stages: teacher reference and training-free solvers (unless
    ``reference_and_solvers`` is false), then the distilled students; with ``noise_floor_out``,
    the noise floor of this protocol too; with a paired reference (read or written), the paired metric."""
    from pipeline.data.datasets import load_split
    from pipeline.core.devices import resolve_device
    device = rank_device(resolve_device(params.device))
    if params.precision != "fp32":
        enable_tf32(device)
    seeds = parse_seeds(params.seeds)
    space = feature_space(params.features, feature_net=feature_net_dir, inception_weights=params.inception_weights, device=device)
    has_classifier = feature_net_dir is not None and has_checkpoint(feature_net_dir)  # none for unlabelled data
    label_space = space if space.kind == "classifier" else (classifier_space(feature_net_dir, device) if has_classifier else None)
    reference = _reference(params, space, data_dir)
    entries = _entries(params, teacher_dir, students, device, reference_and_solvers)
    clip = _clip_scorer(params, entries, device)
    if not entries:
        raise ParamError("evaluation: nothing to evaluate (no students given and the reference/solvers are off)")
    if noise_floor_out is not None and not reference_and_solvers:
        raise ParamError("evaluation: the noise floor needs the teacher's reference entry (drop --no-solvers)")
    paired = paired_meter(params, space, entries[0].key, seeds, reference_and_solvers, paired_reference,
                          paired_reference_out, paired_out)
    features: dict[str, torch.Tensor] = {}
    results = evaluate_entries(
        entries, seeds, space, reference, label_space=label_space, grids_dir=grids_dir, grid_seeds=params.grid_seeds,
        batch_size=params.batch_size, kid_subsets=params.kid_subsets, kid_subset_size=params.kid_subset_size,
        device=device, cost=cost, bootstrap=params.bootstrap, features_out=features, precision=params.precision,
        clip=clip, paired=paired,
    )
    if paired is not None and is_main():  # rank 0 measured every entry (torchrun)
        _write_paired(paired, paired_reference_out, paired_out)
    if cost is not None:
        cost.extra.update({"samples_per_sampler": len(seeds), "samplers": len(entries), "features": space.kind})
    if noise_floor_out is not None and params.noise_floor_seeds is None:
        write_results(noise_floor_out, {"floor": None, "note": "evaluate.noise_floor_seeds is null: no noise floor"})
    elif noise_floor_out is not None and is_main():  # rank 0 holds the gathered features (torchrun)
        held_split = "held_out" if params.reference_stats is not None or params.reference_split == "train" else "train"
        held_images, _ = load_split(data_dir, held_split)
        floor = noise_floor(
            params, entries[0], features[entries[0].key], space, reference, held_images, held_split=held_split,
            device=device, cost=cost,
        )  # fmt: skip
        write_results(noise_floor_out, floor)
    return results


def _clip_scorer(params: EvalParams, entries: list[Entry], device: torch.device) -> Any:
    """The CLIP scorer when a text-to-image entry is evaluated and ``clip_weights`` is given; None otherwise."""
    if params.clip_weights is None or not any(e.prompts for e in entries):
        return None
    from pipeline.evaluation.clip_score import ClipScorer

    return ClipScorer(params.clip_weights, device=device)


def _write_paired(paired: Any, paired_reference_out: str | Path | None, paired_out: str | Path | None) -> None:
    """The teacher's reference samples (evaluate_solvers) and every entry's per-seed paired distances."""
    if paired_reference_out is not None and paired.reference is not None:
        save_reference(paired_reference_out, paired.reference)
    if paired_out is not None:
        paired.save(paired_out)


def _reference(params: EvalParams, space: FeatureSpace, data_dir: str | Path) -> "dict[str, torch.Tensor] | ReferenceStats":
    """The FID reference: EDM's .npz statistics, the features of a folder of images, or of the data split; empty on
    ranks other than 0 (only rank 0 computes metrics and writes the reference cache)."""
    from pipeline.data.datasets import load_image_folder, load_split

    if not is_main():
        return {}
    if params.reference_stats is None:
        ref_images, _ = load_split(data_dir, params.reference_split)
        return reference_features(space, ref_images, params.cache_dir)
    if params.reference_stats.endswith(".npz"):
        return load_reference_stats(params.reference_stats)
    ref_images, _, _ = load_image_folder(params.reference_stats)
    return reference_features(space, ref_images, params.cache_dir)


def _entries(params: EvalParams, teacher_dir: str | Path, students: Sequence[tuple[str, str]], device: torch.device,
             reference_and_solvers: bool) -> list[Entry]:
    """What to evaluate: the teacher's reference and the training-free solvers, then every student entry."""
    loaded = load_teacher(Path(teacher_dir), device)
    teacher, shape, k = loaded.model, loaded.sample_shape, loaded.num_classes
    abar = loaded.alphas_cumprod  # a discrete teacher: its sigma range bounds the schedules
    flow_shift = loaded.flow_shift  # a flow-matching teacher: its schedules start at sigma = inf
    ref_spec = params.reference_spec(abar, flow_shift)
    extra = latent_options(loaded)
    entries = []
    if reference_and_solvers:
        entries += [Entry(f"teacher/nfe{ref_spec.nfe}", teacher, ref_spec, shape, k, **extra)]
        entries += [Entry(key, teacher, spec, shape, k, **extra) for key, spec in params.solver_specs(abar, flow_shift).items()]
    for name, path in students:
        entries += student_entries(name, path, device, params.student_guidance, params.round_nfes)
    return entries


def paired_meter(params: EvalParams, space: FeatureSpace, first_key: str, seeds: list[int], reference_and_solvers: bool,
                 reference_in: str | Path | None, reference_out: str | Path | None,
                 distances_out: str | Path | None) -> PairedMeter | None:
    """The paired metric's meter: reading the teacher's reference samples (checked against this evaluation before
    anything is sampled), or building them from the reference entry (the first entry; ``reference_and_solvers``);
    None when no paired file is asked for."""
    if reference_in is None and reference_out is None:
        if distances_out is not None:
            raise ParamError("evaluation: --paired needs --paired-reference (read) or --paired-reference-out (write)")
        return None
    if reference_in is not None and reference_out is not None:
        raise ParamError("evaluation: give --paired-reference (read) or --paired-reference-out (write), not both")
    if reference_out is not None and not reference_and_solvers:
        raise ParamError("evaluation: --paired-reference-out needs the teacher's reference entry (drop --no-solvers)")
    ident = f"{space.kind}:{space.weights_hash}"
    if reference_out is not None:
        return PairedMeter(reference_key=first_key, count=params.paired_seeds, feature_space=ident)
    if not is_main():  # rank 0 measures (torchrun)
        return PairedMeter(count=params.paired_seeds, feature_space=ident)
    meter = PairedMeter(load_reference(reference_in), count=params.paired_seeds, feature_space=ident)
    meter.check(seeds)
    return meter


def noise_floor(
    params: EvalParams,
    teacher: Entry,  # the teacher's reference sampler, already evaluated on params.seeds
    teacher_features: torch.Tensor,  # its features on params.seeds
    space: FeatureSpace,
    reference: dict[str, torch.Tensor] | ReferenceStats,
    held_images: torch.Tensor,  # data the reference does not hold (the held-out split)
    *,
    held_split: str = "held_out",
    device: str | torch.device = "cpu",
    cost: CostMeter | None = None,
) -> dict[str, Any]:
    """The protocol's FID noise floor (module docstring); ``floor`` is the teacher-vs-teacher FID.

    The second teacher set uses ``evaluate.noise_floor_seeds`` (same count as ``evaluate.seeds``,
    disjoint from them and from every training seed: checked by pipeline.config)."""
    if params.noise_floor_seeds is None:
        raise ParamError("evaluate.noise_floor_seeds: null; set a second seed range to compute the noise floor")
    floor_seeds = params.noise_floor_seeds
    if floor_seeds == "auto":  # unresolved (params not loaded through pipeline.config.params): evaluation seeds only
        from pipeline.config.params import auto_noise_floor_seeds

        floor_seeds = auto_noise_floor_seeds(params.seeds, [])
    seeds_b = parse_seeds(floor_seeds)
    counter = CountingDenoiser(make_denoiser(teacher.model, teacher.spec))
    images = generate(counter, seeds_b, teacher.sample_shape, teacher.spec, labels=seed_labels(seeds_b, teacher.num_classes),
                      batch_size=params.batch_size, device=device)  # fmt: skip
    if cost is not None:
        cost.add_teacher_forward(counter.images)
        cost.extra["noise_floor_samples"] = len(seeds_b)
    feats_b = space.extract(images)[space.layer]
    ref = reference if isinstance(reference, ReferenceStats) else reference[space.layer]
    fid_a, fid_b = fid_between(teacher_features, ref), fid_between(feats_b, ref)
    between = fid_between(teacher_features, feats_b)
    held = fid_between(space.extract(held_images)[space.layer], ref)
    out = {
        "sampler": teacher.key,
        "samples": len(seeds_b),
        "features": space.kind,
        "seeds": params.seeds,
        "noise_floor_seeds": floor_seeds,
        "teacher_vs_teacher_fid": between,
        "teacher_fid": fid_a,
        "teacher_fid_second_seeds": fid_b,
        "teacher_fid_seed_difference": abs(fid_a - fid_b),
        "held_out_fid": held,
        "held_out_split": held_split,
        "held_out_samples": len(held_images),
        "floor": between,
        "rule": "FID differences smaller than `floor` (the FID between two independent teacher sample sets of the "
                "evaluation's size) are not significant",
    }
    if params.bootstrap > 0:
        out["teacher_fid_sd"] = bootstrap_fid(teacher_features, ref, resamples=params.bootstrap)["fid_sd"]
    tqdm.write(f"noise floor: teacher vs teacher FID {between:.4g}, held-out FID {held:.4g} ({len(held_images)} images)")
    return out


def write_results(path: str | Path, results: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
