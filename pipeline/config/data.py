"""The ``data`` section: which images the teacher and the evaluation use."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from pipeline.config.fields import NonNegativeInt, PositiveInt
from pipeline.config.validation import Section, section



@section("data")
class DataParams(Section):
    dataset: Literal["digits", "images"] = "digits"  # "digits" (bundled) or "images" (a folder or zip of PNGs at `path`)
    path: str | None = None  # the folder or zip for dataset="images"
    num_classes: PositiveInt | None = None  # labels must lie in [0, num_classes); None = max label + 1
    held_out_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2
    split_seed: NonNegativeInt = 0

    @model_validator(mode="after")
    def _check(self) -> "DataParams":
        if self.dataset == "images" and not self.path:
            raise ValueError(".path: dataset 'images' needs the path of a folder or zip of PNG images")
        return self
