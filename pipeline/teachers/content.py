"""The content hash of a teacher: everything that determines its denoiser D(x, sigma, labels).

Store keys (pipeline.trajectories.spec) hold this hash, so two teachers that differ in anything that
changes D - weights, preconditioner and its constructor arguments, scheduler, VAE, encoded prompts - never
share a key, and the same network loaded from an EDM pickle or from its converted folder (or from a
diffusers folder and its import) has one key.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pipeline.core.hashing import hash_description, hash_state_dict


def teacher_description(model: nn.Module, network_hash: str | None = None) -> dict[str, Any]:
    """Everything that determines D(x, sigma, labels) of a loaded network: its weights and its complete
    architecture description (model.json's, without provenance) - the preconditioner class and every
    constructor argument of an EDM network (sigma_data, VP's beta_d / beta_min / M, VE's sigma range, the
    label dimension, ...), our U-Net's config and sigma_data, a diffusers UNet's and scheduler's configs
    (prediction type, betas, timestep spacing, clipping) with its VAE and the encoded prompt set. Loading the
    same network from an EDM pickle or from the folder ``sfd teacher import`` wrote gives the same description.
    """
    description: dict[str, Any] = {
        "weights": network_hash or network_weights_hash(model),
        "architecture": _without_private_keys(model.checkpoint_architecture()),
    }
    extra = getattr(model, "content_description", None)
    if extra is not None:  # diffusers: abar table, VAE weights, text encoder and the encoded prompt table
        description["components"] = extra()
    return description


def teacher_content_hash(model: nn.Module, network_hash: str | None = None) -> str:
    """The teacher hash of store keys: :func:`hash_description` of :func:`teacher_description`."""
    return hash_description(teacher_description(model, network_hash))


VERSION_KEYS = ("transformers_version",)  # the library version a config was written with


def _without_private_keys(value: Any) -> Any:
    """A config without keys starting with '_' (diffusers' _name_or_path, _diffusers_version, ...) and library
    versions: they name where or with what a file was written, not what it computes."""
    if isinstance(value, dict):
        return {k: _without_private_keys(v) for k, v in value.items()
                if not str(k).startswith("_") and k not in VERSION_KEYS}
    if isinstance(value, (list, tuple)):
        return [_without_private_keys(v) for v in value]
    return value


def network_weights_hash(model: nn.Module) -> str:
    """hash_state_dict of the weights as a checkpoint stores them: our U-Net's bare network, an EDM
    preconditioner whole (``checkpoint_state_dict``)."""
    return hash_state_dict(model.checkpoint_state_dict())
