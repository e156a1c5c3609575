"""Training machinery shared by every trained stage (teacher, SFD, the baselines).

- :mod:`pipeline.training.state`: one resumable training state (models, optimizers, RNG states,
  counters, metadata, a training key that must match to resume), written atomically;
- :mod:`pipeline.training.loop`: one loop skeleton (budget, lr schedule, NaN/inf stop before the
  optimizer step, progress bar, periodic state, resume, loss statistics and logging);
- :mod:`pipeline.training.live`: DVCLive logging through its public API (metrics.json, plots; live to
  DVC Studio inside `dvc exp run` when a token is configured);
- :mod:`pipeline.training.optim`: Adam as every method here uses it, lr setting, model copies.

Layer: between data and teachers; imports core, diffusion, networks, config and data only.
"""

from pipeline.training.loop import NonFiniteLossError, TrainingLoop, optimizer_step
from pipeline.training.state import STATE_NAME, TrainingState

__all__ = ["NonFiniteLossError", "STATE_NAME", "TrainingLoop", "TrainingState", "optimizer_step"]
