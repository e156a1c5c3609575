"""Tiny random diffusers models saved with save_pretrained (tests only; no download)."""

from __future__ import annotations

from pathlib import Path

import torch


def save_tiny_tokenizer():
    """A CLIP tokenizer over single byte-level characters (no merges): every prompt tokenizes."""
    import transformers
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in sorted(ByteLevel.alphabet()):
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    tok = transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    return tok, len(vocab)


def save_tiny_t2i_folder(path: Path, *, prediction_type: str = "epsilon"):
    """A latent text-to-image pipeline folder: UNet2DConditionModel (4x8x8 latents), AutoencoderKL (16 px),
    CLIPTextModel (hidden 16) + CLIPTokenizer, DDIM scheduler with SD's scaled_linear betas."""
    import diffusers
    import transformers

    torch.manual_seed(0)
    tokenizer, vocab_size = save_tiny_tokenizer()
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4,
    )
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=4, sample_size=16, layers_per_block=1,
    )
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                        prediction_type=prediction_type)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(path)
    return pipe
