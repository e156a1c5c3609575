"""The paired teacher-fidelity metric: how far each sampler's sample lies from the teacher's from the same x_T.

Per seed i of the first ``evaluate.paired_seeds`` evaluation seeds (every sampler starts from the same noise x_T and
label for a seed):
- **pixel**: the RMS distance sqrt(mean_j (x_ij - r_ij)^2) between the sampler's image x_i and the teacher's reference
  sample r_i, both clamped to [-1, 1] (the image space the evaluation uses; a latent model's VAE-decoded images);
- **feature**: the L2 distance ||f(x_i) - f(r_i)|| between their feature vectors in the evaluation feature space
  (``evaluate.features``: the classifier's features or Inception's 2048-d pool features, the FID layer).
The reference r is the teacher's reference sampler (``evaluate.reference``, the entry ``teacher/nfe<k>``): the
evaluate_solvers stage writes its first samples and features once (:func:`save_reference`: images float16, features
float32) and the other evaluate stages read them. A sampler's summary is the mean distance and its standard error
sd / sqrt(n). Two samplers on the same seeds are compared by the **paired bootstrap** (:func:`paired_bootstrap`): the
per-seed differences are resampled with replacement (both samplers' distances of a seed move together) and the
percentile interval of the mean difference says whether the difference is resolved (the interval excludes 0).
KID differences are compared by their subset standard deviations (:func:`kid_difference`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.core.param_checks import PipelineError

KID_SDS = 2.0  # a KID difference is resolved when it exceeds this many standard deviations of the difference


class PairedFileError(PipelineError, FileNotFoundError):
    """A paired reference or distance file is missing, malformed or from another protocol."""


@dataclass(frozen=True)
class PairedReference:
    """The teacher's reference samples of the first paired seeds: what every sampler's distance is measured to."""

    sampler: str  # its evaluation key, e.g. "teacher/nfe35"
    seeds: list[int]
    images: torch.Tensor  # float32 [P, C, H, W] in [-1, 1] (stored as float16)
    features: torch.Tensor  # float32 [P, D] in the evaluation feature space
    feature_space: str  # "<kind>:<extractor weights hash>": distances in another space are refused


def make_reference(sampler: str, seeds: list[int], images: torch.Tensor, features: torch.Tensor, *, count: int,
                   feature_space: str) -> PairedReference:
    """The reference of the first ``count`` seeds (all when fewer), rounded to what the file stores."""
    n = min(count, len(seeds))
    pixels = images[:n].clamp(-1, 1).to(torch.float16).to(torch.float32)
    return PairedReference(sampler, list(seeds[:n]), pixels, features[:n].to(torch.float32).cpu(), feature_space)


def save_reference(path: str | Path, ref: PairedReference) -> None:
    tensors = {"seeds": torch.tensor(ref.seeds, dtype=torch.int64), "images": ref.images.to(torch.float16).contiguous(),
               "features": ref.features.contiguous()}
    _save(path, tensors, {"sampler": ref.sampler, "feature_space": ref.feature_space})


def load_reference(path: str | Path) -> PairedReference:
    tensors, meta = _load(path, ("seeds", "images", "features"), ("sampler", "feature_space"),
                          "the evaluate_solvers stage writes it (dvc repro evaluate_solvers)")
    return PairedReference(meta["sampler"], tensors["seeds"].tolist(), tensors["images"].to(torch.float32),
                           tensors["features"].to(torch.float32), meta["feature_space"])


def distances(images: torch.Tensor, features: torch.Tensor, ref: PairedReference) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-seed (pixel RMS distance, feature L2 distance), float64 [P], of a sampler's images and features on the
    evaluation seeds (the reference's seeds are their first P)."""
    n = len(ref.seeds)
    if len(images) < n or len(features) < n:
        raise PipelineError(f"paired metric: {len(images)} samples, the reference has {n} seeds")
    x, r = images[:n].clamp(-1, 1).to(torch.float64), ref.images.to(torch.float64)
    if x.shape != r.shape:
        raise PipelineError(f"paired metric: samples of shape {tuple(x.shape[1:])}, the teacher's reference samples "
                            f"{tuple(r.shape[1:])}")
    pixel = (x - r).flatten(1).pow(2).mean(1).sqrt()
    feature = (features[:n].to(torch.float64).cpu() - ref.features.to(torch.float64)).norm(dim=1)
    return pixel, feature


def mean_se(values: torch.Tensor) -> tuple[float, float]:
    """(mean, standard error sd/sqrt(n) with the n-1 sd) of per-seed values."""
    v = values.to(torch.float64)
    n = len(v)
    return float(v.mean()), float(v.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan


def summary(pixel: torch.Tensor, feature: torch.Tensor) -> dict[str, float | int]:
    """The evaluation entry's paired fields: mean and standard error of both distances, and the seed count."""
    (pm, ps), (fm, fs) = mean_se(pixel), mean_se(feature)
    return {"paired_pixel_rms": pm, "paired_pixel_rms_se": ps, "paired_feature_l2": fm, "paired_feature_l2_se": fs,
            "paired_seeds": len(pixel)}


@dataclass
class PairedMeter:
    """Each evaluated entry's per-seed distances to the reference. Without a reference yet (evaluate_solvers), the
    entry ``reference_key`` becomes it when it is measured (first: it is the first entry)."""

    reference: PairedReference | None = None
    reference_key: str | None = None
    count: int = 0  # evaluate.paired_seeds: the seeds the reference keeps (0: whatever a read reference holds)
    feature_space: str = ""
    per_seed: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def measure(self, key: str, seeds: list[int], images: torch.Tensor, features: torch.Tensor) -> dict[str, Any]:
        if self.reference is None and key == self.reference_key:
            self.reference = make_reference(key, seeds, images, features, count=self.count, feature_space=self.feature_space)
        ref = self.check(seeds, key)
        self.per_seed[key] = distances(images, features, ref)
        return summary(*self.per_seed[key])

    def check(self, seeds: list[int], key: str = "") -> PairedReference:
        """The reference, after checking that it fits this evaluation: its feature space, seed count and seeds."""
        ref = self.reference
        if ref is None:
            raise PipelineError(f"paired metric: {key} was measured before the reference entry {self.reference_key}")
        if ref.feature_space != self.feature_space:
            raise PairedFileError(f"paired reference: its features are {ref.feature_space}, this evaluation's "
                                  f"{self.feature_space} (re-run evaluate_solvers)")
        if self.count and len(ref.seeds) != min(self.count, len(seeds)):
            raise PairedFileError(f"paired reference: it holds {len(ref.seeds)} seeds, evaluate.paired_seeds asks for "
                                  f"{min(self.count, len(seeds))} (re-run evaluate_solvers)")
        if list(seeds[: len(ref.seeds)]) != ref.seeds:
            raise PairedFileError(f"paired reference: its seeds are not the first {len(ref.seeds)} evaluation seeds "
                                  "(re-run evaluate_solvers)")
        return ref

    def save(self, path: str | Path) -> None:
        """The per-seed distances of every measured entry (``pixel/<key>``, ``feature/<key>``) and the seeds."""
        ref = self.reference
        tensors = {"seeds": torch.tensor([] if ref is None else ref.seeds, dtype=torch.int64)}
        for key, (pixel, feature) in self.per_seed.items():
            tensors[f"pixel/{key}"], tensors[f"feature/{key}"] = pixel.contiguous(), feature.contiguous()
        _save(path, tensors, {"reference": "" if ref is None else ref.sampler, "feature_space": self.feature_space})


@dataclass(frozen=True)
class PairedDistances:
    """Per-seed distances of every entry of one or more evaluate stages (the report stage reads them)."""

    reference: str
    seeds: list[int]
    pixel: dict[str, torch.Tensor]
    feature: dict[str, torch.Tensor]


def load_distances(paths: list[Path]) -> PairedDistances | None:
    """The distance files of the evaluate stages, merged; they must share the reference and the seeds."""
    merged: PairedDistances | None = None
    for path in paths:
        tensors, meta = _load(path, ("seeds",), ("reference", "feature_space"), "its evaluate stage writes it (--paired)")
        seeds = tensors.pop("seeds").tolist()
        if merged is None:
            merged = PairedDistances(meta["reference"], seeds, {}, {})
        elif (meta["reference"], seeds) != (merged.reference, merged.seeds):
            raise PairedFileError(f"paired distances {path}: measured to {meta['reference']} on {len(seeds)} seeds, the "
                                  f"first file to {merged.reference} on {len(merged.seeds)}; re-run the evaluate stages")
        for name, values in tensors.items():
            kind, _, key = name.partition("/")
            target = merged.pixel if kind == "pixel" else merged.feature
            if key in target:
                raise PairedFileError(f"paired distances: {key!r} appears in two files (second: {path})")
            target[key] = values.to(torch.float64)
    return merged


def paired_bootstrap(a: torch.Tensor, b: torch.Tensor, *, resamples: int = 1000, confidence: float = 0.95,
                     seed: int = 0) -> dict[str, Any]:
    """Mean of the per-seed differences a - b (distances: negative = a closer to the teacher) with its percentile
    bootstrap interval: the seeds are resampled with replacement, a seed's two distances together. ``better``: "a"
    or "b" when the interval excludes 0, None when it does not (unresolved at this sample size)."""
    import numpy as np

    if len(a) != len(b) or len(a) < 2:
        raise PipelineError(f"paired bootstrap: needs the same seeds for both samplers and at least 2 (got {len(a)}, {len(b)})")
    d = (a.to(torch.float64) - b.to(torch.float64)).numpy()
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), (resamples, len(d)))].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = (float(v) for v in np.quantile(means, [alpha, 1 - alpha]))
    better = "a" if high < 0 else "b" if low > 0 else None
    return {"difference": float(d.mean()), "se": float(d.std(ddof=1) / math.sqrt(len(d))), "ci_low": low,
            "ci_high": high, "confidence": confidence, "resamples": resamples, "seeds": len(d), "resolved": better is not None,
            "better": better}


def kid_difference(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any] | None:
    """KID_a - KID_b with sd = sqrt(sd_a^2 + sd_b^2) from the subset standard deviations (``kid_std``): resolved when
    |difference| > KID_SDS sd. Conservative: the subset sd is a subset-size estimate's spread (larger than the full
    estimate's error), and the two KIDs share the reference set and the seeds (which correlates them, so the true sd
    of the difference is smaller). None when either KID or its sd is missing."""
    if any(m.get(k) is None for m in (a, b) for k in ("kid", "kid_std")):
        return None
    diff, sd = a["kid"] - b["kid"], math.hypot(a["kid_std"], b["kid_std"])
    resolved = abs(diff) > KID_SDS * sd
    return {"difference": diff, "sd": sd, "rule": f"|difference| > {KID_SDS:g} sd", "resolved": resolved,
            "better": None if not resolved else "a" if diff < 0 else "b"}


def _save(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"paired": json.dumps(meta)})
    tmp.replace(path)


def _load(path: str | Path, names: tuple[str, ...], meta_keys: tuple[str, ...], hint: str
          ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise PairedFileError(f"paired file {path} does not exist ({hint})")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("paired", "{}"))
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise PairedFileError(f"paired file {path}: not a paired safetensors file ({e})") from None
    missing = [n for n in names if n not in tensors] + [k for k in meta_keys if k not in meta]
    if missing:
        raise PairedFileError(f"paired file {path}: missing {', '.join(missing)} ({hint})")
    return tensors, meta
