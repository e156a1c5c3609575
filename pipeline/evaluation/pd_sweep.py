"""Progressive distillation's compute to match SFD (a budget sweep), and the baselines' notes in the report.

The sweep (issue 15, item 6) runs PD on the pipeline's teacher with ``updates_per_round`` multiplied
by 1, 4, 16, 64 (``baseline_pd`` otherwise unchanged, rounds down to NFE 2 only: the 2 -> 1 round
is skipped), evaluates each NFE-2 student with the ``evaluate`` protocol (same seeds, same
feature space and reference as the report) and stops once PD's NFE-2 FID reaches SFD's. PD's
cost is the cumulative forward-pass equivalents of its rounds up to the NFE-2 student
(pipeline.core.cost: a backward counts 2 forwards); SFD's is its stage 1 (trajectories +
distillation, :func:`pipeline.distill.baselines.sfddm.sfd_stage1_budget`). It is too slow for the
default ``make repro`` (x64 is ~30 CPU minutes), so it runs from ``bench/pd_sweep.py`` and writes
``bench/pd_sweep.json``; the report reads that file (:func:`baseline_sections`). The runner lives in
:mod:`pipeline.evaluation.pd_sweep_run` so that the report stage does not import the trainers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

PD_SWEEP_JSON = Path("bench/pd_sweep.json")  # written by bench/pd_sweep.py, read by the report
MULTIPLIERS = (1, 4, 16, 64)


def match_summary(points: Sequence[dict[str, Any]], sfd_fid: float, sfd_fe: float) -> dict[str, Any]:
    """The first sweep point whose NFE-2 FID reaches SFD's (an upper bound on PD's compute to match, with the previous
    point as the lower bound), or, if none does, the bound "more than the largest point"."""
    reached = [p for p in points if p["fid_nfe2"] <= sfd_fid]
    if reached:
        first = min(reached, key=lambda p: p["forward_equivalents"])
        below = [p for p in points if p["forward_equivalents"] < first["forward_equivalents"]]
        lower = max(below, key=lambda p: p["forward_equivalents"]) if below else None
        return {"reached": True, "multiplier": first["multiplier"], "forward_equivalents": first["forward_equivalents"],
                "ratio": first["forward_equivalents"] / sfd_fe,
                "lower_ratio": None if lower is None else lower["forward_equivalents"] / sfd_fe}
    largest = max(points, key=lambda p: p["forward_equivalents"])
    return {"reached": False, "multiplier": largest["multiplier"], "forward_equivalents": largest["forward_equivalents"],
            "ratio": None, "lower_ratio": largest["forward_equivalents"] / sfd_fe}


def pd_sweep_markdown(sweep: dict[str, Any]) -> str:
    """The sweep table and the ratio sentence."""
    sfd = sweep["sfd"]
    rows = ["| updates per round | PD NFE-2 FID | forward equivalents to NFE 2 | × SFD stage 1 | train s |",
            "|---|---|---|---|---|"]
    for p in sweep["points"]:
        rows.append(f"| {p['updates_per_round']} (×{p['multiplier']}) | {p['fid_nfe2']:.3f} | {p['forward_equivalents']:.4g} | "
                    f"{p['ratio_to_sfd']:.2f} | {p['train_seconds']:.0f} |")
    m = sweep["match"]
    if m["reached"]:
        bound = "" if m["lower_ratio"] is None else f" (the previous sweep point, {m['lower_ratio']:.2f}×, did not)"
        sentence = (f"PD's NFE-2 FID reaches SFD's ({sfd['fid_nfe2']:.3f}) at {m['forward_equivalents']:.4g} forward-pass "
                    f"equivalents: **{m['ratio']:.2f}× SFD's stage-1 cost** ({sfd['forward_equivalents']:.4g}){bound}.")
    else:
        sentence = (f"PD's NFE-2 FID never reached SFD's ({sfd['fid_nfe2']:.3f}) in the sweep: PD needs **more than "
                    f"{m['lower_ratio']:.2f}× SFD's stage-1 cost** ({sfd['forward_equivalents']:.4g} forward-pass equivalents).")
    return "\n".join([sentence, "", *rows, "",
                      f"Sweep: bench/pd_sweep.py on {sweep.get('device', '?')} ({sweep.get('when', '')}); bench/pd_sweep.md."])


def sfddm_note(evaluation: dict[str, dict[str, Any]]) -> str | None:
    """SFDDM against its training-free control at each T': a line per T', and why when SFDDM does not beat it."""
    lines = []
    for key in sorted(evaluation):
        if not key.startswith("sfddm/nfe"):
            continue
        control = evaluation.get(key.replace("sfddm/", "sfddm_control/"))
        if control is None or evaluation[key].get("fid") is None:
            continue
        fid, ctrl = evaluation[key]["fid"], control["fid"]
        nfe = key.split("nfe")[1]
        if fid < ctrl:
            lines.append(f"- T′ = {nfe}: SFDDM {fid:.3f} beats its control (the teacher with {nfe} Euler steps) {ctrl:.3f}.")
        else:
            lines.append(
                f"- T′ = {nfe}: SFDDM {fid:.3f} does **not** beat its control {ctrl:.3f}. Its student is trained, in SFD's "
                "stage-1 budget, to make one step do the teacher's c = T/T′ fine Euler steps; each example costs c "
                "teacher passes, so the budget buys few updates, and the student has to move far from the teacher "
                "at σ = t_max in one fold (progressive distillation gets there in halvings).")
    if not lines:
        return None
    return "\n".join(["SFDDM (init from the teacher, SFD stage 1's forward-pass equivalents) vs its training-free control:",
                      "", *lines])


def baseline_sections(evaluation: dict[str, dict[str, Any]], sweep_path: str | Path = PD_SWEEP_JSON) -> list[str]:
    """Report lines: PD's compute to match SFD (from the committed sweep) and SFDDM vs its control."""
    parts: list[str] = []
    path = Path(sweep_path)
    if path.is_file():
        sweep = json.loads(path.read_text())
        current = evaluation.get("sfd/nfe2", {}).get("fid")
        parts += ["## Progressive distillation: compute to match SFD at NFE 2", "", pd_sweep_markdown(sweep), ""]
        if current is not None and abs(current - sweep["sfd"]["fid_nfe2"]) > 1e-9:
            parts += [f"(The sweep compared with SFD's NFE-2 FID {sweep['sfd']['fid_nfe2']:.3f}; this run's is "
                      f"{current:.3f}. Re-run bench/pd_sweep.py when SFD or the teacher changes.)", ""]
    else:
        parts += ["## Progressive distillation: compute to match SFD at NFE 2", "",
                  f"No sweep file ({path}): run `python bench/pd_sweep.py` (bench/pd_sweep.md).", ""]
    note = sfddm_note(evaluation)
    if note:
        parts += ["## SFDDM and its control", "", note, ""]
    return parts
