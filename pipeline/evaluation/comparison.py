"""SFD against the baselines: FID at each NFE against total distillation cost (baselines.md).

Cost is counted the same way for every method, in forward-pass equivalents:
    teacher forward images + student forward images + 2 x student backward images
(a backward pass costs about two forwards; every network here has the teacher's architecture),
plus wall time. The counts come from ``metrics/cost/<stage>.json`` (pipeline.core.cost.CostMeter):
- SFD: the teacher trajectories it distils from plus its distillation stage;
- progressive distillation: every round up to the one that produced the NFE-k student (the
  stage records its cumulative spending after each round);
- SFDDM: its teacher forwards and student passes; its control row (the teacher with the same
  T' Euler steps) is training-free;
- vanilla trajectory distillation: its teacher sub-step solves and student passes.
The headline compares SFD's cost to reach its FID at NFE 2 with progressive distillation's cost
to reach at most that FID at NFE 2, as a ratio, stating plainly when this run cannot show it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.core.cost import BACKWARD_FORWARD_RATIO, load_cost_records
from pipeline.config.evaluation import ENTRY
from pipeline.evaluation.report import markdown_table

COUNT_KEYS = ("teacher_forward_images", "student_forward_images", "student_backward_images")
# method (evaluation sampler name) -> the cost stages it spent in
DEFAULT_METHOD_STAGES: dict[str, tuple[str, ...]] = {
    "sfd": ("trajectories", "distill"),
    "sfd-v": ("trajectories_v", "distill_v"),
    "sfd-stage2": ("trajectories_v", "distill_v", "trajectories_stage2", "distill_stage2"),
    "pd": ("baseline_pd",),
    "sfddm": ("baseline_sfddm",),
    "vanilla": ("baseline_vanilla",),
}
TRAINING_FREE = ("sfddm_control",)
TARGET_RATIO = 100.0


@dataclass(frozen=True)
class Cost:
    teacher_forward_images: int = 0
    student_forward_images: int = 0
    student_backward_images: int = 0
    wall_seconds: float = 0.0

    @property
    def forward_equivalents(self) -> float:
        return self.teacher_forward_images + self.student_forward_images + BACKWARD_FORWARD_RATIO * self.student_backward_images

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(*(getattr(self, k) + getattr(other, k) for k in (*COUNT_KEYS, "wall_seconds")))

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "Cost":
        return cls(*(int(record.get(k, 0)) for k in COUNT_KEYS), float(record.get("wall_seconds", 0.0)))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "forward_equivalents": self.forward_equivalents}


@dataclass(frozen=True)
class Row:
    method: str
    nfe: int
    fid: float | None
    cost: Cost | None  # None: a cost record is missing; Cost() for training-free rows
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "nfe": self.nfe, "fid": self.fid,
                "cost": None if self.cost is None else self.cost.to_dict(), "note": self.note}


def method_cost(method: str, nfe: int, records: Mapping[str, Mapping[str, Any]],
                method_stages: Mapping[str, Sequence[str]]) -> tuple[Cost | None, str]:
    """What ``method`` spent to have its NFE-``nfe`` sampler, and a note (e.g. which stage is missing)."""
    if method in TRAINING_FREE:
        return Cost(), "training-free"
    stages = method_stages.get(method)
    if stages is None:
        return None, "no cost stages known"
    missing = [s for s in stages if s not in records]
    if missing:
        return None, f"missing cost record(s): {', '.join(missing)}"
    total = Cost()
    notes = []
    for stage in stages:
        record = records[stage]
        by_nfe = record.get("cumulative_by_nfe")
        if by_nfe and str(nfe) in by_nfe:
            total = total + Cost.from_record(by_nfe[str(nfe)])
            notes.append(f"{stage}: rounds up to NFE {nfe}")
        else:
            total = total + Cost.from_record(record)
    return total, "; ".join(notes)


def comparison_rows(
    evaluation: Mapping[str, Mapping[str, Any]],
    records: Mapping[str, Mapping[str, Any]],
    *,
    method_stages: Mapping[str, Sequence[str]] = DEFAULT_METHOD_STAGES,
) -> list[Row]:
    """One row per evaluated (method, NFE) of a distillation method or a training-free control row."""
    rows = []
    for key, metrics in evaluation.items():
        m = ENTRY.match(key)
        if not m or (m["sampler"] not in method_stages and m["sampler"] not in TRAINING_FREE):
            continue
        method, nfe = m["sampler"], int(m["nfe"])
        cost, note = method_cost(method, nfe, records, method_stages)
        fid = metrics.get("fid")
        rows.append(Row(method, nfe, None if fid is None else float(fid), cost, note))
    order = {name: i for i, name in enumerate([*method_stages, *TRAINING_FREE])}
    return sorted(rows, key=lambda r: (r.nfe, order.get(r.method, len(order)), r.method))


def headline(rows: Sequence[Row], *, nfe: int = 2, reference: str = "sfd", baseline: str = "pd",
             target_ratio: float = TARGET_RATIO) -> dict[str, Any]:
    """SFD's cost to reach its FID at ``nfe`` vs the baseline's cost to reach at most that FID at ``nfe``.

    - baseline FID <= SFD's: ratio = baseline cost / SFD cost (the baseline's spending when its NFE
      student existed; it may have got there earlier, so this is an upper bound).
    - baseline FID > SFD's: the baseline never reached SFD's quality in this run; the ratio is a
      lower bound (it would have to spend more).
    """
    find = {(r.method, r.nfe): r for r in rows}
    ref, base = find.get((reference, nfe)), find.get((baseline, nfe))
    out: dict[str, Any] = {"nfe": nfe, "reference": reference, "baseline": baseline, "target_ratio": target_ratio}
    if ref is None or base is None or ref.cost is None or base.cost is None or ref.fid is None or base.fid is None:
        missing = [f"{m}/nfe{nfe}" for m, r in ((reference, ref), (baseline, base)) if r is None or r.cost is None or r.fid is None]
        return {**out, "status": "incomplete", "missing": missing,
                "statement": f"Cannot compare: no FID or cost for {', '.join(missing)}."}
    ref_fe, base_fe = ref.cost.forward_equivalents, base.cost.forward_equivalents
    ratio = base_fe / ref_fe if ref_fe > 0 else math.inf
    wall_ratio = base.cost.wall_seconds / ref.cost.wall_seconds if ref.cost.wall_seconds > 0 else math.inf
    reached = base.fid <= ref.fid
    out.update({
        "reference_fid": ref.fid, "baseline_fid": base.fid,
        "reference_forward_equivalents": ref_fe, "baseline_forward_equivalents": base_fe,
        "reference_wall_seconds": ref.cost.wall_seconds, "baseline_wall_seconds": base.cost.wall_seconds,
        "ratio": ratio, "wall_ratio": wall_ratio, "baseline_reached_reference_fid": reached,
        "ratio_kind": "upper bound" if reached else "lower bound",
    })
    sfd, pd = reference.upper(), baseline.upper()
    if reached:
        status = "met (upper bound)" if ratio >= target_ratio else "not met"
        statement = (
            f"At NFE {nfe}, {pd} reached FID {base.fid:.3f} (<= {sfd}'s {ref.fid:.3f}) after {base_fe:.4g} forward-pass "
            f"equivalents; {sfd} spent {ref_fe:.4g}. {pd} needed at most {ratio:.3g}x {sfd}'s compute "
            f"({wall_ratio:.3g}x its wall time) to reach {sfd}'s quality (an upper bound: it may have got there "
            f"earlier within its rounds). Target (>= {target_ratio:g}x): {status}."
        )
    else:
        status = "met" if ratio >= target_ratio else "not shown"
        statement = (
            f"At NFE {nfe}, {sfd} reached FID {ref.fid:.3f} with {ref_fe:.4g} forward-pass equivalents; {pd} spent "
            f"{base_fe:.4g} ({ratio:.3g}x, {wall_ratio:.3g}x the wall time) and reached only FID {base.fid:.3f}, so {pd} "
            f"needs more than {ratio:.3g}x {sfd}'s compute to match it (a lower bound). Target (>= {target_ratio:g}x): "
            + ("met." if status == "met" else f"not shown by this run (the lower bound is below {target_ratio:g}x; "
                                              f"a longer {pd} run would tell).")
        )
    return {**out, "status": status, "statement": statement}


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def rows_markdown(rows: Sequence[Row]) -> str:
    header = ["method", "NFE", "FID", "teacher fwd", "student fwd", "student bwd", "fwd-pass equiv.", "wall s", "note"]
    table = []
    for r in rows:
        c = r.cost
        cells = [r.method, r.nfe, r.fid] + (
            [None] * 5 if c is None else
            [c.teacher_forward_images, c.student_forward_images, c.student_backward_images, c.forward_equivalents,
             round(c.wall_seconds, 1)]
        ) + [r.note]
        table.append([_fmt(v) for v in cells])  # 4 significant digits; markdown_table passes strings through
    return markdown_table(header, table)


def plot_comparison(rows: Sequence[Row], path: str | Path) -> Path | None:
    """FID against forward-pass equivalents (log scale), one marker per method, NFE written next to it."""
    points = [r for r in rows if r.fid is not None and r.cost is not None and r.cost.forward_equivalents > 0]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r.method for r in points):
        mine = [r for r in points if r.method == method]
        ax.scatter([r.cost.forward_equivalents for r in mine], [r.fid for r in mine], label=method)
        for r in mine:
            ax.annotate(f"{r.nfe}", (r.cost.forward_equivalents, r.fid), textcoords="offset points", xytext=(4, 3), fontsize=8)
    ax.set_xscale("log")
    log_fid = all(r.fid > 0 for r in points)
    if log_fid:  # one poor baseline must not flatten the rest
        ax.set_yscale("log")
    ax.set_xlabel("distillation cost (forward-pass equivalents, log)")
    ax.set_ylabel("FID (log)" if log_fid else "FID")
    ax.set_title("FID vs distillation cost (numbers: NFE)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def build_comparison(
    evaluation: str | Path | Mapping[str, Mapping[str, Any]],
    cost_dir: str | Path,
    *,
    method_stages: Mapping[str, Sequence[str]] = DEFAULT_METHOD_STAGES,
    nfe: int = 2,
    plot_path: str | Path | None = None,
) -> tuple[dict[str, Any], str]:
    """(data, markdown): the comparison rows, the SFD vs progressive-distillation headline, and a table."""
    if not isinstance(evaluation, Mapping):
        evaluation = json.loads(Path(evaluation).read_text())
    records = load_cost_records(cost_dir)
    rows = comparison_rows(evaluation, records, method_stages=method_stages)
    head = headline(rows, nfe=nfe)
    plot = plot_comparison(rows, plot_path) if plot_path is not None else None
    parts = [
        "Distillation cost counted the same way for every method: teacher forward images + student forward "
        "images + 2 x student backward images (forward-pass equivalents), and wall time. "
        "SFD = teacher trajectories + distillation; PD = every round up to the student at that NFE; "
        "SFDDM = its teacher forwards + student passes; the SFDDM control row is the teacher with the same "
        "Euler steps (no training).",
        "",
        f"**Headline (NFE {nfe}):** {head['statement']}",
        "",
        rows_markdown(rows),
    ]
    if plot is not None:
        parts += ["", f"![FID vs distillation cost]({Path(plot).name})"]
    data = {"rows": [r.to_dict() for r in rows], "headline": head, "method_stages": {k: list(v) for k, v in method_stages.items()}}
    return data, "\n".join(parts)


def comparison_markdown(evaluation: str | Path | Mapping[str, Mapping[str, Any]], cost_dir: str | Path, plot_path: str | Path | None = None) -> str:
    """The report's comparison section (markdown); what the report stage calls."""
    return build_comparison(evaluation, cost_dir, plot_path=plot_path)[1]
