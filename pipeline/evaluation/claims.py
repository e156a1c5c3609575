"""What this run resolves: each sampler against SFD at the same NFE on the paired teacher-fidelity metric.

Every sampler with paired distances (pipeline.evaluation.paired) is compared with the SFD model of its NFE — ``sfd``
at NFE 2, ``sfd-v`` at NFE 3 and above, ``sfd-stage2`` at NFE 1 (whichever of them this run evaluated) — and SFDDM
with its training-free control at the same T'. A comparison is the paired bootstrap of the per-seed differences of
the pixel RMS distance (the headline metric) and of the feature distance, plus the KID difference against its
standard deviation. "A is better than B" (closer to the teacher's sample from the same x_T) is said only where the
interval excludes 0 (for KID: where the difference exceeds 2 sd); otherwise the pair is "unresolved at this sample
size". FID and its noise floor stay in the report as the field's context; they decide nothing here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.config.evaluation import ENTRY
from pipeline.diffusion.sampling import SOLVER_NAMES
from pipeline.evaluation.paired import PairedDistances, kid_difference, mean_se, paired_bootstrap

CONTROLS = {"sfddm": "sfddm_control"}  # a method compared with its own training-free control as well
HEADLINE_BASELINES = ("vanilla", "pd")  # compared with SFD at the headline NFE, then the best solver, then SFDDM
METRIC_NAMES = {"pixel": "pixel RMS distance", "feature": "feature L2 distance"}
_LABELS = {"vanilla": "SFD vs vanilla trajectory distillation", "pd": "SFD vs progressive distillation",
           "best_training_free": "SFD vs the best training-free solver", "sfddm": "SFDDM vs its control"}


def reference_method(nfe: int) -> str:
    """The SFD model a sampler at ``nfe`` is compared with."""
    return {1: "sfd-stage2", 2: "sfd"}.get(nfe, "sfd-v")


def split(key: str) -> tuple[str, int]:
    m = ENTRY.match(key)
    return (m["sampler"], int(m["nfe"])) if m else (key, -1)


@dataclass(frozen=True)
class Comparison:
    """``a`` against ``b`` (evaluation keys) on the same seeds; differences are a - b (negative: a is closer)."""

    a: str
    b: str
    pixel: dict[str, Any]  # paired_bootstrap of the pixel RMS distances
    feature: dict[str, Any]  # paired_bootstrap of the feature distances
    kid: dict[str, Any] | None  # kid_difference (None: no KID)
    means: dict[str, tuple[float, float]]  # "<metric>/<a|b>" -> (mean, se) of each side's distances

    def verdict(self, metric: str = "pixel") -> str:
        """"better" (a is better than b), "worse", or "unresolved"."""
        result = self.pixel if metric == "pixel" else self.feature if metric == "feature" else self.kid
        if result is None or not result["resolved"]:
            return "unresolved"
        return "better" if result["better"] == "a" else "worse"

    def statement(self, metric: str = "pixel") -> str:
        r = self.pixel if metric == "pixel" else self.feature
        ma, mb = self.means[f"{metric}/a"][0], self.means[f"{metric}/b"][0]
        detail = (f"paired {METRIC_NAMES[metric]} to the teacher's samples: {self.a} {ma:.4g}, {self.b} {mb:.4g}; "
                  f"{self.a} − {self.b} = {r['difference']:+.3g}, {r['confidence']:.0%} CI [{r['ci_low']:+.3g}, "
                  f"{r['ci_high']:+.3g}] over {r['seeds']} seeds")
        verdict = self.verdict(metric)
        if verdict == "unresolved":
            return f"{self.a} vs {self.b}: unresolved at this sample size ({detail}: the interval includes 0)."
        win, lose = (self.a, self.b) if verdict == "better" else (self.b, self.a)
        return f"{win} is better than {lose} in teacher fidelity ({detail})."

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "pixel": self.pixel, "feature": self.feature, "kid": self.kid,
                "verdict": {m: self.verdict(m) for m in ("pixel", "feature", "kid")}, "statement": self.statement()}


def compare(a: str, b: str, distances: PairedDistances, evaluation: Mapping[str, Mapping[str, Any]], *,
            resamples: int = 1000, confidence: float = 0.95) -> Comparison:
    means = {f"{m}/{side}": mean_se(getattr(distances, m)[key]) for m in METRIC_NAMES for side, key in (("a", a), ("b", b))}
    boot = {m: paired_bootstrap(getattr(distances, m)[a], getattr(distances, m)[b], resamples=resamples,
                                confidence=confidence) for m in METRIC_NAMES}
    kid = kid_difference(evaluation.get(a, {}), evaluation.get(b, {}))
    return Comparison(a, b, boot["pixel"], boot["feature"], kid, means)


def comparisons(evaluation: Mapping[str, Mapping[str, Any]], distances: PairedDistances, *, resamples: int = 1000,
                confidence: float = 0.95) -> list[Comparison]:
    """Every measured sampler against the SFD model of its NFE, and each method of CONTROLS against its control."""
    measured = set(distances.pixel)
    pairs = []
    for key in sorted(measured, key=lambda k: (split(k)[1], split(k)[0])):
        sampler, nfe = split(key)
        if key == distances.reference or nfe < 0:
            continue
        ref = f"{reference_method(nfe)}/nfe{nfe}"
        if ref in measured and ref != key:
            pairs.append((key, ref))
        control = f"{CONTROLS.get(sampler)}/nfe{nfe}"
        if control in measured:
            pairs.append((key, control))
    return [compare(a, b, distances, evaluation, resamples=resamples, confidence=confidence) for a, b in pairs]


def best_solver(distances: PairedDistances, nfe: int) -> str | None:
    """The training-free solver closest to the teacher at ``nfe`` (lowest mean paired pixel distance)."""
    solvers = [k for k in distances.pixel if split(k)[1] == nfe and split(k)[0] in SOLVER_NAMES]
    return min(solvers, key=lambda k: float(distances.pixel[k].mean()), default=None)


def headline_comparisons(comps: Sequence[Comparison], distances: PairedDistances, nfe: int = 2
                         ) -> list[tuple[str, Comparison]]:
    """(label, comparison) of the headline at ``nfe``: vanilla and PD against SFD, the best training-free solver
    against SFD, SFDDM against its control (those this run has)."""
    find = {(c.a, c.b): c for c in comps}
    ref = f"{reference_method(nfe)}/nfe{nfe}"
    wanted = [(f"{m}/nfe{nfe}", f"{m}/nfe{nfe}", ref) for m in HEADLINE_BASELINES]
    solver = best_solver(distances, nfe)
    if solver is not None:
        wanted.append((f"best_training_free/nfe{nfe}", solver, ref))
    wanted += [(f"{m}/nfe{nfe}", f"{m}/nfe{nfe}", f"{c}/nfe{nfe}") for m, c in CONTROLS.items()]
    return [(label, find[(a, b)]) for label, a, b in wanted if (a, b) in find]


def headline_numbers(data: Mapping[str, Any] | None, nfe: int = 2) -> dict[str, Any]:
    """The paired numbers of metrics/headline.json (from comparison.json's ``paired`` block): the mean distance
    of SFD at ``nfe`` with its standard error, and each headline difference with its interval."""
    if not data:
        return {}
    out: dict[str, Any] = {}
    ref = f"{reference_method(nfe)}/nfe{nfe}"
    if ref in data["entries"]:
        e = data["entries"][ref]
        out[ref] = {"pixel_rms": e["pixel_rms"], "se": e["pixel_rms_se"]}
    for item in data["headline"]:
        p = item["pixel"]
        out[f"{item['label']}_vs_{item['b']}"] = {"difference": p["difference"], "ci_low": p["ci_low"], "ci_high": p["ci_high"]}
    return out


def paired_json(evaluation: Mapping[str, Mapping[str, Any]], distances: PairedDistances | None, *, nfe: int = 2,
                resamples: int = 1000, confidence: float = 0.95) -> dict[str, Any] | None:
    """comparison.json's ``paired`` block: the protocol, every sampler's mean distances, every comparison and the
    headline ones with their statements. None without distances."""
    if distances is None:
        return None
    comps = comparisons(evaluation, distances, resamples=resamples, confidence=confidence)
    entries = {}
    for key in distances.pixel:
        (pm, ps), (fm, fs) = mean_se(distances.pixel[key]), mean_se(distances.feature[key])
        entries[key] = {"pixel_rms": pm, "pixel_rms_se": ps, "feature_l2": fm, "feature_l2_se": fs}
    heads = [{"label": label, **c.to_dict()} for label, c in headline_comparisons(comps, distances, nfe)]
    return {
        "metric": ("per seed, the distance between a sampler's sample and the teacher's reference sample from the same "
                   "x_T: pixel RMS in [-1, 1] (the headline) and L2 in the evaluation feature space"),
        "reference_sampler": distances.reference, "seeds": len(distances.seeds), "resamples": resamples,
        "confidence": confidence, "bootstrap_seed": 0, "difference": "a - b (negative: a is closer to the teacher)",
        "rule": "a is better than b only where the percentile interval of the paired difference excludes 0 "
                "(KID: where |difference| > 2 sd of the difference); otherwise unresolved at this sample size",
        "entries": entries,
        "comparisons": [c.to_dict() for c in comps],
        "headline": heads,
    }


def _ci(r: Mapping[str, Any] | None) -> str:
    if r is None:
        return "–"
    mark = "" if r["resolved"] else " (unresolved)"
    return f"{r['difference']:+.3g} [{r['ci_low']:+.3g}, {r['ci_high']:+.3g}]{mark}"


def _kid(r: Mapping[str, Any] | None) -> str:
    if r is None:
        return "–"
    return f"{r['difference']:+.3g} ± {2 * r['sd']:.2g}" + ("" if r["resolved"] else " (unresolved)")


def paired_markdown(data: Mapping[str, Any] | None, evaluation: Mapping[str, Mapping[str, Any]]) -> str:
    """The report's paired section: how it is measured, then one row per comparison."""
    from pipeline.evaluation.report import markdown_table

    if not data:
        return ("Not measured: the evaluate stages wrote no paired distances (their `--paired-reference` / `--paired` "
                "options; see dvc.yaml).")
    conf = f"{data['confidence']:.0%}"
    rows = []
    for c in data["comparisons"]:
        a, b = data["entries"][c["a"]], data["entries"][c["b"]]
        kid = evaluation.get(c["a"], {})
        rows.append([c["a"], c["b"], f"{a['pixel_rms']:.4g} ± {a['pixel_rms_se']:.2g}", f"{b['pixel_rms']:.4g}",
                     _ci(c["pixel"]), f"{a['feature_l2']:.4g} ± {a['feature_l2_se']:.2g}", _ci(c["feature"]),
                     "–" if kid.get("kid") is None else f"{kid['kid']:.3g} ± {kid.get('kid_std') or 0:.2g}", _kid(c["kid"]),
                     c["verdict"]["pixel"]])
    lines = [
        f"Per seed (the first {data['seeds']} evaluation seeds: every sampler starts from the same x_T and label), the "
        f"distance between a sampler's sample and the teacher's reference sample `{data['reference_sampler']}`: the "
        "**pixel RMS distance** in [-1, 1] and the L2 distance of their feature vectors (the FID feature space). Mean ± "
        "standard error. Each sampler is compared with the SFD model of its NFE (`sfd` at NFE 2, `sfd-v` at 3 and "
        "above, `sfd-stage2` at 1) and SFDDM with its control: the difference a − b (negative: a is closer to the "
        f"teacher) with its {conf} paired-bootstrap interval ({data['resamples']} resamples of the seeds, both "
        "samplers' distances of a seed together; seeded). `verdict` (pixel): *better* / *worse* only where the interval "
        "excludes 0, else *unresolved* at this sample size. KID ± its subset sd; a KID difference is resolved when "
        "it exceeds 2 sd of the difference (sqrt(sd_a² + sd_b²), conservative).",
        "",
    ]
    if not rows:
        return "\n".join([*lines, "No comparison: the run has no SFD model at the NFE of any other sampler."])
    header = ["a", "b", "a: pixel RMS", "b: pixel RMS", f"Δ pixel [{conf} CI]", "a: feature L2", f"Δ feature [{conf} CI]",
              "a: KID ± sd", "Δ KID ± 2 sd", "verdict"]
    return "\n".join([*lines, markdown_table(header, rows)])


def headline_lines(data: Mapping[str, Any] | None, pd_statement: str | None = None) -> list[str]:
    """The report's headline: the resolved (or unresolved) headline comparisons, then PD's compute statement."""
    if not data or not data["headline"]:
        lines = ["No paired comparison at the headline NFE (no SFD model or no paired distances in this run)."]
    else:
        lines = [f"- **{_LABELS.get(split(h['label'])[0], h['label'])}:** {h['statement']}" for h in data["headline"]]
    if pd_statement:
        lines += ["", pd_statement]
    return lines
