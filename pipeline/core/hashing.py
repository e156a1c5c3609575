"""Content hashes (xxh3) of bytes, tensors, state dicts and canonical JSON descriptions."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
import xxhash


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal descriptions give equal strings."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def hash_bytes(data: bytes | memoryview) -> str:
    return xxhash.xxh3_64_hexdigest(data)


def hash_description(description: Mapping[str, Any]) -> str:
    """128-bit xxh3 of the canonical JSON of a description (used as content-addressed keys)."""
    return xxhash.xxh3_128_hexdigest(canonical_json(description).encode())


def hash_state_dict(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Hash of the weights: names, dtypes, shapes and bytes of every tensor, in sorted order."""
    h = xxhash.xxh3_128()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def hash_file(path: str, chunk_bytes: int = 1 << 24) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()
