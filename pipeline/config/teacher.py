"""The ``teacher`` section: the EDM teacher's architecture and training recipe (or a pretrained one)."""

from __future__ import annotations

from dataclasses import field
from typing import Annotated, Any, Literal

from pydantic import Field

from pipeline.config.fields import Precision, Device, Network, NonNegativeInt, PositiveFloat, PositiveInt
from pipeline.config.validation import Section, described, section
from pipeline.core.hashing import hash_description


@section("teacher")
class TeacherParams(Section):
    network: Network = field(
        default_factory=lambda: {"model_channels": 32, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4]}
    )  # architecture; resolution, channels and label_dim come from the data
    objective: Literal["edm", "flow"] = "edm"  # edm: EDM's denoiser (VE sigma); flow: a pixel-space rectified flow (velocity loss; trajectories then start at flow time 1)
    conditional: bool = True  # class-conditional when the data has labels
    label_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1  # probability of the null class in training (CFG)
    sigma_data: PositiveFloat = 0.5
    P_mean: float = -1.2
    P_std: PositiveFloat = 1.2
    batch_size: PositiveInt = 128
    steps: PositiveInt = 2500  # optimizer steps
    lr: PositiveFloat = 2e-3
    lr_rampup_steps: NonNegativeInt = 100
    ema_halflife_kimg: PositiveFloat = 20.0
    checkpoint_every: PositiveInt = 500  # steps between resumable training states
    pretrained: Annotated[str, Field(min_length=1)] | None = None  # a local teacher used instead of training: an EDM .pkl, a diffusers folder, a folder `sfd teacher import` wrote, or our checkpoint directory
    prompts: Annotated[str, Field(min_length=1)] | None = None  # text-to-image teachers: a local prompt file (one per line, or JSON/CSV of captions); labels are its indices
    seed: NonNegativeInt = 0
    precision: Precision = "fp32"  # fp32 | bf16 | fp16: autocast of the forwards (fp16 training: a gradient scaler)
    device: Device = "auto"
    batch_gpu: PositiveInt | None = None  # rows per micro-batch on each process (gradient accumulation); None: all its rows
    activation_checkpointing: bool = False  # recompute the network's block activations in the backward pass

    def training_key(self, data_description: dict[str, Any]) -> str:
        """Identity of a run: a saved training state is resumed only under the same key.

        ``steps`` is left out so that a longer run continues a shorter one.
        """
        d = described(self, leave_out=("checkpoint_every", "device", "steps", "batch_gpu", "activation_checkpointing")
                      + (("objective",) if self.objective == "edm" else ()))
        return hash_description({"params": d, "data": data_description})
