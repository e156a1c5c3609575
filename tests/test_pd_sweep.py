"""The PD budget sweep's summary and the report's baseline sections (no training: hand-made sweep points)."""

from __future__ import annotations

import json

import pytest

from pipeline.evaluation.pd_sweep import baseline_sections, match_summary, pd_sweep_markdown, sfddm_note


def point(m: int, fid: float, fe: float) -> dict:
    return {"multiplier": m, "updates_per_round": 60 * m, "fid_nfe2": fid, "forward_equivalents": fe,
            "ratio_to_sfd": fe / 100.0, "train_seconds": 1.0, "reaches_sfd": fid <= 0.4}


def test_match_is_the_first_point_at_or_below_sfds_fid_with_the_previous_as_lower_bound():
    pts = [point(1, 0.9, 80.0), point(4, 0.5, 320.0), point(16, 0.39, 1280.0), point(64, 0.30, 5120.0)]
    m = match_summary(pts, 0.4, 100.0)
    assert m["reached"] and m["multiplier"] == 16
    assert m["ratio"] == pytest.approx(12.8) and m["lower_ratio"] == pytest.approx(3.2)
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
    evaluation = {"sfd/nfe2": {"fid": 0.4}, "sfddm/nfe2": {"fid": 7.0}, "sfddm_control/nfe2": {"fid": 6.3}}
    text = "\n".join(baseline_sections(evaluation, path))
    assert "3.20×" in text and "does **not** beat its control 6.300" in text
    text = "\n".join(baseline_sections({"sfd/nfe2": {"fid": 0.5}}, path))
    assert "this run's is 0.500" in text  # the sweep is flagged when SFD's FID moved since it ran
    sweep["points"], sweep["match"] = pts[:1], match_summary(pts[:1], 0.4, 100.0)
    path.write_text(json.dumps(sweep))
    assert "more than 0.80× SFD's stage-1 cost" in "\n".join(baseline_sections({}, path))
    assert "No sweep file" in "\n".join(baseline_sections({}, tmp_path / "missing.json"))
    assert "beats its control" in sfddm_note({"sfddm/nfe2": {"fid": 1.0}, "sfddm_control/nfe2": {"fid": 6.3}})
    assert sfddm_note({}) is None
