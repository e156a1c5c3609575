"""Flow-matching (rectified-flow) teachers as denoisers D(x, sigma, labels) -> x0 in the pipeline's VE view.

Rectified flow: x_tau = (1 - tau) x0 + tau eps for flow time tau in [0, 1]; the network predicts the velocity
v = eps - x0 at the timestep tau * T (T = the scheduler's ``num_train_timesteps``, 1000). The VE view of the
pipeline (x = x0 + sigma eps) is the same path rescaled:

    sigma = tau / (1 - tau),   x = x_tau / (1 - tau);   tau = sigma / (1 + sigma),   x_tau = x / (1 + sigma),
    D(x, sigma) = x_tau - tau v(x_tau, tau T)          (x0 = x_tau - tau v, since x_tau - x0 = tau (eps - x0)).

The teacher's own sampler starts at tau = 1, sigma = inf. There the VE state is unbounded and the pipeline hands
its direction z = lim x / sigma instead, which is x_tau at tau = 1, the noise (pipeline.diffusion.solvers):
D(z, inf) = z - v(z, T). The solvers take their first step from there in the (alpha, sigma) = (1 - tau, tau)
form (docs/teachers.md).

Two kinds of velocity network:

- :class:`DiffusersFlow`: a diffusers flow transformer with its text encoders - Stable Diffusion 3 / 3.5
  (``SD3Transformer2DModel``: two CLIP encoders with projection, the penultimate hidden states concatenated and
  zero-padded to T5's width, then T5's states or zeros when there is no T5; the pooled projections concatenated;
  qk-norm / dual-attention blocks are the transformer's own config) and Flux.1 (``FluxTransformer2DModel``: CLIP's
  pooled output and T5's states, 2x2 latent patches packed into tokens, text ids zero, image ids the patch grid;
  Flux-dev embeds the guidance scale). The samples are VAE latents, decoded as vae.decode(x / scaling_factor +
  shift_factor). The prompt set is bound as class labels (label = prompt index), the empty prompt is the
  unconditional branch; prompts are encoded on first use and cached (an SD3 prompt is 333 x 4096 floats, too
  many to encode a 30k caption set up front).
- :class:`PixelFlow`: this project's U-Net as a pixel-space velocity network (``c_noise = tau T``), the small
  rectified-flow teacher the teacher stage trains with ``teacher.objective: flow`` (no text encoders).

Classifier-free guidance w (:meth:`DiffusersFlow.with_guidance`): SD3 runs the unconditional and conditional
branch in one batched forward, v = v_u + w (v_c - v_u), as StableDiffusion3Pipeline; a guidance-distilled Flux
(``guidance_embeds``) takes w as its embedded guidance in one pass (w = 1 when none is asked); Flux without the
embedding uses the two branches as FluxPipeline's true CFG.

The time grid of the teacher's scheduler (``FlowMatchEulerDiscreteScheduler``) is set by its shift s,
tau = s u / (1 + (s - 1) u), or by the resolution-dependent dynamic shift, where s = e^mu with
mu = base_shift + (max_shift - base_shift) (L - L_base) / (L_max - L_base) for the image's L latent tokens
(``linear`` time_shift_type: s = mu). :attr:`flow_shift` gives s; the ``flow`` schedule kind uses it
(pipeline.diffusion.schedules).

diffusers / transformers are imported lazily (pip install -e '.[diffusers]' in the clone).
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.core.hashing import hash_bytes, hash_state_dict
from pipeline.diffusion.denoisers import EDMPrecond
from pipeline.networks.diffusers_vp import (
    DIFFUSERS_ARCHITECTURE, DiffusersError, DiffusersNetwork, _plain, require_diffusers,
)  # fmt: skip

FLOW_TRANSFORMERS = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
MAX_SEQUENCE_LENGTH = {"sd3": 256, "flux": 512}  # the pipelines' default max_sequence_length (T5 tokens)
FLUX_DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size: 1024 px images, 128x128 latents
FLOW_PRECOND = "flow"  # model.json "precond" of this project's U-Net as a velocity network
PROMPT_CACHE = 4096  # encoded prompts kept (each SD3 prompt with T5: 333 x 4096 floats, 5.5 MB)
UNSUPPORTED_SCHEDULER_KEYS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas")


def flow_times(sigma: torch.Tensor | float, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tau, 1 / (1 + sigma)) as float64 [B]; at sigma = inf (1, 1): the state there is z = x_tau itself."""
    sigma = torch.as_tensor(sigma, device=device).to(torch.float64).reshape(-1)
    sigma = sigma.expand(batch) if sigma.numel() == 1 else sigma
    inf = torch.isinf(sigma)
    finite = torch.where(inf, torch.zeros_like(sigma), sigma)
    tau = torch.where(inf, torch.ones_like(sigma), finite / (1 + finite))
    scale = torch.where(inf, torch.ones_like(sigma), 1 / (1 + finite))
    return tau, scale


class FlowDenoiser(nn.Module):
    """D(x, sigma, labels) = x_tau - tau v(x_tau, tau T) of a velocity network (module docstring); subclasses give
    :meth:`_velocity`. ``x`` at sigma = inf is the noise z (= x_tau at tau = 1)."""

    num_train_timesteps: int = 1000

    @property
    def flow_shift(self) -> float:
        """The time shift s of the teacher's grid (the ``flow`` schedule kind); 1 for a plain rectified flow."""
        return 1.0

    def _velocity(self, x_tau: torch.Tensor, tau: torch.Tensor, cond: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError

    def _flow_denoise(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Any, **kwargs: Any) -> torch.Tensor:
        tau, scale = flow_times(sigma, x.shape[0], x.device)
        shape = (-1, *([1] * (x.ndim - 1)))
        x_tau = x * scale.reshape(shape).to(x.dtype)
        v = self._velocity(x_tau, tau, cond, **kwargs).to(x.dtype)
        return x_tau - tau.reshape(shape).to(x.dtype) * v


# ---- this project's U-Net as a pixel-space rectified flow ---------------------------------------------------


class PixelFlow(FlowDenoiser, EDMPrecond):
    """This project's U-Net F as the velocity network of a pixel-space rectified flow: v = F(x_tau, tau T, labels).

    EDMPrecond with the flow's D in place of EDM's preconditioning: its distillation interface (``step_condition``,
    ``checkpoint_module``, ``checkpoint_state_dict``) is EDMPrecond's; model.json keeps the U-Net's ``"network"``
    section with ``"precond": "flow"``. Training: pipeline.teachers.training (``teacher.objective: flow``, the
    velocity loss, i.e. D's squared error weighted by :meth:`loss_weight`)."""

    def __init__(self, net: nn.Module) -> None:
        EDMPrecond.__init__(self, net)  # sigma_data is not used

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, labels: torch.Tensor | None = None,
                **net_kwargs: Any) -> torch.Tensor:
        if net_kwargs.get("return_features"):
            raise DiffusersError("return_features: the pixel flow teacher has no feature output (SFDDM's feature loss)")
        return self._flow_denoise(x, sigma, labels, **net_kwargs)

    def _velocity(self, x_tau: torch.Tensor, tau: torch.Tensor, labels: Any, **net_kwargs: Any) -> torch.Tensor:
        net_dtype = next(self.net.parameters()).dtype
        return self.net(x_tau.to(net_dtype), (tau * self.num_train_timesteps).to(net_dtype), labels, **net_kwargs)

    @staticmethod
    def loss_weight(sigma: torch.Tensor) -> torch.Tensor:
        """||v_theta - v||^2 = ||D_theta - x0||^2 / tau^2: the weight of D's squared error is ((1 + sigma) / sigma)^2."""
        return ((1 + sigma) / sigma) ** 2

    def checkpoint_architecture(self) -> dict[str, Any]:
        return {"network": copy.deepcopy(self.net.network_kwargs), "precond": FLOW_PRECOND}


# ---- diffusers flow transformers (SD3 / SD3.5, Flux.1) ----------------------------------------------------------


def family_of(transformer_class: str, where: str = "transformer/config.json") -> str:
    if transformer_class not in FLOW_TRANSFORMERS:
        raise DiffusersError(f"{where}: _class_name {transformer_class!r} is not supported (known: "
                             f"{', '.join(FLOW_TRANSFORMERS)})")
    return FLOW_TRANSFORMERS[transformer_class]


def build_transformer(transformer_class: str, config: dict[str, Any], where: str = "transformer/config.json") -> nn.Module:
    """A randomly initialised diffusers flow transformer from its config dict (no file is read)."""
    family_of(transformer_class, where)
    diffusers = require_diffusers()
    return getattr(diffusers, transformer_class).from_config(copy.deepcopy(dict(config)))


def check_flow_scheduler(config: dict[str, Any], where: str) -> None:
    """A FlowMatchEulerDiscreteScheduler config whose grid the ``flow`` schedule reproduces (shift or dynamic shift)."""
    cls = config.get("_class_name", "FlowMatchEulerDiscreteScheduler")
    if "FlowMatch" not in cls:
        raise DiffusersError(f"{where}: _class_name {cls!r}: a flow transformer needs a FlowMatch scheduler config "
                             "(FlowMatchEulerDiscreteScheduler: shift, use_dynamic_shifting)")
    bad = [k for k in UNSUPPORTED_SCHEDULER_KEYS if config.get(k)]
    if bad or config.get("shift_terminal"):
        raise DiffusersError(f"{where}: {', '.join(bad + (['shift_terminal'] if config.get('shift_terminal') else []))} "
                             "is set; the flow schedule reproduces shift and dynamic shift only")
    if config.get("time_shift_type", "exponential") not in ("exponential", "linear"):
        raise DiffusersError(f"{where}: time_shift_type {config.get('time_shift_type')!r} is not known")


def calculate_shift(seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float, max_shift: float) -> float:
    """mu of the dynamic (resolution-dependent) shift: linear in the image's token count (diffusers' calculate_shift)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return seq_len * m + (base_shift - m * base_seq_len)


class DiffusersFlow(DiffusersNetwork, FlowDenoiser):
    """D(x, sigma, labels) of a diffusers flow transformer + FlowMatch scheduler config (module docstring).

    ``labels``: None (the empty prompt), int64 prompt indices into the bound prompt set, or an encoded
    condition ``(hidden_states [B, L, D], pooled [B, P])`` from :meth:`encode_prompts`. The VAE, text encoders
    and tokenizers are held outside the module tree (``components``), so a student's optimiser sees the
    transformer's parameters (and SFD-v's step layers) only."""

    def __init__(self, transformer: nn.Module, transformer_class: str, scheduler_config: dict[str, Any], *,
                 sample_size: tuple[int, int] | list[int] | None = None, max_sequence_length: int | None = None,
                 where: str = "scheduler/scheduler_config.json", step_condition: bool = False) -> None:
        super().__init__()
        self.transformer = transformer
        self.transformer_class = transformer_class
        self.family = family_of(transformer_class)
        self.scheduler_config = copy.deepcopy(dict(scheduler_config))
        check_flow_scheduler(self.scheduler_config, where)
        self.num_train_timesteps = int(self.scheduler_config.get("num_train_timesteps", 1000))
        cfg = transformer.config
        if sample_size is None:
            size = cfg.get("sample_size", FLUX_DEFAULT_SAMPLE_SIZE) if self.family == "sd3" else FLUX_DEFAULT_SAMPLE_SIZE
            sample_size = (size, size) if isinstance(size, int) else tuple(size)
        h, w = (int(v) for v in sample_size)
        step = self.patch
        if h % step or w % step:
            raise DiffusersError(f"sample_size: the latent {h}x{w} must be divisible by the {step}x{step} patches")
        self.sample_size = (h, w)
        self.max_sequence_length = int(max_sequence_length or MAX_SEQUENCE_LENGTH[self.family])
        self.prompts: list[str] | None = None
        self._encoded: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._null: tuple[torch.Tensor, torch.Tensor] | None = None
        object.__setattr__(self, "components", {})  # vae, text encoders, tokenizers (and their folders)
        self.diffusers_section: dict[str, Any] = {"vae": None, "text_encoders": {}, "tokenizers": {}}
        self.map_steps: nn.Module | None = None
        self._step_emb: torch.Tensor | None = None
        if step_condition:  # SFD-v: added to the combined time (and text/guidance) embedding
            embed = self.transformer.time_text_embed
            self._add_step_layers(embed, int(embed.timestep_embedder.linear_2.out_features))

    @property
    def network_body(self) -> nn.Module:
        return self.transformer

    # -- geometry and schedule -------------------------------------------------------------------------------
    @property
    def patch(self) -> int:
        """Latent pixels per token side: SD3's patch_size, Flux's 2x2 packing."""
        return int(self.transformer.config.get("patch_size", 2)) if self.family == "sd3" else 2

    @property
    def latent_channels(self) -> int:
        c = int(self.transformer.config.in_channels)
        return c if self.family == "sd3" else c // 4

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, *self.sample_size)

    @property
    def image_seq_len(self) -> int:
        h, w = self.sample_size
        return (h // self.patch) * (w // self.patch)

    @property
    def flow_shift(self) -> float:
        """s of the FlowMatch grid: ``shift``, or with ``use_dynamic_shifting`` e^mu (``linear``: mu) for this
        latent size (diffusers' calculate_shift with the scheduler config's base/max shift and sequence lengths)."""
        c = self.scheduler_config
        if not c.get("use_dynamic_shifting"):
            return float(c.get("shift", 1.0))
        mu = calculate_shift(self.image_seq_len, int(c.get("base_image_seq_len", 256)), int(c.get("max_image_seq_len", 4096)),
                             float(c.get("base_shift", 0.5)), float(c.get("max_shift", 1.15)))
        return math.exp(mu) if c.get("time_shift_type", "exponential") == "exponential" else mu

    @property
    def guidance_embedded(self) -> bool:
        """A guidance-distilled Flux (Flux-dev): the guidance scale is an input of the transformer."""
        return self.family == "flux" and bool(self.transformer.config.get("guidance_embeds"))

    # -- conditioning --------------------------------------------------------------------------------------
    text_conditioned = True

    @property
    def num_classes(self) -> int:
        return len(self.prompts or [])

    def bind_prompts(self, prompts: list[str] | None) -> None:
        """Labels become indices into ``prompts`` (encoded on first use, cached)."""
        self.prompts = None if prompts is None else list(prompts)
        self._encoded.clear()

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden_states [P, L, D], pooled [P, D_pooled]) as the family's diffusers pipeline encodes them."""
        if not prompts:
            raise DiffusersError("encode_prompts: no prompts")
        comps = self.components
        for name in ("text_encoder", "tokenizer"):
            if name not in comps:
                raise DiffusersError(f"this flow teacher has no {name} (a text-to-image folder has text_encoder/ and tokenizer/)")
        prompts = list(prompts)
        max_clip = int(comps["tokenizer"].model_max_length)
        if self.family == "sd3":
            h1, p1 = _clip_states(comps["tokenizer"], comps["text_encoder"], prompts, max_clip, penultimate=True)
            h2, p2 = _clip_states(comps["tokenizer_2"], comps["text_encoder_2"], prompts, max_clip, penultimate=True)
            clip = torch.cat([h1, h2], dim=-1)
            width = int(self.transformer.config.joint_attention_dim)
            if "text_encoder_3" in comps:
                t5 = _t5_states(comps["tokenizer_3"], comps["text_encoder_3"], prompts, self.max_sequence_length)
            else:  # StableDiffusion3Pipeline without T5: zeros of the same length
                t5 = torch.zeros(len(prompts), self.max_sequence_length, width)
            clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
            return torch.cat([clip, t5], dim=-2), torch.cat([p1, p2], dim=-1)
        _, pooled = _clip_states(comps["tokenizer"], comps["text_encoder"], prompts, max_clip, penultimate=False)
        hidden = _t5_states(comps["tokenizer_2"], comps["text_encoder_2"], prompts, self.max_sequence_length)
        return hidden, pooled

    def _null_cond(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._null is None:
            self._null = self.encode_prompts([""])
        return self._null

    def _table_cond(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoded prompts of the labels (each prompt encoded alone, once, so the result never depends on the batch)."""
        if not self.prompts:
            raise DiffusersError("this text-to-image teacher has no prompt set bound; labels are prompt indices "
                                 "(teacher.prompts, or load_teacher(folder, prompts=[...]))")
        rows = []
        for label in labels.tolist():
            if not 0 <= label < len(self.prompts):
                raise DiffusersError(f"labels: prompt index {label} is outside 0..{len(self.prompts) - 1}")
            if label not in self._encoded:
                self._encoded[label] = self.encode_prompts([self.prompts[label]])
                while len(self._encoded) > PROMPT_CACHE:
                    self._encoded.popitem(last=False)
            self._encoded.move_to_end(label)
            rows.append(self._encoded[label])
        return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])

    def _cond(self, labels: Any, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if labels is None:
            hidden, pooled = self._null_cond()
        elif isinstance(labels, (tuple, list)):
            hidden, pooled = labels
        elif torch.is_tensor(labels) and not labels.is_floating_point():
            hidden, pooled = self._table_cond(labels.reshape(-1))
        else:
            raise DiffusersError("labels: a flow text-to-image teacher takes prompt indices (int64), None (the empty "
                                 "prompt) or (hidden_states, pooled) from encode_prompts")
        if hidden.shape[0] == 1 and batch > 1:
            hidden, pooled = hidden.expand(batch, *hidden.shape[1:]), pooled.expand(batch, *pooled.shape[1:])
        return hidden, pooled

    # -- the denoiser ----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, labels: Any = None, *,
                num_steps: torch.Tensor | None = None, guidance: float | None = None, **net_kwargs: Any) -> torch.Tensor:
        """D(x, sigma, labels) at guidance 1 (``guidance``: a Flux-dev model's embedded scale; for the classifier-free
        guidance of the others use :meth:`with_guidance`)."""
        if net_kwargs:
            raise DiffusersError(f"a diffusers flow transformer takes no inputs {sorted(net_kwargs)} (only num_steps)")
        if guidance is not None and not self.guidance_embedded:
            raise DiffusersError("guidance: this transformer has no guidance embedding; use with_guidance(w) (CFG)")
        cond = self._cond(labels, x.shape[0])
        with self.step_embedding(num_steps, x.shape[0], x.device):
            return self._flow_denoise(x, sigma, cond, guidance=guidance)

    def with_guidance(self, scale: float) -> "nn.Module":
        """D at guidance w (module docstring); w = 1: the model itself."""
        return self if scale == 1.0 else GuidedFlow(self, float(scale))

    def guided_forward(self, x: torch.Tensor, sigma: torch.Tensor | float, labels: Any, scale: float,
                       num_steps: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:  # only the unconditional branch is asked
            return self.forward(x, sigma, None, num_steps=num_steps)
        if self.guidance_embedded:
            return self.forward(x, sigma, labels, num_steps=num_steps, guidance=scale)
        b = x.shape[0]
        h_u, p_u = self._cond(None, b)
        h_c, p_c = self._cond(labels, b)
        cond = (torch.cat([h_u, h_c]), torch.cat([p_u, p_c]))  # [uncond; cond] in one forward, as the pipelines do
        sigma2 = torch.as_tensor(sigma, device=x.device).reshape(-1)
        sigma2 = torch.cat([sigma2.expand(b), sigma2.expand(b)])
        steps2 = None if num_steps is None else torch.as_tensor(num_steps, device=x.device).reshape(-1).expand(b).repeat(2)
        with self.step_embedding(steps2, 2 * b, x.device):
            return self._flow_denoise(x, sigma2, cond, cfg_scale=scale)

    def _flow_denoise(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Any, **kwargs: Any) -> torch.Tensor:
        scale = kwargs.pop("cfg_scale", None)
        if scale is None:
            return super()._flow_denoise(x, sigma, cond, **kwargs)
        b = x.shape[0]
        tau, shrink = flow_times(sigma, 2 * b, x.device)
        shape = (-1, *([1] * (x.ndim - 1)))
        x_tau = x * shrink[:b].reshape(shape).to(x.dtype)
        v_u, v_c = self._velocity(torch.cat([x_tau, x_tau]), tau, cond).to(x.dtype).chunk(2)
        v = v_u + scale * (v_c - v_u)
        return x_tau - tau[:b].reshape(shape).to(x.dtype) * v

    def _velocity(self, x_tau: torch.Tensor, tau: torch.Tensor, cond: Any, guidance: float | None = None) -> torch.Tensor:
        hidden, pooled = cond
        dtype = next(self.transformer.parameters()).dtype
        b = x_tau.shape[0]
        timestep = (tau * self.num_train_timesteps).to(torch.float32)  # the pipelines' scheduler.timesteps (sigma * T)
        hidden, pooled = hidden.to(x_tau.device, dtype), pooled.to(x_tau.device, dtype)
        if self.family == "sd3":
            return self.transformer(hidden_states=x_tau.to(dtype), timestep=timestep, encoder_hidden_states=hidden,
                                    pooled_projections=pooled, return_dict=False)[0]
        c, h, w = x_tau.shape[1:]
        packed = pack_latents(x_tau.to(dtype))
        embed = None
        if self.guidance_embedded:
            embed = torch.full((b,), 1.0 if guidance is None else float(guidance), dtype=torch.float32, device=x_tau.device)
        out = self.transformer(hidden_states=packed, timestep=timestep.to(dtype) / 1000, guidance=embed,
                               pooled_projections=pooled, encoder_hidden_states=hidden,
                               txt_ids=torch.zeros(hidden.shape[1], 3, device=x_tau.device, dtype=dtype),
                               img_ids=latent_image_ids(h // 2, w // 2, x_tau.device, dtype), return_dict=False)[0]
        return unpack_latents(out, h, w)

    # -- SFD-v, checkpoints, decode (DiffusersNetwork: step_condition, checkpoint_*, latent, decode) -----------
    def with_step_condition(self) -> "DiffusersFlow":
        """The same transformer (shared) with new SFD-v step layers (last layer zero: starts as this model)."""
        stepped = DiffusersFlow(self.transformer, self.transformer_class, self.scheduler_config, sample_size=self.sample_size,
                                max_sequence_length=self.max_sequence_length, step_condition=True)
        stepped.components.update(self.components)
        stepped.diffusers_section = copy.deepcopy(self.diffusers_section)
        stepped.bind_prompts(self.prompts)
        stepped.source_dir = getattr(self, "source_dir", None)
        return stepped

    def checkpoint_architecture(self) -> dict[str, Any]:
        """model.json's architecture part: ``{"architecture": "diffusers", "diffusers": {"transformer_class",
        "transformer", "scheduler", "sample_size", "max_sequence_length", "vae", "text_encoders", "tokenizers",
        "step_condition"}}`` - everything that enters D but the weights (the latent shape and the T5 length too)."""
        section = copy.deepcopy(self.diffusers_section)
        section.update(transformer_class=self.transformer_class, transformer=dict(self.transformer.config),
                       scheduler=self.scheduler_config, sample_size=list(self.sample_size),
                       max_sequence_length=self.max_sequence_length, step_condition=self.step_condition)
        return {"architecture": DIFFUSERS_ARCHITECTURE, "diffusers": _plain(section)}

    def content_description(self) -> dict[str, Any]:
        """What determines D beyond the transformer's weights and model.json (pipeline.teachers.content): the VAE's
        and every text encoder's weights and the tokenizers' files (hashes of stored bytes; the prompt set is a
        field of the store key of its own)."""
        tokenizers = {}
        for name, folder in sorted(self.tokenizer_dirs().items()):
            files = sorted(f for f in Path(folder).iterdir() if f.is_file())
            tokenizers[name] = {f.name: hash_bytes(f.read_bytes()) for f in files}
        return {
            "vae": None if "vae" not in self.components else hash_state_dict(self.components["vae"].state_dict()),
            "text_encoders": {name: hash_state_dict(m.state_dict()) for name, m in sorted(self.text_encoders().items())},
            "tokenizers": tokenizers,
        }

    def text_encoders(self) -> dict[str, nn.Module]:
        return {k: v for k, v in self.components.items() if k.startswith("text_encoder")}

    def tokenizer_dirs(self) -> dict[str, Path]:
        return {k.removesuffix("_dir"): Path(v) for k, v in self.components.items() if k.startswith("tokenizer") and k.endswith("_dir")}



class GuidedFlow(nn.Module):
    """D at classifier-free guidance w of a :class:`DiffusersFlow` (:meth:`DiffusersFlow.with_guidance`)."""

    def __init__(self, model: DiffusersFlow, scale: float) -> None:
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, labels: Any = None,
                num_steps: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.guided_forward(x, sigma, labels, self.scale, num_steps=num_steps)


def _clip_states(tokenizer: Any, encoder: nn.Module, prompts: list[str], max_length: int, *,
                 penultimate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states, pooled) of a CLIP text encoder: SD3 reads the penultimate layer and the projected pooled
    output (CLIPTextModelWithProjection's text_embeds), Flux the pooler output of CLIPTextModel."""
    device = next(encoder.parameters()).device
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids
    out = encoder(ids.to(device), output_hidden_states=penultimate)
    if penultimate:
        return out.hidden_states[-2].float().cpu(), out[0].float().cpu()
    return out.last_hidden_state.float().cpu(), out.pooler_output.float().cpu()


def _t5_states(tokenizer: Any, encoder: nn.Module, prompts: list[str], max_length: int) -> torch.Tensor:
    device = next(encoder.parameters()).device
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
                    return_tensors="pt").input_ids
    return encoder(ids.to(device))[0].float().cpu()


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: Flux's 2x2 patches as tokens (FluxPipeline._pack_latents)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` (FluxPipeline._unpack_latents)."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def latent_image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Flux's image position ids [(h)(w), 3]: (0, row, column) of each packed token."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)
