"""The paired teacher-fidelity metric (known distances, files), the paired bootstrap (a known difference is resolved,
a zero-mean one is not), KID's subset sd, and the headline logic: "A is better than B" only where the interval
excludes 0, "unresolved at this sample size" otherwise."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.core.param_checks import PipelineError
from pipeline.evaluation.claims import comparisons, headline_comparisons, headline_lines, paired_json, paired_markdown
from pipeline.evaluation.comparison import Cost, Row, build_comparison, headline, headline_metrics
from pipeline.evaluation.paired import (
    PairedDistances, PairedFileError, PairedMeter, distances, kid_difference, load_distances, load_reference,
    make_reference, mean_se, paired_bootstrap, save_reference,
)  # fmt: skip


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_distances_of_known_images_and_features():
    ref = make_reference("teacher/nfe35", [10, 11, 12], torch.zeros(3, 1, 2, 2), torch.zeros(3, 2), count=8,
                         feature_space="classifier:h")
    assert ref.seeds == [10, 11, 12]  # fewer seeds than count: all of them
    images = torch.stack([torch.full((1, 2, 2), 0.1),  # RMS 0.1
                          torch.tensor([[[0.2, 0.2], [0.0, 0.0]]]),  # sqrt((0.04 + 0.04) / 4)
                          torch.full((1, 2, 2), 1.5)])  # clamped to 1: RMS 1
    feats = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    pixel, feature = distances(images, feats, ref)
    torch.testing.assert_close(pixel, torch.tensor([0.1, math.sqrt(0.02), 1.0], dtype=torch.float64), rtol=0, atol=1e-7)
    torch.testing.assert_close(feature, torch.tensor([5.0, 0.0, 1.0], dtype=torch.float64), rtol=0, atol=1e-12)
    mean, se = mean_se(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    assert mean == 3.0 and se == pytest.approx(math.sqrt(14 / 3) / 2, rel=1e-12)  # sd (n-1) / sqrt(n)
    with pytest.raises(PipelineError, match="shape"):
        distances(torch.zeros(3, 1, 4, 4), feats, ref)


def test_meter_builds_the_reference_and_the_files_round_trip(tmp_path):
    seeds = list(range(100, 106))
    teacher = torch.rand(6, 1, 4, 4, generator=gen(0)) - 0.5  # a shift of 0.25 stays inside [-1, 1]
    feats = torch.randn(6, 8, generator=gen(1), dtype=torch.float64)
    meter = PairedMeter(reference_key="teacher/nfe35", count=4, feature_space="classifier:h")
    own = meter.measure("teacher/nfe35", seeds, teacher, feats)
    assert own["paired_seeds"] == 4 and own["paired_feature_l2"] < 1e-6  # features stored as float32
    assert own["paired_pixel_rms"] < 3e-4  # the stored reference is float16: its round-off only
    shifted = meter.measure("euler/nfe2", seeds, teacher + 0.25, feats + 1.0)
    assert shifted["paired_pixel_rms"] == pytest.approx(0.25, abs=3e-4)  # up to the float16 round-off
    assert shifted["paired_feature_l2"] == pytest.approx(math.sqrt(8), rel=1e-6) and shifted["paired_feature_l2_se"] < 1e-6

    save_reference(tmp_path / "ref.safetensors", meter.reference)
    loaded = load_reference(tmp_path / "ref.safetensors")
    assert loaded.seeds == seeds[:4] and loaded.sampler == "teacher/nfe35"
    torch.testing.assert_close(loaded.images, meter.reference.images, rtol=0, atol=0)
    reader = PairedMeter(loaded, feature_space="classifier:h")
    assert reader.measure("euler/nfe2", seeds, teacher + 0.25, feats + 1.0) == shifted  # the same in another stage
    with pytest.raises(PairedFileError, match="holds 4 seeds, evaluate.paired_seeds asks for 5"):
        PairedMeter(loaded, count=5, feature_space="classifier:h").measure("sfd/nfe2", seeds, teacher, feats)
    with pytest.raises(PairedFileError, match="first 4 evaluation seeds"):
        reader.measure("sfd/nfe2", seeds[1:], teacher, feats)
    with pytest.raises(PairedFileError, match="inception:x"):
        PairedMeter(loaded, feature_space="inception:x").measure("sfd/nfe2", seeds, teacher, feats)

    meter.save(tmp_path / "a.safetensors")
    merged = load_distances([tmp_path / "a.safetensors"])
    assert merged.reference == "teacher/nfe35" and merged.seeds == seeds[:4]
    torch.testing.assert_close(merged.pixel["euler/nfe2"], meter.per_seed["euler/nfe2"][0])
    with pytest.raises(PairedFileError, match="appears in two files"):
        load_distances([tmp_path / "a.safetensors", tmp_path / "a.safetensors"])
    with pytest.raises(PairedFileError, match="does not exist"):
        load_reference(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(PairedFileError, match="not a paired safetensors file"):
        load_distances([tmp_path / "bad.safetensors"])


def test_paired_bootstrap_resolves_a_known_difference_and_not_a_zero_mean_one():
    n = 256
    b = 0.09 + 0.02 * torch.rand(n, generator=gen(0), dtype=torch.float64)
    noise = 0.002 * torch.randn(n, generator=gen(1), dtype=torch.float64)
    worse = paired_bootstrap(b + 0.01 + noise, b)  # a is 0.01 further from the teacher on every seed, give or take
    assert worse["resolved"] and worse["better"] == "b"
    assert worse["ci_low"] > 0 and worse["ci_low"] < 0.01 < worse["ci_high"]
    # the percentile interval of a mean is about +-1.96 se (normal approximation), within 10 %
    assert (worse["ci_high"] - worse["ci_low"]) / (2 * 1.96 * worse["se"]) == pytest.approx(1.0, abs=0.1)
    assert paired_bootstrap(b + 0.01 + noise, b) == worse  # seeded
    assert paired_bootstrap(b, b + 0.01 + noise)["better"] == "a"

    alternating = 0.01 * torch.tensor([1.0, -1.0] * (n // 2), dtype=torch.float64)  # mean difference exactly 0
    tie = paired_bootstrap(b + alternating, b)
    assert not tie["resolved"] and tie["better"] is None and tie["ci_low"] < 0 < tie["ci_high"]
    # the unpaired spreads overlap hugely (b spans 0.02), yet pairing resolves a 0.002 shift with small noise
    small = paired_bootstrap(b + 0.002 + 0.0005 * torch.randn(n, generator=gen(2), dtype=torch.float64), b)
    assert small["resolved"] and small["better"] == "b"
    with pytest.raises(PipelineError, match="same seeds"):
        paired_bootstrap(b, b[:-1])


def test_kid_difference_uses_the_subset_sd_and_fidelity_metrics_report_it():
    from pipeline.evaluation.fidelity import fidelity_metrics

    a, b = {"kid": 0.010, "kid_std": 0.001}, {"kid": 0.002, "kid_std": 0.001}
    resolved = kid_difference(a, b)
    assert resolved["resolved"] and resolved["better"] == "b" and resolved["sd"] == pytest.approx(math.sqrt(2e-6))
    assert not kid_difference({"kid": 0.004, "kid_std": 0.002}, b)["resolved"]  # 0.002 < 2 x 0.0022
    assert kid_difference({"kid": None, "kid_std": None}, b) is None
    g = torch.randn(200, 8, generator=gen(0), dtype=torch.float64)
    r = torch.randn(300, 8, generator=gen(1), dtype=torch.float64) + 0.3
    m = fidelity_metrics(g, r, kid_subsets=20, kid_subset_size=100)
    assert m["kid"] > 0 and 0 < m["kid_std"] < m["kid"]  # a shifted set: KID well above its subset spread


def synthetic_distances(n: int = 128) -> tuple[PairedDistances, dict]:
    """SFD at 0.09; vanilla +0.01 and PD +0.05 (resolved); dpmpp3m +0.3; SFDDM 0.002 better than its control but with
    noise 0.02 (unresolved); sfd-v/nfe3 and pd/nfe4 vs sfd-v/nfe4 (no sfd-v/nfe4 here: no comparison)."""
    base = 0.09 + 0.01 * torch.rand(n, generator=gen(0), dtype=torch.float64)

    def around(shift: float, noise: float, seed: int) -> torch.Tensor:
        return base + shift + noise * torch.randn(n, generator=gen(seed), dtype=torch.float64)

    pixel = {"teacher/nfe35": torch.zeros(n, dtype=torch.float64), "sfd/nfe2": base, "vanilla/nfe2": around(0.01, 0.002, 1),
             "pd/nfe2": around(0.05, 0.002, 2), "dpmpp3m/nfe2": around(0.3, 0.01, 3), "euler/nfe2": around(0.5, 0.01, 4),
             "sfddm/nfe2": around(0.2, 0.02, 5), "sfddm_control/nfe2": around(0.202, 0.02, 6),
             "sfd-v/nfe3": around(-0.01, 0.002, 7), "pd/nfe3": around(0.03, 0.002, 8), "pd/nfe4": around(0.02, 0.002, 9)}
    feature = {k: 10 * v for k, v in pixel.items()}
    evaluation = {k: {"fid": 1.0, "kid": 0.01, "kid_std": 0.002} for k in pixel}
    return PairedDistances("teacher/nfe35", list(range(n)), pixel, feature), evaluation


def test_comparisons_pick_the_sfd_model_of_each_nfe_and_the_headline_pairs():
    dist, evaluation = synthetic_distances()
    pairs = {(c.a, c.b): c for c in comparisons(evaluation, dist, resamples=200)}
    assert set(pairs) == {("vanilla/nfe2", "sfd/nfe2"), ("pd/nfe2", "sfd/nfe2"), ("dpmpp3m/nfe2", "sfd/nfe2"),
                          ("euler/nfe2", "sfd/nfe2"), ("sfddm/nfe2", "sfd/nfe2"), ("sfddm_control/nfe2", "sfd/nfe2"),
                          ("sfddm/nfe2", "sfddm_control/nfe2"), ("pd/nfe3", "sfd-v/nfe3")}
    assert pairs[("vanilla/nfe2", "sfd/nfe2")].verdict() == "worse"
    assert pairs[("vanilla/nfe2", "sfd/nfe2")].statement().startswith("sfd/nfe2 is better than vanilla/nfe2 in teacher fidelity")
    control = pairs[("sfddm/nfe2", "sfddm_control/nfe2")]
    assert control.verdict() == "unresolved" and control.verdict("kid") == "unresolved"
    assert "unresolved at this sample size" in control.statement() and "is better than" not in control.statement()
    heads = headline_comparisons(list(pairs.values()), dist)
    assert [(label, c.a, c.b) for label, c in heads] == [
        ("vanilla/nfe2", "vanilla/nfe2", "sfd/nfe2"), ("pd/nfe2", "pd/nfe2", "sfd/nfe2"),
        ("best_training_free/nfe2", "dpmpp3m/nfe2", "sfd/nfe2"), ("sfddm/nfe2", "sfddm/nfe2", "sfddm_control/nfe2")]
    lines = headline_lines(paired_json(evaluation, dist, resamples=200), "PD statement.")
    assert sum("is better than" in line for line in lines) == 3 and sum("unresolved" in line for line in lines) == 1
    assert lines[-1] == "PD statement."


def test_the_headline_says_unresolved_for_overlapping_intervals():
    """The PD compute ratio is stated only where the paired interval excludes 0: an interval around 0 gives no
    "PD reached SFD's quality with 0.66x its compute", whatever the FIDs say."""
    rows = [Row("sfd", 2, 0.376, Cost(100, 0, 0, 1.0)), Row("pd", 2, 0.370, Cost(66, 0, 0, 1.0))]
    overlapping = {"difference": 0.001, "ci_low": -0.002, "ci_high": 0.004, "confidence": 0.95, "seeds": 256,
                   "better": None, "resolved": False}
    head = headline(rows, floor=0.378, paired=overlapping)
    assert head["status"] == "unresolved" and head["ratio_kind"] == "unresolved" and head["baseline_reached_reference"] is None
    assert "unresolved at this sample size" in head["statement"] and "supports no ratio" in head["statement"]
    assert "reached SFD's quality with" not in head["statement"] and "at most" not in head["statement"]
    # the same FIDs with a resolved paired difference: PD is worse, the ratio is a lower bound
    worse = {**overlapping, "difference": 0.05, "ci_low": 0.045, "ci_high": 0.055, "better": "b", "resolved": True}
    head = headline(rows, floor=0.378, paired=worse)
    assert head["ratio_kind"] == "lower bound" and head["baseline_reached_reference"] is False
    assert "SFD is better than PD" in head["statement"] and "more than 0.66x" in head["statement"]
    better = {**overlapping, "difference": -0.05, "ci_low": -0.055, "ci_high": -0.045, "better": "a", "resolved": True}
    assert headline(rows, paired=better)["ratio_kind"] == "upper bound"
    # without paired distances, an FID difference below the noise floor is unresolved too
    assert headline(rows, floor=0.378)["status"] == "unresolved"


def test_build_comparison_and_headline_metrics_carry_the_intervals(tmp_path):
    import json

    dist, evaluation = synthetic_distances()
    cost = tmp_path / "cost"
    cost.mkdir()
    for stage, fe in (("distill", 100), ("baseline_pd", 80), ("baseline_vanilla", 90), ("baseline_sfddm", 100)):
        record = {"stage": stage, "teacher_forward_images": fe, "wall_seconds": 1.0,
                  "consumed_trajectories": {"trajectories": 1, "teacher_forward_images": 0, "unknown_trajectories": 0}}
        (cost / f"{stage}.json").write_text(json.dumps(record))
    data, md = build_comparison(evaluation, cost, paired=dist, resamples=200, noise_floor={"floor": 0.5})
    pd = data["entries"]["pd/nfe2"]
    assert pd["paired_vs"]["b"] == "sfd/nfe2" and pd["paired_vs"]["verdict"] == "worse"
    assert pd["paired_vs"]["ci_low"] > 0 and pd["paired_pixel_rms"] == pytest.approx(float(dist.pixel["pd/nfe2"].mean()))
    head = data["headline"]
    assert head["basis"] == "paired pixel distance" and head["ratio_kind"] == "lower bound"  # FIDs equal: paired decides
    assert data["paired"]["resamples"] == 200 and len(data["paired"]["headline"]) == 4
    numbers = headline_metrics(evaluation, {"floor": 0.5}, paired=data["paired"])
    assert numbers["fid"]["sfd/nfe2"] == 1.0 and numbers["fid_noise_floor"] == 0.5
    paired = numbers["paired_pixel"]
    assert paired["sfd/nfe2"]["pixel_rms"] == pytest.approx(float(dist.pixel["sfd/nfe2"].mean()))
    assert set(paired) == {"sfd/nfe2", "vanilla/nfe2_vs_sfd/nfe2", "pd/nfe2_vs_sfd/nfe2",
                           "best_training_free/nfe2_vs_sfd/nfe2", "sfddm/nfe2_vs_sfddm_control/nfe2"}
    assert paired["vanilla/nfe2_vs_sfd/nfe2"]["ci_low"] > 0
    assert json.loads(json.dumps(numbers)) == numbers  # plain JSON for DVC
    table = paired_markdown(data["paired"], evaluation)
    assert "95% paired-bootstrap interval (200 resamples" in table
    row = next(line for line in table.splitlines() if line.startswith("| sfddm/nfe2 | sfddm_control/nfe2 |"))
    assert row.endswith("| unresolved |") and "(unresolved)" in row
    assert next(line for line in table.splitlines() if line.startswith("| pd/nfe2 | sfd/nfe2 |")).endswith("| worse |")
