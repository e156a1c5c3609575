"""PD budget sweep: progressive distillation's forward-pass equivalents to reach SFD's NFE-2 FID.

    .venv/bin/python bench/pd_sweep.py [--params params.yaml] [--teacher models/teacher] [--data data/digits]
        [--feature-net models/feature_net] [--sfd-eval metrics/eval.json] [--multipliers 1 4 16 64]
        [--work .cache/pd_sweep] [--out bench/pd_sweep.json]
    .venv/bin/python bench/pd_sweep.py --merge A.json B.json [...] --out bench/pd_sweep.json

Runs PD via the pipeline's functions (pipeline.evaluation.pd_sweep_run.run_pd_sweep) with the
``baseline_pd`` params and ``updates_per_round`` x each multiplier, rounds down to NFE 2 (the 2 -> 1
round is skipped), evaluates each NFE-2 student with the ``evaluate`` protocol and stops at the
first multiplier whose FID reaches SFD's NFE-2 FID (read from ``--sfd-eval``, key ``sfd/nfe2``;
``--no-stop`` runs them all). Writes ``--out`` after every point (the report reads it) and prints
the markdown table. Outside the default ``dvc repro``: x64 alone is about an hour on one CPU core
of the embedded default. Multipliers run in separate processes (``--multipliers 64`` in one,
``--multipliers 1 4 16`` in another, each with its own ``--out``) combine with ``--merge``, which
refuses sweeps of different teachers, PD settings or evaluation protocols.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config.params import load_params  # noqa: E402
from pipeline.evaluation.pd_sweep import MULTIPLIERS, merge_sweeps, pd_sweep_markdown  # noqa: E402
from pipeline.evaluation.pd_sweep_run import run_pd_sweep  # noqa: E402


def fail(message: str) -> None:
    """One line on stderr and exit code 2, as the stages report the project's errors."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--teacher", default="models/teacher")
    ap.add_argument("--data", default="data/digits")
    ap.add_argument("--feature-net", default="models/feature_net")
    ap.add_argument("--sfd-eval", default="metrics/eval.json", help="evaluation JSON holding sfd/nfe2")
    ap.add_argument("--sfd-fid", type=float, default=None, help="SFD's NFE-2 FID (instead of --sfd-eval)")
    ap.add_argument("--multipliers", type=int, nargs="+", default=list(MULTIPLIERS))
    ap.add_argument("--no-stop", action="store_true", help="run every multiplier even after PD reached SFD")
    ap.add_argument("--work", default=".cache/pd_sweep")
    ap.add_argument("--out", default="bench/pd_sweep.json")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="merge these sweep files into --out (runs nothing)")
    args = ap.parse_args()

    def sfd_fid_given() -> float:
        return args.sfd_fid if args.sfd_fid is not None else json.loads(Path(args.sfd_eval).read_text())["sfd/nfe2"]["fid"]

    if args.merge:  # against --sfd-fid or the --sfd-eval file when one is given, else the first sweep's SFD FID
        given = args.sfd_fid is not None or Path(args.sfd_eval).is_file()
        sweeps = []
        for f in args.merge:
            if not Path(f).is_file():
                fail(f"--merge {f}: no such file")
            sweeps.append(json.loads(Path(f).read_text()))
            if not sweeps[-1].get("teacher_file_hash"):
                fail(f"--merge {f}: records no teacher_file_hash (written before the script recorded it); "
                     "without it the sweeps' teachers cannot be compared")
        merged = merge_sweeps(sweeps, sources=args.merge, sfd_fid=sfd_fid_given() if given else None)
        run_keys = ("command", "when", "machine", "device", "loadavg_1min_at_start")  # each input run's, not the first's
        merged["runs"] = {f: {k: s.get(k) for k in run_keys} for f, s in zip(args.merge, sweeps)}
        for k in ("command", "machine", "loadavg_1min_at_start"):
            merged.pop(k, None)
        merged["when"] = ", ".join(dict.fromkeys(str(s.get("when")) for s in sweeps))
        if given:
            merged["sfd_fid_source"] = args.sfd_eval if args.sfd_fid is None else "--sfd-fid"
        Path(args.out).write_text(json.dumps(merged, indent=2) + "\n")
        print(pd_sweep_markdown(merged))
        return

    params = load_params(args.params)
    params.apply_threads()
    sfd_fid = sfd_fid_given()
    command = " ".join(["python", *sys.argv])
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = os.getloadavg()[0]

    def write(result: dict) -> None:
        result.update({"command": command, "when": started, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                       "loadavg_1min_at_start": round(load, 2), "sfd_fid_source": args.sfd_eval if args.sfd_fid is None else "--sfd-fid"})
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    def on_point(result: dict) -> None:
        write(result)
        p = result["points"][-1]
        print(f"x{p['multiplier']}: PD NFE-2 FID {p['fid_nfe2']:.4f} at {p['forward_equivalents']:.4g} FE "
              f"({p['ratio_to_sfd']:.2f}x SFD), {p['train_seconds']:.0f} s train", flush=True)

    result = run_pd_sweep(params, teacher_dir=args.teacher, data_dir=args.data, feature_net_dir=args.feature_net,
                          sfd_fid=sfd_fid, work_dir=args.work, multipliers=args.multipliers,
                          stop_when_reached=not args.no_stop, on_point=on_point)
    write(result)
    print(pd_sweep_markdown(json.loads(Path(args.out).read_text())))


if __name__ == "__main__":
    main()
