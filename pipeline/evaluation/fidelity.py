"""FID, KID, precision/recall (torch-fidelity) in a feature space that works offline.

Feature spaces:
- ``classifier``: the project's digits classifier (pipeline.evaluation.feature_net), registered with
  torch-fidelity as the feature extractor ``sfd-classifier``; its weights path is the
  checkpoint directory. Its logits also give ``label_accuracy``.
- ``inception``: torch-fidelity's InceptionV3 (``inception-v3-compat``, pool3 2048 features)
  with weights from a local file; nothing is downloaded.

FID = ||mu_g - mu_r||^2 + Tr(S_g + S_r - 2 (S_g S_r)^{1/2}) (Heusel et al. 2017); KID is the
unbiased polynomial-kernel MMD^2 averaged over subsets (Binkowski et al. 2018), reported with the
standard deviation over the subsets (``kid_std``, the spread of a subset-size estimate); precision and
recall are the k-NN manifold estimates (Kynkaanniemi et al. 2019), k = 3. Reference features
(of the training images) are cached as safetensors, keyed by the extractor's weights hash and
the images' hash; torch-fidelity's own pickle cache is not used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

from pipeline.config.evaluation import FEATURE_SPACES
from pipeline.core.images import to_uint8
from pipeline.core.hashing import hash_bytes, hash_file
from pipeline.core.param_checks import PipelineError, check_choice

CLASSIFIER_EXTRACTOR = "sfd-classifier"
INCEPTION_EXTRACTOR = "inception-v3-compat"
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"  # torch-fidelity's released weights


class InceptionWeightsMissing(PipelineError, FileNotFoundError):
    """The local Inception weights file named in params is not there."""


class ReferenceStatsError(PipelineError, FileNotFoundError):
    """The reference statistics file named in params is missing or not EDM's (mu, sigma) .npz."""


@dataclass(frozen=True)
class ReferenceStats:
    """FID statistics of a reference set given as a file (EDM's ``fid.py ref`` .npz): FID only, no KID/PR."""

    mu: torch.Tensor  # float64 [D]
    sigma: torch.Tensor  # float64 [D, D]
    source: str


def load_reference_stats(path: str | Path) -> ReferenceStats:
    """EDM's reference statistics (.npz with ``mu`` [D] and ``sigma`` [D, D]), read without unpickling."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise ReferenceStatsError(
            f"evaluate.reference_stats: {path} not found. EDM's reference statistics (e.g. cifar10-32x32.npz from "
            f"EDM's fid-refs, or written by EDM's `fid.py ref --data=DATASET --dest={path.name}`) cannot be "
            f"downloaded here: put the file at {path}, or give a folder of reference PNGs, or set "
            f"evaluate.reference_stats: null to use the data split"
        )
    try:
        with np.load(path, allow_pickle=False) as f:
            mu, sigma = np.asarray(f["mu"], dtype=np.float64), np.asarray(f["sigma"], dtype=np.float64)
    except (KeyError, ValueError, OSError) as e:
        raise ReferenceStatsError(f"evaluate.reference_stats: {path} is not an .npz holding 'mu' and 'sigma' ({e})") from None
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ReferenceStatsError(f"evaluate.reference_stats: {path} has mu {mu.shape} and sigma {sigma.shape}; "
                                  "expected [D] and [D, D]")
    return ReferenceStats(torch.from_numpy(mu), torch.from_numpy(sigma), str(path))


def fid_from_stats(generated: torch.Tensor, stats: ReferenceStats) -> float:
    """FID of generated features [N, D] against reference statistics."""
    g = generated.to(torch.float64).cpu()
    if g.shape[1] != len(stats.mu):
        raise ReferenceStatsError(
            f"evaluate.reference_stats: {stats.source} has {len(stats.mu)}-d statistics, the feature space gives "
            f"{g.shape[1]}-d features (EDM's .npz files are Inception pool features: use evaluate.features: inception)"
        )
    return reference_fid(stats)(g.numpy())


class ClassifierFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity extractor around pipeline.evaluation.feature_net.Classifier; input uint8 [B, C, H, W]."""

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None, **kwargs: Any) -> None:
        super().__init__(name, features_list)
        from pipeline.evaluation.feature_net import load_feature_net

        if feature_extractor_weights_path is None:
            raise FileNotFoundError(
                f"{name}: pass feature_extractor_weights_path= the feature_net checkpoint directory "
                f"(written by `dvc repro feature_net`, e.g. models/feature_net)"
            )
        self.model, self.config, self.weights_hash = load_feature_net(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("features", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return "features"

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> None:
        return None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features, logits = self.model(x.to(torch.float32) / 127.5 - 1)
        out = {"features": features, "logits": logits}
        return tuple(out[name] for name in self.features_list)


if CLASSIFIER_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(CLASSIFIER_EXTRACTOR, ClassifierFeatureExtractor)


class UInt8Images(Dataset):
    """uint8 C×H×W tensors, as torch-fidelity wants them (it rejects a TensorDataset's tuples)."""

    def __init__(self, images: torch.Tensor, channels: int | None = None) -> None:
        self.images = images if images.dtype == torch.uint8 else to_uint8(images)
        if channels is not None and self.images.shape[1] != channels:
            self.images = self.images.expand(-1, channels, -1, -1)  # grayscale -> RGB for Inception

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i].contiguous()


@dataclass
class FeatureSpace:
    extractor: FeatureExtractorBase
    kind: str  # "classifier" | "inception"
    layer: str  # the feature layer the metrics use
    weights_hash: str
    channels: int | None = None  # images are repeated to this many channels
    layers: list[str] = field(default_factory=list)

    def extract(self, images: torch.Tensor, *, batch_size: int = 500) -> dict[str, torch.Tensor]:
        """Features of images (float in [-1, 1] or uint8) -> {layer: float64 [N, D]}."""
        cuda = next(self.extractor.parameters()).is_cuda
        out = get_featuresdict_from_dataset(
            UInt8Images(images, self.channels), self.extractor, batch_size, cuda, True, False
        )
        return {k: v.to(torch.float64) for k, v in out.items()}


def classifier_space(checkpoint_dir: str | Path, device: str | torch.device = "cpu") -> FeatureSpace:
    """The registered ``sfd-classifier`` extractor loaded from a feature_net checkpoint."""
    ext = create_feature_extractor(
        CLASSIFIER_EXTRACTOR, ["features", "logits"], cuda=torch.device(device).type == "cuda",
        feature_extractor_weights_path=str(checkpoint_dir), verbose=False,
    )
    return FeatureSpace(ext, "classifier", "features", ext.weights_hash, layers=["features", "logits"])


def check_inception_weights(path: str | Path | None) -> Path:
    """The local Inception weights file, or an error saying which file and where it goes."""
    hint = (
        f"torch-fidelity's InceptionV3 weights ({INCEPTION_FILE}, from the torch-fidelity GitHub releases) "
        f"cannot be downloaded here: copy that file to {{where}} or set evaluate.inception_weights in "
        f"params.yaml to where it is"
    )
    if path is None:
        raise InceptionWeightsMissing(
            "evaluate.inception_weights is not set; " + hint.format(where=f"weights/{INCEPTION_FILE}")
        )
    path = Path(path)
    if not path.is_file():
        raise InceptionWeightsMissing(f"Inception weights file {path} not found; " + hint.format(where=str(path)))
    return path


def inception_space(weights_path: str | Path | None, device: str | torch.device = "cpu") -> FeatureSpace:
    """torch-fidelity's InceptionV3 (2048-d pool features) with weights from a local file."""
    path = check_inception_weights(weights_path)
    # torch-fidelity unpickles the file; load it safely first so a file with code in it is refused
    torch.load(path, map_location="cpu", weights_only=True)
    ext = create_feature_extractor(
        INCEPTION_EXTRACTOR, ["2048"], cuda=torch.device(device).type == "cuda",
        feature_extractor_weights_path=str(path), verbose=False,
    )
    return FeatureSpace(ext, "inception", "2048", hash_file(str(path)), channels=3, layers=["2048"])


def feature_space(kind: str, *, feature_net: str | Path | None = None, inception_weights: str | Path | None = None,
                  device: str | torch.device = "cpu") -> FeatureSpace:
    check_choice("evaluate.features", kind, FEATURE_SPACES)
    if kind == "classifier":
        if feature_net is None:
            raise FileNotFoundError("evaluate.features=classifier needs --feature-net (e.g. models/feature_net)")
        return classifier_space(feature_net, device)
    return inception_space(inception_weights, device)


def reference_features(space: FeatureSpace, images: torch.Tensor, cache_dir: str | Path | None) -> dict[str, torch.Tensor]:
    """Features of the reference (training) images, cached under a key of weights hash + images hash."""
    pixels = images if images.dtype == torch.uint8 else to_uint8(images)
    key = f"{space.kind}-{space.weights_hash[:16]}-{hash_bytes(pixels.contiguous().numpy().tobytes())}"
    path = Path(cache_dir) / f"reference-{key}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        return load_file(str(path))
    feats = space.extract(pixels)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in feats.items()}, str(tmp))
        tmp.replace(path)
    return feats


def kernel_inception_distance(x: np.ndarray, y: np.ndarray, *, subsets: int, subset_size: int,
                              rng_seed: int) -> tuple[float, float]:
    """KID (mean, sd over ``subsets``) exactly as torch-fidelity computes it (cubic polynomial kernel
    k(a, b) = (a.b / d + 1)^3, unbiased MMD^2 per subset, the same subsets drawn from the same
    ``np.random.RandomState(rng_seed)``), from the kernels of the whole sets computed once: each subset's MMD^2
    is then sums over index blocks instead of three new kernel products (~10x faster at 100 subsets)."""
    d, m = x.shape[1], subset_size
    kxx, kyy, kxy = ((a @ b.T / d + 1.0) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    rng = np.random.RandomState(rng_seed)
    mmds = np.empty(subsets)
    for i in range(subsets):
        a = rng.choice(len(x), m, replace=False)
        b = rng.choice(len(y), m, replace=False)
        off_diagonal = kxx.take(a, 0).take(a, 1).sum() - kxx[a, a].sum() + kyy.take(b, 0).take(b, 1).sum() - kyy[b, b].sum()
        mmds[i] = off_diagonal / (m * (m - 1)) - 2 * kxy.take(a, 0).take(b, 1).sum() / (m * m)
    return float(mmds.mean()), float(mmds.std())


def fidelity_metrics(
    generated: torch.Tensor,  # [N, D] features of generated samples
    reference: torch.Tensor,  # [M, D] features of reference images
    *,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,  # capped at the smaller set size
    prc_neighborhood: int = 3,
    rng_seed: int = 2020,
) -> dict[str, float]:
    """{"fid", "kid", "kid_std", "precision", "recall"} of generated vs reference features (torch-fidelity; kid_std:
    the standard deviation of the KID over its subsets)."""
    g, r = generated.to(torch.float64).cpu(), reference.to(torch.float64).cpu()
    fid = reference_fid(reference)(g.numpy())
    kid, kid_std = kernel_inception_distance(g.numpy(), r.numpy(), subsets=kid_subsets,
                                             subset_size=min(kid_subset_size, len(g), len(r)), rng_seed=rng_seed)
    prc = prc_features_to_metric(g, r, prc_neighborhood=prc_neighborhood, verbose=False, save_cpu_ram=True)
    return {"fid": fid, "kid": kid, "kid_std": kid_std,
            "precision": float(prc[KEY_METRIC_PRECISION]), "recall": float(prc[KEY_METRIC_RECALL])}


def fid_between(generated: torch.Tensor, reference: torch.Tensor | ReferenceStats) -> float:
    """FID of generated features [N, D] against reference features [M, D] or reference statistics."""
    if isinstance(reference, ReferenceStats):
        return fid_from_stats(generated, reference)
    return reference_fid(reference)(generated.to(torch.float64).cpu().numpy())


def bootstrap_fid(
    generated: torch.Tensor,  # [N, D] features of the generated samples
    reference: torch.Tensor | ReferenceStats,  # kept fixed
    *,
    resamples: int = 100,
    seed: int = 0,
) -> dict[str, float]:
    """Spread of the FID over ``resamples`` bootstrap resamples of the generated *features* (no new images).

    FID = |mu_g - mu_r|^2 + Tr S_g + Tr S_r - 2 Tr (S_r^1/2 S_g S_r^1/2)^1/2 (the trace term equals
    Tr (S_g S_r)^1/2), with S_r^1/2 computed once. Returns {fid_sd, fid_boot_mean}: the bootstrap
    standard deviation (the FID's sampling noise at this sample count) and mean (resampling with
    replacement repeats samples, so the mean sits above the FID; only the spread is used).
    """
    import numpy as np

    g = generated.to(torch.float64).cpu().numpy()
    fid = reference_fid(reference)
    rng = np.random.default_rng(seed)
    values = [fid(g[rng.integers(0, len(g), len(g))]) for _ in range(resamples)]
    return {"fid_sd": float(np.std(values, ddof=1)) if resamples > 1 else 0.0, "fid_boot_mean": float(np.mean(values))}


_REFERENCE_FIDS: list[tuple[Any, Any]] = []  # (reference object, its FID function): the last few references


def reference_fid(reference: torch.Tensor | ReferenceStats) -> Any:
    """features [N, D] (numpy) -> FID against ``reference`` (features [M, D] or statistics).

    FID = |mu_g - mu_r|^2 + Tr S_g + Tr S_r - 2 Tr (S_r^1/2 S_g S_r^1/2)^1/2: one symmetric eigendecomposition
    per call (of an n x n matrix when the n samples are fewer than the D dimensions), S_r^1/2 once per reference
    object (an evaluation compares dozens of samplers with one reference).
    The same value as torch-fidelity's scipy ``sqrtm(S_g S_r)`` (tests/test_fidelity.py), ~10x faster at
    2048-d."""
    for ref, fn in _REFERENCE_FIDS:
        if ref is reference:
            return fn
    fn = _reference_fid(reference)
    _REFERENCE_FIDS[:] = [*_REFERENCE_FIDS[-3:], (reference, fn)]
    return fn


def _reference_fid(reference: torch.Tensor | ReferenceStats) -> Any:
    import numpy as np

    if isinstance(reference, ReferenceStats):
        mu_r, s_r = reference.mu.numpy(), reference.sigma.numpy()
    else:
        r = reference.to(torch.float64).cpu().numpy()
        mu_r, s_r = r.mean(0), np.cov(r, rowvar=False)
    w, v = np.linalg.eigh((s_r + s_r.T) / 2)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_r = float(np.trace(s_r))

    def fid(x: Any) -> float:
        n, d = x.shape
        mu = x.mean(0)
        xc = x - mu
        tr_s = float((xc * xc).sum() / (n - 1))
        if n <= d:  # S_r^1/2 S_g S_r^1/2 = A^T A / (n - 1), A = X_c S_r^1/2: its nonzero eigenvalues are A A^T's (n x n)
            a = xc @ root
            m = a @ a.T / (n - 1)
        else:
            m = root @ (xc.T @ xc / (n - 1)) @ root
        ev = np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)
        return float(((mu - mu_r) ** 2).sum() + tr_s + tr_r - 2 * np.sqrt(ev).sum())

    return fid


def label_accuracy(logits: torch.Tensor, labels: torch.Tensor | None) -> float | None:
    """Fraction of samples the classifier assigns to the label they were generated for (None if unconditional)."""
    if labels is None:
        return None
    return float((logits.argmax(dim=1).cpu() == labels.cpu()).to(torch.float64).mean())
