"""The DVC-native experiment workflow on this repository's dvc.yaml at tiny sizes, as the README's
"Experiments, the queue and sharing" section runs it.

One producer repository (tests/byo.py: the pipeline in a fresh git + DVC repository, params.yaml scaled down)
with a bare Git remote and a local DVC remote runs `dvc repro` once; on it:
- the queue: `-S loss=l2` and a larger `trajectories.seeds` range queued, `dvc exp run --run-all -j 2`; both
  appear in `dvc exp show` with their metrics, and no queued experiment generated a trajectory chunk that the
  baseline's store already held (the trajectory stage's cost record and summary of each experiment);
- live logging: the queue runs with a Studio token pointing at a local HTTP server standing in for DVC Studio;
  DVCLive inside `dvc exp run` posts each training stage's points there under the experiment's name and
  baseline revision, while the stage runs (several posts per stage, steps increasing);
- artifacts: `gto register sfd`, then `dvc artifacts get` of the student from the Git remote in a plain folder;
- sharing: `dvc exp push origin EXP`, and in a second clone `dvc exp pull origin EXP`, `dvc exp apply EXP`:
  `dvc repro` there runs nothing but the always-run `inputs` hash check.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
from fnmatch import fnmatch
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from byo import ROOT, make_repo, run, scale_down

pytestmark = pytest.mark.slow  # one tiny `dvc repro` and a queue of two experiments: 4-6 min on 2 shared cores

SEEDS = "1000000-1000015"  # scale_down's range: 2 chunks of 8
MORE_SEEDS = "1000000-1000023"  # the queued larger range: 1 chunk more
NFE_PER_TRAJECTORY = 12  # DPM-Solver++(3M), M = 3, N = 4: 3 intervals x 4 teacher calls
TRAINING_STAGES = {"distill", "distill_v", "distill_stage2"}


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


class FakeStudio:
    """An HTTP server standing in for DVC Studio's /api/live endpoint: it keeps every posted JSON body."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        events = self.events

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                events.append({"path": self.path, **json.loads(body or b"{}")})
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def env(self) -> dict[str, str]:
        return {"DVC_STUDIO_TOKEN": "test-token", "DVC_STUDIO_URL": self.url,
                "DVC_STUDIO_REPO_URL": "https://git.example.com/team/sfd"}  # fmt: skip

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def exp_show(repo: Path) -> dict[str, dict]:
    """`dvc exp show --json` as {name: {"rev", "metrics", "params"}} for the baseline commit and its experiments."""
    out: dict[str, dict] = {}

    def entry(e: dict) -> dict:
        data = e.get("data") or {}
        return {"rev": e["rev"], "metrics": {k: v.get("data") for k, v in (data.get("metrics") or {}).items()},
                "params": (data.get("params") or {}).get("params.yaml", {}).get("data", {})}

    for row in json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout):
        if row["rev"] == "workspace":
            continue
        out["baseline"] = entry(row)
        for exp in row.get("experiments") or []:
            for rev in exp["revs"]:
                out[rev["name"]] = entry(rev)
    return out


def read_at(repo: Path, rev: str, path: str) -> dict:
    """An output of ``rev`` (a commit or an experiment), read from the DVC cache by dvc.api."""
    import dvc.api

    return json.loads(dvc.api.read(path, repo=str(repo), rev=rev))


def lock_at(repo: Path, rev: str) -> dict:
    return yaml.safe_load(run(["git", "show", f"{rev}:dvc.lock"], repo).stdout)["stages"]


@pytest.fixture(scope="module")
def producer(tmp_path_factory) -> dict:
    """The tiny pipeline run once and pushed: {"repo", "git_remote", "dvc_remote", "baseline"}."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    tmp = tmp_path_factory.mktemp("experiments")
    git_remote, dvc_remote = tmp / "origin.git", tmp / "dvc-remote"
    run(["git", "init", "-q", "--bare", str(git_remote)], tmp)
    repo = make_repo(tmp / "producer", scale_down(yaml.safe_load((ROOT / "params.yaml").read_text()), {}))
    run(["git", "remote", "add", "origin", str(git_remote)], repo)
    run(["dvc", "remote", "add", "-d", "local", str(dvc_remote)], repo)
    run(["dvc", "repro"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "baseline run"], repo)
    run(["dvc", "push"], repo)
    run(["git", "push", "-q", "-u", "origin", "HEAD"], repo)
    baseline = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    return {"repo": repo, "git_remote": git_remote, "dvc_remote": dvc_remote, "baseline": baseline, "tmp": tmp}


@pytest.fixture(scope="module")
def queued(producer) -> dict:
    """Two experiments queued and run by two workers, DVC Studio's live endpoint faked on localhost."""
    repo = producer["repo"]
    run(["dvc", "exp", "run", "--queue", "--name", "l2", "-S", "loss=l2"], repo)
    run(["dvc", "exp", "run", "--queue", "--name", "more-seeds", "-S", f"trajectories.seeds={MORE_SEEDS}"], repo)
    studio = FakeStudio()
    try:
        out = run(["dvc", "exp", "run", "--run-all", "-j", "2"], repo, extra_env=studio.env(), timeout=900)
    except BaseException:  # the workers exit by themselves once the queue is empty; not after a timeout
        run(["dvc", "queue", "stop", "--kill"], repo, check=False)
        raise
    finally:
        studio.close()
    (producer["tmp"] / "studio_events.json").write_text(json.dumps(studio.events, indent=1))  # to read when a test fails
    return {"output": out.stdout + out.stderr, "events": studio.events, "exps": exp_show(repo)}


def test_queued_experiments_show_with_metrics_and_reuse_every_stored_chunk(producer, queued):
    repo, baseline = producer["repo"], producer["baseline"]
    exps = queued["exps"]
    assert {"l2", "more-seeds"} <= set(exps), queued["output"][-4000:]
    assert exps["l2"]["params"]["loss"] == "l2" and exps["more-seeds"]["params"]["trajectories"]["seeds"] == MORE_SEEDS
    fid = {name: e["metrics"]["metrics/headline.json"]["fid"]["sfd/nfe2"] for name, e in exps.items()}
    assert fid["l2"] != fid["baseline"] != fid["more-seeds"]  # SFD's student changed: another loss, more trajectories

    # what the baseline's store holds: 2 chunks of 8 seeds
    assert exps["baseline"]["params"]["trajectories"]["seeds"] == SEEDS
    assert read_at(repo, baseline, "metrics/trajectories.json")["chunks_generated"] == 2
    # the stages an experiment ran are those whose dvc.lock entry changed: the loss reaches only the
    # distillation stages and what reads them, never the teacher or its trajectories
    base_lock = lock_at(repo, baseline)
    ran = {name: {s for s, e in lock_at(repo, exps[name]["rev"]).items() if e != base_lock[s]} for name in exps}
    assert ran["l2"] == {"distill@distill", "distill@distill_v", "trajectories_stage2", "distill@distill_stage2",
                         "evaluate", "report"}
    assert ({"trajectories@trajectories", "distill@distill", "evaluate", "report"} <= ran["more-seeds"]
            and "teacher" not in ran["more-seeds"])
    cost_of = lambda name: read_at(repo, exps[name]["rev"], "metrics/cost/trajectories.json")  # noqa: E731
    assert cost_of("l2") == cost_of("baseline")  # the record of the baseline's run: the stage did not run
    spent = read_at(repo, exps["l2"]["rev"], "metrics/cost.json")  # per stage; stage 2's teacher is the SFD-v model
    assert sum(spent.get(s, {}).get("teacher_forward_images", 0) for s in ran["l2"] - {"trajectories_stage2"}) == 0
    # the larger range generated only the new chunk, in its own temporary workspace
    summary, cost = read_at(repo, exps["more-seeds"]["rev"], "metrics/trajectories.json"), cost_of("more-seeds")
    assert summary["chunks_reused"] == 2 and summary["chunks_generated"] == 1, summary
    assert cost["trajectories_generated"] == 8
    assert cost["teacher_forward_images"] == 8 * NFE_PER_TRAJECTORY
    assert cost["stored"]["teacher_forward_images"] == 24 * NFE_PER_TRAJECTORY


def test_dvclive_reports_live_from_queued_experiments(producer, queued):
    """DVCLive inside `dvc exp run` knows the experiment: each training stage's points reach Studio's live endpoint
    (a local server stands in for it) under the experiment's name and baseline commit, first at the stage's first
    log row, then at its end (pipeline/training/live.py: at most one update per 10 s in between)."""
    events, baseline = queued["events"], producer["baseline"]
    assert events, "nothing was posted to the Studio endpoint"
    assert all(e["path"] == "/api/live" and e["repo_url"] == "https://git.example.com/team/sfd" for e in events)
    for name, stages in (("l2", TRAINING_STAGES), ("more-seeds", {"distill"})):
        mine = [e for e in events if e["name"] == name]
        assert {e["type"] for e in mine if e["client"] == "dvc"} >= {"start", "done"}, mine  # dvc exp run's own
        data = [e for e in mine if e["client"] == "dvclive" and e["type"] == "data"]
        assert data and all(e["baseline_sha"] == baseline for e in data)
        for stage in stages:
            posts = [e for e in data if f"metrics/live/{stage}/metrics.json" in e.get("metrics", {})]
            steps = [e["step"] for e in posts]
            assert len(posts) >= 2 and steps == sorted(steps) and steps[0] < steps[-1], (name, stage, steps)
            last = posts[-1]["metrics"][f"metrics/live/{stage}/metrics.json"]["data"]
            assert last["lr"] > 0 and "kimg" in last and "final" in last, last
            # the last update is the file the experiment committed (DVCLive's end() posts after the final write)
            assert last == read_at(producer["repo"], queued["exps"][name]["rev"], f"metrics/live/{stage}/metrics.json")
            plots = {k for e in data for k in e.get("plots", {})}  # posted after the metrics, in their own request
            assert f"metrics/live/{stage}/plots/metrics/lr.tsv" in plots, sorted(plots)


def test_artifacts_get_a_student_from_the_git_remote(producer, tmp_path):
    repo = producer["repo"]
    run(["gto", "register", "sfd", "--version", "v1.0.0"], repo)
    run(["git", "push", "-q", "origin", "sfd@v1.0.0"], repo)
    run(["dvc", "artifacts", "get", str(producer["git_remote"]), "sfd", "-o", "sfd"], tmp_path)
    got = {p.relative_to(tmp_path / "sfd"): p.read_bytes() for p in (tmp_path / "sfd").rglob("*") if p.is_file()}
    made = {p.relative_to(repo / "models" / "sfd"): p.read_bytes() for p in (repo / "models" / "sfd").rglob("*")
            if p.is_file()}  # fmt: skip
    assert got == made and any(p.suffix == ".safetensors" for p in got)
    for name, a in yaml.safe_load((repo / "dvc.yaml").read_text())["artifacts"].items():  # meta names real keys
        evaluated = json.loads((repo / a["meta"]["metrics"]).read_text())
        assert any(fnmatch(k, a["meta"]["keys"]) for k in evaluated), (name, sorted(evaluated))
        assert (repo / a["path"]).is_dir() and (repo / a["meta"]["cost"]).is_file(), name


def test_exp_push_pull_apply_in_a_second_clone_reproduces_without_running(producer, queued):
    repo, exps = producer["repo"], queued["exps"]
    run(["dvc", "exp", "push", "origin", "l2"], repo)
    clone = producer["tmp"] / "clone"
    run(["git", "clone", "-q", str(producer["git_remote"]), str(clone)], producer["tmp"])
    run(["dvc", "exp", "pull", "origin", "l2"], clone)
    run(["dvc", "exp", "apply", "l2"], clone)
    out = run(["dvc", "repro"], clone).stdout
    assert stages_run(out) == {"inputs"}, out  # inputs: the always-run hash check of params.yaml's files
    shown = exp_show(clone)
    assert shown["l2"]["metrics"] == exps["l2"]["metrics"]
    assert json.loads((clone / "metrics" / "headline.json").read_text()) == exps["l2"]["metrics"]["metrics/headline.json"]
    assert json.loads((clone / "metrics" / "distill.json").read_text())["loss"] == "l2"
