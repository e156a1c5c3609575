"""`sfd teacher import SRC.pkl --out DIR`: convert an NVlabs/edm snapshot pickle into a checkpoint folder.

The folder is this project's checkpoint format for an EDM network (see pipeline.teachers.loader):
``model.safetensors`` = the preconditioner's whole ``state_dict()`` (EDM's ``ema`` names) and
``model.json`` = ``{"architecture": "edm", "edm": {"precond", "init_kwargs"}, "data", "sampler": null,
"provenance": {"kind": "teacher", "source_file", "source_hash", ...}}``, written atomically with
:func:`pipeline.core.checkpoints.save_checkpoint`. The pickle is read by the safe reader
(:mod:`pipeline.teachers.edm_pickle`): none of its code runs. ``load_teacher(DIR)`` then gives the same
network, bit for bit, and the same weights hash as ``load_teacher(SRC.pkl)``.

`sfd teacher import FOLDER --out DIR [--prompts FILE]` converts a diffusers folder (pixel UNet2DModel, or
a latent text-to-image pipeline) the same way (pipeline.teachers.diffusers_folder): safetensors + JSON
holding the diffusers configs, the VAE and text encoder as their own safetensors; it loads with
identical outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from pipeline.core.commands import one_line_errors
from pipeline.core.checkpoints import save_checkpoint
from pipeline.core.param_checks import PipelineError

teacher_app = typer.Typer(help="Bring your own teacher: convert EDM snapshot pickles and diffusers folders.", no_args_is_help=True)


def import_edm_pickle(source: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Convert the EDM snapshot ``source`` into the checkpoint folder ``out_dir``; returns a summary
    (class, network, parameters, weights_hash, sample_shape, num_classes, source_hash, out)."""
    from pipeline.teachers.families import family_named

    return family_named("edm").import_source(Path(source), Path(out_dir))


@teacher_app.command("import")
@one_line_errors
def import_command(
    source: Path = typer.Argument(..., help="an NVlabs/edm snapshot pickle (edm-cifar10-32x32-uncond-vp.pkl) or a diffusers folder"),
    out: Path = typer.Option(..., "--out", help="checkpoint directory to write (model.safetensors + model.json)"),
    prompts: Path = typer.Option(None, "--prompts", help="text-to-image diffusers teachers: a prompt file to bind "
                                 "(one per line, or JSON/CSV of captions)"),
) -> None:
    """Convert an EDM snapshot pickle (read safely, no pickled code runs) or a diffusers folder (safetensors
    only) into a checkpoint folder."""
    from pipeline.teachers.families import family_for_source

    try:
        family = family_for_source(source)
        if family is None:
            raise PipelineError(f"{source}: not an EDM snapshot pickle (*.pkl) nor a diffusers folder "
                                "(model_index.json, or unet/ + scheduler/)")
        if prompts is not None and not family.takes_prompts:
            raise PipelineError(f"--prompts: {source} is not a diffusers text-to-image folder")
        info = family.import_source(source, out, prompts_file=prompts)
    except PipelineError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(family.import_line(source, info, out))
