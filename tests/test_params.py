"""params.yaml loading: every section validated once, errors name the key, shared keys inherited."""

from pathlib import Path

import pytest
import yaml

from pipeline.core.param_checks import ParamError
from pipeline.config.params import load_params, parse_params


def test_repository_params_file_is_valid():
    p = load_params(Path(__file__).parents[1] / "params.yaml")
    assert p.trajectories.schedule["num_steps"] == 4
    assert p.distill.trajectories == "trajectories"
    assert p.distill_v.step_condition is True
    assert p.distill_stage2.trajectories == "trajectories_stage2"
    assert p.loss in ("l1", "l2", "pseudo_huber", "lpips")


def test_shared_keys_are_inherited_unless_a_section_sets_its_own():
    p = parse_params({"seed": 7, "device": "cpu", "threads": 2, "distill": {"seed": 3}})
    assert p.distill.seed == 3 and p.distill_v.seed == 7
    assert p.baseline_pd.seed == 7 and p.baseline_pd.device == "cpu"
    assert p.distill.threads == 2
    assert p.resolved["distill_v"]["seed"] == 7
    assert "seed" not in p.resolved["trajectories"]  # no such field: seeds are a range there


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"sed": 1}, "unknown key.*sed"),
        ({"device": "gpu"}, "device.*'auto', 'cpu'"),
        ({"loss": "l3"}, "loss.*l1"),
        ({"threads": -1}, "threads"),
        ({"distill": {"kimg": 0}}, "distill.kimg"),
        ({"distill_v": {"lr_decay_at": 2}}, "distill_v.lr_decay_at"),
        ({"trajectories_v": {"solver": "rk4"}}, "trajectories_v.solver.*dpmpp"),
        ({"baseline_pd": {"start_steps": 48}}, "baseline_pd.start_steps"),
        ({"teacher": {"stepz": 1}}, "teacher.*stepz"),
        ({"report": "x"}, "report: expected a mapping"),
    ],
)
def test_errors_name_the_key_and_allowed_values(raw, match):
    with pytest.raises(ParamError, match=match):
        parse_params(raw)


def test_missing_and_malformed_files_are_named(tmp_path):
    with pytest.raises(ParamError, match="does not exist"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1\n")
    with pytest.raises(ParamError, match="not valid YAML"):
        load_params(bad)
    ok = tmp_path / "ok.yaml"
    ok.write_text(yaml.safe_dump({"seed": 1}))
    assert load_params(ok).seed == 1


def test_cifar10_preset_is_valid():
    p = load_params(Path(__file__).parents[1] / "presets" / "cifar10.yaml")
    assert p.distill.kimg == 200 and p.distill_v.kimg == 800 and p.distill_stage2.kimg == 2000
    assert p.evaluate.features == "inception" and p.distill_stage2.lpips_last_step



def test_threads_setting_is_applied():
    import torch

    assert parse_params({"threads": 2}).apply_threads() == 2 == torch.get_num_threads()
    assert parse_params({"threads": 0}).apply_threads() == 2  # 0 leaves torch's setting as it is
    # (the conftest fixture restores one thread after the test)
