"""Seeds: ranges like ``A-B``, per-seed noise and per-seed labels.

Every sample and trajectory is a function of its seed: noise for seed ``s`` comes from its own
CPU generator, so sample ``s`` is identical whatever the batch size, device or shard.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.core.param_checks import ParamError

LABEL_SEED_OFFSET = 0x5EED_1ABE1  # labels use their own stream, independent of the noise


def parse_seeds(spec: str | int | Sequence[int]) -> list[int]:
    """Parse ``"A-B"`` (inclusive), ``"A,B,C"``, ``"A-B,C"`` or a single integer into a list of seeds."""
    if isinstance(spec, bool):
        raise ParamError(f"seeds: expected a range like '0-99', got {spec!r}")
    if isinstance(spec, int):
        spec = str(spec)
    if not isinstance(spec, str):
        seeds = [int(s) for s in spec]
    else:
        seeds = []
        for part in spec.replace(" ", "").split(","):
            if not part:
                raise ParamError(f"seeds: empty item in {spec!r}; use e.g. '0-99' or '0,5,7'")
            lo, sep, hi = part.partition("-")
            try:
                a = int(lo)
                b = int(hi) if sep else a
            except ValueError:
                raise ParamError(f"seeds: cannot parse {part!r} in {spec!r}; use e.g. '0-99'") from None
            if b < a:
                raise ParamError(f"seeds: range {part!r} ends before it starts (use 'A-B' with A <= B)")
            seeds.extend(range(a, b + 1))
    if any(s < 0 for s in seeds):
        raise ParamError(f"seeds: seeds must be non-negative, got {spec!r}")
    if len(set(seeds)) != len(seeds):
        raise ParamError(f"seeds: {spec!r} contains a seed more than once")
    return seeds


def seed_noise(
    seeds: Sequence[int],
    shape: Sequence[int],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise z of shape [len(seeds), *shape]; row i depends only on seeds[i]."""
    rows = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64) for s in seeds]
    return torch.stack(rows).to(device=device, dtype=dtype)


def seed_labels(
    seeds: Sequence[int],
    num_classes: int,
    *,
    device: torch.device | str = "cpu",
) -> torch.Tensor | None:
    """Class label for each seed (uniform, from the seed's own label stream); None when unconditional."""
    if num_classes <= 0:
        return None
    labels = [
        int(torch.randint(num_classes, (1,), generator=torch.Generator().manual_seed(int(s) ^ LABEL_SEED_OFFSET)))
        for s in seeds
    ]
    return torch.tensor(labels, dtype=torch.int64, device=device)


def format_seeds(seeds: Sequence[int]) -> str:
    """Compact inverse of parse_seeds: [0,1,2,5] -> '0-2,5'."""
    out: list[str] = []
    ordered = sorted(seeds)
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(out)
