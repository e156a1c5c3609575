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


# ---- flow-matching transformers (SD3 / SD3.5, Flux.1) -----------------------------------------------------------


def tiny_t5_tokenizer(max_length: int = 32):
    """A T5 (Unigram) tokenizer over single characters: every prompt tokenizes, offline."""
    import string

    import transformers

    chars = list(string.ascii_lowercase + string.ascii_uppercase + string.digits + " .,'-")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("\u2581" + c, -2.5) for c in chars]
    tok = transformers.T5TokenizerFast(vocab=vocab, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                                       model_max_length=max_length)
    return tok, len(vocab)


def _tiny_clip(vocab_size: int, *, projection: bool, hidden: int = 16):
    import transformers

    cfg = transformers.CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                                      pad_token_id=1, projection_dim=hidden)
    return (transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel)(cfg)


def _tiny_t5(vocab_size: int):
    import transformers

    return transformers.T5EncoderModel(transformers.T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                                             num_heads=2, decoder_start_token_id=0))


def _tiny_flow_vae(shift_factor: float, scaling_factor: float):
    import diffusers

    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4, sample_size=16, layers_per_block=1,
        shift_factor=shift_factor, scaling_factor=scaling_factor,
    )


def _eval(pipe):
    """The pipeline's modules in eval mode (built in code they train: T5's dropout would be on), as from_pretrained gives them."""
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return pipe


def _perturb(*modules, seed: int, scale: float = 0.05):
    """diffusers zero-initialises some output layers (adaLN, proj_out): make every weight matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))


def save_tiny_sd3_folder(path: Path, *, t5: bool = True, sd35: bool = False, shift: float = 3.0, seed: int = 0):
    """A StableDiffusion3Pipeline folder: SD3Transformer2DModel (4x8x8 latents, patch 2; ``sd35``: qk-norm and a
    dual-attention block as SD3.5), two CLIPTextModelWithProjection (hidden 16), T5EncoderModel (d_model 32) or
    none, AutoencoderKL with SD3's shift/scaling factors (16 px), FlowMatchEulerDiscreteScheduler(shift)."""
    import diffusers

    torch.manual_seed(seed)
    clip_tok, clip_vocab = save_tiny_tokenizer()
    t5_tok, t5_vocab = tiny_t5_tokenizer()
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16,
        dual_attention_layers=(0,) if sd35 else (), qk_norm="rms_norm" if sd35 else None,
    )
    _perturb(transformer, seed=seed)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=_tiny_flow_vae(0.0609, 1.5305), text_encoder=_tiny_clip(clip_vocab, projection=True), tokenizer=clip_tok,
        text_encoder_2=_tiny_clip(clip_vocab, projection=True), tokenizer_2=clip_tok,
        text_encoder_3=_tiny_t5(t5_vocab) if t5 else None, tokenizer_3=t5_tok if t5 else None,
    )
    pipe.save_pretrained(path)
    return _eval(pipe)


def save_tiny_flux_folder(path: Path, *, guidance_embeds: bool = True, seed: int = 0):
    """A FluxPipeline folder: FluxTransformer2DModel (one double and one single block; 4-channel latents packed
    2x2 into 16-channel tokens; ``guidance_embeds`` as Flux-dev), CLIPTextModel (hidden 16) + T5EncoderModel,
    AutoencoderKL with Flux's shift/scaling factors (16 px), FlowMatchEulerDiscreteScheduler with Flux's dynamic shift."""
    import diffusers

    torch.manual_seed(seed)
    clip_tok, clip_vocab = save_tiny_tokenizer()
    t5_tok, t5_vocab = tiny_t5_tokenizer()
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4),
    )
    _perturb(transformer, seed=seed)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                          base_image_seq_len=256, max_image_seq_len=4096)
    pipe = diffusers.FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=_tiny_flow_vae(0.1159, 0.3611),
        text_encoder=_tiny_clip(clip_vocab, projection=False), tokenizer=clip_tok,
        text_encoder_2=_tiny_t5(t5_vocab), tokenizer_2=t5_tok,
    )
    pipe.save_pretrained(path)
    return _eval(pipe)
