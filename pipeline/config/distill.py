"""The SFD distillation sections (``distill``, ``distill_v``, ``distill_stage2``) and the loss names."""

from __future__ import annotations

import math
from typing import Annotated, ClassVar, Literal

from pydantic import Field

from pipeline.config.fields import Precision, Device, Network, NonNegativeInt, PositiveFloat, PositiveInt
from pipeline.config.validation import Section, section

LOSSES = ("l1", "l2", "pseudo_huber", "lpips")  # the SFD distillation losses (top-level `loss` and per section)
LPIPS_NETS = ("alex", "vgg")
LPIPS_POOLINGS = ("max", "avg")
LossName = Literal["l1", "l2", "pseudo_huber", "lpips"]
assert LossName.__args__ == LOSSES  # type: ignore[attr-defined]


@section("distill")
class DistillParams(Section):
    """One distillation section of params.yaml (``distill``, ``distill_v``, ``distill_stage2``)."""

    trajectories: Annotated[str, Field(min_length=1)] = "trajectories"  # the trajectories section feeding this stage
    loss: LossName | None = None  # None = the top-level `loss` param
    afs: bool = True  # analytical first step for the student (training and sampling)
    step_condition: bool = False  # SFD-v: condition on N, one model for every N of the trajectory section
    lr: PositiveFloat = 5e-5
    lr_decay: PositiveFloat = 0.1  # lr multiplier once lr_decay_at of the budget is spent
    lr_decay_at: Annotated[float, Field(ge=0, le=1)] = 0.5
    kimg: PositiveFloat = 20.0  # budget in thousands of trajectories
    batch_size: PositiveInt = 128
    checkpoint_every_kimg: PositiveFloat = 5.0
    log_every_kimg: PositiveFloat = 0.5  # loss log (CSV) resolution
    lpips_weights: str | None = None  # local file of torchvision's backbone weights (alexnet-owt-7be5be79.pth)
    lpips_net: Literal["alex", "vgg"] = "alex"
    lpips_size: Annotated[int, Field(ge=16)] | None = None  # bilinear resize of LPIPS inputs (authors: 224); None: >= 64 px
    lpips_pooling: Literal["max", "avg"] = "max"  # avg: the backbone's max pooling swapped for average pooling (piq's)
    lpips_last_step: bool = False  # add LPIPS to the last step's loss when lpips_weights is given (stage 2)
    lpips_weight: PositiveFloat | Literal["chw"] = 1.0  # per-sample weight of the batch-mean LPIPS vs the pixel-summed loss; chw = C*H*W (authors)
    guidance: PositiveFloat = 1.0  # default guidance scale written into the checkpoint's sampler
    student_network: Network | None = None  # architecture for a teacher without a network (gmm)
    seed: NonNegativeInt = 0  # new step-condition layers, reader shuffling, N draws
    prefetch: PositiveInt = 2  # chunks decoded ahead per trajectory key
    precision: Precision = "fp32"  # fp32 | bf16 | fp16: autocast of the forwards (fp16 training: a gradient scaler)
    device: Device = "auto"
    threads: NonNegativeInt = 1  # torch CPU threads (0 = torch's default); small nets on a shared CPU run fastest on 1

    RUN_ONLY: ClassVar[tuple[str, ...]] = (
        "checkpoint_every_kimg", "log_every_kimg", "prefetch", "device", "threads",
    )  # not part of the training key  # fmt: skip

    def total_batches(self) -> int:
        return max(1, math.ceil(self.kimg * 1000 / self.batch_size))

    def every_batches(self, kimg: float) -> int:
        return max(1, round(kimg * 1000 / self.batch_size))

    def lr_at(self, batch: int) -> float:
        """lr, times lr_decay once lr_decay_at of the budget (in trajectories) has been used."""
        decayed = batch * self.batch_size >= self.lr_decay_at * self.kimg * 1000
        return self.lr * (self.lr_decay if decayed else 1.0)
