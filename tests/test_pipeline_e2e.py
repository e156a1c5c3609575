"""The real pipeline (this repository's dvc.yaml and stages) on a tiny params set in a temporary git repo.

`dvc repro` runs every stage; `dvc exp run -S loss=l2` re-runs the distillation stages and what
depends on them but never `teacher` or `trajectories`; a second `dvc repro` is a no-op; going
back to l1 restores from the run-cache; a larger `trajectories.seeds` range generates only the
new chunks. A couple of minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ALL_STAGES = {
    "inputs", "data", "feature_net", "teacher", "trajectories@trajectories", "trajectories@trajectories_v",
    "distill@distill", "distill@distill_v", "trajectories_stage2", "distill@distill_stage2", "baseline_pd", "baseline_sfddm", "baseline_vanilla",
    "evaluate_solvers", "evaluate_baselines", "evaluate", "report",
}  # fmt: skip
LOSS_STAGES = {"inputs", "distill@distill", "distill@distill_v", "trajectories_stage2", "distill@distill_stage2", "evaluate",
               "report"}
NOTHING = {"inputs"}  # the inputs stage always runs (a hash check of params.yaml's files; none here)


def tiny_params() -> dict:
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["feature_net"].update(channels=8, feature_dim=16, epochs=2, min_accuracy=0.0)
    p["teacher"].update(
        network={"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": []},
        steps=30, batch_size=32, lr_rampup_steps=5, checkpoint_every=15, pretrained=None,
    )  # fmt: skip  (a tiny teacher trained by the stage, not the shipped teachers/digits)
    for name, seeds in (("trajectories", "0-191"), ("trajectories_v", "0-63"), ("trajectories_stage2", "0-63")):
        p[name].update(seeds=seeds, chunk_size=64, batch_size=64)
    p["trajectories_v"]["schedule"]["num_steps"] = [4, 5]
    for name in ("distill", "distill_v", "distill_stage2"):
        p[name].update(kimg=0.192, batch_size=32, checkpoint_every_kimg=0.096, log_every_kimg=0.064)
    p["baseline_pd"].update(start_steps=4, updates_per_round=2, batch_size=8)
    p["baseline_sfddm"].update(teacher_steps=8, updates=2, batch_size=8)
    p["baseline_vanilla"].update(updates=2, batch_size=8)
    p["evaluate"].update(
        seeds="1000000-1000099", grid_seeds=16, batch_size=100, solvers=["euler", "dpmpp3m"], nfes=[2],
        reference={"solver": "heun", "num_steps": 4, "t_min": 0.002, "t_max": 80.0, "rho": 7.0, "append_zero": True},
        kid_subsets=5, kid_subset_size=50, noise_floor_seeds="2000000-2000099", bootstrap=10,
    )  # fmt: skip
    p["report"]["panels"] = ["teacher/nfe7", "dpmpp3m/nfe2", "sfd/nfe2", "sfd-stage2/nfe1"]
    return p


def run(args: list[str], cwd: Path, stdout_only: bool = False) -> str:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` = this env
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
    }  # fmt: skip
    cmd = [sys.executable, "-m", "dvc", *args[1:]] if args[0] == "dvc" else args
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(args)} failed ({r.returncode}):\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}"
    return r.stdout if stdout_only else r.stdout + r.stderr


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    from byo import make_repo

    return make_repo(tmp_path_factory.mktemp("pipeline"), tiny_params())


def test_repro_then_loss_experiment_reruns_only_what_the_loss_touches(repo):
    first = run(["dvc", "repro"], repo)
    assert stages_run(first) == ALL_STAGES
    # the report stage ends the run by printing its headline: one line per headline comparison, a verdict in each
    printed = first.split("Headline of this run (what its numbers resolve):", 1)[1].split("report: ", 1)[0]
    claims = [line for line in printed.splitlines() if line.startswith("- SFD")]
    assert claims and all(("is better than" in c) != ("unresolved" in c) for c in claims), printed
    evaluation = {}
    for name in ("eval_solvers", "eval_baselines", "eval"):
        evaluation.update(json.loads((repo / "metrics" / f"{name}.json").read_text()))
    for key in ("teacher/nfe7", "euler/nfe2", "dpmpp3m/nfe2", "sfd/nfe2", "sfd-v/nfe2", "sfd-v/nfe3",
                "sfd-stage2/nfe1", "pd/nfe1", "pd/nfe2", "sfddm/nfe2", "sfddm_control/nfe2", "vanilla/nfe2"):  # fmt: skip
        assert key in evaluation, f"{key} not evaluated: {sorted(evaluation)}"
        assert evaluation[key]["fid"] >= 0
    for key, m in evaluation.items():  # the paired metric for every entry, on all 100 seeds; KID with its sd
        assert m["paired_seeds"] == 100 and m["paired_pixel_rms"] >= 0 and m["paired_feature_l2_se"] >= 0, key
        assert m["kid_std"] > 0, key
    assert evaluation["teacher/nfe7"]["paired_pixel_rms"] < 1e-3  # the reference itself (float16 round-off)
    assert evaluation["euler/nfe2"]["paired_pixel_rms"] > 0.01
    comparison = json.loads((repo / "metrics" / "comparison.json").read_text())
    paired = comparison["paired"]
    assert paired["reference_sampler"] == "teacher/nfe7" and paired["seeds"] == 100 and paired["resamples"] == 1000
    assert set(paired["entries"]) == set(evaluation)
    pairs = {(c["a"], c["b"]): c for c in paired["comparisons"]}
    for a, b in (("pd/nfe2", "sfd/nfe2"), ("vanilla/nfe2", "sfd/nfe2"), ("dpmpp3m/nfe2", "sfd/nfe2"),
                 ("pd/nfe1", "sfd-stage2/nfe1"), ("sfddm/nfe2", "sfddm_control/nfe2")):
        ci = pairs[(a, b)]["pixel"]
        assert ci["ci_low"] <= ci["difference"] <= ci["ci_high"] and ci["resolved"] == (ci["ci_low"] > 0 or ci["ci_high"] < 0)
        assert pairs[(a, b)]["verdict"]["pixel"] in ("better", "worse", "unresolved")
    assert comparison["entries"]["pd/nfe2"]["paired_vs"]["b"] == "sfd/nfe2"
    assert comparison["headline"]["basis"] == "paired pixel distance"
    headline = json.loads((repo / "metrics" / "headline.json").read_text())
    assert headline["paired_pixel"]["sfd/nfe2"]["pixel_rms"] == paired["entries"]["sfd/nfe2"]["pixel_rms"]
    assert {"ci_low", "ci_high", "difference"} == set(headline["paired_pixel"]["pd/nfe2_vs_sfd/nfe2"])
    report = (repo / "reports" / "report.md").read_text()
    assert "| sfd |" in report and "Cost per stage" in report
    assert "## Headline: what this run resolves" in report and "## Teacher fidelity: paired distances" in report
    for png in ("fid_vs_nfe.png", "distill_loss.png", "grids_side_by_side.png", "comparison.png"):
        assert (repo / "reports" / png).stat().st_size > 1000
    costs = json.loads((repo / "metrics" / "cost.json").read_text())
    assert costs["trajectories"]["teacher_forward_images"] == 192 * 12  # DPM++(3M), M=3, N=4: 12 NFE each
    assert json.loads((repo / "metrics" / "distill.json").read_text())["loss"] == "l1"
    plots = json.loads(run(["dvc", "plots", "show", "--json"], repo, stdout_only=True))
    assert plots["data"]["SFD stage 1 loss"][0]["type"] == "vega" and not plots.get("errors")
    assert plots["data"]["reports/grids_side_by_side.png"][0]["type"] == "image"

    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "baseline run"], repo)
    exp = run(["dvc", "exp", "run", "-S", "loss=l2"], repo)
    assert stages_run(exp) == LOSS_STAGES
    assert json.loads((repo / "metrics" / "distill.json").read_text())["loss"] == "l2"
    assert json.loads((repo / "metrics" / "distill_stage2.json").read_text())["loss"] == "l2"

    again = run(["dvc", "repro"], repo)
    assert stages_run(again) == NOTHING, again

    # Back to l1: every changed stage is restored from DVC's run-cache, none trains again.
    back = run(["dvc", "exp", "run", "-S", "loss=l1"], repo)
    assert stages_run(back) == NOTHING, back
    assert "Stage 'distill@distill' is cached - skipping run" in back
    assert json.loads((repo / "metrics" / "distill.json").read_text())["loss"] == "l1"


def test_rerunning_the_trajectory_stage_keeps_the_sfd_cost(repo):
    """`dvc repro -f -s trajectories` on a complete store spends 0 teacher forwards; SFD's cost stands."""
    def comparison() -> dict:
        return json.loads((repo / "metrics" / "comparison.json").read_text())

    before = comparison()
    sfd = before["entries"]["sfd/nfe2"]
    assert sfd["teacher_forward_images"] == 192 * 12  # its 192 trajectories, 12 teacher forwards each
    assert sfd["marginal"]["teacher_forward_images"] == 0  # given the cache
    assert before["noise_floor"]["floor"] > 0 and before["noise_floor"]["samples"] == 100
    out = run(["dvc", "repro", "-f", "-s", "trajectories@trajectories"], repo)
    assert stages_run(out) == {"trajectories@trajectories"}
    cost = json.loads((repo / "metrics" / "cost" / "trajectories.json").read_text())
    assert cost["teacher_forward_images"] == 0 and cost["stored"]["teacher_forward_images"] == 192 * 12
    out = run(["dvc", "repro"], repo)
    assert stages_run(out) == {"inputs", "report"}  # the store did not change: nothing distils again
    assert comparison()["entries"]["sfd/nfe2"] == sfd
    assert comparison()["headline"]["reference_forward_equivalents"] == before["headline"]["reference_forward_equivalents"]


def test_a_larger_seed_range_generates_only_the_new_chunks(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["trajectories"]["seeds"] = "0-319"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro", "-s", "trajectories@trajectories"], repo)
    assert stages_run(out) == {"trajectories@trajectories"}
    summary = json.loads((repo / "metrics" / "trajectories.json").read_text())
    assert summary["chunks_reused"] == 3 and summary["chunks_generated"] == 2
    assert summary["trajectories_generated"] == 128
