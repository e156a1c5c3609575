"""CLIP score of text-to-image samples: 100 * max(cos(image embedding, text embedding), 0), averaged.

The CLIP model is read from a local folder (``evaluate.clip_weights``): a transformers ``CLIPModel``
saved with ``save_pretrained`` (``config.json`` + ``model.safetensors``) and its tokenizer files
(e.g. openai/clip-vit-large-patch14). Only safetensors weights are read. Images in [-1, 1] are resized
(bicubic, antialiased) to the model's image size and normalised with CLIP's mean and std.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.core.param_checks import ParamError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipScorer:
    """CLIP score with a local CLIP model (see the module docstring)."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu", batch_size: int = 64) -> None:
        folder = Path(folder)
        if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
            raise ParamError(
                f"evaluate.clip_weights: {folder} must hold a transformers CLIPModel saved with save_pretrained "
                "(config.json + model.safetensors) and its tokenizer files"
            )
        try:
            import transformers
        except ImportError:
            raise ParamError("evaluate.clip_weights: the CLIP score needs transformers: pip install -e '.[diffusers]' in the clone") from None
        self.model = transformers.CLIPModel.from_pretrained(str(folder), use_safetensors=True).to(device).eval()
        self.tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.size = int(self.model.config.vision_config.image_size)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str]) -> float:
        """Mean CLIP score of images [B, 3, H, W] in [-1, 1] against their prompts."""
        if len(prompts) != images.shape[0]:
            raise ParamError(f"clip score: {images.shape[0]} images but {len(prompts)} prompts")
        mean = torch.tensor(CLIP_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=self.device).view(1, 3, 1, 1)
        total = 0.0
        for i in range(0, len(prompts), self.batch_size):
            x = (images[i : i + self.batch_size].to(self.device).float() + 1) / 2
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", antialias=True, align_corners=False)
            x = ((x.clamp(0, 1) - mean) / std)
            tokens = self.tokenizer(prompts[i : i + self.batch_size], padding="max_length", truncation=True,
                                    max_length=self.tokenizer.model_max_length, return_tensors="pt").to(self.device)
            img = F.normalize(_embeds(self.model.get_image_features(pixel_values=x)), dim=-1)
            txt = F.normalize(_embeds(self.model.get_text_features(input_ids=tokens.input_ids)), dim=-1)
            total += float((100 * (img * txt).sum(-1)).clamp(min=0).sum())
        return total / len(prompts)


def _embeds(out) -> torch.Tensor:
    """The projected embeddings: a tensor (transformers 4) or the output's pooler_output (transformers 5)."""
    return out if torch.is_tensor(out) else out.pooler_output
