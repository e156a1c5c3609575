"""The ``sfd`` command line. Subcommands live next to the code they drive and are attached here.

Every command is wrapped by :func:`pipeline.core.commands.one_line_errors`: the project's errors (missing
files, bad values, bad checkpoints or stores) and OS errors end it with one line on stderr and exit code 2,
never a traceback.
"""

from __future__ import annotations

import typer

from pipeline.core.commands import one_line_errors
from pipeline.diffusion.sampling import SOLVER_NAMES
from pipeline.diffusion.schedules import SCHEDULE_KINDS

app = typer.Typer(
    help="Simple and Fast Distillation (SFD): distil a diffusion teacher into a 1-5 step sampler.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """Simple and Fast Distillation (SFD): distil a diffusion teacher into a 1-5 step sampler."""


@app.command()
def version() -> None:
    """Print the package version."""
    from pipeline import __version__

    typer.echo(__version__)


from pipeline.trajectories.store_cli import store_app  # noqa: E402

app.add_typer(store_app, name="store")

from pipeline.teachers.import_cli import teacher_app  # noqa: E402

app.add_typer(teacher_app, name="teacher")

params_app = typer.Typer(help="Validate params files.", no_args_is_help=True)
app.add_typer(params_app, name="params")


@params_app.command("check")
@one_line_errors
def params_check(
    file: str = typer.Argument("params.yaml", help="params file to validate (default: params.yaml)"),
    dvc_yaml: str = typer.Option(None, "--dvc-yaml", help="check the keys this dvc.yaml tracks too "
                                 "(default: dvc.yaml beside the params file, else in the current directory, if any)"),
    target: list[str] = typer.Option([], "--target", help="check only what `dvc repro TARGET...` runs (repeatable; "
                                     "default: every stage)"),
    preset: str = typer.Option(None, "--preset", help="check FILE with this preset applied (what `sfd preset apply` "
                               "would write): a name in presets/ or a path"),
) -> None:
    """Validate a whole params file (every section, every cross-section rule, every key dvc.yaml tracks)
    without running anything: it passes exactly what the stages and DVC accept."""
    from pathlib import Path

    from pipeline.config.dvc_params import check_tracked_keys
    from pipeline.config.params import TRAJECTORY_SECTIONS, load_params, parse_params
    from pipeline.config.presets import merged_preset
    from pipeline.core.param_checks import ParamError

    params = load_params(file) if preset is None else parse_params(merged_preset(preset, Path(file)))
    beside = Path(file).resolve().parent / "dvc.yaml"
    pipeline_file = Path(dvc_yaml) if dvc_yaml else beside if beside.is_file() else Path("dvc.yaml")
    tracked = 0
    if dvc_yaml or target or pipeline_file.is_file():
        if not pipeline_file.is_file():
            raise ParamError(f"--dvc-yaml {pipeline_file}: does not exist")
        tracked = check_tracked_keys(params.raw, pipeline_file, where=file, targets=target or None)
    checked = f", {tracked} keys tracked by {pipeline_file.name}" if tracked else ""
    typer.echo(f"ok: {file} ({len(params.given)} sections{checked})")
    for name in TRAJECTORY_SECTIONS:
        note = params.section(name).chunk_overhead_note(name) if name in params.given else None
        if note:
            typer.echo(f"note: {note}")
    if params.absent:
        typer.echo(f"note: no section {', '.join(params.absent)}: the stages that read them refuse to run "
                   "(`NAME: {}` runs one on the defaults of docs/params.md)")  # fmt: skip


preset_app = typer.Typer(help="Presets: overlays on params.yaml for real teachers (presets/).", no_args_is_help=True)
app.add_typer(preset_app, name="preset")


@preset_app.command("apply")
@one_line_errors
def preset_apply(
    name: str = typer.Argument(..., help="a preset in presets/ (cifar10, sd15, ...) or a path to an overlay file"),
    base: str = typer.Option("params.yaml", "--base", help="the params file the overlay applies to"),
    out: str = typer.Option(None, "--out", help="where to write the merged file (default: --base, in place)"),
    force: bool = typer.Option(False, "--force", help="apply even when --base already has a preset applied"),
) -> None:
    """Write params.yaml = the shipped defaults with the preset's differences, validated as a whole
    (pipeline.config.presets); then edit its paths and run `sfd params check` and `dvc repro`."""
    from pathlib import Path

    from pipeline.config.presets import apply_preset

    written = apply_preset(name, Path(base), Path(out) if out else None, force=force)
    typer.echo(f"ok: {written} = {base} + preset {name} (validated; `sfd params check` then `dvc repro`)")


@app.command()
@one_line_errors
def sample(
    out: str = typer.Option(..., help="output directory: <seed>.png per sample, grid.png, sampler.json"),
    ckpt: str = typer.Option(None, help="checkpoint directory (teacher or distilled student)"),
    teacher: str = typer.Option(None, help="a built-in teacher source instead of --ckpt: 'gmm'"),
    seeds: str = typer.Option("0-63", help="seeds, e.g. 0-63 or 0,5,7"),
    solver: str = typer.Option(None, help=f"{'|'.join(SOLVER_NAMES)} (default: checkpoint's, else dpmpp3m)"),
    max_order: int = typer.Option(None, help="solver order (iPNDM 1-4, DPM-Solver++ 1-3)"),
    num_steps: int = typer.Option(None, help="number of timestamps N (NFE = N-1, N-2 with AFS)"),
    schedule: str = typer.Option(None, help=f"schedule kind: {'|'.join(SCHEDULE_KINDS)}"),
    afs: bool = typer.Option(None, "--afs/--no-afs", help="analytical first step"),
    guidance: float = typer.Option(None, help="classifier-free guidance scale w (1 = conditional only)"),
    labels: str = typer.Option(None, help="'seed' (per-seed, default), 'none', a class k, or one per seed 'a,b,...' (text-to-image: prompt indices)"),
    batch_size: int = typer.Option(500, help="samples per batch (results do not depend on it)"),
    device: str = typer.Option("auto", help="auto|cpu|cuda"),
) -> None:
    """Generate samples from a checkpoint with any solver / schedule / NFE (a distilled checkpoint needs no options)."""
    from pipeline.core.files import check_writable
    from pipeline.evaluation.samples import sample_command

    check_writable(out)  # before the checkpoint is loaded and anything sampled
    info = sample_command(
        ckpt=ckpt, teacher=teacher, seeds=seeds, out=out, labels=labels, batch_size=batch_size, device=device,
        solver=solver, max_order=max_order, num_steps=num_steps, schedule=schedule, afs=afs, guidance=guidance,
    )
    typer.echo(f"sample: {info['count']} samples, NFE {info['sampler']['nfe']} -> {out}")


@app.command("export")
@one_line_errors
def export(
    ckpt: str = typer.Option(..., help="a distilled checkpoint directory, e.g. models/sfd"),
    format: str = typer.Option("diffusers", "--format",
                               help="export format: diffusers (the whole UNet; a LoRA student merged) | diffusers-lora "
                                    "(a LoRA student's adapters, for pipe.load_lora_weights)"),
    out: str = typer.Option(..., help="output folder"),
) -> None:
    """Export a distilled student of a diffusers teacher as a diffusers folder + sfd_sampler.json (sigmas, AFS, guidance)."""
    from pipeline.teachers.diffusers_export import export_command

    info = export_command(ckpt, format, out)
    typer.echo(f"export: {info['unet_class']}, {info['num_steps']} timestamps (NFE {info['nfe']}) -> {out}")


if __name__ == "__main__":
    app()
