"""What a stage spent: wall time, teacher and student passes (in images), device.

Counts are in images (a batch of B through the network counts B). Forward-pass equivalents
(used to compare methods) count a backward pass as two forwards.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.core.devices import describe_device

BACKWARD_FORWARD_RATIO = 2.0


class CostMeter:
    def __init__(self, stage: str, device: torch.device | str = "cpu") -> None:
        self.stage = stage
        self.device = describe_device(torch.device(device))
        self.teacher_forward_images = 0
        self.student_forward_images = 0
        self.student_backward_images = 0
        self.extra: dict[str, Any] = {}
        self._start = time.perf_counter()
        self._previous_seconds = 0.0  # wall time of earlier (resumed) runs

    def add_teacher_forward(self, images: int) -> None:
        self.teacher_forward_images += int(images)

    def add_student_forward(self, images: int) -> None:
        self.student_forward_images += int(images)

    def add_student_backward(self, images: int) -> None:
        self.student_backward_images += int(images)

    @property
    def wall_seconds(self) -> float:
        return self._previous_seconds + time.perf_counter() - self._start

    def forward_equivalents(self) -> float:
        return (
            self.teacher_forward_images
            + self.student_forward_images
            + BACKWARD_FORWARD_RATIO * self.student_backward_images
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "wall_seconds": round(self.wall_seconds, 3),
            "teacher_forward_images": self.teacher_forward_images,
            "student_forward_images": self.student_forward_images,
            "student_backward_images": self.student_backward_images,
            "forward_equivalents": self.forward_equivalents(),
            "device": self.device,
            **self.extra,
        }

    def restore(self, saved: dict[str, Any]) -> None:
        """Continue counting from a resumed run's saved totals."""
        self._previous_seconds = float(saved.get("wall_seconds", 0.0))
        self.teacher_forward_images = int(saved.get("teacher_forward_images", 0))
        self.student_forward_images = int(saved.get("student_forward_images", 0))
        self.student_backward_images = int(saved.get("student_backward_images", 0))

    def write(self, path: str | Path) -> dict[str, Any]:
        """The record as JSON; under torchrun only rank 0 writes (the counts are the whole run's)."""
        from pipeline.core.distributed import is_main

        path = Path(path)
        if not is_main():
            return self.to_dict()
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        path.write_text(json.dumps(data, indent=2) + "\n")
        return data


def load_cost_records(cost_dir: str | Path) -> dict[str, dict[str, Any]]:
    """{stage: record} from every ``*.json`` that :meth:`CostMeter.write` left in ``cost_dir`` (missing: empty)."""
    records = {}
    for path in sorted(Path(cost_dir).glob("*.json")):
        data = json.loads(path.read_text())
        records[data.get("stage", path.stem)] = data
    return records
