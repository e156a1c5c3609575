"""Bring your own teacher, end to end: every shipped preset through `dvc repro`, as a user runs it.

For each preset the test writes what a user brings (an EDM snapshot pickle, a diffusers pixel folder, a tiny
latent text-to-image folder with a caption file; a dataset zip in EDM's dataset_tool layout; FID reference
statistics and Inception weights), copies the preset to params.yaml changing only keys the preset has (local
paths and CPU sizes: tests/byo.py), and runs the stages its ``# Use:`` line names, in a fresh git + DVC
repository. The runs start together, two at a time (the machine has two cores), when the first test needs
them. Then: `sfd params check` accepts what DVC accepted; the report and headline say which teacher and data
they are about; `dvc exp show` and `dvc plots show --json` are readable and complete; a replaced teacher or
dataset file re-runs exactly the stages downstream of it, with new trajectory chunks and new metrics.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from byo import (  # noqa: E402
    ADM, ROOT, SONG, edm_model, example_files, load_preset, localise, make_repo, preset_targets, run, scale_down,
    walkthrough, write_captions, write_dataset, write_edm_pickle, write_flow_folder, write_inception, write_pixel_folder,
    write_reference_npz, write_t2i_folder,
)  # fmt: skip
from pipeline.core.inputs import describe_path, HashCache  # noqa: E402

ALL_STAGES = {
    "inputs", "data", "feature_net", "teacher", "trajectories@trajectories", "trajectories@trajectories_v",
    "distill@distill", "distill@distill_v", "trajectories_stage2", "distill@distill_stage2", "baseline_pd", "baseline_sfddm", "baseline_vanilla",
    "evaluate_solvers", "evaluate_baselines", "evaluate", "report",
}  # fmt: skip
DOWNSTREAM_OF_TEACHER = ALL_STAGES - {"data", "feature_net"}  # `inputs` always runs (a hash check)
DOWNSTREAM_OF_DATA = {"inputs", "data", "feature_net", "teacher", "baseline_pd", "baseline_sfddm",
                      "baseline_vanilla", "evaluate_solvers", "evaluate_baselines", "evaluate", "report"}
# (the teacher stage re-checks the teacher against the new data and writes the same checkpoint: nothing that
# reads only the teacher - trajectories, SFD - runs again)


@dataclass
class Case:
    teacher: str  # edm | diffusers | t2i | sd3 | flux | trained (teacher.pretrained null: the teacher stage trains it)
    resolution: int
    data_classes: int | None
    precond: str = "VPPrecond"
    arch: dict = field(default_factory=lambda: SONG)
    label_dim: int = 0


CASES = {
    "cifar10": Case("edm", 8, 10),
    "ffhq64": Case("edm", 8, None),
    "afhqv2-64": Case("edm", 8, None),
    "imagenet64": Case("edm", 8, 10, precond="EDMPrecond", arch=ADM, label_dim=1000),
    "ddpm-cifar10": Case("diffusers", 8, 10),
    "sd15": Case("t2i", 16, None),
    "sd3-medium": Case("sd3", 16, None),
    "flux1": Case("flux", 16, None),
    "flow-digits": Case("trained", 8, 10),
}


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def test_every_shipped_preset_has_a_case():
    assert {p.stem for p in (Path(__file__).parents[1] / "presets").glob("*.yaml")} == set(CASES)


def write_teacher(case: Case, path: Path, seed: int = 0) -> Path:
    """The teacher a case brings, at the preset's (localised) path."""
    if case.teacher == "edm":
        model = edm_model(case.precond, case.arch, resolution=case.resolution, label_dim=case.label_dim, seed=seed)
        return write_edm_pickle(path, model)
    if case.teacher == "diffusers":
        return write_pixel_folder(path, seed=seed)
    if case.teacher in ("sd3", "flux"):
        return write_flow_folder(path, case.teacher, seed=seed)
    return write_t2i_folder(path)


def write_user_files(name: str, raw: dict, root: Path, inception: Path) -> dict[str, str]:
    """Every file the preset names, written at its example path under ``root``; the params edit that points
    the preset there (key -> local path)."""
    case = CASES[name]
    local = {key: localise(value, root) for key, value in example_files(raw).items()}
    if "teacher.pretrained" in local:  # else the teacher stage trains it
        write_teacher(case, Path(local["teacher.pretrained"]))
    if "data.path" in local:  # else the bundled digits
        write_dataset(Path(local["data.path"]), n=40, channels=3, resolution=case.resolution, num_classes=case.data_classes)
    if "teacher.prompts" in local:
        write_captions(Path(local["teacher.prompts"]))
    if "evaluate.reference_stats" in local:
        write_reference_npz(Path(local["evaluate.reference_stats"]))
    if "evaluate.inception_weights" in local:
        Path(local["evaluate.inception_weights"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(inception, local["evaluate.inception_weights"])
    return local


def prepare(name: str, base: Path, inception: Path) -> Path:
    """A fresh repository set up for the preset. cifar10 follows the README's walkthrough up to `dvc repro`:
    `sfd preset apply cifar10`, the edit the README asks for (paths, and CPU sizes), `sfd params
    check`; the other presets get the same edit directly."""
    raw = load_preset(name)
    local = write_user_files(name, raw, base / "root", inception)
    if name != "cifar10":
        return make_repo(base / "repo", scale_down(raw, local))
    repo = make_repo(base / "repo", yaml.safe_load((ROOT / "params.yaml").read_text()))  # a fresh clone
    steps = walkthrough()
    assert steps[:3] == ["sfd preset apply cifar10", "sfd params check", "dvc repro"], steps
    run(steps[0].split(), repo)
    edited = scale_down(yaml.safe_load((repo / "params.yaml").read_text()), local)
    (repo / "params.yaml").write_text(yaml.safe_dump(edited, sort_keys=False))
    run(steps[1].split(), repo)
    return repo


def uses(*names: str):
    """Mark a test that needs the runs of these presets (the fixture starts only what selected tests need)."""
    def mark(fn):
        fn.presets = names
        return fn
    return mark


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory) -> dict[str, Future]:
    """The repositories of the presets the selected tests need, their `dvc repro` started in the background
    (two at a time)."""
    items = [it for it in request.session.items if it.module is request.module]
    needed = sorted({n for n in CASES for it in items if f"[{n}]" in it.nodeid}
                    | {n for it in items for n in getattr(it.function, "presets", ())})
    inception = write_inception(tmp_path_factory.mktemp("weights") / "pt_inception-2015-12-05-6726825d.pth")
    repos = {name: prepare(name, tmp_path_factory.mktemp(name), inception) for name in needed}
    pool = ThreadPoolExecutor(max_workers=2)

    def repro(name: str):
        repo = repos[name]
        return repo, run(["dvc", "repro", *preset_targets(name)], repo, check=False)

    futures = {name: pool.submit(repro, name) for name in needed}
    yield futures
    pool.shutdown(wait=True)


def finished(runs, name: str) -> Path:
    repo, result = runs[name].result()
    assert result.returncode == 0, f"{name}: dvc repro failed:\n{result.stdout[-5000:]}\n{result.stderr[-5000:]}"
    return repo


@pytest.mark.parametrize("name", sorted(CASES))
def test_preset_runs_through_dvc_repro(runs, name):
    repo, result = runs[name].result()
    assert result.returncode == 0, f"{name}: dvc repro failed:\n{result.stdout[-5000:]}\n{result.stderr[-5000:]}"
    targets = preset_targets(name)
    expected = ALL_STAGES if not targets else {"inputs", "data", *targets}
    assert stages_run(result.stdout) == expected

    # `sfd params check` accepts what DVC accepted, and checks the keys the stages track
    check = run(["sfd", "params", "check", *[a for t in targets for a in ("--target", t)]], repo)
    assert "keys tracked by dvc.yaml" in check.stdout

    # the teacher is known by its file: the manifest's hash is the file's (or folder's) content hash
    params = yaml.safe_load((repo / "params.yaml").read_text())
    summary = json.loads((repo / "metrics" / "teacher.json").read_text())
    if params["teacher"]["pretrained"] is None:  # trained by the teacher stage (flow-digits)
        assert summary["steps"] == params["teacher"]["steps"]
        return  # the stages of its Use: line; the flow path's checks: tests/test_flow_teachers.py
    source = Path(params["teacher"]["pretrained"])
    manifest = json.loads((repo / "data" / "inputs" / "teacher.pretrained.json").read_text())
    assert manifest["hash"] == describe_path(source, HashCache(None))["hash"]
    assert summary["source_file_hash"] == manifest["hash"] and summary["steps"] == 0
    if targets:
        return  # the stages of its Use: line only (sd15, sd3-medium, flux1); sampling and export: below

    # the report says which teacher and data it is about, and nothing about runs it did not make
    report = (repo / "reports" / "report.md").read_text()
    assert f"`teacher.pretrained` = `{source}`" in report and manifest["hash"] in report
    assert f"`data.path` = `{params['data']['path']}`" in report
    assert "Progressive distillation: compute to match SFD" not in report  # the committed sweep is another teacher's
    headline = json.loads((repo / "metrics" / "headline.json").read_text())
    assert headline["fid"]["sfd/nfe2"] >= 0 and "best_training_free/nfe2" in headline["fid"]

    # dvc exp show: the headline metrics only, not every sampler x NFE x metric
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    metrics = shown[0]["data"]["metrics"]
    assert set(metrics) == {"metrics/headline.json"}
    # dvc plots show --json: every declared plot renders
    plots = json.loads(run(["dvc", "plots", "show", "--json"], repo).stdout)
    assert not plots.get("errors"), plots.get("errors")
    for title in ("SFD stage 1 loss", "SFD-v loss (all N)", "SFD stage 2 loss"):
        assert plots["data"][title][0]["type"] == "vega", title
        assert plots["data"][title][0]["content"]["data"]["values"], title
    assert plots["data"]["reports/grids_side_by_side.png"][0]["type"] == "image"


@uses("cifar10")
def test_a_replaced_teacher_or_dataset_reruns_exactly_what_is_downstream(runs, tmp_path):
    """The README's workflow for a new teacher file at the same path (`dvc add` or not): `dvc repro` re-runs the
    teacher and everything after it, generates new trajectory chunks and changes the metrics; a new dataset file
    re-runs the data stage and what reads the data, not the trajectories or SFD."""
    repo = finished(runs, "cifar10")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    case = CASES["cifar10"]
    before = json.loads((repo / "metrics" / "headline.json").read_text())

    write_teacher(case, Path(params["teacher"]["pretrained"]), seed=1)  # another teacher, the same path
    out = run(["dvc", "repro"], repo).stdout
    assert stages_run(out) == DOWNSTREAM_OF_TEACHER
    summary = json.loads((repo / "metrics" / "trajectories.json").read_text())
    assert summary["chunks_generated"] == 2 and summary["chunks_reused"] == 0  # a new teacher: a new key
    cost = json.loads((repo / "metrics" / "cost" / "trajectories.json").read_text())
    assert cost["teacher_forward_images"] == 16 * 12
    after_teacher = json.loads((repo / "metrics" / "headline.json").read_text())
    assert after_teacher["fid"]["sfd/nfe2"] != before["fid"]["sfd/nfe2"]

    write_dataset(Path(params["data"]["path"]), n=40, channels=3, resolution=8, num_classes=10, seed=1)
    out = run(["dvc", "repro"], repo).stdout
    assert stages_run(out) == DOWNSTREAM_OF_DATA
    after_data = json.loads((repo / "metrics" / "headline.json").read_text())
    assert after_data["fid"]["vanilla/nfe2"] != after_teacher["fid"]["vanilla/nfe2"]  # trained on the data
    assert stages_run(run(["dvc", "repro"], repo).stdout) == {"inputs"}  # and then nothing


@uses("ddpm-cifar10")
def test_a_changed_diffusers_scheduler_makes_new_trajectories(runs):
    """A diffusers teacher folder edited in place (one scheduler field): the teacher stage re-imports it and the
    trajectories go to a new store key (the teacher hash covers the scheduler), generated afresh."""
    repo = finished(runs, "ddpm-cifar10")
    folder = Path(yaml.safe_load((repo / "params.yaml").read_text())["teacher"]["pretrained"])
    before = json.loads((repo / "metrics" / "trajectories.json").read_text())
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "beta_end": 0.025}))
    out = run(["dvc", "repro", "trajectories@trajectories"], repo).stdout
    assert stages_run(out) == {"inputs", "teacher", "trajectories@trajectories"}
    after = json.loads((repo / "metrics" / "trajectories.json").read_text())
    assert after["chunks_generated"] == 2 and after["keys"][0]["key"] != before["keys"][0]["key"]


@uses("cifar10")
def test_the_readme_walkthrough_runs_as_written(runs, tmp_path):
    """The README's bring-your-own commands after `dvc repro` (the ones before it set the cifar10 repository up)."""
    repo = finished(runs, "cifar10")
    root = Path(yaml.safe_load((repo / "params.yaml").read_text())["teacher"]["pretrained"]).parents[1]
    for line in walkthrough()[3:]:
        result = run(["bash", "-c", localise(line, root).replace("sfd ", "python -m pipeline.cli ", 1)], repo)
        if line.startswith("dvc exp show"):
            assert "headline.json" in result.stdout or "fid" in result.stdout
    assert len(list((repo / "samples").glob("*.png"))) >= 16
    assert (repo / "models" / "edm-cifar10-uncond-vp" / "model.safetensors").is_file()


@uses("ddpm-cifar10", "sd15")
@pytest.mark.parametrize("name", ["ddpm-cifar10", "sd15"])
def test_diffusers_students_sample_and_export_as_a_user_does(runs, name):
    """`sfd sample` and `sfd export` on the distilled student, then the export through stock diffusers the way
    the README shows it: DiffusionPipeline.from_pretrained with the project's scheduler imported."""
    repo = finished(runs, name)
    guidance = ["--guidance", "2.0"] if name == "sd15" else []
    run(["sfd", "sample", "--ckpt", "models/sfd", "--seeds", "0-3", "--out", "samples", *guidance], repo)
    assert len(list((repo / "samples").glob("*.png"))) >= 4
    out = run(["sfd", "export", "--ckpt", "models/sfd", "--format", "diffusers", "--out", "sfd-unet"], repo).stdout
    assert "NFE 2" in out
    index = json.loads((repo / "sfd-unet" / "model_index.json").read_text())
    assert index["scheduler"] == ["pipeline.teachers.diffusers_scheduler", "SFDScheduler"]
    script = (
        "import pipeline.teachers.diffusers_scheduler, torch\n"
        "from diffusers import DiffusionPipeline\n"
        "pipe = DiffusionPipeline.from_pretrained('sfd-unet')\n"
        + ("images = pipe('a photo of thing 1', num_inference_steps=2, guidance_scale=2.0, output_type='np').images\n"
           if name == "sd15" else "images = pipe(batch_size=2, num_inference_steps=2, output_type='np').images\n")
        + "print(type(pipe).__name__, images.shape, bool(torch.isfinite(torch.as_tensor(images)).all()))\n"
    )
    shown = run([sys.executable, "-c", script], repo).stdout.split()
    assert shown[0] == ("StableDiffusionPipeline" if name == "sd15" else "DDPMPipeline") and shown[-1] == "True"
