"""The pipeline's report: metrics and cost tables, PNG plots and side-by-side sample grids.

Everything is rendered offline (matplotlib, Agg): ``reports/report.md`` links PNG files that sit
next to it. Inputs are the files the other stages wrote: ``metrics/eval.json`` (flat map
``"<sampler>/nfe<k>" -> metrics``), ``metrics/cost/*.json`` (one per stage), the distillation
loss logs (the DVCLive directories of the distill stages) and the grid PNGs of the evaluation stage.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.evaluation.pd_sweep import PD_SWEEP_JSON, baseline_sections
from pipeline.core.cost import load_cost_records
from pipeline.teachers.families import describe_architecture
from pipeline.config.evaluation import ENTRY, ReportParams
from pipeline.core.param_checks import ParamError

METRIC_COLUMNS = ("fid", "fid_sd", "kid", "kid_std", "precision", "recall", "label_accuracy", "paired_pixel_rms",
                  "paired_feature_l2")


def split_entry(key: str) -> tuple[str, int]:
    m = ENTRY.match(key)
    if not m:
        raise ValueError(f"evaluation key {key!r} is not of the form '<sampler>/nfe<k>'")
    return m["sampler"], int(m["nfe"])


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def metrics_table(evaluation: dict[str, dict[str, Any]]) -> str:
    rows = []
    for key in sorted(evaluation, key=lambda k: (split_entry(k)[0], split_entry(k)[1])):
        sampler, nfe = split_entry(key)
        rows.append([sampler, nfe, *(evaluation[key].get(c) for c in METRIC_COLUMNS)])
    return markdown_table(["sampler", "NFE", *METRIC_COLUMNS], rows)


def fid_pivot_table(evaluation: dict[str, dict[str, Any]]) -> str:
    """FID with samplers as rows and NFE as columns (the paper's table layout)."""
    by_sampler: dict[str, dict[int, float]] = defaultdict(dict)
    for key, m in evaluation.items():
        sampler, nfe = split_entry(key)
        by_sampler[sampler][nfe] = m.get("fid")
    nfes = sorted({n for d in by_sampler.values() for n in d})
    rows = [[s, *(by_sampler[s].get(n) for n in nfes)] for s in sorted(by_sampler)]
    return markdown_table(["sampler", *(f"NFE {n}" for n in nfes)], rows)


def within_floor_lines(evaluation: dict[str, dict[str, Any]], floor: float | None) -> list[str]:
    """Per NFE: the best FID and every other sampler whose FID is within the noise floor of it."""
    if floor is None:
        return []
    by_nfe: dict[int, list[tuple[float, str]]] = defaultdict(list)
    for key, m in evaluation.items():
        sampler, nfe = split_entry(key)
        if m.get("fid") is not None and sampler != "teacher":
            by_nfe[nfe].append((float(m["fid"]), sampler))
    lines = []
    for nfe in sorted(by_nfe):
        ranked = sorted(by_nfe[nfe])
        best_fid, best = ranked[0]
        tied = [f"{s} ({f:.3f})" for f, s in ranked[1:] if f - best_fid < floor]
        lines.append(f"- NFE {nfe}: best {best} ({best_fid:.3f})"
                     + (f"; not significantly different (within {floor:.3g}): {', '.join(tied)}" if tied else
                        "; every other sampler is worse by more than the floor"))
    return lines


def noise_floor_section(floor: dict[str, Any] | None) -> list[str]:
    """The report's *FID noise floor* section from the evaluate_solvers stage's noise-floor JSON."""
    if not floor or floor.get("floor") is None:
        note = (floor or {}).get("note", "no noise floor file given")
        return [f"Not computed ({note}): FID differences are shown without a significance mark.", ""]
    rows = [
        ["teacher vs teacher (two independent sample sets, disjoint seeds)", floor["samples"], floor["teacher_vs_teacher_fid"]],
        [f"teacher ({floor['sampler']}) vs reference, evaluation seeds", floor["samples"], floor["teacher_fid"]],
        [f"teacher ({floor['sampler']}) vs reference, second seeds", floor["samples"], floor["teacher_fid_second_seeds"]],
        [f"real images ({floor['held_out_split'].replace('_', '-')} split) vs reference", floor["held_out_samples"],
         floor["held_out_fid"]],
    ]
    parts = [
        f"For this protocol ({floor['samples']} samples per sampler, {floor['features']} features), the FID between "
        f"two independent sample sets of the teacher's reference sampler — evaluation seeds `{floor['seeds']}` "
        f"and `{floor['noise_floor_seeds']}` — is **{floor['floor']:.3g}**: that is the **noise floor**. FID "
        f"differences smaller than it are marked not significant (n.s.). The same sampler's FID moves by "
        f"{floor['teacher_fid_seed_difference']:.3g} between the two seed sets.",
        "",
        markdown_table(["FID", "samples", "value"], rows),
        "",
    ]
    if floor.get("teacher_fid_sd") is not None:
        parts += ["The `fid_sd` column of *All metrics* is each FID's bootstrap standard deviation (generated "
                  "features resampled with replacement, reference fixed; no new images): ±1.96 sd is a 95% interval. "
                  f"The teacher's: {floor['teacher_fid_sd']:.3g}.", ""]
    parts += [f"The held-out FID uses only {floor['held_out_samples']} real images (FID is biased upward at small "
              "sample counts), so it is a reference point for what real data scores, not a bound for the samplers.", ""]
    return parts


def stored_trajectories_table(costs: dict[str, dict[str, Any]]) -> str | None:
    """What the stored trajectories cost (from the chunks' commit records), per trajectories stage."""
    rows = []
    for stage, c in costs.items():
        stored = c.get("stored")
        if not isinstance(stored, dict):
            continue
        unknown = stored.get("unknown_trajectories", 0)
        rows.append([stage, stored.get("trajectories"), stored.get("teacher_forward_images") if not unknown else
                     f"≥ {stored.get('teacher_forward_images')} ({unknown} without a cost record)",
                     stored.get("wall_seconds"), ", ".join(stored.get("devices", [])),
                     ", ".join(stored.get("precisions", [])), c.get("teacher_forward_images")])
    if not rows:
        return None
    return markdown_table(["store (stage)", "trajectories", "teacher fwd (images)", "wall s", "device", "precision",
                           "teacher fwd of the last run"], rows)


def cost_table(costs: dict[str, dict[str, Any]]) -> str:
    rows = [
        [
            stage,
            c.get("wall_seconds"),
            c.get("teacher_forward_images"),
            c.get("student_forward_images"),
            c.get("student_backward_images"),
            c.get("forward_equivalents"),
            c.get("device"),
        ]
        for stage, c in costs.items()
    ]
    return markdown_table(
        ["stage", "wall s", "teacher fwd (images)", "student fwd", "student bwd", "fwd-equivalents", "device"], rows
    )


def _read_tsv(path: Path) -> dict[int, float]:
    """A DVCLive metric history (columns step, <name>) -> {step: value}; 'nan'/'inf' rows are skipped."""
    with open(path, newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if not header or header[0] != "step" or len(header) != 2:
            raise ParamError(f"loss log {path}: expected DVCLive's columns 'step' and the metric, found {header}")
        out = {}
        for step, value in reader:
            if math.isfinite(float(value)):
                out[int(step)] = float(value)
        return out


def read_loss_log(live_dir: Path) -> dict[str, tuple[list[float], list[float]]]:
    """A distill stage's DVCLive directory -> {step index: (kimg, loss)}.

    Reads ``plots/metrics/loss/<key>.tsv`` (one per step index, e.g. ``step2`` or ``N4/step2``) and
    ``plots/metrics/kimg.tsv`` (the x axis), joined on DVCLive's step; a step index not drawn in a
    log window (SFD-v's other N) has no row there.
    """
    metrics = Path(live_dir) / "plots" / "metrics"
    kimg_file, loss_dir = metrics / "kimg.tsv", metrics / "loss"
    files = sorted(loss_dir.rglob("*.tsv")) if loss_dir.is_dir() else []
    if not kimg_file.is_file() or not files:
        raise ParamError(f"loss log {live_dir}: expected a DVCLive directory with plots/metrics/kimg.tsv and "
                         f"plots/metrics/loss/<step index>.tsv (written by the distill stages' --live)")
    kimg = _read_tsv(kimg_file)
    curves: dict[str, tuple[list[float], list[float]]] = {}
    for f in files:
        points = [(kimg[step], v) for step, v in _read_tsv(f).items() if step in kimg]
        if points:
            xs, ys = zip(*points)
            curves[f.relative_to(loss_dir).with_suffix("").as_posix()] = (list(xs), list(ys))
    return curves


def plot_fid_vs_nfe(evaluation: dict[str, dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_sampler: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for key, m in evaluation.items():
        sampler, nfe = split_entry(key)
        if m.get("fid") is not None:
            by_sampler[sampler].append((nfe, m["fid"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for sampler, points in sorted(by_sampler.items()):
        points.sort()
        if sampler == "teacher":
            for nfe, fid in points:
                ax.axhline(fid, color="k", ls="--", lw=1, label=f"teacher ({nfe} NFE)")
            continue
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", label=sampler)
    ax.set_xlabel("NFE")
    ax.set_ylabel("FID (lower is better)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_losses(logs: dict[str, Path], out: Path) -> Path | None:
    if not logs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(logs), figsize=(5 * len(logs), 3.8), squeeze=False)
    for ax, (name, path) in zip(axes[0], logs.items()):
        for column, (kimg, loss) in read_loss_log(path).items():
            ax.plot(kimg, loss, label=column)
        ax.set_title(name)
        ax.set_xlabel("kimg (trajectories seen, thousands)")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def parse_named_paths(values: Sequence[str], option: str) -> dict[str, Path]:
    """['NAME=PATH', ...] -> {NAME: PATH}; every file must exist."""
    named = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ParamError(f"{option}: expected NAME=PATH, got {value!r}")
        if not Path(path).exists():
            raise ParamError(f"{option} {name}: {path} does not exist")
        named[name] = Path(path)
    return named


def merge_evaluations(paths: Sequence[Path]) -> dict[str, dict[str, Any]]:
    """One map over several evaluation JSONs (solvers, baselines, SFD); a key in two files is an error."""
    merged: dict[str, dict[str, Any]] = {}
    for path in paths:
        if not Path(path).is_file():
            raise ParamError(f"evaluation file {path} does not exist (run its evaluate stage first)")
        for key, metrics in json.loads(Path(path).read_text()).items():
            if key in merged:
                raise ParamError(f"evaluation key {key!r} appears in two evaluation files (second: {path})")
            merged[key] = metrics
    return merged


def grid_file(grids_dirs: Sequence[Path], entry: str) -> Path:
    """The entry's grid PNG in the first directory that has it (else the path it would have in the first)."""
    sampler, nfe = split_entry(entry)
    name = f"{sampler}_nfe{nfe}.png"
    for d in grids_dirs:
        if (Path(d) / name).is_file():
            return Path(d) / name
    return Path(grids_dirs[0]) / name if grids_dirs else Path(name)


def side_by_side(grids_dirs: Sequence[Path], panels: Sequence[str], out: Path) -> tuple[Path | None, list[str]]:
    """One PNG with the chosen grids next to each other, titled; returns (path, missing entries)."""
    present = [p for p in panels if grid_file(grids_dirs, p).is_file()]
    missing = [p for p in panels if p not in present]
    if not present:
        return None, missing
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(present), figsize=(3.2 * len(present), 3.6), squeeze=False)
    for ax, entry in zip(axes[0], present):
        ax.imshow(mpimg.imread(grid_file(grids_dirs, entry)), cmap="gray", interpolation="nearest")
        ax.set_title(entry.replace("/nfe", " · NFE "), fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out, missing


def about_this_run(*, teacher_dir: Path | None, data_dir: Path | None, inputs_dir: Path | None) -> list[str]:
    """Report lines naming what this run is about: the teacher and the data by file and content hash (the
    inputs stage's manifests), the teacher's architecture and the data's shape, classes and split."""
    from pipeline.config.inputs import EXTERNAL_INPUTS
    from pipeline.core.inputs import read_manifest

    def source(key: str) -> str | None:
        m = read_manifest(inputs_dir, key)
        if m is None or m.get("kind") == "none":
            return None
        return f"`{key}` = `{m['path']}` ({m['kind']}, {m['bytes']:,} bytes, xxh3 `{m['hash']}`)"

    lines = ["## This run", ""]
    config = {}
    if teacher_dir is not None and (teacher_dir / "model.json").is_file():
        config = json.loads((teacher_dir / "model.json").read_text())
    kind = describe_architecture(config) if config else "unknown (no model.json)"
    shape = config.get("data", {}).get("sample_shape")
    teacher_from = source("teacher.pretrained") or "trained by this run's teacher stage (`teacher.pretrained: null`)"
    lines.append(f"- **Teacher:** {teacher_from}; {kind}, samples {shape}.")
    if data_dir is not None and (data_dir / "dataset.json").is_file():
        info = json.loads((data_dir / "dataset.json").read_text())
        data_from = source("data.path") or f"`{info.get('provenance', {}).get('source', info.get('name'))}`"
        sizes = ", ".join(f"{k} {v:,}" for k, v in sorted(info.get("sizes", {}).items()))
        lines.append(f"- **Data:** {data_from}; images {info.get('sample_shape')}, "
                     f"{info.get('num_classes') or 'no'} classes, {sizes}.")
    for inp in EXTERNAL_INPUTS:
        if inp.key not in ("teacher.pretrained", "data.path") and (text := source(inp.key)):
            lines.append(f"- {text}")
    return [*lines, ""]


def _fid_sections(evaluation: dict[str, dict[str, Any]], noise_floor: dict[str, Any] | None, fid_png: Path, *,
                  paired: bool) -> list[str]:
    """The FID table (context when paired distances carry the claims), what lies within the noise floor, the plot,
    the noise floor itself and every metric."""
    parts = [
        "## FID by sampler and NFE",
        "",
        *(["The field's measure, kept as context (with its noise floor below): no claim of this report rests on FID.",
           ""] if paired else []),
        fid_pivot_table(evaluation),
        "",
    ]
    floor_value = None if not noise_floor else noise_floor.get("floor")
    lines = within_floor_lines(evaluation, floor_value)
    if lines:
        parts += [f"Differences smaller than the noise floor ({floor_value:.3g}) are not significant:", "", *lines, ""]
    parts += [
        f"![FID vs NFE]({fid_png.name})",
        "",
        "## FID noise floor",
        "",
        *noise_floor_section(noise_floor),
        "## All metrics",
        "",
        metrics_table(evaluation),
        "",
    ]
    return parts


def _cost_sections(costs: dict[str, dict[str, Any]]) -> list[str]:
    """What each stage's last run spent, and what the stored trajectories cost when they were generated."""
    parts = [
        "## Cost per stage",
        "",
        "What the **last run** of each stage spent (a stage that found its work cached spent little: a trajectories "
        "stage that found every chunk committed spent 0 teacher forwards). Counts are images through a network; "
        "forward-pass equivalents count a backward pass as two forwards. A method's cost is assembled from what the "
        "trajectories it consumed cost when they were generated, not from these rows (see the comparison).",
        "",
        cost_table(costs),
        "",
    ]
    stored = stored_trajectories_table(costs)
    if stored is not None:
        parts += ["What the stored trajectories cost when they were generated, from the chunks' commit records "
                  "(whichever run generated them):", "", stored, ""]
    return parts


def build_report(
    *,
    evaluation: dict[str, dict[str, Any]],
    cost_dir: Path,
    grids_dirs: Sequence[Path],
    out_dir: Path,
    loss_logs: dict[str, Path],
    params: ReportParams,
    merged_cost_path: Path | None = None,
    comparison: str | None = None,
    noise_floor: dict[str, Any] | None = None,  # the evaluate_solvers stage's noise-floor JSON
    extra_sections: Sequence[tuple[str, str]] = (),  # (title, markdown) after the comparison
    pd_sweep: dict[str, Any] | None = None,  # the PD budget sweep (pd_sweep.load_sweep), compared with this run's SFD
    pd_sweep_source: str | Path = PD_SWEEP_JSON,  # the file it came from
    teacher_hash: str | None = None,  # this run's teacher weights file hash (pd_sweep.teacher_file_hash)
    about: Sequence[str] = (),  # about_this_run's lines: which teacher and data
    headline: Sequence[str] = (),  # what this run resolves (pipeline.evaluation.claims.headline_lines)
    paired: str | None = None,  # the paired teacher-fidelity section (pipeline.evaluation.claims.paired_markdown)
) -> Path:
    """Write ``out_dir/report.md`` and its PNGs; also merge the per-stage costs into one JSON."""
    costs = load_cost_records(cost_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if merged_cost_path is not None:
        merged_cost_path.parent.mkdir(parents=True, exist_ok=True)
        merged_cost_path.write_text(json.dumps(costs, indent=2) + "\n")
    fid_png = plot_fid_vs_nfe(evaluation, out_dir / "fid_vs_nfe.png")
    loss_png = plot_losses(loss_logs, out_dir / "distill_loss.png")
    grids_png, missing = side_by_side(grids_dirs, params.panels, out_dir / "grids_side_by_side.png")

    parts = [
        "# SFD pipeline report",
        "",
        *about,
        "Every sampler is evaluated on the same seeds with the same feature extractor; the protocol "
        "(sample count, reference set, extractor) is the `evaluate` section of `params.yaml`.",
        "",
    ]
    if headline:
        parts += ["## Headline: what this run resolves", "", *headline, ""]
    if paired is not None:
        parts += ["## Teacher fidelity: paired distances to the teacher's samples", "", paired, ""]
    floor_value = None if not noise_floor else noise_floor.get("floor")
    parts += _fid_sections(evaluation, noise_floor, fid_png, paired=paired is not None)
    parts += _cost_sections(costs)
    if comparison:
        parts += ["## SFD vs the baselines: quality against distillation cost", "", comparison, ""]
    parts += baseline_sections(evaluation, pd_sweep, source=pd_sweep_source, teacher_hash=teacher_hash,
                               floor=floor_value)  # PD's compute to match SFD, SFDDM vs its control
    for title, section in extra_sections:
        parts += [f"## {title}", "", section, ""]
    if loss_png is not None:
        parts += ["## Distillation loss per student step", "", f"![distillation loss]({loss_png.name})", ""]
    parts += ["## Samples (same seeds)", ""]
    if grids_png is not None:
        parts += [f"![grids]({grids_png.name})", ""]
    if missing:
        parts += [f"Not evaluated in this run (no grid): {', '.join(missing)}.", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(parts))
    return report
