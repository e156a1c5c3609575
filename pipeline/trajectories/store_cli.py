"""`sfd store ls|verify|gc`: inspect, check and prune a teacher trajectory store."""

from __future__ import annotations

import json
from typing import Optional

import typer

from pipeline.core.commands import one_line_errors
from pipeline.trajectories.store import StoreError, gc_store, open_store, store_info, verify_store

store_app = typer.Typer(help="Inspect, verify and prune a teacher trajectory store.", no_args_is_help=True)


def _open(store: str):
    try:
        return open_store(store, mode="r")
    except StoreError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


@store_app.command("ls")
@one_line_errors
def ls(
    store: str = typer.Argument(..., help="store path or fsspec URL"),
    as_json: bool = typer.Option(False, "--json", help="print the full entries as JSON"),
) -> None:
    """Keys, their description, committed seeds, size on disk and what the committed trajectories cost."""
    entries = store_info(_open(store))
    if as_json:
        typer.echo(json.dumps(entries, indent=2))
        return
    if not entries:
        typer.echo(f"{store}: no keys")
    for e in entries:
        d = e["description"]
        sched = d["schedule"]
        typer.echo(f"{e['key']}  {e['num_seeds']} seeds [{e['committed_seeds'] or '-'}]  {_size(e['size_bytes'])}")
        typer.echo(
            f"    teacher {d['teacher_hash'][:12]}  {d['solver']['name']}(order {d['solver']['max_order']}"
            f"{', afs' if d['solver']['afs'] else ''})  M={d['M']}  {sched['kind']} N={sched['num_steps']} "
            f"t=[{sched['t_min']}, {sched.get('t_max', 'inf')}] {_shape_of(sched)}  compute {d['compute_dtype']}  "
            f"store {d['storage_dtype']}  labels {d['labels']['policy']}  chunk {e['chunk_size']}"
        )
        c = e["cost"]
        unknown = f", {c['unknown_trajectories']} without a cost record" if c["unknown_trajectories"] else ""
        typer.echo(f"    cost {c['teacher_forward_images']} teacher forward images, {c['wall_seconds']:.1f} s "
                   f"on {', '.join(c['devices']) or '-'} ({', '.join(c['precisions']) or '-'}){unknown}")


@store_app.command("verify")
@one_line_errors
def verify(
    store: str = typer.Argument(..., help="store path or fsspec URL"),
    drop_bad: bool = typer.Option(False, help="uncommit bad chunks so the next generation run redoes them"),
) -> None:
    """Check every committed chunk against its checksum and for NaN/inf; exit code 1 and the bad chunks named."""
    handle = open_store(store, mode="a") if drop_bad else _open(store)
    checked, problems = verify_store(handle, drop_bad=drop_bad)  # a read-only store with --drop-bad: one error line
    for p in problems:
        typer.echo(f"BAD {p}", err=True)
    if problems:
        then = ("uncommitted: the trajectories stage regenerates exactly those" if drop_bad else
                f"`sfd store verify --drop-bad {store}` uncommits them, then the trajectories stage regenerates them")
        typer.echo(f"{store}: {len(problems)} of {checked} committed chunks are bad ({then})", err=True)
        raise typer.Exit(1)
    typer.echo(f"{store}: {checked} committed chunks verified (checksums, finite values), all good")


@store_app.command("gc")
@one_line_errors
def gc(
    store: str = typer.Argument(..., help="store path or fsspec URL"),
    keep: Optional[list[str]] = typer.Option(None, "--keep", help="key (or unique prefix) to keep; repeatable"),
    dry_run: bool = typer.Option(False, help="only print what would be deleted"),
) -> None:
    """Delete every key not named with --keep."""
    try:
        handle = open_store(store, mode="r" if dry_run else "a")
        doomed = gc_store(handle, list(keep or []), dry_run=dry_run)
    except StoreError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    for k in doomed:
        typer.echo(f"{'would delete' if dry_run else 'deleted'} {k}")
    if not doomed:
        typer.echo("nothing to delete")


def _shape_of(schedule: dict) -> str:
    """rho of a VE schedule, the time shift of a flow schedule (which starts at sigma = inf)."""
    return f"shift={schedule['shift']}" if schedule.get("kind") == "flow" else f"rho={schedule.get('rho')}"
