"""A small image classifier trained on the data's train split: the offline FID feature space.

Its penultimate layer (``features``) replaces Inception features for small data such as the
digits, and its logits give ``label_accuracy`` (the fraction of samples classified as the
label they were generated for). Trained with cross-entropy and Adam, deterministic from seed.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from pipeline.core.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from pipeline.core.hashing import hash_state_dict
from pipeline.config.evaluation import FeatureNetParams
from pipeline.core.param_checks import ParamError, PipelineError


class FeatureNetError(PipelineError):
    """The feature network did not reach feature_net.min_accuracy: the stage fails (one line), nothing is written."""


class Classifier(nn.Module):
    """conv-BN-ReLU x2 -> pool -> conv-BN-ReLU x2 -> global average -> features (fc) -> logits."""

    def __init__(self, *, in_channels: int = 1, num_classes: int = 10, channels: int = 32, feature_dim: int = 128) -> None:
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        c = channels
        self.body = nn.Sequential(*conv(in_channels, c), *conv(c, c), nn.MaxPool2d(2), *conv(c, 2 * c), *conv(2 * c, 2 * c))
        self.fc = nn.Linear(2 * c, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)
        self.dropout = nn.Dropout(0.2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [B, feature_dim], logits [B, K]) for images in [-1, 1]."""
        h = self.body(x).mean(dim=(2, 3))
        features = F.relu(self.fc(h))
        return features, self.head(self.dropout(features))


def _shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Random integer translation per image, padding with the background value -1."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b, 1), generator=generator)
    rows, cols = dy + torch.arange(h), dx + torch.arange(w)  # [B, H], [B, W]
    out = padded[torch.arange(b)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without BatchNorm's step counters (unused in eval; 0-dim tensors)."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


@torch.no_grad()
def accuracy(model: Classifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        correct += int((model(images[i : i + batch_size])[1].argmax(1) == labels[i : i + batch_size]).sum())
    return correct / max(1, len(images))


def train_feature_net(
    params: FeatureNetParams,
    train: tuple[torch.Tensor, torch.Tensor],
    held_out: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    out_dir: str | Path,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Train, check the held-out accuracy, write model.safetensors + model.json; returns the metrics."""
    images, labels = train
    if labels is None:
        raise ParamError(
            "feature_net: the dataset has no labels; a classifier needs a labelled train split (with "
            "evaluate.features: inception an unlabelled dataset skips this stage)"
        )
    torch.manual_seed(params.seed)
    generator = torch.Generator().manual_seed(params.seed)
    arch = {"in_channels": images.shape[1], "num_classes": num_classes, "channels": params.channels,
            "feature_dim": params.feature_dim}
    model = Classifier(**arch)
    optimizer = torch.optim.Adam(model.parameters(), lr=params.lr)
    steps_per_epoch = -(-len(images) // params.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, params.lr, total_steps=params.epochs * steps_per_epoch)
    for _ in tqdm(range(params.epochs), desc="feature_net", unit="epoch", disable=not progress):
        model.train()
        order = torch.randperm(len(images), generator=generator)
        for i in range(0, len(images), params.batch_size):
            idx = order[i : i + params.batch_size]
            x = _shift(images[idx], params.shift_augment, generator)
            loss = F.cross_entropy(model(x)[1], labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    metrics = {
        "train_accuracy": accuracy(model, images, labels),
        "held_out_accuracy": accuracy(model, *held_out),
        "held_out_count": len(held_out[0]),
    }
    if metrics["held_out_accuracy"] < params.min_accuracy:  # nothing is written: a weak classifier is no metric
        raise FeatureNetError(
            f"feature_net: held-out accuracy {metrics['held_out_accuracy']:.4f} is below "
            f"feature_net.min_accuracy={params.min_accuracy}; train longer (feature_net.epochs) or lower min_accuracy"
        )
    state = _weights(model)
    metrics["weights_hash"] = hash_state_dict(state)
    config = {"classifier": arch, "sample_shape": list(images.shape[1:]), "training": asdict(params), "metrics": metrics}
    save_checkpoint(out_dir, state, config)
    return metrics


def load_feature_net(path: str | Path, device: str | torch.device = "cpu") -> tuple[Classifier, dict[str, Any], str]:
    """(classifier in eval mode, its config, weights hash) from a checkpoint directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"feature network checkpoint {path} does not exist; train it with `dvc repro feature_net`"
        )
    tensors, config = load_checkpoint(path, device=device)
    if "classifier" not in config:
        raise CheckpointError(f"{path}/model.json has no 'classifier' section; it is not a feature_net checkpoint")
    model = Classifier(**config["classifier"]).to(device)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise CheckpointError(f"{path}/model.safetensors does not match its config: missing {missing}, unexpected {unexpected}")
    return model.eval().requires_grad_(False), config, hash_state_dict(tensors)


def skip_feature_net(out_dir: str | Path, reason: str) -> dict[str, Any]:
    """The feature_net stage on unlabelled data with Inception features: no classifier to train (FID uses
    Inception, label accuracy is not measured); ``out_dir/skipped.json`` says why."""
    import json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"skipped": reason}
    (out_dir / "skipped.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
