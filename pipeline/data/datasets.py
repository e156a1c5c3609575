"""Datasets: the bundled scikit-learn digits (the default) and users' own PNG folders or zips.

Every dataset is written by the ``data`` stage in one format: ``<dir>/<split>.safetensors``
holding ``images`` (float32 [N, C, H, W] in [-1, 1]) and, when labelled, ``labels`` (int64 [N]),
plus ``<dir>/dataset.json`` (sample shape, label count, split sizes, provenance). Other stages
read it with :func:`load_split`.

A user's image data uses the layout EDM's ``dataset_tool.py`` writes: PNG images in a folder or
a zip (any sub-folders), plus an optional ``dataset.json`` of the form
``{"labels": [["00000/img00000000.png", 6], ...]}`` (``"labels": null`` when unlabelled).
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.core.files import atomic_write, make_dirs
from pipeline.core.images import to_unit_range
from pipeline.config.data import DataParams
from pipeline.core.param_checks import PipelineError, check_choice

SPLITS = ("train", "held_out")
IMAGE_EXTENSIONS = (".png",)
IGNORED_NAMES = ("dataset.json",)


class DataError(PipelineError, ValueError):
    """Image data that cannot be used; the message names the offending file."""


def load_digits_dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits: 1,797 images [N, 1, 8, 8] scaled from 0..16 to [-1, 1], labels 0..9."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0 * 2 - 1
    return images, torch.as_tensor(bunch.target, dtype=torch.int64)


def check_split(labels: torch.Tensor | None, n: int, held_out_fraction: float, where: str = "the dataset") -> None:
    """Refuse a dataset too small for its (stratified) held-out split, in one line saying what would work.

    The split holds ceil(fraction * n) images out; each side needs at least one image, and with labels
    at least one image of every class (so every class needs two)."""
    held = math.ceil(held_out_fraction * n)
    train = n - held
    fraction = f"data.held_out_fraction {held_out_fraction:g}"
    if labels is None:
        if held < 1 or train < 1:
            raise DataError(f"{where}: {n} image(s) are too few for a held-out split with {fraction} "
                            f"({train} train, {held} held out): add images (at least 2)")  # fmt: skip
        return
    classes, counts = np.unique(labels.numpy(), return_counts=True)
    k = len(classes)
    lonely = [int(c) for c, m in zip(classes, counts) if m < 2]
    if lonely:
        raise DataError(
            f"{where}: class(es) {', '.join(map(str, lonely[:10]))} have a single image; the stratified held-out split "
            "needs at least 2 images of every class (one for training, one held out): add images of those classes"
        )
    if held < k or train < k:
        side = f"{held} held-out" if held < k else f"{train} training"
        ok = (f"set data.held_out_fraction between {k / n:.3g} and {(n - k) / n:.3g}" if 2 * k <= n
              else f"add images (at least {2 * k})")  # fmt: skip
        raise DataError(
            f"{where}: {n} images in {k} classes are too few for a stratified held-out split with {fraction}: "
            f"{side} images cannot hold one of each of the {k} classes; {ok}"
        )


def split_indices(labels: torch.Tensor | None, n: int, held_out_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed (seeded) train / held-out split, stratified by label when there are labels."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(n)
    stratify = None if labels is None else labels.numpy()
    try:
        train, held = train_test_split(idx, test_size=held_out_fraction, random_state=seed, stratify=stratify)
    except ValueError as e:  # what check_split does not foresee, still one line
        raise DataError(f"the train / held-out split of {n} images failed: {e}".replace("\n", " ")) from None
    return np.sort(train), np.sort(held)


def _decode_png(name: str, data: bytes) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            mode = img.mode
            if mode in ("L", "I;16", "1", "P"):
                img = img.convert("L")
            elif mode in ("RGB", "RGBA", "LA"):
                img = img.convert("RGB")
            else:
                raise DataError(f"{name}: unsupported image mode {mode!r} (use grayscale or RGB PNGs)")
            arr = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"{name}: not a readable PNG image ({e})") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _read_files(path: Path) -> dict[str, bytes]:
    """All files of a folder or zip, keyed by their path relative to its root (with '/')."""
    if not path.exists():
        raise DataError(f"{path}: the image folder or zip does not exist (set data.path in params.yaml)")
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise DataError(f"{path}: not a folder and not a zip archive")
        with zipfile.ZipFile(path) as zf:
            return {n: zf.read(n) for n in sorted(zf.namelist()) if not n.endswith("/")}
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def load_image_folder(
    path: str | Path,
    *,
    num_classes: int | None = None,  # None: max label + 1
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Read a folder or zip of PNGs (EDM dataset_tool layout) -> (uint8 [N, C, H, W], labels or None, K).

    Errors name the file: an empty folder, a non-PNG file, an unreadable image, images of mixed
    size or channel count, a label missing, non-integer or out of range.
    """
    path = Path(path)
    files = _read_files(path)
    names = [n for n in files if not Path(n).name.startswith(".") and n not in IGNORED_NAMES]
    for n in names:
        if not n.lower().endswith(IMAGE_EXTENSIONS):
            raise DataError(f"{path}/{n}: not an image file (expected only .png images and dataset.json)")
    if not names:
        raise DataError(f"{path}: no PNG images found (expected .png files and an optional dataset.json)")
    arrays = []
    for n in names:
        arr = _decode_png(f"{path}/{n}", files[n])
        if arrays and arr.shape != arrays[0].shape:
            raise DataError(
                f"{path}/{n}: image shape {list(arr.shape)} (C, H, W) differs from {list(arrays[0].shape)} "
                f"of {path}/{names[0]}; all images must have the same size and channels"
            )
        arrays.append(arr)
    images = torch.from_numpy(np.stack(arrays))
    labels = _read_labels(path, files, names, num_classes)
    k = 0 if labels is None else (num_classes or int(labels.max()) + 1)
    return images, labels, k


def _read_labels(path: Path, files: dict[str, bytes], names: list[str], num_classes: int | None) -> torch.Tensor | None:
    if "dataset.json" not in files:
        return None
    try:
        meta = json.loads(files["dataset.json"])
    except json.JSONDecodeError as e:
        raise DataError(f"{path}/dataset.json: not valid JSON ({e})") from None
    entries = meta.get("labels") if isinstance(meta, dict) else None
    if entries is None:
        return None
    try:
        table = {str(name): value for name, value in entries}
    except (TypeError, ValueError):
        raise DataError(f'{path}/dataset.json: "labels" must be a list of [file name, label] pairs') from None
    labels = []
    for n in names:
        if n not in table:
            raise DataError(f"{path}/{n}: no label in {path}/dataset.json (every image needs one)")
        value = table[n]
        if isinstance(value, bool) or not isinstance(value, int):
            raise DataError(f"{path}/{n}: label {value!r} in dataset.json is not an integer class index")
        if value < 0 or (num_classes is not None and value >= num_classes):
            allowed = f"[0, {num_classes})" if num_classes is not None else ">= 0"
            raise DataError(f"{path}/{n}: label {value} in dataset.json is out of range (allowed {allowed})")
        labels.append(value)
    return torch.tensor(labels, dtype=torch.int64)


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    sample_shape: list[int]
    num_classes: int
    sizes: dict[str, int]
    provenance: dict[str, Any]


def write_dataset(
    out_dir: str | Path,
    images: torch.Tensor,  # float32 [N, C, H, W] in [-1, 1]
    labels: torch.Tensor | None,
    *,
    num_classes: int,
    held_out_fraction: float,
    split_seed: int,
    name: str,
    provenance: dict[str, Any],
) -> DatasetInfo:
    """Split and write ``train.safetensors``, ``held_out.safetensors`` and ``dataset.json``."""
    out_dir = Path(out_dir)
    check_split(labels, len(images), held_out_fraction, str(provenance.get("source", name)))
    train, held = split_indices(labels, len(images), held_out_fraction, split_seed)
    make_dirs(out_dir)
    sizes = {}
    for split, idx in (("train", train), ("held_out", held)):
        tensors = {"images": images[idx].contiguous().float()}
        if labels is not None:
            tensors["labels"] = labels[idx].contiguous()
        atomic_write(out_dir / f"{split}.safetensors", lambda p: save_file(tensors, str(p)))
        sizes[split] = len(idx)
    info = DatasetInfo(
        name=name,
        sample_shape=list(images.shape[1:]),
        num_classes=num_classes,
        sizes=sizes,
        provenance={**provenance, "held_out_fraction": held_out_fraction, "split_seed": split_seed},
    )
    text = json.dumps(asdict(info), indent=2, sort_keys=True) + "\n"
    atomic_write(out_dir / "dataset.json", lambda p: p.write_text(text))
    return info


def prepare_dataset(params: DataParams, out_dir: str | Path, source_hash: str | None = None) -> DatasetInfo:
    """The ``data`` stage: read the configured source and write the fixed split under ``out_dir``.
    ``source_hash``: the content hash of the folder or zip (the inputs stage's manifest), kept as provenance."""
    if params.dataset == "digits":
        if params.num_classes not in (None, 10):
            raise DataError(f"data.num_classes: the digits have 10 classes, got {params.num_classes}; leave it empty")
        images, labels = load_digits_dataset()
        k, provenance = 10, {"source": "sklearn.datasets.load_digits", "scaling": "x / 16 * 2 - 1"}
    else:
        raw, labels, k = load_image_folder(params.path, num_classes=params.num_classes)
        if labels is None and params.num_classes is not None:
            raise DataError(
                f"data.num_classes is {params.num_classes} but {params.path} has no labels (no dataset.json with "
                '"labels": [[file, label], ...]): add that file for a class-conditional run, or leave data.num_classes '
                "empty for an unconditional one"
            )
        images = to_unit_range(raw)
        provenance = {"source": str(params.path), "scaling": "x / 127.5 - 1"}
        if source_hash is not None:
            provenance["source_hash"] = source_hash
    return write_dataset(
        out_dir,
        images,
        labels,
        num_classes=k,
        held_out_fraction=params.held_out_fraction,
        split_seed=params.split_seed,
        name=params.dataset,
        provenance=provenance,
    )


def dataset_info(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / "dataset.json"
    if not path.is_file():
        raise DataError(f"{path}: missing; run the data stage first (`dvc repro data`)")
    return json.loads(path.read_text())


def load_split(data_dir: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images float32 [N, C, H, W] in [-1, 1] and labels int64 [N] (None when unlabelled)."""
    check_choice("split", split, SPLITS)
    path = Path(data_dir) / f"{split}.safetensors"
    if not path.is_file():
        raise DataError(f"{path}: missing; run the data stage first (`dvc repro data`)")
    tensors = load_file(str(path))
    return tensors["images"], tensors.get("labels")
