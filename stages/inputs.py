"""DVC stage ``inputs`` (always run): hash every local file params.yaml names into ``data/inputs/<key>.json``.

The stages that read such a file depend on its manifest (dvc.yaml), so replacing the file at the same
path re-runs exactly what is downstream of it (pipeline/core/inputs.py). A missing file is reported here
with a warning naming the key (the stages that read it refuse to run until the file is there).
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.config.inputs import input_values
from pipeline.core.inputs import write_manifests
from stages.common import run, stage_params


def main(
    params: Path = typer.Option(..., help="params file; reads the keys that name local files"),
    out: Path = typer.Option(..., help="manifest directory: one <key>.json per file-valued key"),
    cache: Path = typer.Option(Path(".cache/inputs/hashes.json"), help="hash cache (size, mtime, inode -> hash)"),
) -> None:
    p = stage_params(params)
    manifests = write_manifests(input_values(p), out, cache_path=cache)
    used = [m for m in manifests if m["kind"] in ("file", "dir")]
    for m in manifests:
        if m["kind"] == "missing":  # a warning, not an error: only the stages that read it need it
            typer.echo(f"inputs: warning: {m['note']}; the stages that read it fail until it exists", err=True)
    for m in used:
        typer.echo(f"inputs: {m['key']} = {m['path']} ({m['kind']}, {m['files']} file(s), {m['bytes']:,} bytes, xxh3 {m['hash'][:16]})")
    if not used:
        typer.echo("inputs: no local files named in params (the embedded default)")


if __name__ == "__main__":
    run(main)
