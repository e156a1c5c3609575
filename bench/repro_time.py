"""Time `make repro` on a fresh clone: the install, every stage's own wall time, and the whole run.

    python bench/repro_time.py --work /tmp/sfd-fresh --out bench/repro_time.json

Clones this repository's HEAD into --work (removed first), runs `make install` and then `make repro`
(which finds the environment installed), each timed; reads every stage's wall seconds from its cost
record (metrics/cost/<stage>.json) and the headline the run printed (metrics/headline.json,
metrics/comparison.json's statements). With --venv PATH the clone links that environment instead of
installing (to time the pipeline alone). A benchmark, not a test: the numbers depend on the machine and
on what else runs on it; the load average before and after is recorded with them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.core.machine import describe_machine  # noqa: E402


def timed(cmd: list[str], cwd: Path, log: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command and its children): on a loaded machine the CPU seconds of a
    single-threaded pipeline are close to what the wall time would be on an idle one."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                           env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}); see {log}")
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def stage_seconds(clone: Path) -> dict[str, float]:
    out = {}
    for path in sorted((clone / "metrics" / "cost").glob("*.json")):
        record = json.loads(path.read_text())
        out[record.get("stage", path.stem)] = float(record.get("wall_seconds", 0.0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/sfd-fresh"))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "repro_time.json")
    ap.add_argument("--venv", type=Path, default=None, help="link this environment instead of installing")
    ap.add_argument("--note", default="", help="free text recorded with the numbers (e.g. what else ran)")
    a = ap.parse_args()

    if a.work.exists():
        shutil.rmtree(a.work)
    subprocess.run(["git", "clone", "-q", str(REPO), str(a.work)], check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=a.work, capture_output=True, text=True).stdout.strip()
    load_before = os.getloadavg()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if a.venv is not None:
        (a.work / ".venv").symlink_to(a.venv.resolve())
        install, install_cpu = 0.0, 0.0
        # `make repro` re-installs when the stamp is older than pyproject.toml/constraints.txt: a fresh stamp
        stamp = a.work / ".venv" / ".installed"
        if stamp.exists():
            stamp.touch()
    else:
        install, install_cpu = timed(["make", "install"], a.work, a.work.parent / f"{a.work.name}-install.log")
    repro, repro_cpu = timed(["make", "repro"], a.work, a.work.parent / f"{a.work.name}-repro.log")
    stages = stage_seconds(a.work)
    headline = json.loads((a.work / "metrics" / "headline.json").read_text())
    result = {
        "date": started,
        "commit": commit,
        "machine": describe_machine(),
        "command": f"git clone {REPO} {a.work} && make install && make repro"
                   + (f" (environment linked from {a.venv})" if a.venv else ""),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "install_seconds": round(install, 1),
        "repro_seconds": round(repro, 1),
        "total_seconds": round(install + repro, 1),
        "install_cpu_seconds": round(install_cpu, 1),
        "repro_cpu_seconds": round(repro_cpu, 1),
        "stage_seconds": {k: round(v, 1) for k, v in stages.items()},
        "stages_sum_seconds": round(sum(stages.values()), 1),
        "dvc_and_startup_seconds": round(repro - sum(stages.values()), 1),
        "headline": headline,
        "note": a.note,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"install {install:.0f} s + repro {repro:.0f} s = {install + repro:.0f} s on {result['machine']['cpu']} "
          f"(CPU seconds: install {install_cpu:.0f}, repro {repro_cpu:.0f})")
    for name, seconds in sorted(stages.items(), key=lambda kv: -kv[1]):
        print(f"  {name:22s} {seconds:7.1f} s")


if __name__ == "__main__":
    main()
