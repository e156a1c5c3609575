"""Simple and Fast Distillation (SFD) of diffusion models: library behind the DVC stages."""

__version__ = "0.1.0"
