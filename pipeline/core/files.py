"""Small file writers shared by the stages' outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: str | Path, data: Any) -> Path:
    """Pretty JSON with sorted keys (stable bytes for DVC), parent directories created.

    Under torchrun only rank 0 writes (pipeline.core.distributed); the other ranks return the path."""
    from pipeline.core.distributed import is_main

    path = Path(path)
    if not is_main():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path
