"""The PD budget sweep's runner (pipeline.evaluation.pd_sweep has the summary and the report sections)."""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from pipeline.core.cost import CostMeter
from pipeline.core.devices import describe_device, resolve_device
from pipeline.distill.baselines.common import load_baseline_inputs
from pipeline.distill.baselines.progressive import progressive_distillation
from pipeline.distill.baselines.sfddm import sfd_stage1_budget
from pipeline.evaluation.evaluate import run_evaluation
from pipeline.evaluation.pd_sweep import MULTIPLIERS, match_summary, teacher_file_hash


def run_pd_sweep(
    params: Any,  # pipeline.config.params.Params (baseline_pd, evaluate, distill, trajectories)
    *,
    teacher_dir: str | Path,
    data_dir: str | Path,
    feature_net_dir: str | Path,
    sfd_fid: float,  # SFD's NFE-2 FID on the same protocol
    work_dir: str | Path,  # the PD students of each multiplier: <work_dir>/x<m>/nfe<N>
    multipliers: Sequence[int] = MULTIPLIERS,
    stop_when_reached: bool = True,
    progress: bool = True,
    on_point: Any = None,  # called with the results so far after every multiplier (write them as you go)
) -> dict[str, Any]:
    """PD at ``updates_per_round`` x each multiplier, down to NFE 2; FID of each NFE-2 student (module docstring)."""
    base = params.baseline_pd
    device = resolve_device(base.device)
    sfd_cost = sfd_stage1_budget(params.distill, params.trajectories_for("distill"))
    points: list[dict[str, Any]] = []
    result: dict[str, Any] = {
        "sfd": {"fid_nfe2": sfd_fid, **sfd_cost},
        "baseline_pd": {k: v for k, v in asdict(base).items() if k != "device"},
        "teacher_file_hash": teacher_file_hash(teacher_dir),
        "protocol": {k: str(getattr(params.evaluate, k)) for k in ("seeds", "features", "reference_split", "reference_stats")},
        "device": describe_device(torch.device(device)),
        "torch_threads": torch.get_num_threads(),
        "points": points,
    }
    for m in multipliers:
        p = replace(base, updates_per_round=base.updates_per_round * m, final_steps=2)
        model, config, train, provenance = load_baseline_inputs(teacher_dir, data_dir, device)
        cost = CostMeter(f"pd_sweep_x{m}", device)
        start = time.perf_counter()
        out = Path(work_dir) / f"x{m}"
        summary = progressive_distillation(model, config, train, p, out, device=device, cost=cost, progress=progress,
                                           provenance=provenance)
        train_seconds = time.perf_counter() - start
        t0 = time.perf_counter()
        fid = run_evaluation(params.evaluate, teacher_dir=teacher_dir, data_dir=data_dir, feature_net_dir=feature_net_dir,
                             students=[("pd", str(out / "nfe2"))], reference_and_solvers=False)["pd/nfe2"]
        eval_seconds = time.perf_counter() - t0
        point = _sweep_point(m, p, summary, fid, sfd_fid, sfd_cost, train_seconds, eval_seconds)
        points.append(point)
        result["match"] = match_summary(points, sfd_fid, sfd_cost["forward_equivalents"])
        if on_point is not None:
            on_point(result)
        if stop_when_reached and point["reaches_sfd"]:
            break
    return result


def _sweep_point(m: int, p: Any, summary: dict[str, Any], fid: dict[str, Any], sfd_fid: float, sfd_cost: dict[str, Any],
                 train_seconds: float, eval_seconds: float) -> dict[str, Any]:
    """One multiplier's row: its rounds, the NFE-2 student's FID and cost, its ratio to SFD's."""
    at_nfe2 = summary["rounds"][-1]["cumulative"]
    return {
        "multiplier": m,
        "updates_per_round": p.updates_per_round,
        "rounds": [r["student_steps"] for r in summary["rounds"]],
        "fid_nfe2": fid["fid"],
        "label_accuracy_nfe2": fid.get("label_accuracy"),
        "teacher_forward_images": at_nfe2["teacher_forward_images"],
        "student_forward_images": at_nfe2["student_forward_images"],
        "student_backward_images": at_nfe2["student_backward_images"],
        "forward_equivalents": at_nfe2["forward_equivalents"],
        "ratio_to_sfd": at_nfe2["forward_equivalents"] / sfd_cost["forward_equivalents"],
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "reaches_sfd": fid["fid"] <= sfd_fid,
    }
