"""Data stage: the digits split and users' PNG folders / zips with clear errors."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config.data import DataParams
from pipeline.data.datasets import DataError, load_image_folder, load_split, prepare_dataset
from pipeline.core.param_checks import ParamError



def _png(path: Path, size=(8, 8), mode="L", value=0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size[::-1] + ((3,) if mode == "RGB" else ()), value, dtype=np.uint8), mode).save(path)


def _folder(root: Path, n: int = 6, labels: list[int] | None = None, size=(8, 8), mode="L") -> Path:
    names = []
    for i in range(n):
        name = f"00000/img{i:08d}.png"
        _png(root / name, size, mode, value=10 * i)
        names.append(name)
    if labels is not None:
        (root / "dataset.json").write_text(json.dumps({"labels": [[nm, lab] for nm, lab in zip(names, labels)]}))
    return root


def test_digits_split_is_fixed_scaled_and_disjoint(tmp_path):
    info = prepare_dataset(DataParams(), tmp_path / "digits")
    assert info.sample_shape == [1, 8, 8] and info.num_classes == 10
    assert info.sizes == {"train": 1437, "held_out": 360}
    x, y = load_split(tmp_path / "digits", "train")
    xh, yh = load_split(tmp_path / "digits", "held_out")
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (1437, 1, 8, 8)
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1 and x.max() == 1
    assert set(y.tolist()) == set(range(10)) and set(yh.tolist()) == set(range(10))
    # the same split again, and no image row shared between the splits (exact duplicates aside)
    prepare_dataset(DataParams(), tmp_path / "again")
    x2, _ = load_split(tmp_path / "again", "train")
    assert torch.equal(x, x2)
    assert len(x) + len(xh) == 1797


def test_missing_split_names_the_file(tmp_path):
    with pytest.raises(DataError, match="train.safetensors"):
        load_split(tmp_path, "train")


def test_image_folder_with_labels_and_zip(tmp_path):
    root = _folder(tmp_path / "imgs", labels=[0, 1, 2, 0, 1, 2])
    images, labels, k = load_image_folder(root)
    assert images.dtype == torch.uint8 and images.shape == (6, 1, 8, 8)
    assert labels.tolist() == [0, 1, 2, 0, 1, 2] and k == 3
    assert images[3, 0, 0, 0] == 30
    zpath = tmp_path / "imgs.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(root).as_posix())
    zimages, zlabels, zk = load_image_folder(zpath)
    assert torch.equal(zimages, images) and torch.equal(zlabels, labels) and zk == 3


def test_image_folder_unlabelled_rgb_through_the_data_stage(tmp_path):
    root = _folder(tmp_path / "imgs", n=10, size=(4, 4), mode="RGB")
    info = prepare_dataset(DataParams(dataset="images", path=str(root), held_out_fraction=0.2), tmp_path / "out")
    assert info.sample_shape == [3, 4, 4] and info.num_classes == 0 and info.sizes == {"train": 8, "held_out": 2}
    x, y = load_split(tmp_path / "out", "train")
    assert y is None and x.shape == (8, 3, 4, 4) and x.min() >= -1 and x.max() <= 1


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no PNG images found"):
        load_image_folder(tmp_path / "empty")


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "nope")


def test_mixed_sizes_name_the_file(tmp_path):
    root = _folder(tmp_path / "imgs", n=3)
    _png(root / "00000/img00000003.png", size=(9, 8))
    with pytest.raises(DataError, match=r"img00000003\.png.*differs"):
        load_image_folder(root)


def test_non_image_file_is_named(tmp_path):
    root = _folder(tmp_path / "imgs", n=2)
    (root / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"notes\.txt: not an image file"):
        load_image_folder(root)


def test_corrupt_png_is_named(tmp_path):
    root = _folder(tmp_path / "imgs", n=2)
    (root / "00000/broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"broken\.png: not a readable PNG"):
        load_image_folder(root)


def test_label_out_of_range_is_named(tmp_path):
    root = _folder(tmp_path / "imgs", n=3, labels=[0, 5, 1])
    with pytest.raises(DataError, match=r"img00000001\.png: label 5 .*out of range"):
        load_image_folder(root, num_classes=3)
    root2 = _folder(tmp_path / "neg", n=2, labels=[0, -1])
    with pytest.raises(DataError, match=r"img00000001\.png: label -1"):
        load_image_folder(root2)


def test_missing_label_is_named(tmp_path):
    root = _folder(tmp_path / "imgs", n=3)
    (root / "dataset.json").write_text(json.dumps({"labels": [["00000/img00000000.png", 0]]}))
    with pytest.raises(DataError, match=r"img00000001\.png: no label"):
        load_image_folder(root)


def test_params_are_validated():
    with pytest.raises(ParamError, match="data.dataset"):
        DataParams.from_dict({"dataset": "cifar"})
    with pytest.raises(ParamError, match="data.path"):
        DataParams.from_dict({"dataset": "images"})
    with pytest.raises(ParamError, match="unknown key"):
        DataParams.from_dict({"datset": "digits"})
    with pytest.raises(ParamError, match="held_out_fraction"):
        DataParams.from_dict({"held_out_fraction": 1.5})
