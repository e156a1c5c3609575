"""diffusers folders as teachers: reading them safely, and this project's converted checkpoint format.

A **diffusers folder** is a pipeline folder with ``model_index.json`` naming its component subfolders,
or a bare ``unet/`` + ``scheduler/`` pair:

- ``unet/``: ``config.json`` (``_class_name`` ``UNet2DModel`` or ``UNet2DConditionModel``) and
  ``diffusion_pytorch_model.safetensors`` (or its sharded ``.safetensors.index.json``). A folder that
  holds only pickled ``.bin`` weights is refused: nothing is ever unpickled.
- ``scheduler/scheduler_config.json``: a discrete VP (DDPM-type) scheduler: ``num_train_timesteps``,
  ``beta_schedule`` (linear / scaled_linear / squaredcos_cap_v2, or ``trained_betas``), ``beta_start``,
  ``beta_end``, ``prediction_type`` (epsilon / v_prediction / sample).
- latent text-to-image (Stable Diffusion style) also: ``vae/`` (``AutoencoderKL``), ``text_encoder/``
  (``CLIPTextModel``, ``model.safetensors``) and ``tokenizer/`` (``CLIPTokenizer`` text files).

The **converted checkpoint** (``sfd teacher import FOLDER --out DIR``, or the teacher stage with
``teacher.pretrained`` pointing at a diffusers folder) holds

- ``model.safetensors``: the UNet's state dict; ``model.json``: ``{"architecture": "diffusers",
  "diffusers": {"unet_class", "unet": its config, "scheduler": the scheduler config, "vae":
  {"class", "config"} | null, "text_encoder": {"class", "config"} | null, "tokenizer": "tokenizer" |
  null}, "data": {"sample_shape", "num_classes"}, "sampler": null, "provenance": {...}}``;
- ``vae.safetensors`` and ``text_encoder.safetensors`` (their own state dicts), ``tokenizer/`` (the
  tokenizer's text files, copied), and ``prompts.json`` when a prompt set is bound
  (``{"prompts": [...], "hash": ...}``: labels are then indices into it).

Both load into the same :class:`pipeline.networks.diffusers_vp.DiffusersVP` with identical outputs. A
distilled student of a diffusers teacher is the same format with a ``sampler`` section (the side
files are copied from its teacher by :func:`save_components`).

**Flow-matching transformers** (Stable Diffusion 3 / 3.5, Flux.1; :class:`pipeline.networks.flow.DiffusersFlow`):
a pipeline folder with ``model_index.json``, ``transformer/`` (``SD3Transformer2DModel`` or
``FluxTransformer2DModel``), ``scheduler/`` (``FlowMatchEulerDiscreteScheduler``), ``vae/``, ``text_encoder/``,
``text_encoder_2/`` (and SD3's optional ``text_encoder_3/``, T5) with their ``tokenizer*/`` folders. Its converted
checkpoint holds the transformer in model.safetensors, model.json's ``diffusers`` section with
``transformer_class``, ``transformer``, ``scheduler``, ``sample_size`` (the latent size: the data's image size over
the VAE's factor when the teacher stage imports it, else the transformer's default), ``max_sequence_length``,
``vae``, ``text_encoders`` and ``tokenizers``, and the side files ``vae.safetensors``, ``text_encoder*.safetensors``,
``tokenizer*/`` and ``prompts.json``.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline.networks.diffusers_vp import (
    DiffusersError, DiffusersVP, build_unet, require_diffusers, require_transformers,
)  # fmt: skip
from pipeline.networks.flow import FLOW_TRANSFORMERS as FLOW_FAMILIES, DiffusersFlow, build_transformer
from pipeline.teachers.prompts import prompt_set_hash, read_prompts
from pipeline.teachers.content import teacher_content_hash

MODEL_INDEX = "model_index.json"
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")
TEXT_ENCODER_CONFIGS = {"CLIPTextModel": "CLIPTextConfig", "CLIPTextModelWithProjection": "CLIPTextConfig",
                        "T5EncoderModel": "T5Config"}
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast", "T5Tokenizer", "T5TokenizerFast")
FLOW_TEXT_COMPONENTS = {  # (required, optional) text encoders of each flow family, with their tokenizers
    "sd3": (("text_encoder", "text_encoder_2"), ("text_encoder_3",)),
    "flux": (("text_encoder", "text_encoder_2"), ()),
}
VAE_CLASSES = ("AutoencoderKL",)
TOKENIZER_FILE_SUFFIXES = (".json", ".txt", ".model")  # text files only; nothing executable
PROMPTS_FILE = "prompts.json"


def is_diffusers_folder(path: str | Path) -> bool:
    """A directory with model_index.json, or with unet/config.json, and no model.json of ours."""
    path = Path(path)
    return path.is_dir() and not (path / "model.json").exists() and (
        (path / MODEL_INDEX).is_file() or (path / "unet" / "config.json").is_file()
        or (path / "transformer" / "config.json").is_file()
    )


def folder_kind(path: str | Path) -> str:
    """Which diffusers family a folder holds: ``flow`` (a transformer), ``latent`` (a VAE or text encoder beside the
    UNet) or ``pixel``; read from model_index.json's components, else from the subfolders."""
    path = Path(path)
    names: set[str] = set()
    if (path / MODEL_INDEX).is_file():
        try:
            names = {k for k, v in json.loads((path / MODEL_INDEX).read_text()).items() if isinstance(v, list) and v[0]}
        except (json.JSONDecodeError, AttributeError):
            names = set()  # load_diffusers_folder names the problem
    elif path.is_dir():
        names = {p.name for p in path.iterdir() if p.is_dir()}
    if "transformer" in names:
        return "flow"
    return "latent" if {"vae", "text_encoder"} & names else "pixel"


def config_kind(config: dict[str, Any]) -> str:
    """Which diffusers family a converted checkpoint's model.json (``"architecture": "diffusers"``) holds."""
    section = config.get("diffusers")
    if isinstance(section, dict) and "transformer_class" in section:
        return "flow"
    return "latent" if isinstance(section, dict) and (section.get("vae") or section.get("text_encoder")) else "pixel"


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DiffusersError(f"{path} is missing")
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DiffusersError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise DiffusersError(f"{path}: expected a JSON object")
    return value


def _read_safetensors(folder: Path, name: str, what: str) -> dict[str, torch.Tensor]:
    """``folder/name`` or its shards (``name.index.json``); refuses pickled ``.bin`` weights."""
    single, index = folder / name, folder / f"{name}.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        out: dict[str, torch.Tensor] = {}
        for shard in shards:
            if not shard.endswith(".safetensors") or "/" in shard or not (folder / shard).is_file():
                raise DiffusersError(f"{index}: shard {shard!r} is not a safetensors file in {folder}")
            out.update(load_file(str(folder / shard)))
        return out
    bins = sorted(p.name for p in folder.glob("*.bin"))
    extra = f" (found only pickled {', '.join(bins)}, which this pipeline never loads; re-save with safe_serialization)" if bins else ""
    raise DiffusersError(f"{single} is missing: the {what} weights must be safetensors{extra}")


def _component_dirs(path: Path) -> dict[str, Path]:
    """Subfolder of each component: from model_index.json, else the unet/ + scheduler/ pair."""
    index_path = path / MODEL_INDEX
    if index_path.is_file():
        index = _read_json(index_path)
        comps = {k: path / k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0]}
        for key in ("unet" if "transformer" not in comps else "transformer", "scheduler"):
            if key not in comps:
                raise DiffusersError(f"{index_path}: no {key!r} component (a diffusers teacher needs a unet or a "
                                     "transformer, and a scheduler)")
        return comps
    if not (path / "unet" / "config.json").is_file() or not (path / "scheduler" / "scheduler_config.json").is_file():
        raise DiffusersError(
            f"{index_path} is missing: a diffusers teacher folder has model_index.json (a pipeline saved with "
            "save_pretrained) or a unet/ + scheduler/ pair (unet/config.json, scheduler/scheduler_config.json)"
        )
    return {k: path / k for k in ("unet", "scheduler", "vae", "text_encoder", "tokenizer") if (path / k).is_dir()}


def _build_text_encoder(config: dict[str, Any], where: str, cls: str | None = None):
    """(class name, a random text encoder) of a config: the class ``cls`` (a converted checkpoint records it), else the
    config's ``architectures`` (a folder's config.json), else CLIPTextModel."""
    transformers = require_transformers()
    arch = cls or (config.get("architectures") or ["CLIPTextModel"])[0]
    if arch not in TEXT_ENCODER_CLASSES:
        raise DiffusersError(f"{where}: architectures {arch!r} is not supported (known: {', '.join(TEXT_ENCODER_CLASSES)})")
    cfg = getattr(transformers, TEXT_ENCODER_CONFIGS[arch]).from_dict({k: v for k, v in config.items() if k != "architectures"})
    return arch, getattr(transformers, arch)(cfg)


def _build_vae(config: dict[str, Any], where: str):
    diffusers = require_diffusers()
    cls = config.get("_class_name", "AutoencoderKL")
    if cls not in VAE_CLASSES:
        raise DiffusersError(f"{where}: _class_name {cls!r} is not supported (known: {', '.join(VAE_CLASSES)})")
    return cls, getattr(diffusers, cls).from_config(dict(config))


def _load_strict(module: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    if missing:  # a tied weight (T5's encoder.embed_tokens is its shared embedding) is stored once
        params = module.state_dict(keep_vars=True)
        loaded = {params[k].data_ptr() for k in tensors if k in params}
        missing = [k for k in missing if params[k].data_ptr() not in loaded]
    if missing or unexpected:
        raise DiffusersError(f"{where} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _load_tokenizer(folder: Path, cls: str = "CLIPTokenizer"):
    transformers = require_transformers()
    if not folder.is_dir():
        raise DiffusersError(f"{folder} is missing (the text encoder's tokenizer)")
    if cls not in TOKENIZER_CLASSES:
        raise DiffusersError(f"{folder}: tokenizer class {cls!r} is not supported (known: {', '.join(TOKENIZER_CLASSES)})")
    return getattr(transformers, cls).from_pretrained(str(folder), local_files_only=True)


def _tokenizer_class(folder: Path) -> str:
    """The tokenizer class its tokenizer_config.json names (CLIPTokenizer when it names none)."""
    config = folder / "tokenizer_config.json"
    cls = _read_json(config).get("tokenizer_class") if config.is_file() else None
    return cls or "CLIPTokenizer"


def _finish(model: DiffusersVP, section: dict[str, Any], device, prompts: list[str] | None) -> DiffusersVP:
    model.diffusers_section = section
    model = model.to(device).eval().requires_grad_(False)
    for comp in ("vae", "text_encoder"):
        if comp in model.components:
            model.components[comp] = model.components[comp].to(device).eval().requires_grad_(False)
    if model.text_conditioned and "text_encoder" in model.components:
        null = model.encode_prompts([""])
        table = model.encode_prompts(prompts) if prompts else null[:0]
        model.bind_prompts(table, null, prompts or [])
    elif prompts:
        raise DiffusersError("prompts given, but the teacher's UNet is not text-conditioned (UNet2DConditionModel)")
    return model


def load_diffusers_folder(path: str | Path, device: str | torch.device = "cpu", *,
                          prompts: list[str] | None = None, image_size: list[int] | None = None) -> DiffusersVP | DiffusersFlow:
    """A diffusers folder (see the module docstring) as a DiffusersVP (a UNet) or a DiffusersFlow (a flow
    transformer) in eval mode; ``prompts`` bind a prompt set; ``image_size`` [H, W] sets a flow transformer's
    latent size to the image size over the VAE's factor."""
    path = Path(path)
    comps = _component_dirs(path)
    if "transformer" in comps:
        return _load_flow_folder(path, comps, device, prompts, image_size)
    unet_dir, sched_dir = comps["unet"], comps["scheduler"]
    unet_cfg = _read_json(unet_dir / "config.json")
    unet = build_unet(unet_cfg.get("_class_name", "?"), unet_cfg, where=str(unet_dir / "config.json"))
    _load_strict(unet, _read_safetensors(unet_dir, UNET_WEIGHTS, "unet"), str(unet_dir / UNET_WEIGHTS))
    sched_cfg = _read_json(sched_dir / "scheduler_config.json")
    model = DiffusersVP(unet, unet_cfg["_class_name"], sched_cfg, where=str(sched_dir / "scheduler_config.json"))
    section: dict[str, Any] = {"vae": None, "text_encoder": None, "tokenizer": None}
    if "vae" in comps:
        vcfg = _read_json(comps["vae"] / "config.json")
        cls, vae = _build_vae(vcfg, str(comps["vae"] / "config.json"))
        _load_strict(vae, _read_safetensors(comps["vae"], UNET_WEIGHTS, "vae"), str(comps["vae"] / UNET_WEIGHTS))
        model.components["vae"] = vae
        section["vae"] = {"class": cls, "config": dict(vae.config)}
    if "text_encoder" in comps:
        tcfg = _read_json(comps["text_encoder"] / "config.json")
        cls, enc = _build_text_encoder(tcfg, str(comps["text_encoder"] / "config.json"))
        _load_strict(enc, _read_safetensors(comps["text_encoder"], "model.safetensors", "text encoder"),
                     str(comps["text_encoder"] / "model.safetensors"))
        model.components["text_encoder"] = enc
        model.components["tokenizer"] = _load_tokenizer(comps.get("tokenizer", path / "tokenizer"))
        model.components["tokenizer_dir"] = comps.get("tokenizer", path / "tokenizer")
        section["text_encoder"] = {"class": cls, "config": enc.config.to_dict()}
        section["tokenizer"] = "tokenizer"
    elif model.text_conditioned:
        raise DiffusersError(f"{path}: the UNet is a UNet2DConditionModel but the folder has no text_encoder/ (and tokenizer/)")
    model.source_dir = path
    return _finish(model, section, device, prompts)


def load_converted_diffusers(path: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                             device: str | torch.device = "cpu") -> DiffusersVP:
    """A converted checkpoint folder (model.json ``"architecture": "diffusers"``) as a DiffusersVP in eval mode."""
    path = Path(path)
    model = build_diffusers_model(config, where=f"{path}/model.json")
    model.load_checkpoint_state(tensors, f"{path}/model.safetensors")
    section = config["diffusers"]
    if isinstance(model, DiffusersFlow):
        return _load_converted_flow(path, model, section, device)
    if section.get("vae"):
        cls, vae = _build_vae(section["vae"]["config"], f"{path}/model.json: diffusers.vae")
        _load_strict(vae, _read_safetensors(path, "vae.safetensors", "vae"), f"{path}/vae.safetensors")
        model.components["vae"] = vae
    if section.get("text_encoder"):
        cls, enc = _build_text_encoder(section["text_encoder"]["config"], f"{path}/model.json: diffusers.text_encoder")
        _load_strict(enc, _read_safetensors(path, "text_encoder.safetensors", "text encoder"),
                     f"{path}/text_encoder.safetensors")
        model.components["text_encoder"] = enc
        model.components["tokenizer"] = _load_tokenizer(path / (section.get("tokenizer") or "tokenizer"))
        model.components["tokenizer_dir"] = path / (section.get("tokenizer") or "tokenizer")
    prompts = None
    if (path / PROMPTS_FILE).is_file():
        prompts = _read_json(path / PROMPTS_FILE).get("prompts")
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise DiffusersError(f"{path / PROMPTS_FILE}: 'prompts' must be a list of strings")
    model.source_dir = path
    return _finish(model, {k: section.get(k) for k in ("vae", "text_encoder", "tokenizer")}, device, prompts)


def build_diffusers_model(config: dict[str, Any], *, where: str = "model.json") -> DiffusersVP:
    """The bare DiffusersVP (random UNet, no VAE / text encoder) that a model.json describes (with its SFD-v
    step condition when ``diffusers.step_condition`` is true)."""
    section = config.get("diffusers")
    if isinstance(section, dict) and "transformer_class" in section:  # a flow transformer (pipeline.networks.flow)
        for key in ("transformer", "scheduler", "sample_size"):
            if key not in section:
                raise DiffusersError(f"{where}: the diffusers section of a flow transformer has no {key!r}")
        transformer = build_transformer(section["transformer_class"], section["transformer"], where=f"{where}: diffusers.transformer")
        model = DiffusersFlow(transformer, section["transformer_class"], section["scheduler"],
                              sample_size=section["sample_size"], max_sequence_length=section.get("max_sequence_length"),
                              where=f"{where}: diffusers.scheduler", step_condition=bool(section.get("step_condition", False)))
        model.diffusers_section = {k: copy.deepcopy(section.get(k)) for k in ("vae", "text_encoders", "tokenizers")}
        return model
    if not isinstance(section, dict) or not all(k in section for k in ("unet_class", "unet", "scheduler")):
        raise DiffusersError(f"{where}: architecture 'diffusers' needs a diffusers section with unet_class, unet, scheduler "
                             "(or transformer_class, transformer, scheduler)")
    unet = build_unet(section["unet_class"], section["unet"], where=f"{where}: diffusers.unet")
    model = DiffusersVP(unet, section["unet_class"], section["scheduler"], where=f"{where}: diffusers.scheduler",
                        step_condition=bool(section.get("step_condition", False)))
    model.diffusers_section = {k: section.get(k) for k in ("vae", "text_encoder", "tokenizer")}
    return model


def image_shape(model: DiffusersVP) -> list[int]:
    """Shape of one image the model makes: its sample shape, or for a latent model the VAE's decoded shape
    (channels out_channels, each side times 2^(number of VAE blocks - 1))."""
    vae = model.components.get("vae")
    if vae is None:
        return list(model.sample_shape)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    _, h, w = model.sample_shape
    return [int(vae.config.out_channels), h * factor, w * factor]


def checkpoint_config(model: DiffusersVP, *, provenance: dict[str, Any], sampler: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        **model.checkpoint_architecture(),
        "data": {"sample_shape": list(model.sample_shape), "num_classes": model.num_classes},
        "sampler": sampler,
        "provenance": dict(provenance),
    }


def untied_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each tied tensor once (T5's shared embedding is also encoder.embed_tokens): safetensors
    refuses shared storage; loading restores the tie (:func:`_load_strict`)."""
    state, seen = {}, set()
    for k, v in sorted(module.state_dict().items()):
        if v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        state[k] = v.detach().cpu().contiguous()
    return state


def save_components(model: DiffusersVP, directory: str | Path) -> None:
    """Write the side files of a converted checkpoint: vae.safetensors, text_encoder.safetensors,
    tokenizer/ (text files copied) and prompts.json (when a prompt set is bound)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, module in sorted(model.components.items()):  # vae, text_encoder, text_encoder_2, ...
        if isinstance(module, torch.nn.Module):
            save_file(untied_state(module), str(directory / f"{name}.safetensors"))
    for key, tok_dir in sorted(model.components.items()):  # tokenizer_dir -> tokenizer/, tokenizer_2_dir -> tokenizer_2/
        if not (key.startswith("tokenizer") and key.endswith("_dir")):
            continue
        out = directory / key.removesuffix("_dir")
        if Path(tok_dir).resolve() != out.resolve():
            if out.exists():
                shutil.rmtree(out)
            out.mkdir()
            for f in sorted(Path(tok_dir).iterdir()):
                if f.is_file() and f.suffix in TOKENIZER_FILE_SUFFIXES:
                    shutil.copyfile(f, out / f.name)
    if model.prompts:
        (directory / PROMPTS_FILE).write_text(
            json.dumps({"prompts": model.prompts, "hash": prompt_set_hash(model.prompts)}, indent=1) + "\n")


def convert_diffusers_folder(source: str | Path, out_dir: str | Path, *, prompts_file: str | Path | None = None,
                             data_description: dict[str, Any] | None = None) -> dict[str, Any]:
    """``sfd teacher import FOLDER --out DIR``: the diffusers folder as a converted checkpoint; a summary."""
    from pipeline.core.checkpoints import save_checkpoint

    source = Path(source)
    prompts = read_prompts(prompts_file) if prompts_file is not None else None
    want = list((data_description or {}).get("sample_shape") or [])
    model = load_diffusers_folder(source, prompts=prompts, image_size=want[1:] or None)
    made = image_shape(model)
    if want and want != made:
        what = f"decodes its {list(model.sample_shape)} latents to images of shape" if model.latent else "makes samples of shape"
        raise DiffusersError(f"teacher.pretrained: {source} {what} {made}, the data has {want}")
    config = checkpoint_config(model, provenance={
        "kind": "teacher", "source_folder": str(source), "importer": "pipeline.teachers.diffusers_folder",
        "prompts_file": None if prompts_file is None else str(prompts_file),
    })
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    save_checkpoint(out_dir, model.checkpoint_state_dict(), config)
    save_components(model, out_dir)
    if isinstance(model, DiffusersFlow):
        kind = {"class": model.transformer_class, "prediction_type": "flow (velocity)", "flow_shift": model.flow_shift,
                "parameters": sum(p.numel() for p in model.transformer.parameters()), "sigma_range": [0.0, math.inf]}
    else:
        kind = {"class": model.unet_class, "prediction_type": model.prediction_type,
                "parameters": sum(p.numel() for p in model.unet.parameters()),
                "sigma_range": [model.sigma_min, model.sigma_max]}
    return {
        **kind, "weights_hash": teacher_content_hash(model), "sample_shape": list(model.sample_shape),
        "num_classes": model.num_classes, "latent": model.latent, "prompts": len(model.prompts or []), "out": str(out_dir),
    }


# ---- flow-matching transformers (SD3 / SD3.5, Flux.1) ---------------------------------------------------------


def _vae_factor(vae_config: dict[str, Any]) -> int:
    return 2 ** (len(vae_config.get("block_out_channels", [0])) - 1)


def _load_flow_folder(path: Path, comps: dict[str, Path], device, prompts: list[str] | None,
                      image_size: list[int] | None) -> DiffusersFlow:
    """A flow-transformer pipeline folder (module docstring) as a DiffusersFlow in eval mode."""
    tdir, sdir = comps["transformer"], comps["scheduler"]
    tcfg = _read_json(tdir / "config.json")
    cls = tcfg.get("_class_name", "?")
    transformer = build_transformer(cls, tcfg, where=str(tdir / "config.json"))
    _load_strict(transformer, _read_safetensors(tdir, UNET_WEIGHTS, "transformer"), str(tdir / UNET_WEIGHTS))
    section: dict[str, Any] = {"vae": None, "text_encoders": {}, "tokenizers": {}}
    vae = None
    if "vae" in comps:
        vcfg = _read_json(comps["vae"] / "config.json")
        vcls, vae = _build_vae(vcfg, str(comps["vae"] / "config.json"))
        _load_strict(vae, _read_safetensors(comps["vae"], UNET_WEIGHTS, "vae"), str(comps["vae"] / UNET_WEIGHTS))
        section["vae"] = {"class": vcls, "config": dict(vae.config)}
    sample_size = None  # SD3: the transformer's sample_size; Flux (none in its config): the VAE's image size
    if vae is not None and FLOW_FAMILIES.get(cls) == "flux":
        sample_size = [int(vae.config.sample_size) // _vae_factor(dict(vae.config))] * 2
    if image_size:
        factor = _vae_factor(dict(vae.config)) if vae is not None else 1
        if any(int(s) % factor for s in image_size):
            raise DiffusersError(f"{path}: images of {list(image_size)} px are not a multiple of the VAE's factor {factor}")
        sample_size = [int(s) // factor for s in image_size]
    model = DiffusersFlow(transformer, cls, _read_json(sdir / "scheduler_config.json"), sample_size=sample_size,
                          where=str(sdir / "scheduler_config.json"))
    if vae is not None:
        model.components["vae"] = vae
    required, optional = FLOW_TEXT_COMPONENTS[model.family]
    for name in required + optional:
        if name not in comps:
            if name in required:
                raise DiffusersError(f"{path}: a {cls} folder needs {name}/ (and its tokenizer); it has none")
            continue
        suffix = name.removeprefix("text_encoder")
        ecfg = _read_json(comps[name] / "config.json")
        ecls, enc = _build_text_encoder(ecfg, str(comps[name] / "config.json"))
        _load_strict(enc, _read_safetensors(comps[name], "model.safetensors", name), str(comps[name] / "model.safetensors"))
        tok_name = f"tokenizer{suffix}"
        tok_dir = comps.get(tok_name, path / tok_name)
        tcls = _tokenizer_class(tok_dir) if tok_dir.is_dir() else "?"
        model.components[name] = enc
        model.components[tok_name] = _load_tokenizer(tok_dir, tcls)
        model.components[f"{tok_name}_dir"] = tok_dir
        section["text_encoders"][name] = {"class": ecls, "config": enc.config.to_dict()}
        section["tokenizers"][tok_name] = tcls
    model.diffusers_section = section
    model.source_dir = path
    return _finish_flow(model, device, prompts)


def _load_converted_flow(path: Path, model: DiffusersFlow, section: dict[str, Any], device) -> DiffusersFlow:
    """The side files of a converted flow checkpoint (vae.safetensors, text_encoder*.safetensors, tokenizer*/, prompts.json)."""
    if section.get("vae"):
        _, vae = _build_vae(section["vae"]["config"], f"{path}/model.json: diffusers.vae")
        _load_strict(vae, _read_safetensors(path, "vae.safetensors", "vae"), f"{path}/vae.safetensors")
        model.components["vae"] = vae
    for name, spec in sorted((section.get("text_encoders") or {}).items()):
        _, enc = _build_text_encoder(spec["config"], f"{path}/model.json: diffusers.text_encoders.{name}", spec.get("class"))
        _load_strict(enc, _read_safetensors(path, f"{name}.safetensors", name), f"{path}/{name}.safetensors")
        model.components[name] = enc
    for name, cls in sorted((section.get("tokenizers") or {}).items()):
        model.components[name] = _load_tokenizer(path / name, cls)
        model.components[f"{name}_dir"] = path / name
    model.source_dir = path
    return _finish_flow(model, device, _converted_prompts(path))


def _converted_prompts(path: Path) -> list[str] | None:
    if not (path / PROMPTS_FILE).is_file():
        return None
    prompts = _read_json(path / PROMPTS_FILE).get("prompts")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise DiffusersError(f"{path / PROMPTS_FILE}: 'prompts' must be a list of strings")
    return prompts


def _finish_flow(model: DiffusersFlow, device, prompts: list[str] | None) -> DiffusersFlow:
    model = model.to(device).eval().requires_grad_(False)
    for name, comp in list(model.components.items()):
        if isinstance(comp, torch.nn.Module):
            model.components[name] = comp.to(device).eval().requires_grad_(False)
    model.bind_prompts(prompts or [])
    return model
