"""What a user brings, written in code at tiny sizes: EDM snapshot pickles, diffusers folders, dataset zips
in EDM's dataset_tool layout, FID reference statistics and Inception weights; and the scaled-down copy of a
shipped preset (only keys the preset has change), in a fresh git + DVC repository of this pipeline.

Used by the bring-your-own end-to-end tests (tests/test_byo_presets.py) and the README walkthrough test.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "presets"

# tiny EDM networks: the presets' architectures (DDPM++ SongUNet for the VP teachers, ADM DhariwalUNet for
# ImageNet) at 8x8 or 16x16 with a few channels
SONG = dict(model_type="SongUNet", model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
            dropout=0.13, augment_dim=9, use_fp16=False)
ADM = dict(model_type="DhariwalUNet", model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
           dropout=0.1, augment_dim=0, use_fp16=False)


def env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {
        **os.environ, **(extra or {}),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # `python`, `sfd` = this env
        "DVC_NO_ANALYTICS": "1", "COLUMNS": "200",
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
    }  # fmt: skip


def run(args: list[str], cwd: Path, *, check: bool = True, extra_env: dict[str, str] | None = None,
        timeout: float | None = None) -> subprocess.CompletedProcess:
    """A command as a user types it (dvc through this interpreter, so the test's environment is used)."""
    cmd = [sys.executable, "-m", "dvc", *args[1:]] if args[0] == "dvc" else args
    cmd = [sys.executable, "-m", "pipeline.cli", *cmd[1:]] if cmd[0] == "sfd" else cmd
    r = subprocess.run(cmd, cwd=cwd, env=env(extra_env), capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, f"{' '.join(args)} failed ({r.returncode}):\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}"
    return r


def write_dataset(path: Path, *, n: int, channels: int, resolution: int, num_classes: int | None,
                  seed: int = 0) -> Path:
    """PNGs in EDM's dataset_tool.py layout (00000/img00000000.png ...) with dataset.json labels (or null):
    a zip when ``path`` ends with .zip, else a folder."""
    rng = np.random.default_rng(seed)
    names = [f"{i // 1000:05d}/img{i:08d}.png" for i in range(n)]
    labels = None if not num_classes else [[name, int(i % num_classes)] for i, name in enumerate(names)]
    files = {"dataset.json": json.dumps({"labels": labels}).encode()}
    for name in names:
        pixels = rng.integers(0, 256, size=(resolution, resolution, channels), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels).save(buf, format="PNG")
        files[name] = buf.getvalue()
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in files.items():
                zf.writestr(name, data)
    else:
        for name, data in files.items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_bytes(data)
    return path


def edm_model(precond: str, arch: dict[str, Any], *, resolution: int, label_dim: int, seed: int = 0) -> torch.nn.Module:
    from pipeline.networks.edm import build_edm_model

    torch.manual_seed(seed)
    model = build_edm_model(precond, dict(arch, img_resolution=resolution, img_channels=3, label_dim=label_dim)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # EDM zero-initialises some layers: make every weight matter
    return model


def write_edm_pickle(path: Path, model: torch.nn.Module) -> Path:
    """An EDM snapshot pickle, written the way EDM's persistence writes one (tests/test_edm_pickle.py)."""
    from test_edm_pickle import write_port_snapshot

    path.parent.mkdir(parents=True, exist_ok=True)
    write_port_snapshot(path, model, path.with_suffix(".ran"))  # the marker file exists only if pickled code ran
    return path


def write_inception(path: Path) -> Path:
    """torch-fidelity's Inception-v3 with random weights, saved as its state dict (the format of
    pt_inception-2015-12-05-6726825d.pth): the evaluation path of the presets without the real file."""
    from unittest import mock

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    empty = path.with_suffix(".empty")
    torch.save({}, empty)
    torch.manual_seed(0)
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, strict=True: None):
        model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    with torch.no_grad():  # He-initialised convolutions keep the activations' scale through the ~50 layers, so the
        for m in model.modules():  # features of different images differ (PyTorch's default init lets them vanish)
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(model.state_dict(), path)
    empty.unlink()
    return path


def write_reference_npz(path: Path, dim: int = 2048, seed: int = 0) -> Path:
    """EDM-style FID reference statistics (mu, sigma)."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(dim, 8)) * 0.1
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, mu=rng.normal(size=dim) * 0.1, sigma=a @ a.T + 0.01 * np.eye(dim))
    return path


def write_pixel_folder(path: Path, *, seed: int = 0, beta_end: float = 0.02) -> Path:
    """A diffusers DDPMPipeline folder (UNet2DModel 3x8x8 + DDPMScheduler, epsilon, linear betas)."""
    import diffusers

    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=4,
    )  # fmt: skip
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_end=beta_end)
    if path.exists():
        shutil.rmtree(path)
    diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(path)
    return path


def write_t2i_folder(path: Path) -> Path:
    """A tiny latent text-to-image pipeline folder (tests/diffusers_fixtures.py)."""
    from diffusers_fixtures import save_tiny_t2i_folder

    save_tiny_t2i_folder(path)
    return path


def write_flow_folder(path: Path, family: str, seed: int = 0) -> Path:
    """A tiny flow-matching pipeline folder: StableDiffusion3Pipeline (``sd3``) or FluxPipeline (``flux``, Flux-dev's
    guidance embedding), 16 px images (tests/diffusers_fixtures.py)."""
    from diffusers_fixtures import save_tiny_flux_folder, save_tiny_sd3_folder

    if path.exists():
        shutil.rmtree(path)
    (save_tiny_sd3_folder if family == "sd3" else save_tiny_flux_folder)(path, seed=seed)
    return path


def write_captions(path: Path, n: int = 6) -> Path:
    """A CSV of captions (MS-COCO's caption file has a caption column)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("id,caption\n" + "".join(f"{i},a photo of thing {i}\n" for i in range(n)))
    return path


EXAMPLE_ROOTS = ("/datasets/", "/models/", "/refs/", "/weights/")  # where the presets' example paths live
FILE_KEYS = ("data.path", "teacher.pretrained", "teacher.prompts", "evaluate.inception_weights",
             "evaluate.reference_stats")


def localise(text: str, root: Path) -> str:
    """A preset's or the README's example path (/models/x.pkl) under ``root`` (root/models/x.pkl)."""
    for prefix in EXAMPLE_ROOTS:
        text = text.replace(prefix, f"{root}/{prefix.strip('/')}/")
    return text


def example_files(raw: dict[str, Any]) -> dict[str, str]:
    """The file keys a preset sets, with their example paths."""
    out = {}
    for key in FILE_KEYS:
        section, name = key.split(".")
        value = raw.get(section, {}).get(name)
        if value:
            out[key] = value
    return out


def walkthrough(readme: Path = ROOT / "README.md") -> list[str]:
    """The README's bring-your-own walkthrough: the commands of the marked block, comments dropped."""
    text = readme.read_text()
    block = text.split("<!-- walkthrough:", 1)[1].split("<!-- /walkthrough -->", 1)[0]
    body = block.split("```bash", 1)[1].split("```", 1)[0]
    return [line.split("  #")[0].strip() for line in body.splitlines() if line.strip() and not line.startswith("#")]


def load_preset(name: str) -> dict[str, Any]:
    """The params a preset gives: its overlay on the shipped params.yaml (what `sfd preset apply NAME` writes)."""
    from pipeline.config.presets import merged_preset

    return merged_preset(name, ROOT / "params.yaml", PRESETS)


def preset_targets(name: str) -> list[str]:
    """The stages a preset's ``# Use:`` line runs (``dvc repro A B`` -> [A, B]; plain ``dvc repro`` -> [])."""
    import re

    use = next(line for line in (PRESETS / f"{name}.yaml").read_text().splitlines() if line.startswith("# Use:"))
    return re.search(r"dvc repro([\w@ ]*)", use).group(1).split()


def _set(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set an existing key: scaling down changes only keys the preset has."""
    node = raw
    *parents, last = dotted.split(".")
    for part in parents:
        node = node[part]
    assert last in node, f"the preset has no key {dotted}: a scaled-down preset changes only keys it has"
    node[last] = value


def _set_present(raw: dict[str, Any], section: str, values: dict[str, Any]) -> None:
    """Set those of ``values`` the preset's section has (presets differ in which optional keys they spell out)."""
    for k, v in values.items():
        if k in raw.get(section, {}):
            _set(raw, f"{section}.{k}", v)


def scale_down(raw: dict[str, Any], files: dict[str, str]) -> dict[str, Any]:
    """A preset at CPU-test sizes, as a user trying it on a laptop would edit it: the local paths (``files``:
    dotted key -> path), small seed ranges, budgets, networks and evaluation; nothing else."""
    raw = json.loads(json.dumps(raw))
    for key, value in files.items():
        _set(raw, key, value)
    _set(raw, "device", "cpu")
    _set(raw, "threads", 1)
    if "feature_net" in raw:
        for k, v in dict(channels=4, feature_dim=8, epochs=1, batch_size=8, min_accuracy=0.0).items():
            _set(raw, f"feature_net.{k}", v)
    _set(raw, "data.held_out_fraction", 0.25)
    sections = [s for s in ("trajectories", "trajectories_v", "trajectories_stage2") if s in raw]
    for name in sections:
        for k, v in dict(seeds="1000000-1000015", chunk_size=8, batch_size=8).items():
            _set(raw, f"{name}.{k}", v)
    if "trajectories_v" in raw:
        _set(raw, "trajectories_v.schedule", {**raw["trajectories_v"]["schedule"], "num_steps": [4, 5]})
    for name in ("distill", "distill_v", "distill_stage2"):
        if name in raw:
            for k, v in dict(kimg=0.016, batch_size=8, checkpoint_every_kimg=0.008, log_every_kimg=0.008).items():
                _set(raw, f"{name}.{k}", v)
            if raw[name].get("lpips_weights"):
                _set(raw, f"{name}.lpips_weights", None)  # no 500 MB VGG in a test: the last step keeps L1
    if raw.get("teacher", {}).get("pretrained") is None:  # the teacher stage trains it: a few steps
        _set_present(raw, "teacher", dict(steps=4, batch_size=16, checkpoint_every=2, lr_rampup_steps=1))
    _set_present(raw, "baseline_pd", dict(start_steps=2, updates_per_round=2, batch_size=4))
    _set_present(raw, "baseline_sfddm", dict(teacher_steps=8, student_steps=[2], budget="updates", updates=2,
                                             batch_size=4))
    _set_present(raw, "baseline_vanilla", dict(updates=2, batch_size=4))
    _set_present(raw, "evaluate", dict(seeds="0-7", grid_seeds=4, batch_size=8, solvers=["euler"], nfes=[2],
                                       kid_subsets=2, kid_subset_size=4, noise_floor_seeds="2000000-2000007",
                                       bootstrap=0, student_guidance=[2.0]))
    if "reference" in raw.get("evaluate", {}):
        _set(raw, "evaluate.reference", {**raw["evaluate"]["reference"], "num_steps": 3})
    return raw


def make_repo(root: Path, params: dict[str, Any]) -> Path:
    """A fresh git + DVC repository of this pipeline (code, dvc.yaml, presets, the shipped teacher) with ``params`` as
    params.yaml."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("pipeline", "stages", "presets", "teachers"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore"):  # .dvcignore: the stages' __pycache__ is not a change of their deps
        shutil.copy(ROOT / name, root / name)
    (root / "bench").mkdir(exist_ok=True)
    shutil.copy(ROOT / "bench" / "pd_sweep.json", root / "bench" / "pd_sweep.json")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / ".gitignore").write_text("__pycache__/\n.cache/\n")
    run(["git", "init", "-q"], root)
    run(["dvc", "init", "-q"], root)
    run(["dvc", "config", "core.analytics", "false"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "pipeline"], root)
    return root
