"""The shipped default teacher (teachers/digits): its recipe is params.yaml's, its file is intact, retraining it
reproduces its first steps, and the teacher stage imports it (pipeline.teachers.shipped).

The full retraining (2,500 steps, ~10 minutes on 2 CPU cores) is bench/teacher_retrain.py, not a test: it
reproduces the shipped weights hash on a machine with the shipped one's signature (bench/teacher_retrain.json).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config.params import load_params, parse_params
from pipeline.core.checkpoints import load_checkpoint
from pipeline.core.hashing import hash_state_dict
from pipeline.core.machine import machine_signature
from pipeline.teachers import shipped

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "teachers" / "digits"
STEPS = 12  # retrained first steps compared with training.json (about 3 s on one CPU core)
# Relative tolerance of those losses on a CPU other than the shipped one's: they differ in the last bits of the
# float32 sums (round-off ~1e-7 per step, growing with the steps); the same signature must give them exactly.
LOSS_RTOL_OTHER_CPU = 1e-4


def test_params_yaml_uses_the_shipped_teacher_and_its_recipe():
    p = load_params(ROOT / "params.yaml")
    assert Path(p.teacher.pretrained) == Path("teachers/digits")
    assert shipped.recipe_differences(p.teacher, SHIPPED) == []
    changed = shipped.training_params(p.teacher, steps=p.teacher.steps + 1)
    assert shipped.recipe_differences(changed, SHIPPED) == [f"teacher.steps: params {p.teacher.steps + 1}, shipped {p.teacher.steps}"]


def test_shipped_file_is_intact():
    tensors, config = load_checkpoint(SHIPPED)
    provenance, record = shipped.read_shipped(SHIPPED)
    assert hash_state_dict(tensors) == provenance["weights_hash"] == record["weights_hash"]
    assert record["steps"] == provenance["training"]["steps"] and len(record["first_losses"]) >= STEPS
    assert config["data"] == {"sample_shape": [1, 8, 8], "num_classes": 10}


def test_retraining_reproduces_the_first_steps(tmp_path):
    p = load_params(ROOT / "params.yaml")
    _, record = shipped.read_shipped(SHIPPED)
    summary = shipped.retrain(p, tmp_path / "teacher", steps=STEPS, progress=False)
    same_machine = record["machine"]["signature"] == machine_signature()
    ok, rel = shipped.first_losses_close(record, summary["first_losses"], 0.0 if same_machine else LOSS_RTOL_OTHER_CPU)
    assert ok, f"first {STEPS} losses differ from training.json's by {rel:.3g} (relative) on {machine_signature()}"
    assert len(summary["first_losses"]) == STEPS
    # the check can fail: another recipe (a 1.5x lr) moves the first steps beyond the tolerance
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["teacher"]["lr"] *= 1.5
    faster = parse_params(raw)
    other = shipped.retrain(faster, tmp_path / "other", steps=4, progress=False)
    assert not shipped.first_losses_close(record, other["first_losses"], LOSS_RTOL_OTHER_CPU)[0]


def test_teacher_stage_imports_the_shipped_weights(tmp_path):
    """`python -m stages.teacher` on params.yaml copies teachers/digits byte for byte (no training)."""
    from pipeline.data.datasets import prepare_dataset

    p = load_params(ROOT / "params.yaml")
    prepare_dataset(p.data, tmp_path / "data")
    out = tmp_path / "teacher"
    cmd = [sys.executable, "-m", "stages.teacher", "--params", str(ROOT / "params.yaml"), "--data", str(tmp_path / "data"),
           "--out", str(out), "--state", str(tmp_path / "state"), "--metrics", str(tmp_path / "m.json"),
           "--live", str(tmp_path / "live"), "--cost", str(tmp_path / "cost.json")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "model.safetensors").read_bytes() == (SHIPPED / "model.safetensors").read_bytes()
    summary = json.loads((tmp_path / "m.json").read_text())
    assert summary["steps"] == 0 and Path(summary["pretrained"]) == Path("teachers/digits")


def test_dvc_yaml_teacher_stage_depends_on_the_shipped_file_through_its_manifest():
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["teacher"]
    assert "data/inputs/teacher.pretrained.json" in stage["deps"]
