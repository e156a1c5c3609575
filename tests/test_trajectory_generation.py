"""Generation stage: targets equal the teacher solver's states, keys per N, reuse, CLI errors, step binding."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config.params import parse_params
from pipeline.core.param_checks import ParamError
from pipeline.diffusion.schedules import Schedule, student_indices
from pipeline.diffusion.seeds import seed_labels, seed_noise
from pipeline.diffusion.solvers import solve
from pipeline.diffusion.denoisers import bind_num_steps
from pipeline.teachers.loader import bound_teacher_hash, gmm_teacher
from pipeline.trajectories.generation import parse_shard, run_trajectories_stage
from pipeline.config.trajectories import TrajectoryParams
from pipeline.trajectories.store import open_store
from pipeline.teachers.content import teacher_content_hash

ROOT = Path(__file__).resolve().parents[1]
TEACHER = {"source": "gmm", "num_components": 3, "sample_shape": [1, 4, 4], "std": 0.3, "seed": 1, "conditional": True}


def params(**section) -> dict:
    base = {"teacher": TEACHER, "solver": "dpmpp", "M": 3, "seeds": "0-15", "chunk_size": 8, "batch_size": 8,
            "schedule": {"kind": "polynomial", "num_steps": [3, 4], "t_min": 0.006, "t_max": 80.0, "rho": 7.0}}  # fmt: skip
    base.update(section)
    return {"seed": 0, "device": "cpu", "trajectories": base}


def run_stage(raw: dict, name: str, out, **kwargs):
    """The stage as stages/trajectories.py runs it: the whole file validated, the typed section passed on."""
    p = parse_params(raw)
    return run_trajectories_stage(p.section(name), out, name=name, device=p.device, **kwargs)


def test_stage_keys_per_num_steps_and_targets_equal_solver(tmp_path):
    out = tmp_path / "traj.zarr"
    summary, images = run_stage(params(), "trajectories", out, progress=False)
    assert [k["description"]["schedule"]["num_steps"] for k in summary["keys"]] == [3, 4]
    assert summary["chunks_generated"] == 4 and summary["trajectories_generated"] == 32
    assert images == 16 * 8 + 16 * 12  # (M+1)(N-1) NFE per trajectory for N = 3 and N = 4
    teacher = gmm_teacher(num_components=3, sample_shape=(1, 4, 4), std=0.3, seed=1, conditional=True)
    key = open_store(out).key(summary["keys"][1]["key"])
    spec = key.spec
    chunk = key.read_chunk(1)
    seeds = list(range(8, 16))
    fine = Schedule(num_steps=4).fine(3)
    assert len(fine) == 13
    x_T = (80.0 * seed_noise(seeds, (1, 4, 4), dtype=torch.float64)).float()
    labels = seed_labels(seeds, 3)
    _, states = solve(teacher.denoiser, x_T, fine, "dpmpp", max_order=3, labels=labels, record=[4, 8, 12])
    torch.testing.assert_close(torch.from_numpy(chunk["states"]), torch.stack(states, 1), rtol=0, atol=0)
    torch.testing.assert_close(torch.from_numpy(chunk["x_T"]), x_T, rtol=0, atol=0)
    assert student_indices(4, 3)[1:] == [4, 8, 12] and spec.num_targets == 3
    again, images = run_stage(params(), "trajectories", out, seeds="0-23", progress=False)
    assert (again["chunks_reused"], again["chunks_generated"]) == (4, 2)


def test_stage2_style_euler_afs_section(tmp_path):
    section = {"solver": "euler", "max_order": 1, "M": 2, "afs": True,
               "schedule": {"kind": "polynomial", "num_steps": 3, "t_min": 0.006, "t_max": 80.0, "rho": 7.0}}  # fmt: skip
    p = params(**section)
    p["trajectories_stage2"] = p.pop("trajectories")
    summary, images = run_stage(p, "trajectories_stage2", tmp_path / "s2.zarr", progress=False)
    d = summary["keys"][0]["description"]
    assert d["solver"] == {"name": "euler", "max_order": 1, "lower_order_final": True, "afs": True} and d["M"] == 2
    assert images == 16 * 5  # 7 fine timestamps, 6 Euler steps, AFS saves the first call


def test_stage_cli_writes_summary_cost_and_refuses_bad_seeds(tmp_path):
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(params(seeds="0-7")))
    cmd = [sys.executable, "-m", "stages.trajectories", "--params", str(pfile), "--section", "trajectories", "--out", str(tmp_path / "t.zarr"),
           "--summary", str(tmp_path / "m.json"), "--cost", str(tmp_path / "cost.json"), "--no-progress"]  # fmt: skip
    bad = subprocess.run(cmd + ["--seeds", "5-2"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "range '5-2' ends before it starts" in bad.stderr
    assert not (tmp_path / "t.zarr").exists() and not (tmp_path / "m.json").exists()
    ok = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    summary = json.loads((tmp_path / "m.json").read_text())
    assert summary["seeds"] == "0-7" and summary["chunks_generated"] == 2
    cost = json.loads((tmp_path / "cost.json").read_text())
    assert cost["stage"] == "trajectories" and cost["teacher_forward_images"] == 8 * 8 + 8 * 12


def test_bad_params_are_refused_before_writing(tmp_path):
    out = tmp_path / "t.zarr"
    with pytest.raises(ParamError, match="trajectories.solver: got 'rk4'"):
        run_stage(params(solver="rk4"), "trajectories", out, progress=False)
    with pytest.raises(ParamError, match="unknown key"):
        run_stage(params(chunks=8), "trajectories", out, progress=False)
    with pytest.raises(ParamError, match="max_order"):
        TrajectoryParams.from_dict({"solver": "dpmpp", "max_order": 4})
    with pytest.raises(ParamError, match="no teacher given"):
        run_stage(params(teacher=None), "trajectories", out, progress=False)
    with pytest.raises(ParamError, match="shard"):
        parse_shard("2/2")
    assert not out.exists()


def test_step_condition_binding_and_hash():
    seen = {}

    def net(x, sigma, labels=None, num_steps=None):
        seen["num_steps"] = num_steps
        return x * 0

    d = bind_num_steps(net, 7)
    d(torch.zeros(3, 1, 2, 2), torch.ones(3))
    assert seen["num_steps"].tolist() == [7, 7, 7]
    assert bound_teacher_hash("abc", None) == "abc"
    assert bound_teacher_hash("abc", 7) != bound_teacher_hash("abc", 6) != "abc"


def test_distilled_step_conditioned_checkpoint_as_teacher(tmp_path):
    from pipeline.core.checkpoints import save_checkpoint
    from pipeline.networks.unet import build_network

    cfg = {"img_resolution": 4, "in_channels": 1, "model_channels": 8, "channel_mult": [1], "num_blocks": 1,
           "attn_resolutions": [], "step_condition": True}  # fmt: skip
    torch.manual_seed(0)
    net = build_network(**cfg)
    sampler = {"solver": "euler", "max_order": 1, "afs": True, "step_condition": [4, 5, 6, 7], "guidance": 1.0,
               "schedule": {"kind": "polynomial", "num_steps": 7, "t_min": 0.006, "t_max": 80.0, "rho": 7.0}}  # fmt: skip
    config = {"network": cfg, "sigma_data": 0.5, "data": {"sample_shape": [1, 4, 4], "num_classes": 0},
              "sampler": sampler, "provenance": {}}  # fmt: skip
    save_checkpoint(tmp_path / "sfd_n7", net.state_dict(), config)
    section = {"solver": "euler", "max_order": 1, "M": 2, "afs": True, "seeds": "0-7", "chunk_size": 8,
               "schedule": {"kind": "polynomial", "num_steps": 3, "t_min": 0.006, "t_max": 80.0, "rho": 7.0}}  # fmt: skip
    p = {"device": "cpu", "trajectories_stage2": section}
    summary, images = run_stage(p, "trajectories_stage2", tmp_path / "s2.zarr",
                                teacher_ckpt=tmp_path / "sfd_n7", progress=False)  # fmt: skip
    d = summary["keys"][0]["description"]
    from pipeline.core.hashing import hash_state_dict

    from pipeline.teachers.loader import load_teacher

    assert d["teacher_hash"] == bound_teacher_hash(teacher_content_hash(load_teacher(tmp_path / "sfd_n7").model), 7)
    assert load_teacher(tmp_path / "sfd_n7").network_hash == hash_state_dict(net.state_dict())
    assert d["labels"]["policy"] == "none" and images == 8 * 5
