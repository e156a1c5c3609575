"""SFD against the baselines: FID at each NFE against total distillation cost (baselines.md).

Cost is counted the same way for every method, in forward-pass equivalents:
    teacher forward images + student forward images + 2 x student backward images
(a backward pass costs about two forwards; every network here has the teacher's architecture),
plus wall time. The counts come from ``metrics/cost/<stage>.json`` (pipeline.core.cost.CostMeter):
- SFD: the teacher cost of the cached trajectories it consumed (the distill stage's
  ``consumed_trajectories``: rows read x per-trajectory cost from the store's commit records, each
  stored trajectory once however many epochs read it, whichever run generated it) plus its own
  training passes; stage 2 adds SFD-v's total (its teacher) and the SFD-v forwards of its own
  trajectories;
- progressive distillation: every round up to the one that produced the NFE-k student (the
  stage records its cumulative spending after each round);
- SFDDM: its teacher forwards and student passes; its control row (the teacher with the same
  T' Euler steps) is training-free;
- vanilla trajectory distillation: its teacher sub-step solves and student passes.
Two numbers per method: the **total** cost, and the **marginal** cost of re-running it given the
cache (the teacher's persistent trajectory stores filled): what `dvc exp run -S loss=l2` spends.
For SFD that is its training alone (0 teacher forwards); stage 2 still pays for its trajectories,
whose teacher (the SFD-v model) is retrained; the baselines have no cache, so marginal = total.
The headline compares SFD's total cost at NFE 2 with progressive distillation's cost to reach SFD's quality at
NFE 2, as a ratio (an upper or a lower bound), only where the paired teacher-fidelity metric resolves which of the
two is better (pipeline.evaluation.claims: the paired bootstrap's interval excludes 0), and says "unresolved at this
sample size" otherwise. FID stays as the field's context: differences smaller than the evaluation's noise floor
(pipeline.evaluation.evaluate.noise_floor) are marked not significant.
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
from pipeline.evaluation.claims import headline_numbers, paired_json
from pipeline.evaluation.paired import PairedDistances
from pipeline.evaluation.pd_sweep import match_summary, sweep_sentence
from pipeline.evaluation.report import markdown_table

COUNT_KEYS = ("teacher_forward_images", "student_forward_images", "student_backward_images")
TRAINING_FREE = ("sfddm_control",)
TARGET_RATIO = 100.0


@dataclass(frozen=True)
class CostPlan:
    """Which cost records make up a method's cost (names of ``metrics/cost/<stage>.json``)."""

    training: tuple[str, ...]  # stages whose own passes count (PD: its rounds up to the NFE)
    cached: tuple[str, ...] = ()  # distill stages reading the teacher's persistent stores: their trajectories count in the total only
    regenerated: tuple[str, ...] = ()  # distill stages whose trajectories are regenerated when the method re-runs (a distilled teacher's)

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*self.training, *self.cached, *self.regenerated)))


# method (evaluation sampler name) -> how its cost is assembled
DEFAULT_PLANS: dict[str, CostPlan] = {
    "sfd": CostPlan(training=("distill",), cached=("distill",)),
    "sfd-v": CostPlan(training=("distill_v",), cached=("distill_v",)),
    # stage 2's teacher is the SFD-v model: its total includes SFD-v's; its own trajectories are
    # SFD-v forwards, regenerated whenever SFD-v is retrained
    "sfd-stage2": CostPlan(training=("distill_v", "distill_stage2"), cached=("distill_v",), regenerated=("distill_stage2",)),
    "pd": CostPlan(training=("baseline_pd",)),
    "sfddm": CostPlan(training=("baseline_sfddm",)),
    "vanilla": CostPlan(training=("baseline_vanilla",)),
}
DEFAULT_METHOD_STAGES: dict[str, tuple[str, ...]] = {m: p.stages for m, p in DEFAULT_PLANS.items()}


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
    cost: Cost | None  # total; None: unknown (a record or a chunk cost is missing, see note); Cost() for training-free rows
    note: str = ""
    marginal: Cost | None = None  # given the cache; None: unknown (or not computed)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "nfe": self.nfe, "fid": self.fid,
                "cost": None if self.cost is None else self.cost.to_dict(),
                "marginal": None if self.marginal is None else self.marginal.to_dict(), "note": self.note}


def consumed_cost(record: Mapping[str, Any], stage: str) -> tuple[Cost | None, str]:
    """The teacher cost of the trajectories a distill stage consumed (its record's ``consumed_trajectories``)."""
    consumed = record.get("consumed_trajectories")
    if not isinstance(consumed, Mapping):
        return None, f"{stage}: its cost record has no consumed_trajectories (written before cost travelled with the data; re-run it)"
    unknown = int(consumed.get("unknown_trajectories", 0))
    if unknown:
        return None, (f"{stage}: {unknown} of {consumed.get('trajectories')} consumed trajectories come from chunks "
                      "committed without a cost record (an older store): their teacher cost is unknown")
    return Cost(teacher_forward_images=int(consumed.get("teacher_forward_images", 0)),
                wall_seconds=float(consumed.get("wall_seconds", 0.0))), ""


def _own_cost(record: Mapping[str, Any], stage: str, nfe: int) -> tuple[Cost, str]:
    by_nfe = record.get("cumulative_by_nfe")
    if by_nfe and str(nfe) in by_nfe:
        return Cost.from_record(by_nfe[str(nfe)]), f"{stage}: rounds up to NFE {nfe}"
    return Cost.from_record(record), ""


def method_costs(method: str, nfe: int, records: Mapping[str, Mapping[str, Any]],
                 plans: Mapping[str, CostPlan] = DEFAULT_PLANS) -> tuple[Cost | None, Cost | None, str]:
    """(total, marginal given the cache, note) of ``method``'s NFE-``nfe`` sampler; None where unknown."""
    if method in TRAINING_FREE:
        return Cost(), Cost(), "training-free"
    plan = plans.get(method)
    if plan is None:
        return None, None, "no cost stages known"
    missing = [s for s in plan.stages if s not in records]
    if missing:
        return None, None, f"missing cost record(s): {', '.join(missing)}"
    own, notes = Cost(), []
    for stage in plan.training:
        c, note = _own_cost(records[stage], stage, nfe)
        own = own + c
        notes += [note] if note else []
    total: Cost | None = own
    marginal: Cost | None = own
    for stage in (*plan.cached, *plan.regenerated):
        c, note = consumed_cost(records[stage], stage)
        notes += [note] if note else []
        total = None if total is None or c is None else total + c
        if stage in plan.regenerated:
            marginal = None if marginal is None or c is None else marginal + c
    return total, marginal, "; ".join(notes)


def method_cost(method: str, nfe: int, records: Mapping[str, Mapping[str, Any]],
                plans: Mapping[str, CostPlan] = DEFAULT_PLANS) -> tuple[Cost | None, str]:
    """(total cost, note) of ``method``'s NFE-``nfe`` sampler (see :func:`method_costs`)."""
    total, _, note = method_costs(method, nfe, records, plans)
    return total, note


def comparison_rows(
    evaluation: Mapping[str, Mapping[str, Any]],
    records: Mapping[str, Mapping[str, Any]],
    *,
    plans: Mapping[str, CostPlan] = DEFAULT_PLANS,
) -> list[Row]:
    """One row per evaluated (method, NFE) of a distillation method or a training-free control row."""
    rows = []
    for key, metrics in evaluation.items():
        m = ENTRY.match(key)
        if not m or (m["sampler"] not in plans and m["sampler"] not in TRAINING_FREE):
            continue
        method, nfe = m["sampler"], int(m["nfe"])
        total, marginal, note = method_costs(method, nfe, records, plans)
        fid = metrics.get("fid")
        rows.append(Row(method, nfe, None if fid is None else float(fid), total, note, marginal))
    order = {name: i for i, name in enumerate([*plans, *TRAINING_FREE])}
    return sorted(rows, key=lambda r: (r.nfe, order.get(r.method, len(order)), r.method))


def significance(fid: float | None, other: float | None, floor: float | None) -> dict[str, Any] | None:
    """{delta, significant}: ``fid - other`` and whether it exceeds the noise floor (None: not comparable)."""
    if fid is None or other is None:
        return None
    delta = fid - other
    return {"delta": delta, "significant": None if floor is None else abs(delta) >= floor}


def headline(rows: Sequence[Row], *, nfe: int = 2, reference: str = "sfd", baseline: str = "pd",
             target_ratio: float = TARGET_RATIO, floor: float | None = None,
             pd_sweep: Mapping[str, Any] | None = None, paired: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """SFD's cost to reach its quality at ``nfe`` vs the baseline's cost, as a ratio, only as far as the data resolve it.

    Whether the baseline reached SFD's quality is decided by the paired teacher-fidelity metric when ``paired`` is
    given (pipeline.evaluation.paired.paired_bootstrap of the baseline's minus SFD's per-seed pixel distances):
    - the interval below 0 (the baseline is closer to the teacher): reached; ratio = baseline cost / SFD cost is an
      upper bound (it may have got there earlier within its rounds);
    - the interval above 0: not reached; the ratio is a lower bound (it would have to spend more);
    - the interval includes 0: unresolved at this sample size; no ratio claim is made.
    Without ``paired``, by FID: a difference below the noise ``floor`` is unresolved; without a floor the FID
    comparison is made and said to be unassessed. Costs are totals (SFD: including its teacher trajectories).
    ``pd_sweep`` (bench/pd_sweep.json, run on this teacher) adds PD's measured compute to match the reference's FID at
    NFE 2 (``pd_sweep`` key; FID-based: the sweep has no paired distances).
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
    out.update({
        "reference_fid": ref.fid, "baseline_fid": base.fid,
        "reference_forward_equivalents": ref_fe, "baseline_forward_equivalents": base_fe,
        "reference_wall_seconds": ref.cost.wall_seconds, "baseline_wall_seconds": base.cost.wall_seconds,
        "ratio": ratio, "wall_ratio": wall_ratio,
    })
    sfd, pd = reference.upper(), baseline.upper()
    delta = abs(base.fid - ref.fid)
    if floor is not None:
        out.update({"noise_floor": floor, "fid_difference": delta, "significant": delta >= floor})
    outcome, evidence = _outcome(ref, base, out, floor=floor, paired=paired, names=(sfd, pd))
    out["baseline_reached_reference"] = None if outcome == "unresolved" else outcome == "reached"
    spent = (f"{pd} spent {base_fe:.4g} forward-pass equivalents, {ratio:.3g}x {sfd}'s {ref_fe:.4g} "
             f"({wall_ratio:.3g}x its wall time)")
    status, out["ratio_kind"], statement = _claim(outcome, evidence, spent, nfe=nfe, ratio=ratio,
                                                  target_ratio=target_ratio, names=(sfd, pd), sweep=pd_sweep is not None)
    if pd_sweep is not None and baseline == "pd" and nfe == 2:
        out["pd_sweep"], sentence = _sweep_block(pd_sweep, ref, ref_fe, target_ratio)
        statement += sentence
    if ref.marginal is not None:
        out["reference_marginal_forward_equivalents"] = ref.marginal.forward_equivalents
        statement += (f" Given the trajectory cache, re-running {sfd} (e.g. `dvc exp run -S loss=l2`) costs "
                      f"{ref.marginal.forward_equivalents:.4g} forward-pass equivalents "
                      f"({ref.marginal.teacher_forward_images} teacher forwards).")
    return {**out, "status": status, "statement": statement}


def _claim(outcome: str, evidence: str, spent: str, *, nfe: int, ratio: float, target_ratio: float,
           names: tuple[str, str], sweep: bool) -> tuple[str, str, str]:
    """(target status, the kind of ratio claimed, the headline statement) for a comparison's outcome."""
    sfd, pd = names
    if outcome == "unresolved":
        status = "unresolved"
        statement = (f"At NFE {nfe}, whether {pd} reached {sfd}'s quality is unresolved at this sample size ({evidence}). "
                     f"{spent}; this run supports no ratio of the compute {pd} needs to match {sfd}. "
                     f"Target (>= {target_ratio:g}x): unresolved.")
    elif outcome == "reached":
        status = "met (upper bound)" if ratio >= target_ratio else "not met"
        statement = (f"At NFE {nfe}, {pd} is at least as good as {sfd} ({evidence}): {spent}, so {pd} needed at most "
                     f"{ratio:.3g}x {sfd}'s compute to reach its quality (an upper bound: it may have got there earlier "
                     f"within its rounds). Target (>= {target_ratio:g}x): {status}.")
    else:
        status = "met" if ratio >= target_ratio else "not shown"
        statement = (f"At NFE {nfe}, {sfd} is better than {pd} ({evidence}): {spent} without reaching {sfd}'s quality, so "
                     f"{pd} needs more than {ratio:.3g}x {sfd}'s compute to match it (a lower bound). Target (>= "
                     f"{target_ratio:g}x): " + ("met." if status == "met" else
                                               f"not shown by this run (the lower bound is below {target_ratio:g}x"
                                               + ("; the PD budget sweep measures more)." if sweep
                                                  else f"; a longer {pd} run would tell)."))
        )
    kind = {"unresolved": "unresolved", "reached": "upper bound"}.get(outcome, "lower bound")
    return status, kind, statement


def _outcome(ref: Row, base: Row, out: dict[str, Any], *, floor: float | None, paired: Mapping[str, Any] | None,
             names: tuple[str, str]) -> tuple[str, str]:
    """(reached | not reached | unresolved, the evidence sentence): by the paired distances when given, else by FID
    against the noise floor; the basis and its numbers go into ``out``."""
    sfd, pd = names
    delta = abs(base.fid - ref.fid)
    if paired is not None:
        outcome = {"a": "reached", "b": "not reached", None: "unresolved"}[paired["better"]]
        lo, hi = paired["ci_low"], paired["ci_high"]
        evidence = (f"the paired pixel distance to the teacher's samples, {pd} − {sfd}: {paired['difference']:+.3g} "
                    f"({paired['confidence']:.0%} CI [{lo:+.3g}, {hi:+.3g}], {paired['seeds']} seeds)")
        out.update({"basis": "paired pixel distance", "paired_difference": paired["difference"], "paired_ci": [lo, hi]})
        return outcome, evidence
    outcome = "unresolved" if floor is not None and delta < floor else "reached" if base.fid <= ref.fid else "not reached"
    evidence = (f"FID {base.fid:.3f} vs {sfd}'s {ref.fid:.3f}, difference {delta:.3g} "
                + ("(significance not assessed: no noise floor)" if floor is None else
                   f"({'below' if delta < floor else 'above'} the noise floor {floor:.3g})"))
    out["basis"] = "fid"
    return outcome, evidence


def _sweep_block(pd_sweep: Mapping[str, Any], ref: Row, ref_fe: float, target_ratio: float) -> tuple[dict[str, Any], str]:
    """The PD budget sweep's match to the reference (bench/pd_sweep.json) and its sentence."""
    m = match_summary(pd_sweep["points"], ref.fid, ref_fe)
    # the sweep decides the target where its bracket does: [lower_ratio, ratio] all above or all below it
    if m["lower_ratio"] is not None and m["lower_ratio"] >= target_ratio:
        m["status"] = "met"
    elif m["reached"] and m["ratio"] < target_ratio:
        m["status"] = "not met"
    else:
        m["status"] = "undecided"
    sentence = (f" PD budget sweep on this teacher (bench/pd_sweep.json): {sweep_sentence(m, ref.fid, ref_fe)} "
                f"Target (>= {target_ratio:g}x) by the sweep: {m['status']}. (The sweep compares FIDs, without "
                "the noise floor or paired distances: context, not a resolved claim.)")
    return m, sentence


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def rows_markdown(rows: Sequence[Row], *, floor: float | None = None, reference: str = "sfd") -> str:
    """The comparison table: FID (and its difference to ``reference`` at the same NFE, n.s. below the
    noise floor), the total cost's counts, the marginal cost given the cache, wall time, notes."""
    ref_fid = {r.nfe: r.fid for r in rows if r.method == reference}
    header = ["method", "NFE", "FID", f"FID − {reference}", "teacher fwd", "student fwd", "student bwd",
              "total fwd-pass equiv.", "marginal fwd-pass equiv. (teacher fwd)", "wall s (total)", "note"]
    table = []
    for r in rows:
        c, mc = r.cost, r.marginal
        sig = significance(r.fid, ref_fid.get(r.nfe), floor) if r.method != reference else None
        diff = "–" if sig is None else f"{sig['delta']:+.3g}" + (" (n.s.)" if sig["significant"] is False else "")
        marginal = "unknown" if mc is None else f"{_fmt(mc.forward_equivalents)} ({_fmt(mc.teacher_forward_images)})"
        if c is not None and mc is not None and mc == c:
            marginal = "= total"
        cells = [r.method, r.nfe, r.fid, diff] + (
            ["unknown"] + [None] * 3 if c is None else
            [c.teacher_forward_images, c.student_forward_images, c.student_backward_images, c.forward_equivalents]
        ) + [marginal, None if c is None else round(c.wall_seconds, 1), r.note]
        table.append([v if isinstance(v, str) else _fmt(v) for v in cells])  # markdown_table passes strings through
    return markdown_table(header, table)


def comparison_json(rows: Sequence[Row], head: Mapping[str, Any], noise_floor: Mapping[str, Any] | None = None,
                    *, reference: str = "sfd", paired: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``metrics/comparison.json``: one entry per method and NFE (keys ``<method>/nfe<k>``) with fid and the
    total cost's counts (null where unknown), ``marginal`` where it differs from the total, and the
    FID difference to ``reference`` with its significance against the noise floor; with the ``paired`` block
    (pipeline.evaluation.claims.paired_json), each entry's paired pixel distance and its difference from the SFD
    model of its NFE (``paired_vs``: interval and verdict); plus the headline, the paired block and the noise floor."""
    floor = None if not noise_floor else noise_floor.get("floor")
    ref_fid = {r.nfe: r.fid for r in rows if r.method == reference}
    entries: dict[str, Any] = {}
    for r in rows:
        c = r.cost.to_dict() if r.cost is not None else dict.fromkeys((*COUNT_KEYS, "wall_seconds", "forward_equivalents"))
        entry: dict[str, Any] = {"method": r.method, "nfe": r.nfe, "fid": r.fid, **c, "cost_known": r.cost is not None}
        if r.marginal is None or r.cost is None or r.marginal != r.cost:
            entry["marginal"] = None if r.marginal is None else r.marginal.to_dict()
        if r.method != reference:
            sig = significance(r.fid, ref_fid.get(r.nfe), floor)
            if sig is not None:
                entry[f"fid_minus_{reference}"] = sig["delta"]
                entry["significant"] = sig["significant"]
        if r.note:
            entry["note"] = r.note
        entries[f"{r.method}/nfe{r.nfe}"] = {**entry, **_paired_fields(f"{r.method}/nfe{r.nfe}", paired)}
    return _finite({"entries": entries, "headline": dict(head), "paired": None if paired is None else dict(paired),
                    "noise_floor": dict(noise_floor) if noise_floor else None})


def _paired_fields(key: str, paired: Mapping[str, Any] | None) -> dict[str, Any]:
    """A comparison entry's paired pixel distance and its first comparison (with the SFD model of its NFE, or the
    control): difference, interval, verdict."""
    if not paired or key not in paired["entries"]:
        return {}
    e = paired["entries"][key]
    out: dict[str, Any] = {"paired_pixel_rms": e["pixel_rms"], "paired_pixel_rms_se": e["pixel_rms_se"]}
    comp = next((c for c in paired["comparisons"] if c["a"] == key), None)
    if comp is not None:
        p = comp["pixel"]
        out["paired_vs"] = {"b": comp["b"], "difference": p["difference"], "ci_low": p["ci_low"], "ci_high": p["ci_high"],
                            "verdict": comp["verdict"]["pixel"]}
    return out


def _finite(value: Any) -> Any:
    """inf/nan -> None, so the file is plain JSON (DVC metrics, other readers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


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
    plans: Mapping[str, CostPlan] = DEFAULT_PLANS,
    nfe: int = 2,
    plot_path: str | Path | None = None,
    noise_floor: Mapping[str, Any] | None = None,  # pipeline.evaluation.evaluate.noise_floor's result
    pd_sweep: Mapping[str, Any] | None = None,  # the PD budget sweep, only when it ran on this run's teacher
    paired: PairedDistances | None = None,  # the evaluate stages' per-seed paired distances
    resamples: int = 1000,  # the paired bootstrap's resamples
    confidence: float = 0.95,  # and its interval
) -> tuple[dict[str, Any], str]:
    """(data, markdown): ``metrics/comparison.json``'s content (:func:`comparison_json`) and the report's section."""
    if not isinstance(evaluation, Mapping):
        evaluation = json.loads(Path(evaluation).read_text())
    records = load_cost_records(cost_dir)
    rows = comparison_rows(evaluation, records, plans=plans)
    floor = None if not noise_floor else noise_floor.get("floor")
    pairs = paired_json(evaluation, paired, nfe=nfe, resamples=resamples, confidence=confidence)
    pd_vs_sfd = next((c["pixel"] for c in (pairs or {}).get("comparisons", [])
                      if (c["a"], c["b"]) == (f"pd/nfe{nfe}", f"sfd/nfe{nfe}")), None)
    head = headline(rows, nfe=nfe, floor=floor, pd_sweep=pd_sweep, paired=pd_vs_sfd)
    plot = plot_comparison(rows, plot_path) if plot_path is not None else None
    parts = [
        "Distillation cost counted the same way for every method: teacher forward images + student forward "
        "images + 2 x student backward images (forward-pass equivalents), and wall time. "
        "**Total** cost: SFD = the teacher cost of the stored trajectories it consumed (each once, from the "
        "store's commit records, whichever run generated them) + its training; SFD stage 2 = SFD-v's total + "
        "its own trajectories (SFD-v forwards) + its training; PD = every round up to the student at that NFE; "
        "SFDDM and vanilla = their teacher forwards + student passes; the SFDDM control row is the teacher "
        "with the same Euler steps (no training). **Marginal** cost: what re-running the method costs given "
        "the cache (the teacher's trajectory stores filled), i.e. what `dvc exp run -S loss=l2` spends: "
        "SFD's training alone; the baselines have no cache (marginal = total).",
        "",
        f"**Headline (NFE {nfe}):** {head['statement']}",
        "",
        rows_markdown(rows, floor=floor),
    ]
    if floor is not None:
        parts += ["", f"`FID − sfd`: difference to SFD at the same NFE; (n.s.) = smaller than the noise floor "
                      f"({floor:.3g}, see *FID noise floor*), not significant."]
    unknown = [f"{r.method}/nfe{r.nfe}" for r in rows if r.cost is None]
    if unknown:
        parts += ["", f"Total cost unknown for {', '.join(unknown)} (see the note column)."]
    if plot is not None:
        parts += ["", f"![FID vs distillation cost]({Path(plot).name})"]
    return comparison_json(rows, head, noise_floor, paired=pairs), "\n".join(parts)


def headline_metrics(evaluation: Mapping[str, Mapping[str, Any]], noise_floor: Mapping[str, Any] | None = None,
                     *, nfe: int = 2, paired: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``metrics/headline.json``, the few numbers `dvc exp show` lists: the FID of the teacher's reference,
    of every distilled method at NFE <= ``nfe`` (SFD-v at each of its NFE), of the best training-free solver
    at ``nfe``, and the FID noise floor; with comparison.json's ``paired`` block, the resolved numbers
    (pipeline.evaluation.claims.headline_numbers): SFD's paired pixel distance and the headline differences with
    their intervals. The full detail stays in metrics/eval*.json and comparison.json."""
    fid: dict[str, float] = {}
    training_free: dict[str, float] = {}
    for key, metrics in sorted(evaluation.items()):
        method, _, k = key.partition("/nfe")
        value = metrics.get("fid")
        if value is None or not k.isdigit():
            continue
        if method == "teacher":
            fid["teacher"] = value
        elif method in DEFAULT_PLANS:
            if int(k) <= nfe or method == "sfd-v":
                fid[key] = value
        elif int(k) == nfe and method not in TRAINING_FREE:
            training_free[method] = value
    if training_free:
        best = min(training_free, key=training_free.get)
        fid[f"best_training_free/nfe{nfe}"] = training_free[best]
    out: dict[str, Any] = {"fid": fid}
    if noise_floor and noise_floor.get("floor") is not None:
        out["fid_noise_floor"] = noise_floor["floor"]
    numbers = headline_numbers(paired, nfe)
    if numbers:
        out["paired_pixel"] = numbers
    return out


def comparison_markdown(evaluation: str | Path | Mapping[str, Mapping[str, Any]], cost_dir: str | Path,
                        plot_path: str | Path | None = None, noise_floor: Mapping[str, Any] | None = None) -> str:
    """The report's comparison section (markdown)."""
    return build_comparison(evaluation, cost_dir, plot_path=plot_path, noise_floor=noise_floor)[1]
