"""Image conversions and files: [-1, 1] floats <-> uint8 pixels, PNGs and image grids."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


def to_unit_range(images_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 pixels [0, 255] -> float32 in [-1, 1]."""
    return torch.as_tensor(np.asarray(images_uint8), dtype=torch.float32) / 127.5 - 1


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float images in [-1, 1] -> uint8 [0, 255] (clamped, rounded)."""
    return ((images.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def image_grid(images: torch.Tensor, *, columns: int | None = None, min_tile: int = 32, pad: int = 1) -> np.ndarray:
    """A uint8 [H, W, C] grid of images in [-1, 1] (or uint8), tiles upscaled to at least min_tile pixels."""
    pixels = images if images.dtype == torch.uint8 else to_uint8(images)
    n, c, h, w = pixels.shape
    cols = columns or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    scale = max(1, -(-min_tile // max(h, w)))
    tiles = pixels.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    th, tw = h * scale, w * scale
    grid = np.full((rows * (th + pad) + pad, cols * (tw + pad) + pad, c), 255, dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, cols)
        y, x = pad + r * (th + pad), pad + q * (tw + pad)
        grid[y : y + th, x : x + tw] = tiles[k].permute(1, 2, 0).numpy()
    return grid


def _to_pil(array: np.ndarray):
    from PIL import Image

    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


def save_grid(path: str | Path, images: torch.Tensor, **kwargs: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _to_pil(image_grid(images, **kwargs)).save(path)
    return path


def save_pngs(images: torch.Tensor, seeds: Sequence[int], out_dir: str | Path) -> list[Path]:
    """One PNG per sample, named ``<seed:06d>.png`` (EDM's convention)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pixels = to_uint8(images)
    paths = []
    for seed, img in zip(seeds, pixels):
        p = out_dir / f"{seed:06d}.png"
        _to_pil(img.permute(1, 2, 0).numpy()).save(p)
        paths.append(p)
    return paths
