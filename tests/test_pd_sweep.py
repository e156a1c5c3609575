"""The PD budget sweep's summary and the report's baseline sections (no training: hand-made sweep points)."""

from __future__ import annotations

import json

import pytest

from pipeline.core.param_checks import PipelineError
from pipeline.evaluation.pd_sweep import (
    baseline_sections,
    load_sweep,
    match_summary,
    merge_sweeps,
    pd_sweep_markdown,
    sfddm_note,
    sweep_on_teacher,
    teacher_file_hash,
)


def point(m: int, fid: float, fe: float) -> dict:
    return {"multiplier": m, "updates_per_round": 60 * m, "fid_nfe2": fid, "forward_equivalents": fe,
            "ratio_to_sfd": fe / 100.0, "train_seconds": 1.0, "reaches_sfd": fid <= 0.4}


def test_match_is_the_first_point_at_or_below_sfds_fid_with_the_previous_as_lower_bound():
    pts = [point(1, 0.9, 80.0), point(4, 0.5, 320.0), point(16, 0.39, 1280.0), point(64, 0.30, 5120.0)]
    m = match_summary(pts, 0.4, 100.0)
    assert m["reached"] and m["multiplier"] == 16
    assert m["ratio"] == pytest.approx(12.8) and m["lower_ratio"] == pytest.approx(3.2)
    # FID linear in log(cost) between 320 (0.5) and 1280 (0.39): 0.4 is crossed at 320 * 4**(0.1/0.11)
    assert m["interpolated_ratio"] == pytest.approx(3.2 * 4 ** (0.1 / 0.11), rel=1e-12)
    never = match_summary(pts[:2], 0.4, 100.0)
    assert not never["reached"] and never["ratio"] is None and never["lower_ratio"] == pytest.approx(3.2)
    first = match_summary([point(1, 0.3, 80.0)], 0.4, 100.0)
    assert first["reached"] and first["lower_ratio"] is None and first["ratio"] == pytest.approx(0.8)


def test_report_sections_state_the_ratio_or_the_bound(tmp_path):
    pts = [point(1, 0.9, 80.0), point(4, 0.39, 320.0)]
    sweep = {"sfd": {"fid_nfe2": 0.4, "forward_equivalents": 100.0}, "points": pts, "device": "cpu",
             "match": match_summary(pts, 0.4, 100.0)}
    assert "**3.20× SFD's stage-1 cost**" in pd_sweep_markdown(sweep) and "0.80×, did not" in pd_sweep_markdown(sweep)
    path = tmp_path / "pd_sweep.json"
    path.write_text(json.dumps(sweep))
    assert load_sweep(path) == sweep and load_sweep(tmp_path / "missing.json") is None
    evaluation = {"sfd/nfe2": {"fid": 0.4}, "sfddm/nfe2": {"fid": 7.0}, "sfddm_control/nfe2": {"fid": 6.3}}
    text = "\n".join(baseline_sections(evaluation, sweep))
    assert "3.20×" in text and "does **not** beat its control 6.300" in text
    text = "\n".join(baseline_sections({"sfd/nfe2": {"fid": 0.95}}, sweep))
    # compared with this run's SFD FID, not the one recorded at sweep time: x1 (0.9) already reaches 0.95
    assert "reaches SFD's (0.950)" in text and "**0.80× SFD's stage-1 cost**" in text
    sweep["points"], sweep["match"] = pts[:1], match_summary(pts[:1], 0.4, 100.0)
    assert "more than 0.80× SFD's stage-1 cost" in "\n".join(baseline_sections({}, sweep))
    assert baseline_sections({}, None, source="x/pd.json") == []  # no sweep: the report says nothing about one
    assert "beats its control" in sfddm_note({"sfddm/nfe2": {"fid": 1.0}, "sfddm_control/nfe2": {"fid": 6.3}})
    assert sfddm_note({}) is None


def _sweep(points, teacher="aa", device="cpu"):
    return {"sfd": {"fid_nfe2": 0.4, "forward_equivalents": 100.0}, "points": points, "device": device,
            "teacher_file_hash": teacher, "baseline_pd": {"updates_per_round": 60}, "protocol": {"seeds": "0-9"},
            "match": match_summary(points, 0.4, 100.0)}


def test_merge_joins_multipliers_in_order_and_refuses_mismatches():
    a = _sweep([point(64, 0.35, 5120.0)], device="cpu (1 threads)")
    b = _sweep([point(1, 0.9, 80.0), point(16, 0.45, 1280.0)], device="cuda (H200)")
    merged = merge_sweeps([b, a], sources=["b.json", "a.json"])
    assert [p["multiplier"] for p in merged["points"]] == [1, 16, 64]
    assert [p["device"] for p in merged["points"]] == ["cuda (H200)", "cuda (H200)", "cpu (1 threads)"]
    assert merged["match"]["multiplier"] == 64 and merged["match"]["lower_ratio"] == pytest.approx(12.8)
    assert merged["merged_from"] == ["b.json", "a.json"] and merged["device"] == "cuda (H200), cpu (1 threads)"
    again = merge_sweeps([b, a], sfd_fid=0.5)  # against another SFD FID: x16 (0.45) now reaches it
    assert again["sfd"]["fid_nfe2"] == 0.5 and again["match"]["multiplier"] == 16
    assert [p["reaches_sfd"] for p in again["points"]] == [False, True, True] and b["sfd"]["fid_nfe2"] == 0.4
    with pytest.raises(PipelineError, match="a.json: multiplier x16 is also in b.json"):
        merge_sweeps([b, _sweep([point(16, 0.4, 1280.0)])], sources=["b.json", "a.json"])
    with pytest.raises(PipelineError, match="teacher_file_hash differs"):
        merge_sweeps([b, _sweep([point(64, 0.35, 5120.0)], teacher="bb")])
    with pytest.raises(PipelineError, match="no sweep"):
        merge_sweeps([])


def test_report_flags_a_sweep_of_another_teacher_and_marks_points_within_the_noise_floor():
    sweep = _sweep([point(1, 0.9, 80.0), point(4, 0.5, 320.0)])
    assert sweep_on_teacher(sweep, "aa") and sweep_on_teacher(sweep, None) and not sweep_on_teacher(sweep, "cc")
    assert not sweep_on_teacher(None, "aa")
    text = "\n".join(baseline_sections({"sfd/nfe2": {"fid": 0.4}}, sweep, teacher_hash="aa", floor=0.3))
    assert "another teacher" not in text
    assert "| 0.500 | +0.100 (n.s.) |" in text and "| 0.900 | +0.500 |" in text
    text = "\n".join(baseline_sections({"sfd/nfe2": {"fid": 0.4}}, sweep, teacher_hash="cc"))
    assert text == ""  # another teacher's sweep: the report describes this run only


def test_comparison_headline_carries_the_sweeps_ratio_against_this_runs_sfd():
    from pipeline.evaluation.comparison import Cost, Row, headline

    def row(method, fid, fe):
        return Row(method=method, nfe=2, fid=fid, cost=Cost(teacher_forward_images=int(fe)), note="")

    rows = [row("sfd", 0.4, 100.0), row("pd", 0.9, 80.0)]
    sweep = _sweep([point(1, 0.9, 80.0), point(16, 0.45, 1280.0), point(64, 0.35, 5120.0)])
    plain = headline(rows, floor=None)
    assert "pd_sweep" not in plain and "a longer PD run would tell" in plain["statement"]
    head = headline(rows, floor=None, pd_sweep=sweep)
    assert head["pd_sweep"]["reached"] and head["pd_sweep"]["ratio"] == pytest.approx(51.2)
    assert head["pd_sweep"]["lower_ratio"] == pytest.approx(12.8) and "a longer PD run" not in head["statement"]
    assert "PD budget sweep on this teacher (bench/pd_sweep.json): PD's NFE-2 FID reaches SFD's (0.400)" in head["statement"]
    assert head["pd_sweep"]["status"] == "not met" and "by the sweep: not met." in head["statement"]  # 51.2x < 100x
    never = headline(rows, floor=None, pd_sweep=_sweep([point(1, 0.9, 80.0), point(64, 0.5, 20000.0)]))
    assert never["pd_sweep"]["status"] == "met" and never["pd_sweep"]["lower_ratio"] == pytest.approx(200.0)
    open_ = headline(rows, floor=None, pd_sweep=_sweep([point(1, 0.9, 80.0), point(64, 0.5, 5000.0)]))
    assert open_["pd_sweep"]["status"] == "undecided"  # never reached, bound 50x < 100x


def test_teacher_file_hash_follows_the_weights_file(tmp_path):
    assert teacher_file_hash(tmp_path) is None
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    h = teacher_file_hash(tmp_path)
    (tmp_path / "model.json").write_text("{}")
    assert teacher_file_hash(tmp_path) == h
    (tmp_path / "model.safetensors").write_bytes(b"other")
    assert teacher_file_hash(tmp_path) != h


def test_merge_script_refuses_missing_files_and_sweeps_without_a_teacher_hash(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "pd_sweep.py"
    old = tmp_path / "old.json"
    old.write_text(json.dumps({**_sweep([point(1, 0.9, 80.0)]), "teacher_file_hash": None}))
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_sweep([point(4, 0.3, 320.0)])))
    out = tmp_path / "merged.json"
    for files, message in (([str(tmp_path / "nope.json")], "nope.json: no such file"),
                           ([str(good), str(old)], "old.json: records no teacher_file_hash")):
        r = subprocess.run([sys.executable, str(script), "--merge", *files, "--sfd-fid", "0.4", "--out", str(out)],
                           capture_output=True, text=True)
        assert r.returncode == 2 and message in r.stderr and not out.exists()
    r = subprocess.run([sys.executable, str(script), "--merge", str(good), "--sfd-fid", "0.4", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(out.read_text())["match"]["multiplier"] == 4
