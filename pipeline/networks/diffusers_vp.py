"""A diffusers UNet (a variance-preserving, discrete-time model) as a denoiser D(x, sigma, labels) -> x0.

The pipeline works in the variance-exploding (EDM) view x = x0 + sigma * eps. A diffusers model was
trained on T discrete steps tau = 0..T-1 with the table abar_tau = prod_{s <= tau} (1 - beta_s) and
sees x_vp = sqrt(abar) x0 + sqrt(1 - abar) eps. The two views are related by

    sigma_tau = sqrt((1 - abar_tau) / abar_tau),        x_vp = x / sqrt(1 + sigma^2).

Timestep of a noise level (the k-diffusion convention): at the scheduler's own sigma_tau the UNet gets
the integer timestep tau (exact); between two neighbouring grid points sigma_tau < sigma < sigma_{tau+1}
it gets the fractional timestep tau + (ln sigma - ln sigma_tau) / (ln sigma_{tau+1} - ln sigma_tau),
i.e. the timestep is interpolated linearly in log sigma. Noise levels outside [sigma_0, sigma_{T-1}]
are clamped to the end of the table (the schedules refuse such levels: see
:func:`pipeline.diffusion.schedules.check_sigma_range`).

With the UNet's output o (prediction_type):
- ``epsilon``: D = x - sigma * o
- ``v_prediction``: D = sqrt(abar) x_vp - sqrt(1 - abar) o = (x - sigma o) / (1 + sigma^2)
- ``sample``: D = o

Conditioning: a ``UNet2DModel`` with a class embedding takes the pipeline's integer labels as its
``class_labels``. A ``UNet2DConditionModel`` (latent text-to-image) takes text-encoder hidden states:
``forward_cond(x, sigma, cond)`` with ``cond`` = [B, L, D] (None: the empty prompt's embedding, the
unconditional branch of classifier-free guidance); ``forward(x, sigma, labels)`` reads the labels as
indices into the bound prompt table (:meth:`DiffusersVP.bind_prompts`), ``labels=None`` being the
empty prompt. The VAE and text encoder are held outside the module tree (``components``), so the
optimiser of a student sees the UNet's parameters only.

diffusers / transformers are imported lazily (pip install -e '.[diffusers]' in the clone).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from pipeline.core.hashing import hash_state_dict
from pipeline.core.param_checks import PipelineError

DIFFUSERS_ARCHITECTURE = "diffusers"
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
DEFAULT_VAE_SCALING = 0.18215
STEP_PREFIX = "sfd_map_steps."  # SFD-v step-condition layers in model.safetensors
STEP_FREQS = 8  # sin/cos features of N
INSTALL_HINT = "pip install -e '.[diffusers]' in the clone"


class DiffusersError(PipelineError, ValueError):
    """A diffusers folder or config the pipeline cannot use (the message names the file or key)."""


def require_diffusers():
    """The diffusers module, or a one-line error telling how to install it."""
    try:
        import diffusers
    except ImportError:
        raise DiffusersError(f"diffusers teachers need the diffusers extra: {INSTALL_HINT}") from None
    return diffusers


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise DiffusersError(f"text-to-image teachers need transformers: {INSTALL_HINT}") from None
    return transformers


def alphas_cumprod_from_config(config: dict[str, Any], where: str = "scheduler_config.json") -> torch.Tensor:
    """abar_tau (float64, tau = 0..T-1) from a diffusers scheduler config, computed as diffusers does
    (same beta formulas) but in float64."""
    if "prediction_type" in config and config["prediction_type"] not in PREDICTION_TYPES:
        raise DiffusersError(
            f"{where}: prediction_type {config['prediction_type']!r} is not supported "
            f"(known: {', '.join(PREDICTION_TYPES)})"
        )
    if config.get("rescale_betas_zero_snr"):
        raise DiffusersError(f"{where}: rescale_betas_zero_snr=true gives sigma = inf at the last step; not supported")
    trained = config.get("trained_betas")
    if trained is not None:
        betas = torch.tensor(trained, dtype=torch.float64).flatten()
    else:
        if "beta_schedule" not in config or "num_train_timesteps" not in config:
            missing = "beta_schedule" if "beta_schedule" not in config else "num_train_timesteps"
            raise DiffusersError(
                f"{where}: no {missing!r} key (nor trained_betas): the scheduler "
                f"{config.get('_class_name', '?')} has no abar table, so it is not a discrete VP (DDPM-type) scheduler"
            )
        schedule, steps = config["beta_schedule"], int(config["num_train_timesteps"])
        start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
        if schedule == "linear":
            betas = torch.linspace(start, end, steps, dtype=torch.float64)
        elif schedule == "scaled_linear":
            betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2
        elif schedule == "squaredcos_cap_v2":
            f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
            betas = torch.tensor([min(1 - f((i + 1) / steps) / f(i / steps), 0.999) for i in range(steps)],
                                 dtype=torch.float64)
        else:
            raise DiffusersError(
                f"{where}: beta_schedule {schedule!r} is not supported (known: {', '.join(BETA_SCHEDULES)}, or trained_betas)"
            )
    abar = torch.cumprod(1 - betas, dim=0)
    if betas.numel() < 2 or not ((abar > 0) & (abar < 1)).all():
        raise DiffusersError(f"{where}: the betas do not give an abar table strictly between 0 and 1")
    return abar


def prediction_type_of(config: dict[str, Any], where: str = "scheduler_config.json") -> str:
    kind = config.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise DiffusersError(f"{where}: prediction_type {kind!r} is not supported (known: {', '.join(PREDICTION_TYPES)})")
    return kind


def build_unet(unet_class: str, config: dict[str, Any], where: str = "unet/config.json") -> nn.Module:
    """A randomly initialised diffusers UNet of ``unet_class`` from its config dict (no file is read)."""
    if unet_class not in UNET_CLASSES:
        raise DiffusersError(f"{where}: _class_name {unet_class!r} is not supported (known: {', '.join(UNET_CLASSES)})")
    diffusers = require_diffusers()
    return getattr(diffusers, unet_class).from_config(copy.deepcopy(config))


class DiffusersNetwork:
    """What the diffusers teachers share (DiffusersVP's UNet, pipeline.networks.flow.DiffusersFlow's transformer):

    - SFD-v's step condition: an embedding of N (sin/cos features of N -> Linear -> SiLU -> Linear, the last layer
      zero so the student starts as its teacher) added to the output of the network's time embedding by a forward
      hook;
    - the checkpoint of network + step layers (``sfd_map_steps.*`` beside the network's own names);
    - the VAE of a latent model (``components["vae"]``) and its decode.

    A subclass sets ``self.map_steps = None`` and ``self._step_emb = None``, calls :meth:`_add_step_layers` and names
    its network in :attr:`network_body`."""

    map_steps: nn.Module | None
    _step_emb: torch.Tensor | None
    components: dict[str, Any]

    @property
    def network_body(self) -> nn.Module:
        raise NotImplementedError

    def _add_step_layers(self, time_embedding: nn.Module, dim: int) -> None:
        self.map_steps = nn.Sequential(nn.Linear(STEP_FREQS * 2, dim), nn.SiLU(), nn.Linear(dim, dim))
        nn.init.zeros_(self.map_steps[2].weight)
        nn.init.zeros_(self.map_steps[2].bias)
        time_embedding.register_forward_hook(self._add_step_embedding)

    def _add_step_embedding(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if self._step_emb is None:
            raise DiffusersError("num_steps: this network is step-conditioned (SFD-v); pass num_steps=[B] (the sampler's N)")
        return output + self._step_emb.to(output.dtype)

    @contextmanager
    def step_embedding(self, num_steps: torch.Tensor | None, batch: int, device: torch.device) -> Iterator[None]:
        """Within the block, the network's time embedding gets the embedding of ``num_steps`` ([B] or one N)."""
        if self.map_steps is None:
            if num_steps is not None:
                raise DiffusersError("num_steps: this network is not step-conditioned (SFD-v)")
            yield
            return
        if num_steps is None:
            raise DiffusersError("num_steps: this network is step-conditioned (SFD-v); pass num_steps=[B] (the sampler's N)")
        n = torch.as_tensor(num_steps, device=device).reshape(-1).expand(batch).to(torch.float32)
        freqs = torch.arange(STEP_FREQS, device=device, dtype=torch.float32)
        angles = n[:, None] * (0.5 ** freqs)[None, :]  # N = 1..~100 resolved by the low frequencies
        features = torch.cat([angles.sin(), angles.cos()], dim=1).to(next(self.map_steps.parameters()).dtype)
        self._step_emb = self.map_steps(features)
        try:
            yield
        finally:
            self._step_emb = None

    # -- the distillation interface (as EDMPrecond's) ----------------------------------------------
    @property
    def step_condition(self) -> bool:
        return self.map_steps is not None

    def checkpoint_module(self) -> nn.Module:
        return self  # type: ignore[return-value]

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """model.safetensors: the network's state dict (diffusers' names), plus ``sfd_map_steps.*`` for SFD-v."""
        state = dict(self.network_body.state_dict())
        if self.map_steps is not None:
            state.update({f"{STEP_PREFIX}{k}": v for k, v in self.map_steps.state_dict().items()})
        return state

    def load_checkpoint_state(self, tensors: dict[str, torch.Tensor], where: str, *, allow_missing_steps: bool = False) -> None:
        """Load :meth:`checkpoint_state_dict`'s tensors strictly (``allow_missing_steps``: new SFD-v layers stay)."""
        body = {k: v for k, v in tensors.items() if not k.startswith(STEP_PREFIX)}
        steps = {k[len(STEP_PREFIX):]: v for k, v in tensors.items() if k.startswith(STEP_PREFIX)}
        missing, unexpected = self.network_body.load_state_dict(body, strict=False)
        if self.map_steps is not None and (steps or not allow_missing_steps):
            m2, u2 = self.map_steps.load_state_dict(steps, strict=False)
            missing, unexpected = missing + [STEP_PREFIX + k for k in m2], unexpected + [STEP_PREFIX + k for k in u2]
        elif self.map_steps is None and steps:
            unexpected = unexpected + [STEP_PREFIX + k for k in steps]
        if missing or unexpected:
            raise DiffusersError(f"{where} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")

    # -- latent models ------------------------------------------------------------------------------
    @property
    def latent(self) -> bool:
        return "vae" in self.components

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Images in [-1, 1] from latents: vae.decode(latents / scaling_factor + shift_factor) (:func:`decode_latents`);
        identity without a VAE."""
        vae = self.components.get("vae")
        return latents if vae is None else decode_latents(vae, latents, batch_size)


class DiffusersVP(DiffusersNetwork, nn.Module):
    """D(x, sigma, labels) of a diffusers UNet + scheduler config (see the module docstring)."""

    def __init__(self, unet: nn.Module, unet_class: str, scheduler_config: dict[str, Any], *,
                 where: str = "scheduler/scheduler_config.json", step_condition: bool = False) -> None:
        super().__init__()
        self.unet = unet
        self.unet_class = unet_class
        self.scheduler_config = copy.deepcopy(dict(scheduler_config))
        self.prediction_type = prediction_type_of(self.scheduler_config, where)
        abar = alphas_cumprod_from_config(self.scheduler_config, where)
        self.register_buffer("alphas_cumprod", abar, persistent=False)
        self.register_buffer("log_sigmas", (((1 - abar) / abar).sqrt()).log(), persistent=False)
        self.register_buffer("cond_table", None, persistent=False)  # [P, L, D] bound prompt embeddings
        self.register_buffer("null_cond", None, persistent=False)  # [1, L, D] the empty prompt's
        self.prompts: list[str] | None = None
        # VAE, text encoder, tokenizer: outside the module tree (not trained, not in state_dict)
        object.__setattr__(self, "components", {})
        # SFD-v: an embedding of N added to the UNet's time embedding (its last layer zero: starts as the UNet)
        self.map_steps: nn.Module | None = None
        self._step_emb: torch.Tensor | None = None
        if step_condition:
            self._add_step_layers(unet.time_embedding, int(unet.time_embedding.linear_2.out_features))

    @property
    def network_body(self) -> nn.Module:
        return self.unet

    # -- the schedule ------------------------------------------------------------------------------
    @property
    def sigmas(self) -> torch.Tensor:
        """sigma_tau for tau = 0..T-1 (float64, increasing)."""
        return self.log_sigmas.exp()

    @property
    def sigma_min(self) -> float:
        return float(self.log_sigmas[0].exp())

    @property
    def sigma_max(self) -> float:
        return float(self.log_sigmas[-1].exp())

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The (fractional) timestep of each sigma: exact on the grid, linear in log sigma between (float64)."""
        log_sigma = sigma.to(torch.float64).clamp(min=1e-300).log()
        ls = self.log_sigmas.to(log_sigma.device)
        log_sigma = log_sigma.clamp(ls[0], ls[-1])
        hi = torch.searchsorted(ls, log_sigma).clamp(1, ls.numel() - 1)
        lo = hi - 1
        w = (log_sigma - ls[lo]) / (ls[hi] - ls[lo])
        return lo.to(torch.float64) + w.clamp(0, 1)

    # -- conditioning ------------------------------------------------------------------------------
    @property
    def text_conditioned(self) -> bool:
        return self.unet_class == "UNet2DConditionModel"

    @property
    def num_classes(self) -> int:
        """Prompt-table size of a text-to-image model, class count of a class-embedding UNet, else 0."""
        if self.text_conditioned:
            return 0 if self.cond_table is None else int(self.cond_table.shape[0])
        return int(self.unet.config.get("num_class_embeds") or 0)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (int(self.unet.config.in_channels), int(h), int(w))

    def bind_prompts(self, cond_table: torch.Tensor, null_cond: torch.Tensor, prompts: list[str] | None = None) -> None:
        """Bind the encoded prompt table ([P, L, D]) and the empty prompt ([1, L, D]): labels are prompt indices."""
        self.cond_table = cond_table.detach().to(self.log_sigmas.device)
        self.null_cond = null_cond.detach().to(self.log_sigmas.device)
        self.prompts = None if prompts is None else list(prompts)

    def content_description(self) -> dict[str, Any]:
        """What determines D beyond the UNet's weights and the configs (pipeline.teachers.content): the abar
        table, the VAE's and the text encoder's weights, and the tokenizer's files (the prompt set itself is
        part of the store key as its own field). Hashes of stored bytes, never of computed encodings, so
        the key is the same on every device."""
        from pathlib import Path

        from pipeline.core.hashing import hash_bytes

        vae, enc = self.components.get("vae"), self.components.get("text_encoder")
        tok_dir = self.components.get("tokenizer_dir")
        tokenizer = None
        if tok_dir is not None:
            files = sorted(f for f in Path(tok_dir).iterdir() if f.is_file())
            tokenizer = {f.name: hash_bytes(f.read_bytes()) for f in files}
        return {
            "alphas_cumprod": hash_state_dict({"abar": self.alphas_cumprod.detach().cpu()}),
            "vae": None if vae is None else hash_state_dict(vae.state_dict()),
            "text_encoder": None if enc is None else hash_state_dict(enc.state_dict()),
            "tokenizer": tokenizer,
        }

    # -- the denoiser ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, labels: torch.Tensor | None = None,
                **net_kwargs: Any) -> torch.Tensor:
        num_steps = net_kwargs.pop("num_steps", None)
        if net_kwargs.pop("return_features", False):
            return self._with_features(x, sigma, labels, num_steps=num_steps, **net_kwargs)
        if net_kwargs:
            raise TypeError(f"a diffusers UNet takes no extra inputs but num_steps and return_features, got {sorted(net_kwargs)}")
        with self.step_embedding(num_steps, x.shape[0], x.device):
            return self._forward(x, sigma, labels)

    def _with_features(self, x: torch.Tensor, sigma: torch.Tensor | float, labels: torch.Tensor | None,
                       **net_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(D, h): h is the feature map the UNet's output convolution reads, SiLU(conv_norm_out(.)) - the map
        right before the output layer, as the EDM networks' ``return_features`` (SFDDM's feature loss)."""
        captured: list[torch.Tensor] = []
        handle = self.unet.conv_out.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            d = self.forward(x, sigma, labels, **net_kwargs)
        finally:
            handle.remove()
        return d, captured[-1]

    def _forward(self, x: torch.Tensor, sigma: torch.Tensor | float, labels: torch.Tensor | None) -> torch.Tensor:
        if self.text_conditioned:
            if labels is None or labels.is_floating_point():  # None: empty prompt; float [B, L, D]: a cond
                cond = labels
            else:
                if self.cond_table is None:
                    raise DiffusersError("this text-to-image teacher has no prompt table bound; labels are prompt indices")
                cond = self.cond_table[labels.to(self.cond_table.device).long()]
            return self.forward_cond(x, sigma, cond)
        if self.num_classes > 0 and labels is None:
            raise DiffusersError(
                "the diffusers UNet has a class embedding (num_class_embeds) but no null class: it needs labels "
                "(no classifier-free guidance)"
            )
        return self._denoise(x, sigma, {"class_labels": labels} if self.num_classes > 0 else {})

    def forward_cond(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: torch.Tensor | None) -> torch.Tensor:
        """D(x, sigma, cond) of a text-to-image UNet: cond = encoder hidden states [B, L, D]; None = empty prompt."""
        if not self.text_conditioned:
            raise DiffusersError(f"{self.unet_class} takes no text conditioning")
        if cond is None:
            if self.null_cond is None:
                raise DiffusersError("this text-to-image teacher has no empty-prompt embedding (load it with its text encoder)")
            cond = self.null_cond.expand(x.shape[0], *self.null_cond.shape[1:])
        elif cond.shape[0] == 1 and x.shape[0] > 1:
            cond = cond.expand(x.shape[0], *cond.shape[1:])
        net_dtype = next(self.unet.parameters()).dtype
        return self._denoise(x, sigma, {"encoder_hidden_states": cond.to(device=x.device, dtype=net_dtype)})

    def _denoise(self, x: torch.Tensor, sigma: torch.Tensor | float, kwargs: dict[str, Any]) -> torch.Tensor:
        net_dtype = next(self.unet.parameters()).dtype
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float64).reshape(-1)
        sigma = sigma.expand(x.shape[0]) if sigma.numel() == 1 else sigma
        t = self.sigma_to_t(sigma)
        shape = (-1, *([1] * (x.ndim - 1)))
        s = sigma.reshape(shape)
        c_in = (1 / (1 + s**2).sqrt()).to(x.dtype)
        out = self.unet((c_in * x).to(net_dtype), t.to(torch.float32), return_dict=False, **kwargs)[0].to(x.dtype)
        s = s.to(x.dtype)
        if self.prediction_type == "epsilon":
            return x - s * out
        if self.prediction_type == "v_prediction":
            return c_in**2 * x - s * c_in * out
        return out

    # -- the distillation interface (as EDMPrecond's; DiffusersNetwork) ---------------------------
    def with_step_condition(self) -> "DiffusersVP":
        """The same UNet (shared) with new SFD-v step layers (last layer zero: starts as this model), its
        components and prompt table carried along."""
        stepped = DiffusersVP(self.unet, self.unet_class, self.scheduler_config, step_condition=True)
        stepped.diffusers_section = getattr(self, "diffusers_section", None)
        stepped.components.update(self.components)
        stepped.prompts, stepped.cond_table, stepped.null_cond = self.prompts, self.cond_table, self.null_cond
        stepped.source_dir = getattr(self, "source_dir", None)
        return stepped

    def checkpoint_architecture(self) -> dict[str, Any]:
        """model.json's architecture part: ``{"architecture": "diffusers", "diffusers": {...}}`` (see
        :func:`pipeline.teachers.diffusers_folder.diffusers_section`)."""
        section = copy.deepcopy(getattr(self, "diffusers_section", None) or {})
        section.update(unet_class=self.unet_class, unet=dict(self.unet.config), scheduler=self.scheduler_config,
                       step_condition=self.step_condition)
        return {"architecture": DIFFUSERS_ARCHITECTURE, "diffusers": _plain(section)}

    # -- latent models (DiffusersNetwork: latent, decode) -------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], batch_size: int = 32) -> torch.Tensor:
        """Text-encoder hidden states [P, L, D] (the text encoder runs once per prompt)."""
        encoder, tokenizer = self.components.get("text_encoder"), self.components.get("tokenizer")
        if encoder is None or tokenizer is None:
            raise DiffusersError("this teacher has no text encoder and tokenizer (not a text-to-image model)")
        device = next(encoder.parameters()).device
        outs = []
        for i in range(0, len(prompts), batch_size):
            tokens = tokenizer(list(prompts[i : i + batch_size]), padding="max_length",
                               max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
            outs.append(encoder(tokens.input_ids.to(device), return_dict=False)[0].float().cpu())
        return torch.cat(outs)


@torch.no_grad()
def decode_latents(vae: nn.Module, latents: torch.Tensor, batch_size: int = 16,
                   default_scale: float = DEFAULT_VAE_SCALING) -> torch.Tensor:
    """Images in [-1, 1]: vae.decode(latents / scaling_factor + shift_factor), batch by batch, as the diffusers
    pipelines decode (shift_factor 0 when the VAE has none, as SD 1.x's; SD3 and Flux have one)."""
    scale = float(vae.config.get("scaling_factor", default_scale) or default_scale)
    shift = float(vae.config.get("shift_factor") or 0.0)
    device = next(vae.parameters()).device
    outs = [vae.decode((latents[i : i + batch_size] / scale + shift).to(device), return_dict=False)[0].float().cpu()
            for i in range(0, latents.shape[0], batch_size)]
    return torch.cat(outs).clamp(-1, 1)


def _plain(value: Any) -> Any:
    """JSON-safe copy of a config (FrozenDicts, tuples)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
