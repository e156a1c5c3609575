"""How much bf16/fp16 teacher forwards change the stored trajectory states, against fp32 (CPU).

    python bench/precision_cpu.py --teacher models/teacher --seeds 0-255 [--params params.yaml]

The teacher's trajectories of the params' ``trajectories`` section (solver, M, schedule) are computed
for the seeds with ``precision`` fp32, bf16 and fp16 (the forwards under autocast; the solver and
the stored states stay float32, exactly as the trajectories stage stores them), and for each state
y_1..y_{N-1} the difference to fp32 is reported: max and mean absolute difference, and the relative
difference ||y - y_fp32|| / ||y_fp32|| (per trajectory, then the mean and max over trajectories).
Results: docs/scale-out.md.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from pipeline.config.params import load_params
from pipeline.diffusion.seeds import parse_seeds
from pipeline.trajectories.generation import load_trajectory_teacher, teacher_trajectories
from pipeline.trajectories.spec import trajectory_specs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="models/teacher")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--seeds", default="0-255")
    ap.add_argument("--out", default=None, help="JSON file for the numbers")
    args = ap.parse_args()
    torch.set_num_threads(1)
    params = load_params(args.params)
    teacher, denoiser, teacher_hash = load_trajectory_teacher(None, args.teacher)
    seeds = parse_seeds(args.seeds)
    results: dict[str, object] = {"teacher": args.teacher, "seeds": args.seeds, "torch": torch.__version__}
    states = {}
    for precision in ("fp32", "bf16", "fp16"):
        section = params.trajectories
        object.__setattr__(section, "precision", precision)
        (spec,) = trajectory_specs(section, teacher_hash=teacher_hash, num_classes=teacher.num_classes,
                                   sample_shape=teacher.sample_shape)[:1]
        start = time.perf_counter()
        try:
            out = teacher_trajectories(denoiser, spec, seeds)
        except Exception as e:  # fp16 autocast may be unsupported on a CPU torch
            results[precision] = {"error": f"{type(e).__name__}: {e}"}
            continue
        seconds = time.perf_counter() - start
        states[precision] = torch.from_numpy(out["states"]).double()
        entry: dict[str, object] = {"seconds": round(seconds, 2), "traj_per_s": round(len(seeds) / seconds, 1),
                                    "key": spec.key}
        if precision != "fp32":
            ref, y = states["fp32"], states[precision]
            per_state = []
            for n in range(ref.shape[1]):
                d = (y[:, n] - ref[:, n]).flatten(1)
                r = ref[:, n].flatten(1)
                rel = d.norm(dim=1) / r.norm(dim=1)
                per_state.append({"state": n + 1, "max_abs": float(d.abs().max()), "mean_abs": float(d.abs().mean()),
                                  "rel_mean": float(rel.mean()), "rel_max": float(rel.max()),
                                  "ref_abs_mean": float(r.abs().mean())})
            entry["states"] = per_state
        results[precision] = entry
        print(precision, json.dumps(entry, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
