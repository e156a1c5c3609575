"""params.yaml loading: every section validated once, errors name the key, shared keys inherited."""

import re
from pathlib import Path

import pytest
import yaml

from pipeline.config.params import load_params, parse_params
from pipeline.config.trajectories import TrajectoryParams
from pipeline.core.param_checks import ParamError
from pipeline.trajectories.spec import trajectory_specs


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
    assert p.distill_v.seed == 7 and not hasattr(p, "resolved")  # the stages get typed sections, never raw dicts
    assert "seed" not in TrajectoryParams.__dataclass_fields__  # no such field: seeds are a range there


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


ROOT = Path(__file__).parents[1]


def preset_params(name: str):
    """The validated params a preset gives on the shipped params.yaml (what `sfd preset apply` writes)."""
    from pipeline.config.presets import merged_preset

    return parse_params(merged_preset(name, ROOT / "params.yaml", ROOT / "presets"))


def test_cifar10_preset_is_valid():
    p = preset_params("cifar10")
    assert p.distill.kimg == 200 and p.distill_v.kimg == 800 and p.distill_stage2.kimg == 2000
    assert p.evaluate.features == "inception" and p.distill_stage2.lpips_last_step
    assert p.teacher.pretrained == "/models/edm-cifar10-32x32-uncond-vp.pkl"
    assert p.evaluate.seeds == "0-49999" and p.evaluate.reference_stats == "/refs/cifar10-32x32.npz"


PRESETS = sorted((ROOT / "presets").glob("*.yaml"))


def preset_targets(preset: Path) -> list[str]:
    """The stages a preset's ``# Use:`` line runs (``dvc repro A B`` -> [A, B]; plain ``dvc repro`` -> [])."""
    import re

    use = next(line for line in preset.read_text().splitlines() if line.startswith("# Use:"))
    return re.search(r"dvc repro([\w@ ]*)", use).group(1).split()


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_validates(preset):
    """Every preset passes `sfd params check` (its local files need not exist) and uses EDM's FID protocol."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    targets = [a for t in preset_targets(preset) for a in ("--target", t)]
    result = CliRunner().invoke(app, ["params", "check", str(ROOT / "params.yaml"), "--preset", str(preset),
                                      "--dvc-yaml", str(ROOT / "dvc.yaml"), *targets])
    assert result.exit_code == 0, result.output
    assert "keys tracked by dvc.yaml" in result.output  # the keys DVC will ask for are there (precision, ...)
    p = preset_params(preset.stem)
    if preset.stem in TRAINED_TEACHER_PRESETS:  # the embedded digits, a teacher the teacher stage trains
        assert p.teacher.pretrained is None and p.evaluate.features == "classifier"
        return
    if preset.stem in DIFFUSERS_PRESETS:  # a diffusers folder; text-to-image evaluates FID-30k as the authors (SD)
        assert p.teacher.pretrained and not p.teacher.pretrained.endswith(".pkl")
        assert p.evaluate.seeds == ("0-29999" if p.teacher.prompts else "0-49999")
    else:
        assert p.teacher.pretrained and p.teacher.pretrained.endswith(".pkl")
        assert p.evaluate.seeds == "0-49999"
    assert p.evaluate.features == "inception" and p.evaluate.reference_stats


DIFFUSERS_PRESETS = ("ddpm-cifar10", "sd15", "sd3-medium", "flux1")
TRAINED_TEACHER_PRESETS = ("flow-digits",)


def test_diffusers_presets():
    sd = preset_params("sd15")
    (s,) = sd.trajectories.schedules()
    assert s.t_min == 0.1 and "t_max" not in sd.trajectories.schedule  # t_max: the teacher's sigma_max, 14.6146
    assert sd.teacher.prompts.endswith(".csv") and sd.distill.guidance == 1.0 and 7.5 in sd.evaluate.student_guidance
    assert sd.evaluate.clip_weights and sd.trajectories.M == 3 and sd.distill.kimg == 200 and sd.distill.lr == 5e-5
    ddpm = preset_params("ddpm-cifar10")
    assert ddpm.trajectories.schedule["t_min"] == 0.01  # DDPM's smallest sigma (0.0100005, within 0.1%)


def test_the_presets_are_there():
    assert {p.stem for p in PRESETS} >= {"cifar10", "ffhq64", "afhqv2-64", "imagenet64", "ddpm-cifar10", "sd15"}



def test_threads_setting_is_applied():
    import torch

    assert parse_params({"threads": 2}).apply_threads() == 2 == torch.get_num_threads()
    assert parse_params({"threads": 0}).apply_threads() == 2  # 0 leaves torch's setting as it is
    # (the conftest fixture restores one thread after the test)


# ---- typed sections: one-line errors with the full key path ----------------------------------------


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"trajectories": {"schedule": {"t_min": -1}}}, "trajectories.schedule.t_min: must be > 0, got -1"),
        ({"trajectories_v": {"schedule": {"num_steps": [4, 1]}}}, "trajectories_v.schedule.num_steps: must be >= 2, got 1"),
        ({"distill_v": {"lr": True}}, "distill_v.lr: expected a number, got True"),
        ({"distill": {"kimg": "5"}}, "distill.kimg: expected a number, got '5'"),
        ({"baseline_pd": {"lr": True}}, "baseline_pd.lr: expected a number, got True"),
        ({"evaluate": {"solvers": ["rk4"]}}, "evaluate.solvers[0]: got 'rk4'; allowed values: 'euler', 'heun', 'dpm2', "
                                             "'ipndm', 'dpmpp', 'dpmpp2m', 'dpmpp3m'"),
        ({"teacher": {"network": {"channel_mult": [1, 0]}}}, "teacher.network.channel_mult[1]: must be >= 1, got 0"),
        ({"teacher": {"network": {"channel_mult": "12"}}}, "teacher.network.channel_mult: expected a list, got '12'"),
        ({"distill": {"loss": "l3"}}, "distill.loss: got 'l3'; allowed values: 'l1', 'l2', 'pseudo_huber', 'lpips'"),
        ({"trajectories": {"compressor": 5}}, "trajectories.compressor: got 5; allowed values: 'blosc-zstd', 'blosc-lz4', 'zstd', 'none'"),
        ({"baseline_vanilla": {"schedule": {"num_steps": 2}}}, "baseline_vanilla.schedule.num_steps: with afs the student needs N >= 3, got 2"),
        ({"teacher": {"device": "gpu"}}, "teacher.device: got 'gpu'; allowed values: 'auto', 'cpu', 'cuda', 'cuda:N'"),
        ({"seed": 1.5}, "seed: expected an integer, got 1.5"),
        ({"evaluate": {"round_nfes": []}}, "evaluate.round_nfes: expected at least 1 item(s), got []"),
        ({"evaluate": {"round_nfes": [2, 0]}}, "evaluate.round_nfes[1]: must be >= 1, got 0"),
    ],
)
def test_a_bad_nested_value_is_one_line_naming_the_full_path(raw, message):
    with pytest.raises(ParamError) as info:
        parse_params(raw)
    assert str(info.value) == message and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "raw, prefix",
    [
        ({"distill": {"kimgg": 1}}, "distill: unknown key(s) kimgg"),
        ({"teacher": {"network": {"model_chanels": 8}}}, "teacher.network: unknown key(s) model_chanels"),
        ({"trajectories": {"schedule": {"steps": 4}}}, "trajectories.schedule: unknown key(s) steps"),
        ({"evaluate": {"schedule": {"num_steps": 4}}}, "evaluate.schedule: unknown key(s) num_steps"),  # N comes from nfes
    ],
)
def test_unknown_keys_are_refused_with_the_known_ones(raw, prefix):
    with pytest.raises(ParamError) as info:
        parse_params(raw)
    assert str(info.value).startswith(prefix + "; known keys: ")


def test_ints_are_accepted_where_floats_are_expected():
    p = parse_params({"distill": {"lr": 1, "kimg": 5}, "trajectories": {"schedule": {"t_max": 80}}})
    assert p.distill.lr == 1.0 and isinstance(p.distill.kimg, float)
    assert isinstance(p.trajectories.schedule["t_max"], float)


def test_distill_sections_name_an_existing_trajectories_section():
    with pytest.raises(ParamError, match=r"^distill_v.trajectories: got 'trajectories_x'; allowed values: 'trajectories', "
                                         r"'trajectories_v', 'trajectories_stage2'$"):
        parse_params({"distill_v": {"trajectories": "trajectories_x"}})
    with pytest.raises(ParamError, match="distill.trajectories: got 'evaluate'"):
        parse_params({"distill": {"trajectories": "evaluate"}})  # a section, but not a trajectories one


def test_evaluation_seeds_are_disjoint_from_every_trajectories_section():
    with pytest.raises(ParamError, match=r"^evaluate.seeds: '2000-2999' overlaps trajectories_v.seeds '0-2047' "
                                         r"\(48 seed\(s\) in common, e.g. 2000\)"):
        parse_params({"trajectories_v": {"seeds": "0-2047"}, "evaluate": {"seeds": "2000-2999"}})
    parse_params({"trajectories_v": {"seeds": "0-1999"}, "evaluate": {"seeds": "2000-2999"}})


@pytest.mark.parametrize("section", ["trajectories_stage2", "baseline_vanilla"])
def test_max_order_only_where_the_solver_uses_it(section):
    with pytest.raises(ParamError, match=rf"^{section}.max_order: only ipndm \(1-4\) and dpmpp \(1-3\) use max_order; "
                                         r"for 'euler' leave it out or set 1, got 4$"):
        parse_params({section: {"solver": "euler", "max_order": 4}})
    assert parse_params({section: {"solver": "euler"}}).section(section).max_order == 1  # normalised, not the default 3
    assert parse_params({section: {"solver": "heun", "max_order": 1}}).section(section).max_order == 1
    assert parse_params({section: {"solver": "ipndm", "max_order": 4}}).section(section).max_order == 4
    assert parse_params({section: {"solver": "dpmpp"}}).section(section).max_order == 3
    with pytest.raises(ParamError, match=rf"^{section}.max_order: must lie in 1..3 for 'dpmpp', got 4$"):
        parse_params({section: {"solver": "dpmpp", "max_order": 4}})


def test_sections_by_type_for_the_stages():
    p = parse_params({})
    assert p.trajectories_for("distill_v") is p.trajectories  # the default distill_v reads `trajectories`
    assert p.section("trajectories_v", TrajectoryParams) is p.trajectories_v
    with pytest.raises(ParamError, match="distill: not a TrajectoryParams section; allowed values: 'trajectories'"):
        p.section("distill", TrajectoryParams)
    with pytest.raises(ParamError, match="no section 'nope'"):
        p.section("nope")


# Store keys of the repository's params.yaml (teacher hash "0" * 32) since spec_version 2 (issue 28: the teacher
# hash became the teacher's complete description); a change here means every cached trajectory would be regenerated.
STORE_KEYS = {
    ("trajectories", 10): ["373c724a891ec8bc419577b6e8879a46"],
    ("trajectories", 0): ["84b2eb83830382d30f8cf996d1fe4d8d"],
    ("trajectories_v", 10): ["373c724a891ec8bc419577b6e8879a46", "eb72f3728508fa11e6e6a90799fd68d9",
                             "f78ce1cd9998d13b75ab2838a6e9f375", "7ccd554d1761f98582f193e7dcbe17f7"],
    ("trajectories_v", 0): ["84b2eb83830382d30f8cf996d1fe4d8d", "3a427b8db0a113d35ffe19b4daab31ac",
                            "b36aaad674e66fb07163c31e30959051", "93d93c61d0d3b2536f3e7d9930dac6af"],
    ("trajectories_stage2", 10): ["455f037760f5b0cbbe3922c200a740b1"],
    ("trajectories_stage2", 0): ["a1074f032b379fdb7b5bd1b4f3a946e0"],
}  # fmt: skip


@pytest.mark.parametrize("preset", [None, "cifar10"])
def test_store_keys_of_the_default_params_are_unchanged(preset):
    p = load_params(ROOT / "params.yaml") if preset is None else preset_params(preset)
    for (name, num_classes), keys in STORE_KEYS.items():
        shape = (1, 8, 8) if num_classes else (3, 32, 32)
        specs = trajectory_specs(p.section(name), teacher_hash="0" * 32, num_classes=num_classes, sample_shape=shape)
        assert [s.key for s in specs] == keys, (name, num_classes)


def test_params_check_command(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    runner = CliRunner()
    root = Path(__file__).parents[1]
    ok = runner.invoke(app, ["params", "check", str(root / "params.yaml")])
    assert ok.exit_code == 0, ok.output
    assert re.fullmatch(rf"ok: {root / 'params.yaml'} \(14 sections, \d+ keys tracked by dvc.yaml\)", ok.output.strip())
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"trajectories": {"schedule": {"t_min": -1}}}))
    result = runner.invoke(app, ["params", "check", str(bad)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["error: trajectories.schedule.t_min: must be > 0, got -1"]
    missing = runner.invoke(app, ["params", "check", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_params_check_refuses_what_dvc_would_refuse(tmp_path):
    """A key dvc.yaml tracks but the file lacks (DVC refuses the stage even where the code has a default) fails
    `sfd params check` with one line naming the key and its stages; --target checks only what those stages run."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    del raw["precision"]
    del raw["baseline_pd"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["params", "check", str(path), "--dvc-yaml", str(ROOT / "dvc.yaml")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "baseline_pd (tracked by baseline_pd)" in result.output and "precision (tracked by teacher," in result.output
    only = CliRunner().invoke(app, ["params", "check", str(path), "--dvc-yaml", str(ROOT / "dvc.yaml"), "--target", "data"])
    assert only.exit_code == 0, only.output  # the data stage tracks neither
    teacher = CliRunner().invoke(app, ["params", "check", str(path), "--dvc-yaml", str(ROOT / "dvc.yaml"), "--target", "teacher"])
    assert teacher.exit_code == 2 and "precision (tracked by teacher)" in teacher.output and "baseline_pd" not in teacher.output


def test_several_n_without_step_conditioning_is_refused_at_params_check():
    """SFD-v's rule between sections: a trajectories section with several N needs a step-conditioned student."""
    with pytest.raises(ParamError, match=r"distill_v.step_condition: trajectories_v.schedule.num_steps lists several N"):
        parse_params({"distill_v": {"trajectories": "trajectories_v", "step_condition": False},
                      "trajectories_v": {"schedule": {"num_steps": [4, 5]}}})
    parse_params({"trajectories": {"schedule": {"num_steps": [4, 5]}}})  # no distill section reads it: nothing runs
    with pytest.raises(ParamError, match=r"N=2 with distill.afs=True leaves no network step"):
        parse_params({"trajectories": {"schedule": {"num_steps": 2}}, "distill": {}})


def test_params_check_states_what_whole_chunks_cost(tmp_path):
    """Seeds not aligned to chunk_size generate whole chunks: `sfd params check` says how many trajectories
    that is beyond the range (and says nothing for an aligned one)."""
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.config.params import parse_params

    p = parse_params({"trajectories": {"seeds": "50-149", "chunk_size": 64}})
    assert p.trajectories.chunk_overhead() == (100, 192)  # 3 chunks: 0-63, 64-127, 128-191
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"data": {}, "trajectories": {"seeds": "0-99", "chunk_size": 64}}))
    result = CliRunner().invoke(app, ["params", "check", str(path), "--dvc-yaml", str(ROOT / "dvc.yaml"),
                                      "--target", "data"])
    assert result.exit_code == 0, result.output
    assert "note: trajectories.seeds '0-99' with chunk_size 64: 128 trajectories per N are generated for 100 seeds" \
        " (28 more, +28%" in result.output
    assert parse_params({"trajectories": {"seeds": "0-127", "chunk_size": 64}}).trajectories.chunk_overhead_note("t") is None


def test_sfd_commands_and_the_feature_net_fail_in_one_line(tmp_path):
    """A bad `sfd sample` argument and a feature network below its accuracy floor: one line, exit code 2."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "sample", "--teacher", "gmm", "--seeds", "abc",
                        "--out", str(tmp_path / "s")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["error: seeds: cannot parse 'abc' in 'abc'; use e.g. '0-99'"]
    from pipeline.config.evaluation import FeatureNetParams
    from pipeline.config.validation import validate_section
    from pipeline.evaluation.feature_net import FeatureNetError, train_feature_net
    import torch

    p = validate_section(FeatureNetParams, {"channels": 4, "feature_dim": 8, "epochs": 1, "min_accuracy": 1.0}, "feature_net")
    images, labels = torch.rand(40, 1, 8, 8) * 2 - 1, torch.arange(40) % 4
    with pytest.raises(FeatureNetError, match="below feature_net.min_accuracy=1.0"):
        train_feature_net(p, (images[:30], labels[:30]), (images[30:], labels[30:]), 4, tmp_path / "fn", progress=False)
    assert not (tmp_path / "fn").exists()  # nothing written


def test_params_check_refuses_what_the_stages_would_refuse(tmp_path):
    """`sfd params check` holds the rules the stages used to re-check: SFD-v's step conditioning against its list
    of N, a LoRA student that is step-conditioned, a trajectories section's built-in teacher."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    cases = {
        "distill_v.step_condition: trajectories_v.schedule.num_steps lists several N": {
            "trajectories_v": {"schedule": {"num_steps": [3, 4]}},
            "distill_v": {"trajectories": "trajectories_v", "step_condition": False}},
        "distill_v.lora_rank: LoRA students are single-N": {
            "trajectories_v": {"schedule": {"num_steps": [3, 4]}},
            "distill_v": {"trajectories": "trajectories_v", "step_condition": True, "lora_rank": 4}},
        "trajectories.teacher.source: got 'edm'": {"trajectories": {"teacher": {"source": "edm"}}},
        "trajectories.teacher.path: the 'checkpoint' teacher source needs": {
            "trajectories": {"teacher": {"source": "checkpoint"}}},
        "trajectories.teacher: unknown key(s) width": {"trajectories": {"teacher": {"source": "gmm", "width": 3}}},
    }
    for message, raw in cases.items():
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(raw))
        result = CliRunner().invoke(app, ["params", "check", str(path), "--dvc-yaml", str(tmp_path / "none.yaml")])
        assert result.exit_code == 2 and message in " ".join(result.output.split()), (message, result.output)


def test_presets_are_overlays_applied_by_one_command(tmp_path):
    """A preset holds only what differs from params.yaml (under half its length); `sfd preset apply` writes the
    merged, validated file, refuses a second preset on top, and a null section is one the preset does not run."""
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.config.presets import merge_overlay

    limit = len((ROOT / "params.yaml").read_text().splitlines()) / 2
    assert all(len(p.read_text().splitlines()) < limit for p in PRESETS), {p.stem: len(p.read_text().splitlines())
                                                                           for p in PRESETS}
    base = tmp_path / "params.yaml"
    base.write_text((ROOT / "params.yaml").read_text())
    result = CliRunner().invoke(app, ["preset", "apply", "sd15", "--base", str(base)])
    assert result.exit_code == 0, result.output
    merged = yaml.safe_load(base.read_text())
    assert merged == merge_overlay(yaml.safe_load((ROOT / "params.yaml").read_text()),
                                   yaml.safe_load((ROOT / "presets" / "sd15.yaml").read_text()))
    assert "baseline_pd" not in merged and merged["distill"]["kimg"] == 200  # sd15 runs no baselines
    assert load_params(base).teacher.prompts.endswith(".csv")
    again = CliRunner().invoke(app, ["preset", "apply", "cifar10", "--base", str(base)])
    assert again.exit_code == 2 and "already has the preset 'sd15' applied" in again.output
    assert merge_overlay({"a": {"x": 1, "y": [1]}, "b": {"z": 1}, "s": 1}, {"a": {"y": [2]}, "b": None, "s": None}) == {
        "a": {"x": 1, "y": [2]}, "s": None}
