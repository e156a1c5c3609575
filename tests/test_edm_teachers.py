"""Bring your own teacher: EDM networks and pickles through the one teacher loader.

A tiny EDM model (our port, VPPrecond + SongUNet) is written as an EDM snapshot pickle the way EDM's
persistence writes it (tests/test_edm_pickle.py's ``write_port_snapshot``), then loaded from the
pickle and from the folder ``sfd teacher import`` converts it into.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.core.checkpoints import CheckpointError
from pipeline.core.hashing import hash_file, hash_state_dict
from pipeline.networks.edm import build_edm_model
from pipeline.teachers.edm_pickle import EDMPickleMissing
from pipeline.teachers.loader import load_network, load_teacher
from test_edm_pickle import write_port_snapshot
from pipeline.teachers.content import teacher_content_hash

TINY = dict(img_resolution=8, img_channels=3, label_dim=0, use_fp16=False, model_type="SongUNet", model_channels=4,
            channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], resample_filter=[1, 1], augment_dim=9,
            dropout=0.13)


def tiny_edm_model(precond: str = "VPPrecond", kwargs: dict | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_edm_model(precond, dict(TINY if kwargs is None else kwargs)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # EDM zero-initialises some layers: make every weight matter
    return model


@pytest.fixture
def edm_pkl(tmp_path) -> Path:
    path = tmp_path / "edm-tiny-8x8-uncond-vp.pkl"
    write_port_snapshot(path, tiny_edm_model(), tmp_path / "ran.txt")
    return path


def import_pkl(src: Path, out: Path) -> None:
    from pipeline.teachers.import_cli import import_edm_pickle

    import_edm_pickle(src, out)


def outputs(teacher, labels=None) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, *teacher.sample_shape, generator=g)
    with torch.no_grad():
        return teacher.denoiser(x, torch.tensor([0.05, 1.0, 40.0]), labels)


def test_load_teacher_reads_an_edm_pickle(edm_pkl, tmp_path):
    teacher = load_teacher(edm_pkl)
    assert not (tmp_path / "ran.txt").exists()
    assert type(teacher.denoiser).__name__ == "VPPrecond" and teacher.model is teacher.denoiser
    assert teacher.sample_shape == (3, 8, 8) and teacher.num_classes == 0
    assert teacher.network_hash == hash_state_dict(teacher.denoiser.state_dict())
    assert teacher.weights_hash == teacher_content_hash(teacher.model)  # + the preconditioner and its arguments
    assert teacher.config["architecture"] == "edm" and teacher.config["edm"]["precond"] == "VPPrecond"
    assert teacher.config["edm"]["init_kwargs"]["model_channels"] == 4
    assert teacher.config["data"] == {"sample_shape": [3, 8, 8], "num_classes": 0}
    assert teacher.config["sampler"] is None and not teacher.is_distilled
    prov = teacher.config["provenance"]
    assert prov["kind"] == "teacher" and prov["source_file"] == edm_pkl.name and prov["source_hash"] == hash_file(str(edm_pkl))
    json.dumps(teacher.config)  # plain JSON, as the converted folder holds it


def test_pickle_and_converted_folder_agree_bit_for_bit(edm_pkl, tmp_path):
    out = tmp_path / "converted"
    import_pkl(edm_pkl, out)
    from_pkl, from_dir = load_teacher(edm_pkl), load_teacher(out)
    assert from_dir.config == from_pkl.config == json.loads((out / "model.json").read_text())
    assert from_dir.weights_hash == from_pkl.weights_hash and from_dir.network_hash == from_pkl.network_hash
    assert type(from_dir.denoiser) is type(from_pkl.denoiser)
    assert torch.equal(outputs(from_dir), outputs(from_pkl))
    model, config = load_network(out)
    assert config["architecture"] == "edm" and not model.training
    assert list(model.state_dict()) == list(from_pkl.denoiser.state_dict())


def test_conditional_iddpm_keeps_u_and_labels(tmp_path):
    """A conditional iDDPM/ADM-style network: the ``u`` buffer is in the checkpoint, labels are class indices."""
    kw = dict(img_resolution=8, img_channels=3, label_dim=5, use_fp16=False, model_type="DhariwalUNet",
              model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.1)
    model = tiny_edm_model("iDDPMPrecond", kw)
    pkl = tmp_path / "adm.pkl"
    write_port_snapshot(pkl, model, tmp_path / "ran.txt")
    import_pkl(pkl, tmp_path / "adm")
    a, b = load_teacher(pkl), load_teacher(tmp_path / "adm")
    assert "u" in a.denoiser.state_dict() and a.num_classes == b.num_classes == 5
    assert a.weights_hash == b.weights_hash
    labels = torch.tensor([0, 3, 4])
    assert torch.equal(outputs(a, labels), outputs(b, labels))


def test_a_missing_pickle_names_it_and_where_pickles_come_from(tmp_path):
    missing = tmp_path / "edm-cifar10-32x32-uncond-vp.pkl"
    with pytest.raises(EDMPickleMissing, match="edm-cifar10-32x32-uncond-vp.pkl") as info:
        load_teacher(missing)
    assert "nvlabs-fi-cdn.nvidia.com/edm/pretrained" in str(info.value)


def test_top_level_load_teacher_reads_the_pickle(edm_pkl):
    from pipeline import load_teacher as top_level

    assert top_level(edm_pkl).weights_hash == load_teacher(edm_pkl).weights_hash


def test_sfd_teacher_import_command(edm_pkl, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    out = tmp_path / "teacher"
    result = CliRunner().invoke(app, ["teacher", "import", str(edm_pkl), "--out", str(out)])
    assert result.exit_code == 0, result.output
    teacher = load_teacher(edm_pkl)
    n = sum(p.numel() for p in teacher.denoiser.parameters())
    assert "VPPrecond" in result.output and f"{n:,}" in result.output and teacher.weights_hash in result.output
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors"]
    assert torch.equal(outputs(load_teacher(out)), outputs(teacher))

    missing = CliRunner().invoke(app, ["teacher", "import", str(tmp_path / "nope.pkl"), "--out", str(tmp_path / "x")])
    assert missing.exit_code == 2 and "nope.pkl" in missing.output and not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- the teacher stage's import


@pytest.mark.parametrize("form", ["pkl", "folder"])
def test_teacher_stage_imports_a_pickle_or_a_converted_folder(edm_pkl, tmp_path, form):
    from pipeline.teachers.training import import_pretrained_teacher

    source = edm_pkl
    if form == "folder":
        source = tmp_path / "converted"
        import_pkl(edm_pkl, source)
    desc = {"name": "tiny", "sample_shape": [3, 8, 8], "num_classes": 0}
    out = tmp_path / "models" / "teacher"
    summary = import_pretrained_teacher(source, out, desc)
    from_pkl = load_teacher(edm_pkl)
    assert summary["weights_hash"] == from_pkl.weights_hash and summary["edm_class"] == "VPPrecond"
    teacher = load_teacher(out)
    assert teacher.weights_hash == from_pkl.weights_hash and teacher.config == from_pkl.config
    assert torch.equal(outputs(teacher), outputs(from_pkl))
    if form == "folder":
        for name in ("model.safetensors", "model.json"):
            assert (out / name).read_bytes() == (source / name).read_bytes()


def test_teacher_stage_refuses_a_wrong_shape_and_a_missing_file(edm_pkl, tmp_path):
    from pipeline.teachers.training import import_pretrained_teacher

    with pytest.raises(CheckpointError, match=r"shape \[3, 8, 8\], the data has \[1, 28, 28\]") as info:
        import_pretrained_teacher(edm_pkl, tmp_path / "t", {"name": "mnist", "sample_shape": [1, 28, 28]})
    assert edm_pkl.name in str(info.value) and not (tmp_path / "t").exists()
    with pytest.raises(EDMPickleMissing, match="edm-ffhq-64x64-uncond-vp.pkl"):
        import_pretrained_teacher(tmp_path / "edm-ffhq-64x64-uncond-vp.pkl", tmp_path / "t", {"sample_shape": [3, 64, 64]})
    with pytest.raises(CheckpointError, match=r"nothing/model\.safetensors is missing.*sfd teacher import"):
        import_pretrained_teacher(tmp_path / "nothing", tmp_path / "t", {"sample_shape": [3, 8, 8]})


# ----------------------------------------------------------------------------- trajectories from an EDM teacher


def test_trajectories_from_an_edm_teacher(edm_pkl, tmp_path):
    from pipeline.config.params import parse_params
    from pipeline.trajectories.generation import generate_trajectories, run_trajectories_stage
    from pipeline.trajectories.store import open_store

    converted = tmp_path / "teacher"
    import_pkl(edm_pkl, converted)
    teacher = load_teacher(converted)
    raw = {"seed": 0, "device": "cpu", "trajectories": {
        "solver": "dpmpp", "M": 1, "seeds": "0-3", "chunk_size": 4, "batch_size": 4,
        "schedule": {"kind": "polynomial", "num_steps": [3], "t_min": 0.006, "t_max": 80.0, "rho": 7.0}}}
    p = parse_params(raw)
    summary, _ = run_trajectories_stage(p.section("trajectories"), tmp_path / "traj.zarr", name="trajectories",
                                        device="cpu", teacher_ckpt=converted, progress=False)
    (entry,) = summary["keys"]
    assert entry["description"]["teacher_hash"] == teacher.weights_hash
    chunk = open_store(tmp_path / "traj.zarr").key(entry["key"]).read_chunk(0)
    assert chunk["states"].shape[0] == 4 and tuple(chunk["states"].shape[2:]) == (3, 8, 8)
    assert torch.isfinite(torch.from_numpy(chunk["states"])).all()

    # the same key and the same targets straight from the pickle's teacher
    spec = open_store(tmp_path / "traj.zarr").key(entry["key"]).spec
    again = generate_trajectories(load_teacher(edm_pkl), spec, [0, 1, 2, 3], tmp_path / "again.zarr", chunk_size=4,
                                  progress=False)
    assert again["key"] == entry["key"]
    assert (open_store(tmp_path / "again.zarr").key(again["key"]).read_chunk(0)["states"] == chunk["states"]).all()


def test_a_directory_named_like_a_pickle_is_a_checkpoint_directory(edm_pkl, tmp_path):
    out = tmp_path / "converted.pkl"
    import_pkl(edm_pkl, out)
    assert out.is_dir() and load_teacher(out).weights_hash == load_teacher(edm_pkl).weights_hash


@pytest.mark.parametrize("precond, a, b", [
    ("EDMPrecond", {"sigma_data": 0.5}, {"sigma_data": 0.2}),
    ("VPPrecond", {}, {"beta_d": 10.0}),
    ("VPPrecond", {"beta_min": 0.1}, {"beta_min": 0.2}),
    ("VPPrecond", {"M": 1000}, {"M": 500}),
    ("VEPrecond", {"sigma_max": 100}, {"sigma_max": 50}),
])
def test_teachers_that_differ_only_in_their_preconditioner_get_different_store_keys(tmp_path, precond, a, b):
    """Same weights, another D(x, sigma): the store key must differ (a store pushed by another team for one
    of them is never reused as the other's targets); the pickle and its converted folder share one key."""
    from pipeline.config.trajectories import TrajectoryParams
    from pipeline.config.validation import validate_section
    from pipeline.trajectories.spec import trajectory_specs

    keys = {}
    for name, extra in (("a", a), ("b", b)):
        model = tiny_edm_model(precond, {**TINY, **extra})
        path = tmp_path / f"{name}.pkl"
        write_port_snapshot(path, model, tmp_path / "ran.txt")
        params = validate_section(TrajectoryParams, {"seeds": "0-3", "chunk_size": 4}, "trajectories")
        for source in (path, tmp_path / f"{name}-folder"):
            if source.suffix != ".pkl":
                import_pkl(path, source)
            t = load_teacher(source)
            (spec,) = trajectory_specs(params, teacher_hash=t.weights_hash, num_classes=0, sample_shape=t.sample_shape)
            keys.setdefault(name, set()).add(spec.key)
        assert len(keys[name]) == 1, "a pickle and its converted folder must give one key"
    assert load_teacher(tmp_path / "a.pkl").network_hash == load_teacher(tmp_path / "b.pkl").network_hash  # same weights
    assert keys["a"] != keys["b"]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        da = load_teacher(tmp_path / "a.pkl").denoiser(x, torch.tensor([0.5, 5.0]))
        db = load_teacher(tmp_path / "b.pkl").denoiser(x, torch.tensor([0.5, 5.0]))
    if precond != "VEPrecond":  # VE's sigma range only sets the sampler's default range, D is the same; the key
        assert not torch.equal(da, db)  # still differs: every constructor argument counts, none is second-guessed


def test_a_store_written_before_complete_teacher_keys_is_refused_with_the_reason(tmp_path, edm_pkl):
    """A spec_version-1 key (teacher hash = weights only) is never read as the complete-key teacher's."""
    from pipeline.diffusion.schedules import Schedule
    from pipeline.trajectories.spec import TrajectorySpec
    from pipeline.trajectories.store import KEY_ATTR, KeyMismatchError, open_store

    t = load_teacher(edm_pkl)
    spec = TrajectorySpec(teacher_hash=t.weights_hash, schedule=Schedule(num_steps=4), M=3, sample_shape=(3, 8, 8))
    old = TrajectorySpec(teacher_hash=t.network_hash, schedule=Schedule(num_steps=4), M=3, sample_shape=(3, 8, 8))
    store = open_store(tmp_path / "old.zarr", mode="a")
    handle = store.create_key(old, chunk_size=4)
    info = dict(handle.group.attrs[KEY_ATTR])
    handle.group.attrs[KEY_ATTR] = {**info, "description": {**info["description"], "spec_version": 1}}
    with pytest.raises(KeyMismatchError, match=r"spec_version 1\): its teacher hash covered the network weights only"):
        open_store(tmp_path / "old.zarr", mode="r").open_spec(spec)
