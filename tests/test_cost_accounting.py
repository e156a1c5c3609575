"""Cost travels with the data: chunk cost records, what a distillation consumed, total vs marginal cost."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from pipeline.config.params import parse_params
from pipeline.distill.sfd import run_distill_stage
from pipeline.evaluation.comparison import build_comparison, method_costs
from pipeline.trajectories.store import open_store

TEACHER = {"source": "gmm", "num_components": 4, "sample_shape": [1, 4, 4], "std": 0.2, "seed": 0}
TINY_NET = {"model_channels": 8, "channel_mult": [1], "num_blocks": 1, "attn_resolutions": []}
SCHEDULE = {"kind": "polynomial", "num_steps": 4, "t_min": 0.006, "t_max": 80.0, "rho": 7.0}
SEEDS = 64


def make_params(**distill) -> dict:
    return {
        "loss": "l1",
        "trajectories": {"teacher": TEACHER, "seeds": f"0-{SEEDS - 1}", "chunk_size": 32, "batch_size": 64, "M": 1,
                         "schedule": SCHEDULE},
        "distill": {"student_network": TINY_NET, "kimg": 0.128, "batch_size": 16, "lr": 1e-3, "checkpoint_every_kimg": 0.032,
                    "log_every_kimg": 0.016, "device": "cpu", **distill},
    }  # fmt: skip


def trajectories_stage(params_file, store, cost_file, summary_file):
    """The DVC stage's entry point, as `dvc repro trajectories` runs it."""
    from stages.trajectories import main

    main(params=params_file, section="trajectories", out=str(store), teacher_ckpt=None, summary=summary_file,
         cost=cost_file, seeds=None, shard=None, progress=False)  # fmt: skip
    return json.loads(cost_file.read_text())


def distill_stage(params, store, tmp_path, cost_file, name="run"):
    p = parse_params(params)
    return run_distill_stage(
        p.distill, trajectories=p.trajectories, loss=p.loss, name="distill", store=store, teacher_ckpt=None,
        out=tmp_path / name / "student", state_dir=tmp_path / name / "state", metrics=None, live_dir=None,
        cost_path=cost_file, progress=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """trajectories stage -> distill stage (2 epochs over the 64 cached trajectories)."""
    tmp = tmp_path_factory.mktemp("cost")
    params = make_params()
    params_file = tmp / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    store, costs = tmp / "trajectories.zarr", tmp / "cost"
    first = trajectories_stage(params_file, store, costs / "trajectories.json", tmp / "summary.json")
    result = distill_stage(params, store, tmp, costs / "distill.json")
    return tmp, params, params_file, store, costs, first, result


def test_rerunning_the_trajectory_stage_leaves_the_sfd_cost_unchanged(pipeline_run):
    tmp, params, params_file, store, costs, first, result = pipeline_run
    per_trajectory = first["teacher_forward_images"] / SEEDS
    assert first["teacher_forward_images"] > 0 and per_trajectory == int(per_trajectory)
    assert first["stored"]["teacher_forward_images"] == first["teacher_forward_images"]
    assert first["stored"]["trajectories"] == SEEDS and first["stored"]["unknown_trajectories"] == 0
    assert result["epochs_over_cache_max"] == pytest.approx(2.0)
    evaluation = {"sfd/nfe2": {"fid": 1.0}}
    data, _ = build_comparison(evaluation, costs)
    before = data["entries"]["sfd/nfe2"]
    # each cached trajectory is counted once although it was read in two epochs
    assert before["teacher_forward_images"] == first["teacher_forward_images"]
    distill_cost = json.loads((costs / "distill.json").read_text())
    own = distill_cost["student_forward_images"] + 2 * distill_cost["student_backward_images"]
    assert before["forward_equivalents"] == first["teacher_forward_images"] + own
    assert before["marginal"]["teacher_forward_images"] == 0 and before["marginal"]["forward_equivalents"] == own

    # `dvc repro -f -s trajectories` on a complete store: nothing generated, this run spent 0 teacher forwards ...
    again = trajectories_stage(params_file, store, costs / "trajectories.json", tmp / "summary.json")
    assert again["teacher_forward_images"] == 0 and again["trajectories_generated"] == 0
    assert {k: v for k, v in again["stored"].items()} == first["stored"]  # ... but the stored trajectories' cost stands
    data, md = build_comparison(evaluation, costs)
    assert data["entries"]["sfd/nfe2"] == before
    # and a distill re-run (a code change) reads the same cost from the store's records
    distill_stage(params, store, tmp, costs / "distill.json", name="again")
    data, _ = build_comparison(evaluation, costs)
    after = data["entries"]["sfd/nfe2"]
    assert after["teacher_forward_images"] == before["teacher_forward_images"]
    assert after["forward_equivalents"] == before["forward_equivalents"]


def test_a_partial_epoch_is_charged_for_the_trajectories_it_read(pipeline_run, tmp_path):
    _, _, _, store, _, first, _ = pipeline_run
    params = make_params(kimg=0.032, checkpoint_every_kimg=0.016)  # 2 batches of 16: 32 of the 64 trajectories
    distill_stage(params, store, tmp_path, tmp_path / "distill.json")
    consumed = json.loads((tmp_path / "distill.json").read_text())["consumed_trajectories"]
    assert consumed["trajectories"] == 32
    assert consumed["teacher_forward_images"] == first["teacher_forward_images"] // 2
    (key,) = consumed["keys"].values()
    assert key["rows_read"] == 32 and key["unknown_trajectories"] == 0


def test_a_store_without_cost_records_gives_an_unknown_total_not_a_crash(pipeline_run, tmp_path):
    from pipeline.evaluation.report import build_report
    from pipeline.config.evaluation import ReportParams

    _, params, _, store, costs, _, _ = pipeline_run
    old = tmp_path / "old.zarr"
    shutil.copytree(store, old)
    (key,) = open_store(old).keys()
    for record in (old / key / "commits").glob("[0-9]*.json"):  # records as written before cost records existed
        data = json.loads(record.read_text())
        data.pop("cost")
        record.write_text(json.dumps(data))
    cost = open_store(old).key(key).stored_cost()
    assert (cost["trajectories"], cost["unknown_trajectories"], cost["teacher_forward_images"]) == (SEEDS, SEEDS, 0)
    cost_dir = tmp_path / "cost"
    cost_dir.mkdir()
    distill_stage(params, old, tmp_path, cost_dir / "distill.json")
    data, md = build_comparison({"sfd/nfe2": {"fid": 1.0}}, cost_dir)
    entry = data["entries"]["sfd/nfe2"]
    assert entry["cost_known"] is False and entry["forward_equivalents"] is None
    assert entry["marginal"]["teacher_forward_images"] == 0  # the marginal cost needs no trajectory record
    assert "without a cost record" in entry["note"] and "Total cost unknown for sfd/nfe2" in md
    report = build_report(evaluation={"sfd/nfe2": {"fid": 1.0}}, cost_dir=cost_dir, grids_dirs=[], out_dir=tmp_path / "r",
                          loss_logs={}, params=ReportParams(), comparison=md)  # fmt: skip
    assert "unknown" in report.read_text()


def _consumed(teacher, wall=1.0, unknown=0):
    return {"trajectories": 10, "teacher_forward_images": teacher, "wall_seconds": wall, "unknown_trajectories": unknown}


def test_total_and_marginal_arithmetic():
    records = {
        "trajectories": {"teacher_forward_images": 0},  # the last run found everything cached: not used
        "distill": {"student_forward_images": 100, "student_backward_images": 100, "wall_seconds": 2.0,
                    "consumed_trajectories": _consumed(1000, 5.0)},
        "distill_v": {"student_forward_images": 40, "student_backward_images": 40, "wall_seconds": 1.0,
                      "consumed_trajectories": _consumed(400, 2.0)},
        "distill_stage2": {"student_forward_images": 10, "student_backward_images": 10, "wall_seconds": 0.5,
                           "consumed_trajectories": _consumed(70, 0.25)},
        "baseline_pd": {"teacher_forward_images": 50, "student_forward_images": 50, "student_backward_images": 50},
    }  # fmt: skip
    total, marginal, _ = method_costs("sfd", 2, records)
    assert total.forward_equivalents == 1000 + 100 + 200 and total.wall_seconds == 7.0
    assert marginal.forward_equivalents == 300 and marginal.teacher_forward_images == 0
    total, marginal, _ = method_costs("sfd-v", 3, records)
    assert (total.forward_equivalents, marginal.forward_equivalents) == (400 + 120, 120)
    # stage 2 = SFD-v's total + its own trajectories (SFD-v forwards) + its training; given the teacher's
    # cache, SFD-v is retrained and the stage-2 trajectories regenerated: only trajectories_v is saved
    total, marginal, _ = method_costs("sfd-stage2", 1, records)
    assert total.forward_equivalents == 520 + 70 + 30 and total.teacher_forward_images == 470
    assert marginal.forward_equivalents == 120 + 70 + 30 and marginal.teacher_forward_images == 70
    assert total.wall_seconds == pytest.approx(1.0 + 2.0 + 0.5 + 0.25)
    total, marginal, _ = method_costs("pd", 2, records)
    assert total == marginal and total.forward_equivalents == 50 + 50 + 100
    # unknown where a record cannot say: never zero
    records["distill_v"]["consumed_trajectories"] = _consumed(400, unknown=3)
    total, marginal, note = method_costs("sfd-stage2", 1, records)
    assert total is None and marginal.forward_equivalents == 220 and "3 of 10" in note
    del records["distill"]["consumed_trajectories"]
    total, marginal, note = method_costs("sfd", 2, records)
    assert total is None and marginal.forward_equivalents == 300 and "no consumed_trajectories" in note
    del records["distill_stage2"]
    assert method_costs("sfd-stage2", 1, records)[:2] == (None, None)


def test_headline_marks_a_difference_below_the_noise_floor():
    """Without paired distances the headline falls back on FID: below the noise floor it is unresolved (no ratio claim)."""
    from pipeline.evaluation.comparison import Cost, Row, headline

    rows = [Row("sfd", 2, 0.376, Cost(100, 0, 0, 1.0), marginal=Cost(0, 0, 0, 0.5)), Row("pd", 2, 0.5, Cost(80, 0, 0, 1.0))]
    head = headline(rows, floor=0.25)
    assert head["significant"] is False and head["status"] == "unresolved" and head["basis"] == "fid"
    assert "unresolved at this sample size" in head["statement"] and "0 teacher forwards" in head["statement"]
    assert "below the noise floor 0.25" in head["statement"] and "quality with" not in head["statement"]
    head = headline(rows, floor=0.1)
    assert head["significant"] is True and head["ratio_kind"] == "lower bound" and "above the noise floor" in head["statement"]
    assert "significant" not in headline(rows) and "not assessed" in headline(rows)["statement"]  # no floor: no claim
