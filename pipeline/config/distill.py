"""The SFD distillation sections (``distill``, ``distill_v``, ``distill_stage2``) and the loss names."""

from __future__ import annotations

import math
from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from pipeline.config.fields import Device, Network, NonNegativeInt, PositiveFloat, PositiveInt
from pipeline.config.validation import Section, section

# the SFD distillation losses (top-level `loss` and per section): name -> what it is. Their functions are
# pipeline.distill.losses.LOSS_REGISTRY (checked at import to have exactly these names); params validation,
# docs and CLI help read the names from here (config sits below distill, so the names live here).
LOSS_DESCRIPTIONS = {
    "l1": "mean over the batch of sum |x_hat - y| (SFD's default)",
    "l2": "mean over the batch of sum (x_hat - y)^2",
    "pseudo_huber": "sqrt(||x_hat - y||^2 + c^2) - c, c = 0.00054 sqrt(dim) (consistency models)",
    "lpips": "LPIPS on the images (needs the section's lpips_weights)",
}
LOSSES = tuple(LOSS_DESCRIPTIONS)
LPIPS_NETS = ("alex", "vgg")
LPIPS_POOLINGS = ("max", "avg")
LPIPS_SCALINGS = ("lpips", "piq")
LR_DECAY_CHECKS = ("after_batch", "before_batch")
STEP_DRAWS = ("seeded", "authors")
STEP_CONDITION_INITS = ("zero", "random")
STEP_CONDITION_ARCHS = ("ours", "authors")
DISTILL_PRECISIONS = ("fp32", "bf16", "fp16", "fp16_authors")
LossName = Literal[LOSSES]  # type: ignore[valid-type]


@section("distill")
class DistillParams(Section):
    """One distillation section of params.yaml (``distill``, ``distill_v``, ``distill_stage2``)."""

    trajectories: Annotated[str, Field(min_length=1)] = "trajectories"  # the trajectories section feeding this stage
    loss: LossName | None = None  # None = the top-level `loss` param
    afs: bool = True  # analytical first step for the student (training and sampling)
    step_condition: bool = False  # SFD-v: condition on N, one model for every N of the trajectory section
    step_draw: Literal["seeded", "authors"] = "seeded"  # SFD-v N per batch: seeded torch generator | sfd-main's random.randint, seed 42
    step_condition_init: Literal["zero", "random"] = "zero"  # SFD-v new layers: last one zero (starts as the teacher) | random (sfd-main)
    step_condition_arch: Literal["ours", "authors"] = "ours"  # SFD-v layers: N added to the block embedding | sfd-main's (EDM nets)
    lr: PositiveFloat = 5e-5
    lr_decay: PositiveFloat = 0.1  # lr multiplier once lr_decay_at of the budget is spent
    lr_decay_at: Annotated[float, Field(ge=0, le=1)] = 0.5
    # when the decay is checked: after_batch = sfd-main (after a batch's optimizer steps, with the images
    # counted before that batch: the first decayed batch is one later); before_batch = this project before issue 21
    lr_decay_check: Literal["after_batch", "before_batch"] = "after_batch"
    kimg: PositiveFloat = 20.0  # budget in thousands of trajectories
    batch_size: PositiveInt = 128
    checkpoint_every_kimg: PositiveFloat = 5.0
    log_every_kimg: PositiveFloat = 0.5  # loss log (CSV) resolution
    lpips_weights: str | None = None  # local file of torchvision's backbone weights (alexnet-owt-7be5be79.pth)
    lpips_net: Literal["alex", "vgg"] = "alex"
    lpips_size: Annotated[int, Field(ge=16)] | None = None  # bilinear resize of LPIPS inputs (authors: 224); None: >= 64 px
    lpips_pooling: Literal["max", "avg"] = "max"  # avg: the backbone's max pooling swapped for average pooling (piq's)
    lpips_scaling: Literal["lpips", "piq"] = "lpips"  # input map: lpips' ScalingLayer | piq's ImageNet (x - mean) / std on [-1, 1] images
    lpips_heads: str | None = None  # local file of piq's LPIPS linear heads (lpips_weights.pt); None: the lpips package's v0.1 heads
    lpips_last_step: bool = False  # add LPIPS to the last step's loss when lpips_weights is given (stage 2)
    lpips_weight: PositiveFloat | Literal["chw"] = 1.0  # per-sample weight of the batch-mean LPIPS vs the pixel-summed loss; chw = C*H*W (authors)
    guidance: PositiveFloat = 1.0  # default guidance scale written into the checkpoint's sampler
    student_network: Network | None = None  # architecture for a teacher without a network (gmm)
    seed: NonNegativeInt = 0  # new step-condition layers, reader shuffling, N draws
    prefetch: PositiveInt = 2  # chunks decoded ahead per trajectory key
    # fp32 | bf16 | fp16: autocast of the forwards (fp16 training: a gradient scaler); fp16_authors: sfd-main's
    # use_fp16 recipe (float16 body on CUDA, no scaler, nan_to_num gradients, fp16 off for good after a NaN loss)
    precision: Literal["fp32", "bf16", "fp16", "fp16_authors"] = "fp32"
    device: Device = "auto"
    threads: NonNegativeInt = 1  # torch CPU threads (0 = torch's default); small nets on a shared CPU run fastest on 1
    # memory and scale-out settings (docs/scale-out.md); they change results only to float round-off
    batch_gpu: PositiveInt | None = None  # rows per micro-batch on each process (gradient accumulation); None: all its rows
    sharding: Literal["ddp", "fsdp"] = "ddp"  # several processes: DDP replicas | FSDP2 shards (weights, grads, Adam state)
    activation_checkpointing: bool = False  # recompute the student's block activations in the backward pass
    # LoRA student (pipeline.networks.lora): the teacher frozen + adapters of this rank; 0 = every weight trained
    lora_rank: NonNegativeInt = 0
    lora_alpha: PositiveFloat | None = None  # adapter scale alpha / rank; None: alpha = rank
    lora_targets: list[str] | None = None  # layer-name suffixes that get adapters; None: the network's default set

    RUN_ONLY: ClassVar[tuple[str, ...]] = (
        "checkpoint_every_kimg", "log_every_kimg", "prefetch", "device", "threads", "batch_gpu", "sharding",
        "activation_checkpointing",
    )  # not part of the training key  # fmt: skip

    @model_validator(mode="after")
    def _check(self) -> "DistillParams":
        if self.lora_rank > 0 and self.step_condition:
            raise ValueError(".lora_rank: LoRA students are single-N (distill, distill_stage2); SFD-v's new step layers "
                             "are not teacher weights an adapter could modify: set lora_rank: 0")
        return self

    def total_batches(self) -> int:
        return max(1, math.ceil(self.kimg * 1000 / self.batch_size))

    def every_batches(self, kimg: float) -> int:
        return max(1, round(kimg * 1000 / self.batch_size))

    def lr_at(self, batch: int) -> float:
        """lr of batch ``batch`` (0-based): times lr_decay once lr_decay_at of the budget (in trajectories) is spent.

        ``after_batch`` (sfd-main, training_loop.py): after batch k's optimizer steps the loop checks
        k B / 1000 >= lr_decay_at kimg (the images counted *before* batch k) and lowers the lr for the
        batches that follow, so batch b trains decayed iff b >= 1 and (b - 1) B / 1000 >= lr_decay_at kimg.
        ``before_batch`` (this project before issue 21): batch b is decayed iff b B >= lr_decay_at kimg 1000,
        so its first decayed batch is always the one before sfd-main's."""
        if self.lr_decay_check == "after_batch":
            decayed = batch >= 1 and (batch - 1) * self.batch_size / 1000 >= self.lr_decay_at * self.kimg
        else:
            decayed = batch * self.batch_size >= self.lr_decay_at * self.kimg * 1000
        return self.lr * (self.lr_decay if decayed else 1.0)
