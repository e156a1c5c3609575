"""Prompt sets for text-to-image teachers, read from a local file.

Formats (by suffix):
- ``.txt`` (or any other suffix): one prompt per line; blank lines are skipped;
- ``.json``: a list of strings, a list of objects with a ``caption`` / ``prompt`` / ``text`` key, or
  a COCO captions file (``{"annotations": [{"caption": ...}, ...]}``);
- ``.csv``: a header row with a ``caption``, ``prompt`` or ``text`` column (else the first column).

The prompt set's hash (:func:`prompt_set_hash`) enters the trajectory store key; a seed's label is
its prompt's index in the set.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from pipeline.core.hashing import hash_description
from pipeline.core.param_checks import ParamError

CAPTION_KEYS = ("caption", "prompt", "text")


def _caption(item, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for key in CAPTION_KEYS:
            if isinstance(item.get(key), str):
                return item[key]
    raise ParamError(f"{where}: expected a string or an object with one of {', '.join(CAPTION_KEYS)}, got {item!r:.80}")


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a local file (see the module docstring); a clear error when missing or empty."""
    path = Path(path)
    if not path.is_file():
        raise ParamError(f"prompts: {path} does not exist (a local file: one prompt per line, or a JSON/CSV of captions)")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ParamError(f"prompts: {path} is not valid JSON: {e}") from None
        if isinstance(data, dict) and isinstance(data.get("annotations"), list):
            data = data["annotations"]
        if not isinstance(data, list):
            raise ParamError(f"prompts: {path}: expected a JSON list of captions or a COCO captions file")
        prompts = [_caption(item, f"prompts: {path}[{i}]") for i, item in enumerate(data)]
    elif suffix == ".csv":
        rows = list(csv.reader(text.splitlines()))
        if not rows:
            raise ParamError(f"prompts: {path} is empty")
        header = [h.strip().lower() for h in rows[0]]
        col = next((header.index(k) for k in CAPTION_KEYS if k in header), None)
        body = rows[1:] if col is not None else rows
        prompts = [r[col or 0] for r in body if r]
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ParamError(f"prompts: {path} holds no prompts")
    return prompts


def prompt_set_hash(prompts: list[str]) -> str:
    """Content hash of an ordered prompt set."""
    return hash_description({"prompts": list(prompts)})
