"""``sfd export --ckpt models/sfd --format diffusers --out DIR``: a distilled diffusers student as a diffusers folder
(a LoRA student: its adapters merged); ``--format diffusers-lora``: a LoRA student's adapters as diffusers LoRA
weights (:func:`export_diffusers_lora`).

DIR holds ``model_index.json``, ``unet/`` (the distilled UNet, ``save_pretrained`` with safetensors),
``scheduler/`` (the student's own sampler as :class:`pipeline.teachers.diffusers_scheduler.SFDScheduler`:
its time points, AFS and prediction type), for a latent text-to-image model also ``vae/``, ``text_encoder/``
and ``tokenizer/``, and ``sfd_sampler.json``, the sampler the student was distilled for:

- ``sigmas``: the VE noise levels t_0 = t_max > ... > t_{N-1} (float64), ``timesteps``: the UNet timestep
  of each (fractional between the scheduler's grid points, linear in log sigma);
- ``solver`` (``euler``), ``afs`` (analytical first step: no UNet call at t_0, eps = x / sqrt(1 + t_0^2)),
  ``guidance`` (the w it was distilled at; any w works: eps = eps_u + w (eps_c - eps_u)), ``nfe``;
- ``prediction_type``, ``sample_shape``, ``latent`` and ``vae_scaling_factor``.

A flow-matching transformer (SD3 / SD3.5, Flux.1) exports as ``StableDiffusion3Pipeline`` / ``FluxPipeline``
with ``transformer/``, ``vae/``, ``text_encoder*/`` and ``tokenizer*/`` (:func:`export_flow`): with the stock
``FlowMatchEulerDiscreteScheduler`` (shift 1, no dynamic shift, so ``sigmas=`` pass unchanged) when the stock
loop expresses the student (no AFS, last point sigma = 0: ``pipe(prompt, sigmas=s["stock"]["sigmas"])``), else
with the SFD scheduler in its ``flow`` sample space. An AFS student ending at 0 also samples with the stock
scheduler from the latents tau_1 z (``latents_scale``): ``sfd_sampler.json``'s ``stock`` section says how.

``model_index.json`` declares ``DDPMPipeline`` (pixel) or ``StableDiffusionPipeline`` (text-to-image) with the
SFD scheduler, so ``DiffusionPipeline.from_pretrained(DIR)`` samples the student with its own steps once
``pipeline.teachers.diffusers_scheduler`` is imported (diffusers does not import a module a folder names). The
README ("Use your own teacher") shows both that and the few lines of plain diffusers code that sample with
``sfd_sampler.json``; tests/test_diffusers_pixel.py and tests/test_diffusers_t2i.py check both against
``sfd sample``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from pipeline.core.param_checks import ParamError
from pipeline.networks.diffusers_vp import DEFAULT_VAE_SCALING, DiffusersVP, require_diffusers
from pipeline.networks.flow import DiffusersFlow
from pipeline.teachers.families import family_for_config
from pipeline.teachers.loader import load_student

EXPORT_FORMATS = ("diffusers", "diffusers-lora")
SAMPLER_FILE = "sfd_sampler.json"


def export_diffusers(ckpt: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the distilled checkpoint ``ckpt`` (of a diffusers teacher) as a diffusers folder ``out``."""
    student = load_student(ckpt)
    if family_for_config(student.config).diffusers_export == "flow":
        return export_flow(student, ckpt, out)
    return export_unet(student, ckpt, out)


def export_unet(student: Any, ckpt: str | Path, out: str | Path) -> dict[str, Any]:
    """A distilled diffusers UNet (pixel or latent text-to-image) as a DDPMPipeline / StableDiffusionPipeline folder."""
    diffusers = require_diffusers()
    _, model, spec, sigmas, timesteps = _distilled_diffusers(ckpt, "diffusers", student)
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.unet.save_pretrained(out / "unet", safe_serialization=True)
    from pipeline.teachers.diffusers_scheduler import SFDScheduler

    sample_space = "ve" if "text_encoder" in model.components else "vp"  # StableDiffusionPipeline / DDPMPipeline
    SFDScheduler(sigmas=[float(s) for s in sigmas], timesteps=[float(t) for t in timesteps], afs=bool(spec.afs),
                 prediction_type=model.prediction_type, sample_space=sample_space,
                 num_train_timesteps=int(model.scheduler_config.get("num_train_timesteps", 1000)),
                 ).save_pretrained(out / "scheduler")
    index: dict[str, Any] = {"_diffusers_version": diffusers.__version__, "unet": ["diffusers", model.unet_class],
                             "scheduler": [SFDScheduler.__module__, SFDScheduler.__name__]}
    if model.latent:
        model.components["vae"].save_pretrained(out / "vae", safe_serialization=True)
        index["vae"] = ["diffusers", type(model.components["vae"]).__name__]
    if "text_encoder" in model.components:
        model.components["text_encoder"].save_pretrained(out / "text_encoder", safe_serialization=True)
        index["text_encoder"] = ["transformers", type(model.components["text_encoder"]).__name__]
        (out / "tokenizer").mkdir()
        for f in sorted(Path(model.components["tokenizer_dir"]).iterdir()):
            if f.is_file():
                shutil.copyfile(f, out / "tokenizer" / f.name)
        index["tokenizer"] = ["transformers", "CLIPTokenizer"]
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
        index["_class_name"] = "StableDiffusionPipeline"
    else:
        index["_class_name"] = "DDPMPipeline"
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    sampler = write_sampler_file(out, ckpt, model, spec, sigmas, timesteps)
    return {"out": str(out), "nfe": spec.nfe, "num_steps": len(sampler["sigmas"]), "unet_class": model.unet_class}


def write_sampler_file(out: Path, ckpt: str | Path, model: DiffusersVP, spec: Any, sigmas: Any, timesteps: Any) -> dict[str, Any]:
    """``sfd_sampler.json`` (module docstring) beside an export."""
    vae = model.components.get("vae")
    sampler = {
        "solver": spec.solver,
        "sigmas": [float(s) for s in sigmas],
        "timesteps": [float(t) for t in timesteps],
        "afs": bool(spec.afs),
        "guidance": float(spec.guidance),
        "nfe": spec.nfe,
        "prediction_type": model.prediction_type,
        "sample_shape": list(model.sample_shape),
        "latent": model.latent,
        "vae_scaling_factor": None if vae is None else float(vae.config.get("scaling_factor") or DEFAULT_VAE_SCALING),
        "source_checkpoint": str(ckpt),
    }
    (out / SAMPLER_FILE).write_text(json.dumps(sampler, indent=2) + "\n")
    return sampler


def _distilled_diffusers(ckpt: str | Path, fmt: str, student: Any = None) -> tuple[Any, DiffusersVP, Any, Any, Any]:
    """(student, its DiffusersVP, sampler spec, sigmas, UNet timesteps) of a single-N Euler student of a diffusers teacher
    (``student``: the checkpoint already loaded)."""
    student = load_student(ckpt) if student is None else student
    model = student.model
    if family_for_config(student.config).diffusers_export != "unet":
        raise ParamError(f"--format {fmt}: {ckpt} is not a distilled diffusers UNet (its teacher was not a diffusers folder)")
    spec = student.sampler_spec()
    if model.step_condition:
        raise ParamError(f"--format {fmt}: {ckpt} is step-conditioned (SFD-v); its step layers have no diffusers "
                         "equivalent, export a single-N student (distill, distill_stage2)")
    if spec.solver != "euler":
        raise ParamError(f"--format {fmt}: the checkpoint's sampler is {spec.solver!r}; the export describes Euler samplers only")
    sigmas = spec.t_steps()
    timesteps = model.sigma_to_t(sigmas.to(model.log_sigmas.device)).cpu()
    return student, model, spec, sigmas, timesteps


def export_diffusers_lora(ckpt: str | Path, out: str | Path) -> dict[str, Any]:
    """A LoRA student (``lora_rank`` > 0) as diffusers LoRA weights: ``pytorch_lora_weights.safetensors`` (the UNet's
    adapters under ``unet.``, with their rank / alpha / targets in the file's metadata) + ``sfd_sampler.json``.
    A user loads them into the teacher's pipeline: ``pipe.load_lora_weights(out)`` (StableDiffusionPipeline), or a
    bare UNet: ``unet.load_lora_adapter(out, prefix="unet")``. ``--format diffusers`` writes the merged folder."""
    require_diffusers()
    from diffusers import StableDiffusionPipeline

    from pipeline.core.checkpoints import load_checkpoint

    adapters, config = load_checkpoint(ckpt)
    lora = config.get("lora")
    if not lora:
        raise ParamError(f"--format diffusers-lora: {ckpt} is not a LoRA student (its distill section had lora_rank: 0); "
                         "export the whole UNet with --format diffusers")
    _, model, spec, sigmas, timesteps = _distilled_diffusers(ckpt, "diffusers-lora")
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    metadata = {"r": int(lora["rank"]), "lora_alpha": float(lora["alpha"]), "target_modules": list(lora["targets"])}
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=adapters, unet_lora_adapter_metadata=metadata,
                                              safe_serialization=True)
    write_sampler_file(out, ckpt, model, spec, sigmas, timesteps)
    return {"out": str(out), "nfe": spec.nfe, "num_steps": len(sigmas), "unet_class": model.unet_class,
            "adapters": len(adapters), "rank": metadata["r"]}


FLOW_PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
FLOW_OPTIONAL = {"sd3": ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor"),
                 "flux": ("image_encoder", "feature_extractor")}


def export_flow(student: Any, ckpt: str | Path, out: str | Path) -> dict[str, Any]:
    """A distilled flow transformer as a StableDiffusion3Pipeline / FluxPipeline folder (module docstring).

    ``sfd_sampler.json``: ``flow_times`` tau_0 = 1 > ... > tau_{N-1} (tau = sigma / (1 + sigma)), ``timesteps``
    tau_i T, ``afs``, ``guidance`` (the pipeline's ``guidance_scale``: CFG for SD3, Flux-dev's embedded scale),
    ``nfe``, ``sample_shape``, the VAE's scaling and shift factors, and ``stock``: how the stock scheduler samples
    it (``sigmas`` for ``pipe(..., sigmas=...)``, ``latents_scale`` to multiply the noise by: tau_1 with AFS), or
    null when it cannot (a last point sigma > 0)."""
    import diffusers

    from pipeline.teachers.diffusers_scheduler import SFDScheduler

    model: DiffusersFlow = student.model
    spec = student.sampler_spec()
    if model.step_condition:
        raise ParamError(f"--format diffusers: {ckpt} is step-conditioned (SFD-v); its step layers have no diffusers "
                         "equivalent, export a single-N student (distill, distill_stage2)")
    if spec.solver != "euler" or not spec.schedule.starts_at_infinity:
        raise ParamError(f"--format diffusers: the checkpoint's sampler is {spec.solver!r} on a {spec.schedule.kind!r} "
                         "schedule; a flow export describes Euler from flow time 1 (the 'flow' schedule) only")
    sigmas = spec.t_steps().tolist()
    taus = [1.0] + [s / (1 + s) for s in sigmas[1:]]
    T = model.num_train_timesteps
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.transformer.save_pretrained(out / "transformer", safe_serialization=True)
    stock_possible = taus[-1] == 0.0
    stock = None
    if stock_possible:
        first = 1 if spec.afs else 0
        stock = {"scheduler": "FlowMatchEulerDiscreteScheduler (shift 1.0, use_dynamic_shifting false)",
                 "sigmas": taus[first:-1], "num_inference_steps": len(taus) - 1 - first,
                 "latents_scale": taus[1] if spec.afs else 1.0}
    if stock_possible and not spec.afs:
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=1.0, use_dynamic_shifting=False)
        sched_entry = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    else:
        scheduler = SFDScheduler(sigmas=taus, timesteps=[tau * T for tau in taus], afs=bool(spec.afs),
                                 prediction_type="flow", sample_space="flow", num_train_timesteps=T)
        sched_entry = [SFDScheduler.__module__, SFDScheduler.__name__]
    scheduler.save_pretrained(out / "scheduler")
    _write_flow_components(model, out, sched_entry, diffusers.__version__)
    vae = model.components.get("vae")
    sampler = {
        "solver": "euler", "flow": True, "flow_times": taus, "sigmas_ve": sigmas[1:], "timesteps": [tau * T for tau in taus],
        "afs": bool(spec.afs), "guidance": float(spec.guidance), "nfe": spec.nfe, "sample_shape": list(model.sample_shape),
        "latent": model.latent, "pipeline": FLOW_PIPELINES[model.family], "stock": stock,
        "vae_scaling_factor": None if vae is None else float(vae.config.get("scaling_factor") or 1.0),
        "vae_shift_factor": None if vae is None else float(vae.config.get("shift_factor") or 0.0),
        "source_checkpoint": str(ckpt),
    }
    (out / SAMPLER_FILE).write_text(json.dumps(sampler, indent=2) + "\n")
    return {"out": str(out), "nfe": spec.nfe, "num_steps": len(taus), "unet_class": model.transformer_class,
            "scheduler": sched_entry[1]}


def _write_flow_components(model: DiffusersFlow, out: Path, sched_entry: list[str], version: str) -> None:
    """The VAE, text encoders and tokenizers beside the transformer, and model_index.json naming them all."""
    index: dict[str, Any] = {"_class_name": FLOW_PIPELINES[model.family], "_diffusers_version": version,
                             "transformer": ["diffusers", model.transformer_class], "scheduler": sched_entry}
    index.update({name: [None, None] for name in FLOW_OPTIONAL[model.family]})
    for name, comp in sorted(model.components.items()):
        if isinstance(comp, torch.nn.Module):  # vae, text encoders
            comp.save_pretrained(out / name, safe_serialization=True)
            index[name] = ["diffusers" if name == "vae" else "transformers", type(comp).__name__]
    for name, folder in sorted(model.tokenizer_dirs().items()):
        (out / name).mkdir()
        for f in sorted(Path(folder).iterdir()):
            if f.is_file():
                shutil.copyfile(f, out / name / f.name)
        index[name] = ["transformers", type(model.components[name]).__name__]
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def export_command(ckpt: str | Path, fmt: str, out: str | Path) -> dict[str, Any]:
    if fmt not in EXPORT_FORMATS:
        raise ParamError(f"--format: got {fmt!r}; known: {', '.join(EXPORT_FORMATS)}")
    return export_diffusers_lora(ckpt, out) if fmt == "diffusers-lora" else export_diffusers(ckpt, out)
