import json

import numpy as np
import pytest
from PIL import Image

from pipeline.core.param_checks import ParamError
from pipeline.evaluation.report import ReportParams, build_report, merge_evaluations, fid_pivot_table, read_loss_log, split_entry


@pytest.fixture
def inputs(tmp_path):
    evaluation = {
        "teacher/nfe35": {"fid": 1.0, "kid": 0.001, "precision": 0.9, "recall": 0.9, "label_accuracy": 0.99},
        "dpmpp3m/nfe2": {"fid": 80.0, "kid": 0.1, "precision": 0.1, "recall": 0.2, "label_accuracy": 0.3},
        "dpmpp3m/nfe3": {"fid": 40.0, "kid": 0.05, "precision": 0.3, "recall": 0.4, "label_accuracy": 0.5},
        "sfd/nfe2": {"fid": 5.0, "kid": 0.004, "precision": 0.8, "recall": 0.7, "label_accuracy": 0.95},
    }
    (tmp_path / "eval.json").write_text(json.dumps(evaluation))
    cost = tmp_path / "cost"
    cost.mkdir()
    (cost / "distill.json").write_text(json.dumps({"stage": "distill", "wall_seconds": 12.5, "teacher_forward_images": 0,
                                                   "student_forward_images": 100, "student_backward_images": 100,
                                                   "forward_equivalents": 300.0, "device": "cpu"}))
    grids = tmp_path / "grids"
    grids.mkdir()
    for name in ("teacher_nfe35", "sfd_nfe2"):
        Image.fromarray((np.random.default_rng(0).random((16, 16)) * 255).astype(np.uint8)).save(grids / f"{name}.png")
    log = tmp_path / "live"  # a distill stage's DVCLive directory (pipeline.training.live)
    (log / "plots" / "metrics" / "loss" / "N4").mkdir(parents=True)
    (log / "plots" / "metrics" / "loss" / "N5").mkdir()
    (log / "plots" / "metrics" / "kimg.tsv").write_text("step\tkimg\n1\t0.1\n2\t0.2\n")
    (log / "plots" / "metrics" / "loss" / "N4" / "step1.tsv").write_text("step\tstep1\n1\t3.0\n2\t2.5\n")
    (log / "plots" / "metrics" / "loss" / "N5" / "step1.tsv").write_text("step\tstep1\n2\t2.0\n")
    return tmp_path, log


def test_report_writes_tables_plots_and_grids(inputs):
    tmp_path, log = inputs
    report = build_report(
        evaluation=merge_evaluations([tmp_path / "eval.json"]), cost_dir=tmp_path / "cost", grids_dirs=[tmp_path / "grids"],
        out_dir=tmp_path / "reports", loss_logs={"sfd": log}, params=ReportParams(),
        merged_cost_path=tmp_path / "cost.json", comparison="| a |\n|---|\n| b |",
    )
    text = report.read_text()
    assert "| sfd | 5.000 |" in text  # pivot row: FID at NFE 2; NFE 3 missing -> dash
    assert "| dpmpp3m | 80.000 | 40.000 |" in text
    assert "| distill | 12.500 |" in text
    assert "sfd-stage2/nfe1" in text  # panel without a grid is named, not silently dropped
    for png in ("fid_vs_nfe.png", "distill_loss.png", "grids_side_by_side.png"):
        assert (tmp_path / "reports" / png).stat().st_size > 1000
        assert f"({png})" in text
    assert json.loads((tmp_path / "cost.json").read_text())["distill"]["wall_seconds"] == 12.5


def test_loss_log_and_entry_parsing(tmp_path, inputs):
    _, log = inputs
    curves = read_loss_log(log)
    assert curves["N4/step1"] == ([0.1, 0.2], [3.0, 2.5])
    assert curves["N5/step1"] == ([0.2], [2.0])  # no row: not drawn in that window
    assert split_entry("sfd-v/nfe12") == ("sfd-v", 12)
    with pytest.raises(ValueError):
        split_entry("sfd")
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(ParamError, match="kimg"):
        read_loss_log(bad)
    with pytest.raises(ParamError, match="report.panels"):
        ReportParams.from_dict({"panels": ["sfd"]})
    with pytest.raises(ParamError, match="unknown key"):
        ReportParams.from_dict({"panel": []})


def test_pivot_orders_nfe_columns():
    table = fid_pivot_table({"a/nfe3": {"fid": 3.0}, "a/nfe1": {"fid": 1.0}})
    assert table.splitlines()[0] == "| sampler | NFE 1 | NFE 3 |"


def test_merge_evaluations_refuses_a_key_in_two_files(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"sfd/nfe2": {"fid": 1.0}}))
    b.write_text(json.dumps({"euler/nfe2": {"fid": 2.0}}))
    assert set(merge_evaluations([a, b])) == {"sfd/nfe2", "euler/nfe2"}
    b.write_text(json.dumps({"sfd/nfe2": {"fid": 2.0}}))
    with pytest.raises(ParamError, match="sfd/nfe2"):
        merge_evaluations([a, b])
    with pytest.raises(ParamError, match="does not exist"):
        merge_evaluations([tmp_path / "c.json"])
