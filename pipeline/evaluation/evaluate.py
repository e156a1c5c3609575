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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipeline.core.cost import CostMeter
from pipeline.diffusion.denoisers import Denoiser
from pipeline.evaluation.fidelity import FEATURE_SPACES, FeatureSpace, classifier_space, feature_space, fidelity_metrics, label_accuracy, reference_features
from pipeline.core.param_checks import ParamError, check_choice, check_int, check_keys, check_positive
from pipeline.core.images import save_grid
from pipeline.diffusion.sampling import SOLVER_NAMES, SamplerSpec, generate, make_denoiser, resolve_sampler, resolve_solver
from pipeline.diffusion.schedules import Schedule
from pipeline.diffusion.seeds import parse_seeds, seed_labels
from pipeline.diffusion.solvers import CountingDenoiser, num_steps_for_nfe


@dataclass(frozen=True)
class EvalParams:
    seeds: str = "1000000-1001999"  # evaluation seeds; keep disjoint from every training seed range
    grid_seeds: int = 64  # the first this-many evaluation seeds go into each grid PNG
    batch_size: int = 1000
    solvers: list[str] = field(default_factory=lambda: ["euler", "ipndm", "dpmpp3m"])
    nfes: list[int] = field(default_factory=lambda: [2, 3, 4, 5])
    schedule: dict[str, Any] = field(default_factory=lambda: {"kind": "polynomial", "t_min": 0.006, "t_max": 80.0, "rho": 7.0})
    reference: dict[str, Any] = field(
        default_factory=lambda: {"solver": "heun", "num_steps": 18, "t_min": 0.002, "t_max": 80.0, "rho": 7.0,
                                 "append_zero": True}
    )  # the teacher's reference sampler (EDM: 35 NFE)
    guidance: float = 1.0  # classifier-free guidance for the teacher entries
    features: str = "classifier"  # "classifier" (feature_net) or "inception" (local weights file)
    inception_weights: str | None = None  # path of torch-fidelity's pt_inception-2015-12-05-6726825d.pth
    reference_split: str = "train"
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    cache_dir: str = ".cache/fidelity"  # reference features, keyed by extractor weights hash
    device: str = "auto"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EvalParams":
        check_keys("evaluate", d, [f for f in cls.__dataclass_fields__])
        p = cls(**d)
        parse_seeds(p.seeds)
        check_int("evaluate.grid_seeds", p.grid_seeds, minimum=0)
        check_int("evaluate.batch_size", p.batch_size, minimum=1)
        for s in p.solvers:
            check_choice("evaluate.solvers[]", s, list(SOLVER_NAMES))
        for k in p.nfes:
            check_int("evaluate.nfes[]", k, minimum=1)
        Schedule.from_dict({**p.schedule, "num_steps": 4}, section="evaluate.schedule")
        ref = dict(p.reference)
        check_keys("evaluate.reference", ref, ("solver", "num_steps", "t_min", "t_max", "rho", "kind", "append_zero"))
        check_choice("evaluate.reference.solver", ref.get("solver"), list(SOLVER_NAMES))
        check_positive("evaluate.guidance", p.guidance)
        check_choice("evaluate.features", p.features, FEATURE_SPACES)
        check_choice("evaluate.reference_split", p.reference_split, ("train", "held_out"))
        check_int("evaluate.kid_subsets", p.kid_subsets, minimum=1)
        check_int("evaluate.kid_subset_size", p.kid_subset_size, minimum=2)
        return p

    def reference_spec(self) -> SamplerSpec:
        ref = dict(self.reference)
        solver, order = resolve_solver(ref.pop("solver"))
        append_zero = bool(ref.pop("append_zero", False))
        sched = Schedule.from_dict({"kind": "polynomial", **ref}, section="evaluate.reference")
        return SamplerSpec(solver, order, sched, guidance=self.guidance, append_zero=append_zero)

    def solver_specs(self) -> dict[str, SamplerSpec]:
        """{"<solver>/nfe<k>": spec} for the training-free solvers on the student schedule."""
        out = {}
        for name in self.solvers:
            solver, order = resolve_solver(name)
            for k in self.nfes:
                n = num_steps_for_nfe(solver, k)
                sched = Schedule.from_dict({**self.schedule, "num_steps": n}, section="evaluate.schedule")
                out[f"{name}/nfe{k}"] = SamplerSpec(solver, order, sched, guidance=self.guidance)
        return out


@dataclass
class Entry:
    key: str
    model: Denoiser  # D(x, sigma, labels, **net_kwargs)
    spec: SamplerSpec
    sample_shape: tuple[int, ...]
    num_classes: int
    is_student: bool = False


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


def student_entries(name: str, ckpt_dir: str | Path, device: str | torch.device) -> list[Entry]:
    """Entries of a distilled checkpoint: its own sampler, at every supported N when step-conditioned.

    A directory of ``nfe<k>/`` checkpoints gives one entry per checkpoint."""
    from pipeline.teachers.loader import load_network

    dirs = student_dirs(ckpt_dir)
    if len(dirs) > 1 or dirs[0] != Path(ckpt_dir):
        return [e for d in dirs for e in student_entries(name, d, device)]
    model, config = load_network(ckpt_dir, device)
    section = config.get("sampler")
    if section is None:
        raise ParamError(f"--student {name}={ckpt_dir}: the checkpoint has no sampler section (is it a teacher?)")
    data = config["data"]
    base = resolve_sampler(section)
    ns = base.step_condition or (base.schedule.num_steps,)
    entries = []
    for n in ns:
        spec = resolve_sampler(section, num_steps=n) if base.step_condition else base
        entries.append(Entry(f"{name}/nfe{spec.nfe}", model, spec, tuple(data["sample_shape"]),
                             int(data.get("num_classes", 0)), is_student=True))
    return entries


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
    reference: dict[str, torch.Tensor],
    *,
    label_space: FeatureSpace | None = None,  # classifier for label_accuracy (None: not measured)
    grids_dir: str | Path | None = None,
    grid_seeds: int = 64,
    batch_size: int = 1000,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    device: str | torch.device = "cpu",
    cost: CostMeter | None = None,
) -> dict[str, dict[str, float | None]]:
    """Sample every entry on the same seeds and compute its metrics; grids named ``<sampler>_nfe<k>.png``."""
    results: dict[str, dict[str, float | None]] = {}
    keys = [e.key for e in entries]
    if len(set(keys)) != len(keys):
        raise ParamError(f"evaluation: duplicate sampler keys {sorted(k for k in keys if keys.count(k) > 1)}")
    for entry in tqdm(entries, desc="evaluate", unit="sampler"):
        labels = seed_labels(seeds, entry.num_classes)
        counter = CountingDenoiser(make_denoiser(entry.model, entry.spec))
        images = generate(counter, seeds, entry.sample_shape, entry.spec, labels=labels, batch_size=batch_size, device=device)
        if cost is not None:
            (cost.add_student_forward if entry.is_student else cost.add_teacher_forward)(counter.images)
        feats = space.extract(images)
        metrics: dict[str, float | None] = fidelity_metrics(
            feats[space.layer], reference[space.layer], kid_subsets=kid_subsets, kid_subset_size=kid_subset_size
        )
        acc = None
        if labels is not None and label_space is not None:
            logits = (feats if label_space is space else label_space.extract(images))["logits"]
            acc = label_accuracy(logits, labels)
        metrics["label_accuracy"] = acc
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
    from pipeline.data.datasets import load_split
    from pipeline.core.devices import resolve_device
    from pipeline.teachers.loader import load_network

    device = resolve_device(params.device)
    seeds = parse_seeds(params.seeds)
    space = feature_space(params.features, feature_net=feature_net_dir, inception_weights=params.inception_weights, device=device)
    label_space = space if space.kind == "classifier" else (classifier_space(feature_net_dir, device) if feature_net_dir else None)
    ref_images, _ = load_split(data_dir, params.reference_split)
    reference = reference_features(space, ref_images, params.cache_dir)

    teacher, config = load_network(teacher_dir, device)
    shape, k = tuple(config["data"]["sample_shape"]), int(config["data"].get("num_classes", 0))
    ref_spec = params.reference_spec()
    entries = []
    if reference_and_solvers:
        entries += [Entry(f"teacher/nfe{ref_spec.nfe}", teacher, ref_spec, shape, k)]
        entries += [Entry(key, teacher, spec, shape, k) for key, spec in params.solver_specs().items()]
    for name, path in students:
        entries += student_entries(name, path, device)
    if not entries:
        raise ParamError("evaluation: nothing to evaluate (no students given and the reference/solvers are off)")
    results = evaluate_entries(
        entries, seeds, space, reference, label_space=label_space, grids_dir=grids_dir, grid_seeds=params.grid_seeds,
        batch_size=params.batch_size, kid_subsets=params.kid_subsets, kid_subset_size=params.kid_subset_size,
        device=device, cost=cost,
    )
    if cost is not None:
        cost.extra.update({"samples_per_sampler": len(seeds), "samplers": len(entries), "features": space.kind})
    return results


def write_results(path: str | Path, results: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
