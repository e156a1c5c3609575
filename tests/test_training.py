"""pipeline.training: one resumable state, one loop; every trained stage gives the weights it gave before.

The references were taken with the code before pipeline.training existed (each stage had its own loop
and state format): the refactor must not change a weight (torch 2.14.1, CPU, 1 thread). Exact weight
hashes hold per machine (see WEIGHT_HASHES); the losses are checked on every machine.
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from pipeline.core.checkpoints import load_checkpoint
from pipeline.core.hashing import hash_state_dict
from pipeline.core.machine import machine_signature
from pipeline.core.param_checks import PipelineError
from pipeline.training.live import LiveLog
from pipeline.training.loop import NonFiniteLossError, TrainingLoop, optimizer_step
from pipeline.training.optim import adam
from pipeline.training.state import STATE_NAME, TrainingState

REFERENCE_TORCH = "2.14.1"
# Bit-exact weights depend on the CPU: oneDNN/MKL choose kernels and summation orders by instruction set
# and cache sizes, so the AMD EPYC of earlier sessions, an Intel Xeon and an AVX2 AMD EPYC (Zen 2) all
# train different last bits from the same code. Exact weight hashes are therefore checked only on a
# machine whose signature (vendor/family/model/torch CPU capability) has a record, with torch
# REFERENCE_TORCH. The losses agree
# across those machines to ~1e-8 and are checked everywhere (rtol LOSS_RTOL): a change of behaviour moves
# them by far more.
WEIGHT_HASHES = {
    # AMD EPYC Zen 2, AVX2 (dev machine, 2026-12-04); f2fc49a (before issues 13-15) gives the same teacher,
    # distill and pd hashes there. Its distill and distill_v hashes were removed by issue 21 (the lr now decays
    # one batch later, as in sfd-main) and could not be re-recorded on that CPU: a name missing from a
    # machine's record is not checked there.
    "AuthenticAMD/23/49/AVX2": {
        "teacher": "5ee4b8580fba8c4f3405c2689232d072",
        "pd": {"2": "d9ce8f15f82d5a4a7828a45dbf6f94ab", "1": "84651b6503473f3bc2b5c5526eea2d51"},
        "sfddm": {"2": "e846c798c46d17b3e737d4776b5641cd", "4": "2e61ce3ff58bdfcf160cb2e10d4beff6"},
        "vanilla": "2663388e0437bbefcb581af9de967287",
    },
    # Intel Xeon, AVX-512 (cpu family 6, model 207; issue 21's machine, 2026-12-05), this code
    "GenuineIntel/6/207/AVX512": {
        "teacher": "03bd6966dfd9de4ae6acbb68e6da2c6e",
        "distill": "7fc5c637684ccc27662009c7fb1c1efa",
        "distill_v": "434f934699b6e741e14b957ba22423af",
        "pd": {"2": "c00cfd72eaf7b56e7abb05fc5b4b3547", "1": "7cc148ca6fadfb194bb696b38fb4ba20"},
        "sfddm": {"2": "ef5efece923e0f009d7e58cf7029346a", "4": "4855c1f08b78c66e2f421b62ce829a75"},
        "vanilla": "feb93134eaa4f8dd1432a844c87266ff",
    },
}
# Recorded on the earlier AMD EPYC (teacher ... vanilla; before issues 13-15) and an Intel Xeon (2026-11-23,
# also sfddm's multi-step target of issue 15); the Zen 2 machine above agrees with them within 1e-6 relative.
# distill and distill_v: issue 21 (lr_decay_check after_batch, sfd-main's timing: the lr of these 8-batch runs
# drops at batch 5 instead of 4), on the AVX-512 Xeon; with lr_decay_check: before_batch the same code gives
# the earlier values (step2 4.560807168483734, step3 7.51742023229599; N4/step2 4.5328583, N4/step3 7.5640595;
# N3/step2 unchanged: every N3 batch of that run comes before the first step whose lr differs).
REFERENCE_LOSSES = {
    "teacher": [1.6883648037910461, 1.4834909439086914],
    "distill": {"step2": 4.551455080509186, "step3": 7.507840633392334},
    "distill_v": {"N3/step2": 5.8292906284332275, "N4/step2": 4.521327257156372, "N4/step3": 7.5537794431050616},
    "pd": [[0.017857566475868225, 0.015517856925725937], [0.005787496920675039, 0.003909311257302761]],
    "sfddm": [[0.11958103626966476, 0.12283016741275787], [0.0325825959444046, 0.03889068588614464]],
    "vanilla": [7.798097133636475, 7.961877346038818],
}
LOSS_RTOL = 1e-6


MACHINE = machine_signature()
_HASHES = WEIGHT_HASHES.get(MACHINE) if torch.__version__.startswith(REFERENCE_TORCH) else None


def check_weights(name: str, actual) -> None:
    """Exact weight hashes where this machine has a record (module comment); elsewhere only the losses are checked."""
    if _HASHES is not None and name in _HASHES:
        assert actual == _HASHES[name], f"{name} weights on {MACHINE}: {actual}"


def _flat(losses) -> list[float]:
    if isinstance(losses, dict):
        return [v for k in sorted(losses) for v in _flat(losses[k])]
    return [v for x in losses for v in _flat(x)] if isinstance(losses, (list, tuple)) else [float(losses)]


def check_losses(name: str, actual) -> None:
    expected = REFERENCE_LOSSES[name]
    assert not isinstance(expected, dict) or set(actual) == set(expected), f"{name} loss keys: {sorted(actual)}"
    assert _flat(actual) == pytest.approx(_flat(expected), rel=LOSS_RTOL), f"{name} losses: {actual}"


def tiny_mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))


def weights(d) -> str:
    return hash_state_dict(load_checkpoint(d)[0])


# ---------------------------------------------------------------- state and loop

def test_state_restores_models_optimizer_rngs_and_counters(tmp_path):
    net, ema = tiny_mlp(0), tiny_mlp(1)
    opt = adam(net, 1e-2)
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        optimizer_step(opt, net(torch.randn(16, 4, generator=g)).square().mean())
    state = TrainingState(tmp_path, "key", modules={"net": net, "ema": ema}, optimizers={"opt": opt}, generators={"g": g})
    state.save({"batch": 3, "rows": [1, 2]}, {"note": "x"})
    expected = (torch.randn(3, generator=g), torch.rand(3), hash_state_dict(net.state_dict()))
    meta = json.loads((tmp_path / f"{STATE_NAME}.json").read_text())
    assert meta["counters"] == {"batch": 3, "rows": [1, 2]} and meta["training_key"] == "key"

    net2, ema2 = tiny_mlp(7), tiny_mlp(8)
    opt2 = adam(net2, 1e-2)
    g2 = torch.Generator().manual_seed(99)
    other = TrainingState(tmp_path, "other key", modules={"net": net2, "ema": ema2}, optimizers={"opt": opt2}, generators={"g": g2})
    assert other.load() is None  # another training key: nothing changes
    assert hash_state_dict(net2.state_dict()) != expected[2]
    same = TrainingState(tmp_path, "key", modules={"net": net2, "ema": ema2}, optimizers={"opt": opt2}, generators={"g": g2})
    assert same.load(accept=lambda c: c["batch"] < 3) is None  # refused by the caller
    restored = same.load()
    assert restored.counters == {"batch": 3, "rows": [1, 2]} and restored.metadata == {"note": "x"}
    assert hash_state_dict(net2.state_dict()) == expected[2]
    assert hash_state_dict(ema2.state_dict()) == hash_state_dict(ema.state_dict())
    assert torch.equal(torch.randn(3, generator=g2), expected[0]) and torch.equal(torch.rand(3), expected[1])
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)
    with pytest.raises(PipelineError, match="distinct"):
        TrainingState(tmp_path, "k", modules={"rng": net})


def _train(tmp_path, total, *, stop_after=None, fail_at=None, live=None):
    net = tiny_mlp(0).train()
    opt = adam(net, 1e-2)
    g = torch.Generator().manual_seed(1)
    state = TrainingState(tmp_path / "state", "k", modules={"net": net}, optimizers={"opt": opt}, generators={"g": g})

    def step(b):
        x = torch.randn(8, 4, generator=g)
        loss = net(x).square().mean()  # dropout draws from the global RNG
        if b == fail_at:
            loss = loss * float("nan")
        return [("a", optimizer_step(opt, loss)), ("b", optimizer_step(opt, net(x).abs().mean()))]

    loop = TrainingLoop("toy", total, optimizers=[opt], lr=lambda b: 1e-2 / (1 + b), state=state, checkpoint_every=3,
                        keys=["a", "b"], log_every=2, images_per_batch=8, live=live, progress=False)
    done = loop.run(step, stop_after=stop_after)
    return done, loop, hash_state_dict(net.state_dict())


def test_loop_resume_is_bit_exact_and_logs_the_same(tmp_path):
    torch.manual_seed(0)
    _, full, h_full = _train(tmp_path / "full", 10, live=LiveLog(tmp_path / "full" / "live"))
    torch.manual_seed(0)
    done, cut, _ = _train(tmp_path / "cut", 10, stop_after=5, live=LiveLog(tmp_path / "cut" / "live"))
    assert not done and cut.batch == 5
    torch.manual_seed(123)  # the global RNG comes back from the state
    done, resumed, h_resumed = _train(tmp_path / "cut", 10, live=LiveLog(tmp_path / "cut" / "live"))
    assert done and resumed.resumed and h_resumed == h_full
    assert resumed.log == full.log and resumed.count == {"a": 10, "b": 10}
    assert [r["step"] for r in full.log] == [2, 4, 6, 8, 10] and full.log[-1]["kimg"] == 0.08
    assert full.log[0]["lr"] == pytest.approx(1e-2 / 2)  # the lr of the window's last batch
    files = sorted(p.relative_to(tmp_path / "full" / "live") for p in (tmp_path / "full" / "live").rglob("*") if p.is_file())
    assert {str(f) for f in files} >= {"metrics.json", "plots/metrics/loss/a.tsv", "plots/metrics/lr.tsv", "plots/custom/loss.json"}
    for f in files:
        assert (tmp_path / "full" / "live" / f).read_text() == (tmp_path / "cut" / "live" / f).read_text(), f


def test_non_finite_loss_stops_before_the_optimizer_step(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"toy: stopped at batch 4, 0.032 kimg: the loss is nan.*last verified state .*batch 3"):
        _train(tmp_path, 10, fail_at=4)
    assert issubclass(NonFiniteLossError, FloatingPointError) and issubclass(NonFiniteLossError, PipelineError)


# ---------------------------------------------------------------- the refactor changed no weight

def test_teacher_weights_unchanged(tmp_path):
    from pipeline.data.datasets import load_digits_dataset
    from pipeline.teachers.training import TeacherParams, train_teacher

    images, labels = load_digits_dataset()
    p = TeacherParams.from_dict({"network": {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": []},
                                 "batch_size": 32, "steps": 8, "lr": 2e-3, "lr_rampup_steps": 3, "checkpoint_every": 3,
                                 "device": "cpu"})  # fmt: skip
    s = train_teacher(p, images[:256], labels[:256], 10, tmp_path / "teacher", state_dir=tmp_path / "state",
                      live_dir=tmp_path / "live", progress=False)  # fmt: skip
    check_weights("teacher", weights(tmp_path / "teacher"))
    check_losses("teacher", [s["first_loss"], s["final_loss"]])
    summary = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert summary["final"]["final_loss"] == s["final_loss"] and summary["step"] == 8
    assert len((tmp_path / "live" / "plots" / "metrics" / "loss.tsv").read_text().splitlines()) == 1 + 8


def test_sfd_weights_unchanged(tmp_path):
    from pipeline.distill.sfd import run_distill_stage
    from pipeline.trajectories.generation import run_trajectories_stage

    teacher = {"source": "gmm", "num_components": 4, "sample_shape": [1, 4, 4], "std": 0.2, "seed": 0}
    tiny = {"model_channels": 8, "channel_mult": [1], "num_blocks": 1, "attn_resolutions": []}
    sched = {"kind": "polynomial", "num_steps": 4, "t_min": 0.006, "t_max": 80.0, "rho": 7.0}
    base = {"student_network": tiny, "kimg": 0.128, "batch_size": 16, "lr": 1e-3, "checkpoint_every_kimg": 0.032,
            "log_every_kimg": 0.016, "device": "cpu"}
    params = {
        "loss": "l1",
        "trajectories": {"teacher": teacher, "seeds": "0-63", "chunk_size": 32, "batch_size": 64, "M": 1, "schedule": sched},
        "trajectories_v": {"teacher": teacher, "seeds": "0-63", "chunk_size": 32, "batch_size": 64, "M": 1,
                           "schedule": {**sched, "num_steps": [3, 4]}},
        "distill": base, "distill_v": {**base, "trajectories": "trajectories_v", "step_condition": True},
    }  # fmt: skip
    store = tmp_path / "store.zarr"
    for name in ("trajectories", "trajectories_v"):
        if "name" in inspect.signature(run_trajectories_stage).parameters:  # run_trajectories_stage(section params, out, name=)
            from pipeline.config.trajectories import TrajectoryParams

            run_trajectories_stage(TrajectoryParams.from_dict(params[name], section=name), store, name=name, device="cpu",
                                   progress=False)
        else:
            run_trajectories_stage(params, name, store, progress=False)
    for section in ("distill", "distill_v"):
        kwargs = dict(store=store, teacher_ckpt=None, out=tmp_path / section, state_dir=tmp_path / f"{section}_state",
                      live_dir=tmp_path / f"{section}_live", progress=False)
        if "trajectories" in inspect.signature(run_distill_stage).parameters:  # typed sections
            from pipeline.distill.sfd import DistillParams
            from pipeline.config.trajectories import TrajectoryParams

            d = DistillParams.from_dict(params[section], section=section)
            t = TrajectoryParams.from_dict(params[d.trajectories], section=d.trajectories)
            r = run_distill_stage(d, trajectories=t, loss="l1", name=section, **kwargs)
        else:
            r = run_distill_stage(params, section, **kwargs)
        check_weights(section, weights(tmp_path / section))
        check_losses(section, r["final_loss"])


def test_baseline_weights_unchanged(tmp_path):
    from pipeline.diffusion.denoisers import EDMPrecond
    from pipeline.diffusion.gmm import GaussianMixture
    from pipeline.distill.baselines.common import TrainingData
    from pipeline.distill.baselines.progressive import PDParams, progressive_distillation
    from pipeline.distill.baselines.sfddm import SFDDMParams, sfddm_distillation
    from pipeline.distill.baselines.vanilla import VanillaParams, vanilla_distillation
    from pipeline.networks.unet import build_network

    net_cfg = {"img_resolution": 8, "in_channels": 1, "label_dim": 0, "model_channels": 8, "channel_mult": [1],
               "num_blocks": 1, "attn_resolutions": []}

    def teacher() -> EDMPrecond:
        torch.manual_seed(0)
        net = build_network(**net_cfg)
        torch.nn.init.normal_(net.out_conv.weight, std=0.1)
        return EDMPrecond(net)

    cfg = {"network": net_cfg, "sigma_data": 0.5, "data": {"sample_shape": [1, 8, 8], "num_classes": 0}, "sampler": None,
           "provenance": {}}
    gmm = GaussianMixture.random(num_components=3, sample_shape=(1, 8, 8), std=0.3, seed=1)
    data = TrainingData(gmm.sample(512, generator=torch.Generator().manual_seed(0)).float(), None)
    s = progressive_distillation(teacher(), cfg, data, PDParams(start_steps=4, updates_per_round=5, batch_size=8),
                                 tmp_path / "pd", progress=False, state_dir=tmp_path / "s_pd", live_dir=tmp_path / "l_pd")
    check_weights("pd", {n: weights(tmp_path / "pd" / f"nfe{n}") for n in ("2", "1")})
    check_losses("pd", [[r["loss_first"], r["loss_last"]] for r in s["rounds"]])
    s = sfddm_distillation(teacher().eval().requires_grad_(False), cfg, data,
                           SFDDMParams(teacher_steps=8, student_steps=[2, 4], updates=4, batch_size=8, budget="updates"),
                           tmp_path / "sfddm", tmp_path / "ctl", progress=False, state_dir=tmp_path / "s_sfddm")
    check_weights("sfddm", {n: weights(tmp_path / "sfddm" / f"nfe{n}") for n in ("2", "4")})
    check_losses("sfddm", [[r["loss_first"], r["loss_last"]] for r in s["students"]])
    s = vanilla_distillation(teacher(), cfg, data, VanillaParams(updates=6, batch_size=8), tmp_path / "vanilla",
                             progress=False, state_dir=tmp_path / "s_vanilla")
    check_weights("vanilla", weights(tmp_path / "vanilla"))
    check_losses("vanilla", [s["loss_first"], s["loss_last"]])
    live = json.loads((tmp_path / "l_pd" / "metrics.json").read_text())
    assert set(live["final"]) == {"nfe2", "nfe1", "forward_equivalents"} and "lr" in live["nfe1"]


def test_live_log_writes_only_files_and_prints_nothing(tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no Git or DVC repository is opened, nothing is written outside the directory
    live = LiveLog(tmp_path / "live")
    live.log_row({"step": 1, "kimg": 0.5, "lr": 1e-3, "step2": 0.25, "N4/step3": None}, step=1)
    live.log_table([{"step": 1, "kimg": 0.5, "lr": 1e-3, "step2": 0.25}], x="kimg")
    live.log_final({"final_loss": {"step2": 0.25, "step3": None}, "kimg": 0.5})
    live.flush()
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live"]
    summary = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert summary["loss"] == {"step2": 0.25} and summary["final"] == {"final_loss": {"step2": 0.25}, "kimg": 0.5}
    assert not list((tmp_path / "live").glob("dvc.yaml")) and not (tmp_path / "live" / "report.html").exists()
