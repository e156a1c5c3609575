"""Progressive distillation's compute to match SFD (a budget sweep), and the baselines' notes in the report.

The sweep (issue 15, item 6) runs PD on the pipeline's teacher with ``updates_per_round`` multiplied
by 1, 4, 16, 64 (``baseline_pd`` otherwise unchanged, rounds down to NFE 2 only: the 2 -> 1 round
is skipped), evaluates each NFE-2 student with the ``evaluate`` protocol (same seeds, same
feature space and reference as the report). PD's cost is the cumulative forward-pass equivalents
of its rounds up to the NFE-2 student (pipeline.core.cost: a backward counts 2 forwards); SFD's is
its stage 1 (trajectories + distillation, :func:`pipeline.distill.baselines.sfddm.sfd_stage1_budget`).
It is too slow for the default ``make repro`` (x64 is about an hour on one CPU core), so it runs
from ``bench/pd_sweep.py`` and writes ``bench/pd_sweep.json``; the report stage reads that file
(:func:`load_sweep`, :func:`baseline_sections`). The runner lives in
:mod:`pipeline.evaluation.pd_sweep_run` so that the report stage does not import the trainers.

A sweep's points depend on the teacher, ``baseline_pd`` and the evaluation protocol, not on SFD:
the report compares them with **this run's** SFD NFE-2 FID, and says so when the sweep ran on
another teacher (the hash of its ``model.safetensors``, :func:`teacher_file_hash`). Multipliers
can run in separate processes or on separate machines and be merged (:func:`merge_sweeps`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from pipeline.core.hashing import hash_file
from pipeline.core.param_checks import PipelineError

PD_SWEEP_JSON = Path("bench/pd_sweep.json")  # written by bench/pd_sweep.py, read by the report
MULTIPLIERS = (1, 4, 16, 64)
TEACHER_FILE = "model.safetensors"


def teacher_file_hash(teacher_dir: str | Path) -> str | None:
    """The content hash of a teacher checkpoint's weights file (None when the folder has none, e.g. a built-in
    teacher): what ties a sweep to the teacher it ran on."""
    path = Path(teacher_dir) / TEACHER_FILE
    return hash_file(str(path)) if path.is_file() else None


def match_summary(points: Sequence[dict[str, Any]], sfd_fid: float, sfd_fe: float) -> dict[str, Any]:
    """The first sweep point whose NFE-2 FID reaches SFD's (an upper bound on PD's compute to match, with the previous
    point as the lower bound and a log-linear interpolation between the two as the estimate), or, if none does, the
    bound "more than the largest point"."""
    reached = [p for p in points if p["fid_nfe2"] <= sfd_fid]
    if reached:
        first = min(reached, key=lambda p: p["forward_equivalents"])
        below = [p for p in points if p["forward_equivalents"] < first["forward_equivalents"]]
        lower = max(below, key=lambda p: p["forward_equivalents"]) if below else None
        estimate = None
        if lower is not None and lower["fid_nfe2"] > first["fid_nfe2"]:
            # FID linear in log(cost) between the bracketing points: where the line crosses SFD's FID
            t = (lower["fid_nfe2"] - sfd_fid) / (lower["fid_nfe2"] - first["fid_nfe2"])
            estimate = math.exp((1 - t) * math.log(lower["forward_equivalents"]) + t * math.log(first["forward_equivalents"]))
        return {"reached": True, "sfd_fid": sfd_fid, "multiplier": first["multiplier"],
                "forward_equivalents": first["forward_equivalents"], "ratio": first["forward_equivalents"] / sfd_fe,
                "lower_ratio": None if lower is None else lower["forward_equivalents"] / sfd_fe,
                "interpolated_ratio": None if estimate is None else estimate / sfd_fe}
    largest = max(points, key=lambda p: p["forward_equivalents"])
    return {"reached": False, "sfd_fid": sfd_fid, "multiplier": largest["multiplier"],
            "forward_equivalents": largest["forward_equivalents"], "ratio": None,
            "lower_ratio": largest["forward_equivalents"] / sfd_fe, "interpolated_ratio": None}


_SAME_IN_MERGED = ("baseline_pd", "teacher_file_hash", "protocol")


def merge_sweeps(sweeps: Sequence[dict[str, Any]], sources: Sequence[str] | None = None,
                 sfd_fid: float | None = None) -> dict[str, Any]:
    """One sweep from several (multipliers run in separate processes or machines): the teacher, ``baseline_pd`` and
    the evaluation protocol must agree, and each multiplier may come from one sweep only. The match is recomputed
    against ``sfd_fid`` (default: the first sweep's SFD FID)."""
    if not sweeps:
        raise PipelineError("merge_sweeps: no sweep to merge")
    names = list(sources) if sources is not None else [f"sweep {i + 1}" for i in range(len(sweeps))]
    first = sweeps[0]
    for name, other in zip(names[1:], sweeps[1:]):
        for key in _SAME_IN_MERGED:
            if other.get(key) != first.get(key):
                raise PipelineError(f"{name}: its {key} differs from {names[0]}'s ({other.get(key)!r} vs "
                                    f"{first.get(key)!r}); only sweeps of the same teacher, PD settings and protocol merge")
    points: dict[int, dict[str, Any]] = {}
    origin: dict[int, str] = {}
    for name, sweep in zip(names, sweeps):
        for p in sweep["points"]:
            m = p["multiplier"]
            if m in points:
                raise PipelineError(f"{name}: multiplier x{m} is also in {origin[m]}; keep it in one of them")
            points[m], origin[m] = {"device": sweep.get("device"), **p}, name
    merged = {k: v for k, v in first.items() if k not in ("points", "match")}
    merged["points"] = [points[m] for m in sorted(points)]
    merged["device"] = ", ".join(dict.fromkeys(str(s.get("device")) for s in sweeps))
    merged["merged_from"] = names
    if sfd_fid is not None:
        merged["sfd"] = {**first["sfd"], "fid_nfe2": sfd_fid}
    merged["match"] = match_summary(merged["points"], merged["sfd"]["fid_nfe2"], merged["sfd"]["forward_equivalents"])
    for p in merged["points"]:
        p["reaches_sfd"] = p["fid_nfe2"] <= merged["sfd"]["fid_nfe2"]
    return merged


def sweep_sentence(match: dict[str, Any], sfd_fid: float, sfd_fe: float) -> str:
    """The ratio sentence of a :func:`match_summary`: the measured ratio (with its bracket and the interpolated
    estimate) or the bound."""
    if match["reached"]:
        bound = "" if match["lower_ratio"] is None else f" (the previous sweep point, {match['lower_ratio']:.2f}×, did not)"
        sentence = (f"PD's NFE-2 FID reaches SFD's ({sfd_fid:.3f}) at {match['forward_equivalents']:.4g} forward-pass "
                    f"equivalents: **{match['ratio']:.2f}× SFD's stage-1 cost** ({sfd_fe:.4g}){bound}.")
        if match["interpolated_ratio"] is not None:
            sentence += (f" Interpolating FID linearly in log(cost) between the two points, PD matches SFD at about "
                         f"**{match['interpolated_ratio']:.1f}×**.")
        return sentence
    return (f"PD's NFE-2 FID never reached SFD's ({sfd_fid:.3f}) in the sweep: PD needs **more than "
            f"{match['lower_ratio']:.2f}× SFD's stage-1 cost** ({sfd_fe:.4g} forward-pass equivalents).")


def pd_sweep_markdown(sweep: dict[str, Any], sfd_fid: float | None = None, floor: float | None = None) -> str:
    """The sweep table and the ratio sentence, against ``sfd_fid`` (default: the FID the sweep recorded); with the FID
    noise ``floor``, each point's difference from SFD is marked "n.s." when it is smaller than the floor."""
    sfd = sweep["sfd"]
    sfd_fid = sfd["fid_nfe2"] if sfd_fid is None else sfd_fid
    rows = ["| updates per round | PD NFE-2 FID | − SFD's | forward equivalents to NFE 2 | × SFD stage 1 | train s | device |",
            "|---|---|---|---|---|---|---|"]
    for p in sweep["points"]:
        diff = p["fid_nfe2"] - sfd_fid
        mark = " (n.s.)" if floor is not None and abs(diff) < floor else ""
        rows.append(f"| {p['updates_per_round']} (×{p['multiplier']}) | {p['fid_nfe2']:.3f} | {diff:+.3f}{mark} | "
                    f"{p['forward_equivalents']:.4g} | {p['ratio_to_sfd']:.2f} | {p['train_seconds']:.0f} | "
                    f"{p.get('device', sweep.get('device', '?'))} |")
    sentence = sweep_sentence(match_summary(sweep["points"], sfd_fid, sfd["forward_equivalents"]), sfd_fid,
                              sfd["forward_equivalents"])
    if floor is not None:
        sentence += (f" FID differences below the noise floor ({floor:.3g}) are marked n.s.: such a point is "
                     "indistinguishable from SFD on this protocol.")
    return "\n".join([sentence, "", *rows, "",
                      f"Sweep: bench/pd_sweep.py on {sweep.get('device', '?')} ({sweep.get('when', '')}); bench/pd_sweep.md."])


def load_sweep(path: str | Path) -> dict[str, Any] | None:
    """The sweep JSON, or None when the file does not exist."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def sweep_on_teacher(sweep: dict[str, Any] | None, teacher_hash: str | None) -> bool:
    """Whether ``sweep`` ran on the teacher whose weights file hashes to ``teacher_hash`` (None: not checked)."""
    return sweep is not None and (teacher_hash is None or sweep.get("teacher_file_hash") == teacher_hash)


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


def baseline_sections(
    evaluation: dict[str, dict[str, Any]],
    sweep: dict[str, Any] | None,  # load_sweep(...) of the PD budget sweep; None: no sweep file
    *,
    source: str | Path = PD_SWEEP_JSON,  # where the sweep was read from (named in the text)
    teacher_hash: str | None = None,  # this run's teacher_file_hash: a sweep of another teacher is flagged
    floor: float | None = None,  # the FID noise floor of this run
) -> list[str]:
    """Report lines: PD's compute to match SFD (from a sweep that ran on this run's teacher, against this run's SFD
    FID) and SFDDM vs its control. A sweep of another teacher (or none) is not reported: the report describes
    this run only."""
    parts: list[str] = []
    if sweep is not None and sweep_on_teacher(sweep, teacher_hash):
        parts += ["## Progressive distillation: compute to match SFD at NFE 2", "",
                  f"From the PD budget sweep in {source}, which ran on this run's teacher (`python bench/pd_sweep.py`).", "",
                  pd_sweep_markdown(sweep, sfd_fid=evaluation.get("sfd/nfe2", {}).get("fid"), floor=floor), ""]
    note = sfddm_note(evaluation)
    if note:
        parts += ["## SFDDM and its control", "", note, ""]
    return parts
