"""Benchmark the embedded default: wall time of the data, feature_net, teacher and evaluate stages,
the teacher's FID and label accuracy, and the FID-vs-NFE table of the training-free solvers.

    python bench/bench_embedded_default.py --work /tmp/sfd-bench-default --out bench/embedded_default.md

Runs each stage as its own process (``python -m stages.NAME``) in --work with the default
params (or --params), optionally pinned to CPU cores with taskset (--cores 0,1). A benchmark,
not a test: numbers depend on the machine and on whatever else runs on it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

DEFAULT_PARAMS = {"data": {"dataset": "digits"}, "teacher": {}, "feature_net": {}, "evaluate": {}}


def run_stage(name: str, args: list[str], cores: str | None, env: dict[str, str]) -> float:
    cmd = [sys.executable, "-m", f"stages.{name}", *args]
    if cores:
        cmd = ["taskset", "-c", cores, *cmd]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/sfd-bench-default"))
    ap.add_argument("--out", type=Path, default=Path("bench/embedded_default.md"))
    ap.add_argument("--params", type=Path, default=None, help="params.yaml to use (default: built-in defaults)")
    ap.add_argument("--cores", default=None, help="taskset core list, e.g. 0,1")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the stages")
    ap.add_argument("--skip", nargs="*", default=[], help="stages to skip (reuse their outputs in --work)")
    ap.add_argument("--recorded", nargs="*", default=[], help="NAME=SECONDS wall times of skipped stages measured earlier")
    ap.add_argument("--note", default="", help="free text for the report (e.g. contention)")
    a = ap.parse_args()

    repo = Path(__file__).resolve().parents[1]
    a.work.mkdir(parents=True, exist_ok=True)
    params = a.work / "params.yaml"
    if a.params is not None:
        shutil.copy(a.params, params)
    elif not params.exists():
        params.write_text(yaml.safe_dump(DEFAULT_PARAMS))
    env = {**os.environ, "PYTHONPATH": str(repo)}
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    w = a.work
    stages = {
        "data": ["--params", str(params), "--out", str(w / "data/digits")],
        "feature_net": ["--params", str(params), "--data", str(w / "data/digits"), "--out", str(w / "models/feature_net"),
                        "--metrics", str(w / "metrics/feature_net.json")],
        "teacher": ["--params", str(params), "--data", str(w / "data/digits"), "--out", str(w / "models/teacher"),
                    "--state", str(w / "checkpoints/teacher"), "--metrics", str(w / "metrics/teacher.json"),
                    "--cost", str(w / "metrics/cost/teacher.json")],
        "evaluate": ["--params", str(params), "--teacher", str(w / "models/teacher"), "--feature-net",
                     str(w / "models/feature_net"), "--data", str(w / "data/digits"), "--out", str(w / "metrics/eval.json"),
                     "--grids", str(w / "reports/grids"), "--cost", str(w / "metrics/cost/evaluate.json")],
    }
    times = {n: float(t) for n, t in (r.split("=") for r in a.recorded)}
    for name, args in stages.items():
        if name in a.skip:
            continue
        if name == "teacher":
            shutil.rmtree(w / "checkpoints/teacher", ignore_errors=True)  # time a run from scratch
        times[name] = run_stage(name, args, a.cores, env)
        print(f"{name}: {times[name]:.1f} s", flush=True)

    results = json.loads((w / "metrics/eval.json").read_text())
    fnet = json.loads((w / "metrics/feature_net.json").read_text())
    teacher = json.loads((w / "metrics/teacher.json").read_text())
    eval_params = yaml.safe_load(params.read_text()).get("evaluate", {})
    lines = [
        "# Embedded default: stage wall times, teacher quality, training-free solvers",
        "",
        f"Command: `python bench/bench_embedded_default.py {' '.join(sys.argv[1:])}`",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs visible, cores used: {a.cores or 'all'}, "
        f"OMP_NUM_THREADS={a.threads or 'default'}. {a.note}",
        "",
        "| stage | wall time (s) |",
        "|---|---|",
        *[f"| {k} | {v:.1f} |" for k, v in times.items()],
        "",
        f"feature_net held-out accuracy: {fnet['held_out_accuracy']:.4f} ({fnet['held_out_count']} images). "
        f"Teacher: {teacher['steps']} steps, loss {teacher['first_loss']:.4f} -> {teacher['final_loss']:.4f}.",
        "",
        f"Protocol: {eval_params.get('seeds', '1000000-1001999')} evaluation seeds (one sample each, labels from "
        "the seed), reference = the digits train split (1,437 images), features = the feature_net classifier's "
        "penultimate layer (128-d) through torch-fidelity; KID x 1000.",
        "",
        "| sampler | FID | KID x1000 | precision | recall | label accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for key in sorted(results, key=lambda k: (k.split("/")[0] != "teacher", k.split("/")[0], int(k.split("nfe")[1]))):
        m = results[key]
        acc = "-" if m["label_accuracy"] is None else f"{m['label_accuracy']:.3f}"
        lines.append(f"| {key} | {m['fid']:.3f} | {1000 * m['kid']:.2f} | {m['precision']:.3f} | {m['recall']:.3f} | {acc} |")
    solvers = sorted({k.split("/")[0] for k in results if not k.startswith("teacher")})
    nfes = sorted({int(k.split("nfe")[1]) for k in results if not k.startswith("teacher")})
    lines += ["", "FID vs NFE (training-free solvers, polynomial rho=7, t_min 0.006, t_max 80):", "",
              "| solver | " + " | ".join(f"NFE {k}" for k in nfes) + " |", "|---|" + "---|" * len(nfes)]
    for s in solvers:
        lines.append(f"| {s} | " + " | ".join(f"{results[f'{s}/nfe{k}']['fid']:.2f}" if f"{s}/nfe{k}" in results else "-"
                                               for k in nfes) + " |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
