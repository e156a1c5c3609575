"""diffusers latent text-to-image pipelines (Stable Diffusion 1.x style): ``UNet2DConditionModel`` with a VAE,
a CLIP text encoder and tokenizer, as :class:`pipeline.networks.diffusers_vp.DiffusersVP` on latents.

Labels index the bound prompt set; its converted checkpoint carries ``vae.safetensors``,
``text_encoder.safetensors``, ``tokenizer/`` and ``prompts.json`` beside model.safetensors. Everything else is
the diffusers pixel family's.
"""

from __future__ import annotations

from pipeline.teachers.families.diffusers_pixel import DiffusersFamily


class DiffusersLatentFamily(DiffusersFamily):
    name = "diffusers_latent"
    kind = "latent"
    diffusers_export = "unet"


FAMILY = DiffusersLatentFamily()
