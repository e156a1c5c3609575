"""Retrain the shipped default teacher (teachers/digits) from params.yaml and compare, or regenerate it.

    python bench/teacher_retrain.py                  # retrain into a scratch folder, compare, record
    python bench/teacher_retrain.py --write          # make the retrained weights the shipped ones

The recipe is params.yaml's `teacher` section with `pretrained` cleared (pipeline.teachers.shipped). On a
machine with the same signature as the one in teachers/digits/training.json, at `threads: 1`, the
retrained weights have the shipped hash; on another CPU they agree to round-off (the largest weight
difference is recorded). About ten minutes on two CPU cores. The result is written to
bench/teacher_retrain.json with the machine and the command.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config.params import load_params  # noqa: E402
from pipeline.core.machine import describe_machine  # noqa: E402
from pipeline.teachers import shipped  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--shipped", type=Path, default=REPO / "teachers" / "digits")
    ap.add_argument("--steps", type=int, default=None, help="fewer steps than the recipe (a quick look; no hash match)")
    ap.add_argument("--write", action="store_true", help="replace the shipped folder by the retrained one")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "teacher_retrain.json")
    a = ap.parse_args()

    params = load_params(a.params)
    params.apply_threads()
    differences = [] if a.write else shipped.recipe_differences(params.required("teacher"), a.shipped)
    if differences:
        raise SystemExit("params.yaml's teacher recipe is not the shipped one: " + "; ".join(differences))
    with tempfile.TemporaryDirectory(prefix="sfd-teacher-") as tmp:
        start = time.perf_counter()
        summary = shipped.retrain(params, tmp, steps=a.steps)
        seconds = time.perf_counter() - start
        machine = describe_machine()
        record = {"summary": summary, "machine": machine, "threads": params.threads,
                  "command": "python bench/teacher_retrain.py" + (" --write" if a.write else ""),
                  "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seconds": round(seconds, 1)}
        if a.write:
            a.shipped.mkdir(parents=True, exist_ok=True)
            for name in ("model.safetensors", "model.json"):
                shutil.copyfile(Path(tmp) / name, a.shipped / name)
            training = {**summary, "machine": machine, "threads": params.threads, "command": record["command"],
                        "date": record["date"]}
            (a.shipped / shipped.TRAINING_RECORD).write_text(json.dumps(training, indent=2) + "\n")
            print(f"wrote {a.shipped} (weights {summary['weights_hash']}, {seconds:.0f} s)")
        else:
            _, trained = shipped.read_shipped(a.shipped)
            record["comparison"] = shipped.weight_differences(a.shipped, tmp)
            record["shipped_machine"] = trained.get("machine")
            record["same_signature"] = trained.get("machine", {}).get("signature") == machine["signature"]
            print(json.dumps(record["comparison"], indent=2))
    a.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{a.out}: {seconds:.0f} s on {machine['cpu']}")


if __name__ == "__main__":
    main()
