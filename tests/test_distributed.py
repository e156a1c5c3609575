"""Several processes (torchrun's environment, gloo on the CPU) give the one-process results; precision paths run.

Each multi-process test spawns 2 processes with torch.multiprocessing, sets the variables torchrun
sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and joins the gloo group through
pipeline.core.distributed.init_from_env, as a stage does under torchrun.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from pipeline.config.params import parse_params
from pipeline.core import distributed
from pipeline.core.checkpoints import load_checkpoint
from pipeline.core.param_checks import ParamError
from pipeline.distill.sfd import run_distill_stage
from pipeline.trajectories.generation import run_trajectories_stage
from pipeline.trajectories.spec import trajectory_specs
from pipeline.trajectories.store import open_store
from pipeline.training.parallel import prepare

TEACHER = {"source": "gmm", "num_components": 4, "sample_shape": [1, 4, 4], "std": 0.2, "seed": 0}
TINY_NET = {"model_channels": 8, "channel_mult": [1], "num_blocks": 1, "attn_resolutions": []}
SCHEDULE = {"kind": "polynomial", "num_steps": 4, "t_min": 0.006, "t_max": 80.0, "rho": 7.0}
ROOT = Path(__file__).resolve().parents[1]


def make_params(**distill) -> dict:
    return {
        "loss": "l1",
        "trajectories": {"teacher": TEACHER, "seeds": "0-95", "chunk_size": 16, "batch_size": 32, "M": 1, "schedule": SCHEDULE},
        "distill": {"student_network": TINY_NET, "kimg": 0.096, "batch_size": 16, "lr": 1e-3,
                    "checkpoint_every_kimg": 0.032, "log_every_kimg": 0.016, "device": "cpu", **distill},
    }  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, target: str, kwargs: dict) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    assert distributed.init_from_env("cpu")
    try:
        globals()[target](**kwargs)
    finally:
        distributed._shutdown()


def spawn(target: str, world: int = 2, **kwargs) -> None:
    mp.spawn(_worker, args=(world, free_port(), target, kwargs), nprocs=world, join=True)


# ------------------------------------------------------------------ targets (run in every process)


def do_trajectories(params: dict, store: str, section: str = "trajectories") -> None:
    p = parse_params(params)
    summary, images = run_trajectories_stage(p.section(section), store, name=section, progress=False)
    if distributed.is_main():
        Path(store + ".summary.json").write_text(json.dumps({"summary": summary, "images": images}))


def do_distill(params: dict, store: str, out: str, stop_after_batches: int | None = None) -> None:
    p = parse_params(params)
    out_dir = Path(out)
    run_distill_stage(
        p.distill, trajectories=p.trajectories_for("distill"), loss=p.loss, name="distill", store=store,
        teacher_ckpt=None, out=out_dir / "student", state_dir=out_dir / "state", metrics=out_dir / "metrics.json",
        live_dir=out_dir / "live", cost_path=out_dir / "cost.json", progress=False, stop_after_batches=stop_after_batches,
    )  # fmt: skip


def do_evaluate(params: dict, teacher: str, data: str, feature_net: str, out: str) -> None:
    from pipeline.config.evaluation import EvalParams
    from pipeline.core.cost import CostMeter
    from pipeline.evaluation.evaluate import run_evaluation, write_results

    cost = CostMeter("evaluate")
    results = run_evaluation(EvalParams.from_dict(params), teacher_dir=teacher, data_dir=data, feature_net_dir=feature_net,
                             grids_dir=Path(out) / "grids", cost=cost)
    if distributed.is_main():
        write_results(Path(out) / "results.json", results)
        cost.write(Path(out) / "cost.json")


def do_gather(out: str) -> None:
    """Helpers: shares, the loss mean, gathering; DDP averages gradients and syncs only the last micro-batch."""
    from pipeline.training.parallel import prepare

    lo, hi = distributed.share(8)
    assert (lo, hi) == ((0, 4) if distributed.rank() == 0 else (4, 8))
    assert distributed.mean_over_ranks(torch.tensor(float(10 * distributed.rank()))) == 5.0
    torch.manual_seed(distributed.rank())  # different initial weights: DDP broadcasts rank 0's
    lin = torch.nn.Linear(3, 1, bias=False)
    model = prepare(lin, sharding="ddp")
    assert model.sharding == "ddp" and isinstance(model.forward, torch.nn.parallel.DistributedDataParallel)
    reductions = []

    def counting_hook(state, bucket):  # DDP's default all-reduce, counted
        reductions.append(bucket.index())
        fut = torch.distributed.all_reduce(bucket.buffer().div_(2), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])

    model.forward.register_comm_hook(None, counting_hook)
    x = torch.full((1, 3), float(distributed.rank() + 1))
    for j in range(3):  # three micro-batches: only the last one communicates
        with model.sync(j == 2):
            model.forward(x).sum().backward()
    assert len(reductions) == 1
    torch.testing.assert_close(lin.weight.grad, torch.full((1, 3), 3 * 1.5))  # 3 micro-batches x mean(1, 2)
    got = distributed.all_gather_objects(distributed.rank())
    assert got == [0, 1]
    with pytest.raises(ParamError, match="multiple of the 2 processes"):
        distributed.share(7)
    if distributed.is_main():
        Path(out).write_text("ok")


def _tiny_teacher_model(seed: int = 0):
    from pipeline.diffusion.denoisers import EDMPrecond
    from pipeline.networks.unet import build_network

    torch.manual_seed(seed)
    net = build_network(**UNET)
    torch.nn.init.normal_(net.out_conv.weight, std=0.1)  # the output layer starts at zero; a teacher must say something
    return EDMPrecond(net)


UNET = {"img_resolution": 8, "in_channels": 1, "label_dim": 10, "model_channels": 8, "channel_mult": [1],
        "num_blocks": 1, "attn_resolutions": []}


def _images(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.rand((n, 1, 8, 8), generator=g) * 2 - 1, torch.randint(10, (n,), generator=g)


def do_teacher(out: str) -> None:
    from pipeline.config.teacher import TeacherParams
    from pipeline.teachers.training import train_teacher

    images, labels = _images()
    p = TeacherParams.from_dict({"network": {k: UNET[k] for k in ("model_channels", "channel_mult", "num_blocks",
                                                                  "attn_resolutions")},
                                 "batch_size": 16, "steps": 6, "lr": 2e-3, "lr_rampup_steps": 2, "ema_halflife_kimg": 0.01,
                                 "device": "cpu"})
    train_teacher(p, images, labels, 10, Path(out) / "teacher", state_dir=Path(out) / "state",
                  live_dir=Path(out) / "live", progress=False)


def do_baselines(out: str) -> None:
    from pipeline.config.baselines import PDParams, VanillaParams
    from pipeline.distill.baselines.common import TrainingData
    from pipeline.distill.baselines.progressive import progressive_distillation
    from pipeline.distill.baselines.vanilla import vanilla_distillation

    images, labels = _images()
    data = TrainingData(images, labels)
    config = {"network": UNET, "sigma_data": 0.5, "data": {"sample_shape": [1, 8, 8], "num_classes": 10},
              "sampler": None, "provenance": {}}
    pd = PDParams.from_dict({"start_steps": 4, "final_steps": 2, "updates_per_round": 4, "batch_size": 8, "device": "cpu"})
    progressive_distillation(_tiny_teacher_model(), config, data, pd, Path(out) / "pd", progress=False,
                             state_dir=Path(out) / "pd_state")
    va = VanillaParams.from_dict({"updates": 4, "batch_size": 8, "lr": 1e-3, "M": 1, "device": "cpu"})
    vanilla_distillation(_tiny_teacher_model(), config, data, va, Path(out) / "vanilla", progress=False)


# ------------------------------------------------------------------ tests


def test_helpers_are_single_process_no_ops():
    assert not distributed.is_distributed() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.share(7) == (0, 7)
    assert distributed.mean_over_ranks(torch.tensor(2.5)) == 2.5
    lin = torch.nn.Linear(2, 2)
    model = prepare(lin)
    assert model.forward is lin and model.sharding is None  # one process: the module itself, today's path
    assert distributed.all_gather_objects("x") == ["x"]


def test_helpers_across_two_processes(tmp_path):
    spawn("do_gather", out=str(tmp_path / "ok"))
    assert (tmp_path / "ok").read_text() == "ok"


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The same trajectories written by one process and by two (each owning every other chunk)."""
    root = tmp_path_factory.mktemp("stores")
    params = make_params()
    one, two = str(root / "one.zarr"), str(root / "two.zarr")
    do_trajectories(params, one)
    spawn("do_trajectories", params=params, store=two)
    return params, one, two


def test_trajectories_two_processes_equal_one(stores):
    params, one, two = stores
    p = parse_params(params)
    (spec,) = trajectory_specs(p.trajectories, teacher_hash=_gmm_hash(), num_classes=0, sample_shape=(1, 4, 4))
    a, b = open_store(one).open_spec(spec), open_store(two).open_spec(spec)
    assert a.committed_chunks() == b.committed_chunks() == list(range(6))
    for c in range(6):
        x, y = a.read_chunk(c), b.read_chunk(c)
        assert sorted(x) == sorted(y)
        for name in x:
            np.testing.assert_array_equal(x[name], y[name])  # bit-identical
    summary = json.loads(Path(two + ".summary.json").read_text())
    assert summary["summary"]["shard"] == [0, 2] and summary["summary"]["chunks_generated"] == 6
    assert summary["summary"]["keys"][0]["processes"] == 2 and summary["summary"]["trajectories_generated"] == 96


def _gmm_hash() -> str:
    from pipeline.trajectories.generation import load_trajectory_teacher

    return load_trajectory_teacher(TEACHER, None)[2]


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(directory)[0]


@pytest.fixture(scope="module")
def two_process_run(stores, tmp_path_factory):
    """An uninterrupted 2-process distill run (DDP) of the stores' params."""
    params, one, _ = stores
    out = tmp_path_factory.mktemp("two")
    spawn("do_distill", params=params, store=one, out=str(out))
    return out


@pytest.fixture(scope="module")
def one_process_run(stores, tmp_path_factory):
    params, one, _ = stores
    out = tmp_path_factory.mktemp("one")
    do_distill(params, one, str(out))
    return out


def test_distill_two_processes_equal_one(stores, one_process_run, two_process_run, tmp_path):
    params, one, _ = stores
    (tmp_path / "one").symlink_to(one_process_run)
    (tmp_path / "two").symlink_to(two_process_run)
    w1, w2 = _weights(tmp_path / "one" / "student"), _weights(tmp_path / "two" / "student")
    assert sorted(w1) == sorted(w2)
    moved = max(float((w1[k] - _init_weights(params)[k]).abs().max()) for k in w1)
    assert moved > 1e-3  # the students trained
    for k in w1:  # equal to float tolerance (the batch mean is summed in another order)
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=2e-6)
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m2["processes"] == 2 and m1["rows_per_key"] == m2["rows_per_key"] and m1["kimg"] == m2["kimg"]
    for k, v in m1["final_loss"].items():
        assert m2["final_loss"][k] == pytest.approx(v, rel=1e-4)
    c1 = json.loads((tmp_path / "one" / "cost.json").read_text())
    c2 = json.loads((tmp_path / "two" / "cost.json").read_text())
    assert c1["student_forward_images"] == c2["student_forward_images"]  # the whole run's, written by rank 0 only
    assert (tmp_path / "two" / "live" / "metrics.json").is_file()


def _init_weights(params: dict) -> dict[str, torch.Tensor]:
    from pipeline.distill.student import student_from_scratch

    p = parse_params(params).distill
    init = student_from_scratch(p.student_network, sample_shape=(1, 4, 4), num_classes=0, step_condition=False,
                                seed=p.seed, device="cpu")
    return init.model.checkpoint_state_dict()


def test_distill_fsdp_two_processes_equal_one_and_resume(stores, one_process_run, tmp_path, capfd):
    """FSDP2 (sharding: fsdp) with two micro-batches per process: interrupted after 3 batches, resumed from the state
    of batch 2 (saved in whole tensors, the one-process format), the student equals the one-process one.
    (SIGKILL of every rank and a bit-identical re-run: tests/test_scale_out.py, with DDP.)"""
    params, one, _ = stores
    (tmp_path / "one").symlink_to(one_process_run)
    fsdp = make_params(sharding="fsdp", batch_gpu=4)
    spawn("do_distill", params=fsdp, store=one, out=str(tmp_path / "two"), stop_after_batches=3)
    state = load_checkpoint(tmp_path / "two" / "state", name="training_state")[0]
    one_state = load_checkpoint(tmp_path / "one" / "state", name="training_state")[0]
    assert sorted(state) == sorted(one_state)  # whole tensors, parameter-indexed Adam moments: the same file format
    assert all(state[k].shape == one_state[k].shape for k in state)
    capfd.readouterr()
    spawn("do_distill", params=fsdp, store=one, out=str(tmp_path / "two"))
    assert "(verified) at batch 2 of 6" in capfd.readouterr().out  # resumed, not restarted
    w1, w2 = _weights(tmp_path / "one" / "student"), _weights(tmp_path / "two" / "student")
    assert sorted(w1) == sorted(w2)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=2e-6)
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m2["processes"] == 2 and m2["kimg"] == 0.096


def test_distill_batch_must_split_evenly(stores, tmp_path):
    params, one, _ = stores
    with pytest.raises(mp.ProcessRaisedException, match="distill.batch_size: 15 is not a multiple of the 2 processes"):
        spawn("do_distill", params=make_params(batch_size=15), store=one, out=str(tmp_path / "odd"))


@pytest.mark.slow  # several 2-process spawns (~1 min on a 2-core CPU)
def test_evaluate_two_processes_equal_one(tmp_path):
    from pipeline.config.data import DataParams
    from pipeline.config.evaluation import FeatureNetParams
    from pipeline.core.checkpoints import save_checkpoint
    from pipeline.data.datasets import load_split, prepare_dataset
    from pipeline.evaluation.feature_net import train_feature_net
    from pipeline.networks.unet import build_network

    prepare_dataset(DataParams(), tmp_path / "digits")
    fp = FeatureNetParams(channels=8, feature_dim=32, epochs=1, min_accuracy=0.0)
    train_feature_net(fp, load_split(tmp_path / "digits", "train"), load_split(tmp_path / "digits", "held_out"), 10,
                      tmp_path / "feature_net", progress=False)
    torch.manual_seed(0)
    cfg = {"model_channels": 8, "channel_mult": [1], "num_blocks": 1, "attn_resolutions": [], "img_resolution": 8,
           "in_channels": 1, "label_dim": 10}
    save_checkpoint(tmp_path / "teacher", build_network(**cfg).state_dict(),
                    {"network": cfg, "sigma_data": 0.5, "data": {"sample_shape": [1, 8, 8], "num_classes": 10},
                     "provenance": {}, "sampler": None})
    params = {"seeds": "1000000-1000039", "grid_seeds": 16, "batch_size": 8, "nfes": [2], "solvers": ["euler"],
              "reference": {"solver": "euler", "num_steps": 3, "t_min": 0.002, "t_max": 80.0, "rho": 7.0},
              "cache_dir": str(tmp_path / "cache"), "device": "cpu", "kid_subsets": 5, "kid_subset_size": 20}
    paths = dict(teacher=str(tmp_path / "teacher"), data=str(tmp_path / "digits"), feature_net=str(tmp_path / "feature_net"))
    do_evaluate(params, out=str(tmp_path / "one"), **paths)
    spawn("do_evaluate", params=params, out=str(tmp_path / "two"), **paths)
    r1 = json.loads((tmp_path / "one" / "results.json").read_text())
    r2 = json.loads((tmp_path / "two" / "results.json").read_text())
    assert r1 == r2 and len(r1) == 2  # identical: the same batches give the same samples
    for name in ("teacher_nfe2.png", "euler_nfe2.png"):
        assert (tmp_path / "one" / "grids" / name).read_bytes() == (tmp_path / "two" / "grids" / name).read_bytes()
    c1 = json.loads((tmp_path / "one" / "cost.json").read_text())
    c2 = json.loads((tmp_path / "two" / "cost.json").read_text())
    assert c1["teacher_forward_images"] == c2["teacher_forward_images"] > 0


def torchrun(stage_name: str, args: list[str], faults: str = "") -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 -m stages.<stage> ARGS`` (gloo, one thread each; the README's
    by-hand command), the stage started through tests/fault_injection.py so that ``faults`` are in every rank."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "fault_injection.py"), f"stages.{stage_name}", *args]
    return subprocess.run(cmd, cwd=ROOT, env={**stage_env(), "SFD_FAULTS": faults}, capture_output=True, text=True,
                          timeout=300, start_new_session=True)


def stage_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SFD_FAULTS"):
        env.pop(k, None)
    return env


def test_sigkill_of_every_rank_then_rerun_is_bit_identical(stores, two_process_run, tmp_path):
    """2-process (gloo) distill under torchrun: every rank and torchrun's agent SIGKILLed right after the state of
    batch 4 of 6 is saved; the same command again resumes and ends bit-identical to an uninterrupted 2-process run."""
    import yaml

    params, one, _ = stores
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    run = tmp_path / "run"
    args = ["--params", str(tmp_path / "params.yaml"), "--section", "distill", "--store", one, "--out", str(run / "student"),
            "--state", str(run / "state"), "--metrics", str(run / "metrics.json"), "--live", str(run / "live"),
            "--cost", str(run / "cost.json"), "--no-progress"]  # fmt: skip
    killed = torchrun("distill", args, faults="killpg_after_saves:2")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert json.loads((run / "state" / "training_state.json").read_text())["counters"]["batch"] == 4
    assert not (run / "student").exists()
    again = torchrun("distill", args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(verified) at batch 4 of 6" in again.stdout
    w1, w2 = _weights(two_process_run / "student"), _weights(run / "student")
    assert sorted(w1) == sorted(w2) and all(torch.equal(w1[k], w2[k]) for k in w1)
    m = json.loads((run / "metrics.json").read_text())
    assert m["processes"] == 2 and m == {**json.loads((two_process_run / "metrics.json").read_text()),
                                         "wall_seconds": m["wall_seconds"], "checkpoint": m["checkpoint"]}


def test_trajectories_sigkill_of_every_rank_then_nproc_rerun_equals_one_process(stores, tmp_path):
    """2-process trajectory generation SIGKILLed (every rank and the agent) after the first chunk commit, then re-run
    the DVC way (`nproc: 2` in params.yaml: `python -m stages.trajectories ...` re-runs itself under torchrun): only
    the missing chunks are generated and the store equals the one-process store bit for bit."""
    import yaml

    params, one, _ = stores
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**params, "nproc": 1}))
    store = tmp_path / "stage.zarr"
    args = ["--params", str(tmp_path / "params.yaml"), "--section", "trajectories", "--out", str(store),
            "--summary", str(tmp_path / "summary.json"), "--cost", str(tmp_path / "cost.json"), "--no-progress"]
    killed = torchrun("trajectories", args, faults="killpg_after_chunks:1")
    assert killed.returncode == -9, killed.stderr[-3000:]
    (spec,) = trajectory_specs(parse_params(params).trajectories, teacher_hash=_gmm_hash(), num_classes=0,
                               sample_shape=(1, 4, 4))
    done = open_store(store).open_spec(spec).committed_chunks()
    assert 1 <= len(done) < 6, done  # killed mid-way
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**params, "nproc": 2}))
    cmd = [sys.executable, "-m", "stages.trajectories", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=stage_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["shard"] == [0, 2] and summary["chunks_generated"] == 6 - len(done)  # both ranks, merged by rank 0
    assert json.loads((tmp_path / "cost.json").read_text())["teacher_forward_images"] > 0
    a, b = open_store(one).open_spec(spec), open_store(store).open_spec(spec)
    assert b.committed_chunks() == list(range(6))
    for c in range(6):
        x, y = a.read_chunk(c), b.read_chunk(c)
        for name in x:
            np.testing.assert_array_equal(x[name], y[name])


# ------------------------------------------------------------------ precision


def test_precision_values_and_store_keys():
    p32 = parse_params(make_params())
    pbf = parse_params({**make_params(), "precision": "bf16"})
    assert p32.trajectories.precision == "fp32" and pbf.trajectories.precision == "bf16" and pbf.distill.precision == "bf16"
    (s32,) = trajectory_specs(p32.trajectories, teacher_hash="t", num_classes=0, sample_shape=(1, 4, 4))
    (sbf,) = trajectory_specs(pbf.trajectories, teacher_hash="t", num_classes=0, sample_shape=(1, 4, 4))
    assert "precision" not in s32.description() and sbf.description()["precision"] == "bf16"
    assert s32.key != sbf.key
    with pytest.raises(ParamError, match="precision"):
        parse_params({**make_params(), "precision": "fp8"})
    bad = make_params()
    bad["trajectories"] = {**bad["trajectories"], "precision": "bf16", "compute_dtype": "float64"}
    with pytest.raises(ParamError, match="compute_dtype float32"):
        parse_params(bad)


def test_autocast_helpers_on_cpu():
    assert distributed.grad_scaler("fp32", "cpu") is None and distributed.grad_scaler("bf16", "cpu") is None
    lin = torch.nn.Linear(4, 4)
    with distributed.autocast_context("bf16", "cpu"):
        assert lin(torch.ones(2, 4)).dtype == torch.bfloat16
    with distributed.autocast_context("fp32", "cpu"):
        assert lin(torch.ones(2, 4)).dtype == torch.float32
    d = distributed.autocast_denoiser(lambda x, s, labels=None: lin(x), "bf16", "cpu")
    assert d(torch.ones(2, 4), torch.ones(2)).dtype == torch.float32
    assert distributed.maybe_compile(lin, True, "cpu")[1].startswith("compile: skipped")
    assert distributed.to_channels_last(lin, True, "cpu")[1].startswith("channels_last: skipped")


def test_bf16_trajectories_and_distill_on_cpu(tmp_path):
    params = {**make_params(kimg=0.032), "precision": "bf16"}
    store = str(tmp_path / "bf16.zarr")
    do_trajectories(params, store)
    do_trajectories(make_params(), store)  # fp32 next to it: its own key
    assert len(open_store(store).keys()) == 2
    do_distill(params, store, str(tmp_path / "run"))
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["precision"] == "bf16" and all(np.isfinite(v) for v in m["final_loss"].values())


def _cpu_fp16_autocast_works() -> str | None:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            out = torch.nn.Conv2d(1, 2, 3, padding=1)(torch.ones(1, 1, 4, 4))
        return None if out.dtype == torch.float16 else f"fp16 autocast on this CPU gives {out.dtype}"
    except (RuntimeError, ValueError) as e:
        return f"fp16 autocast is not supported on this CPU torch: {e}"


def test_fp16_distill_with_grad_scaler_on_cpu(stores, tmp_path):
    reason = _cpu_fp16_autocast_works()
    if reason:
        pytest.skip(reason)
    params, one, _ = stores
    p = {**make_params(kimg=0.032), "precision": "fp16"}
    p["trajectories"] = params["trajectories"]  # fp16 only in the student: the fp32 store key
    p["trajectories"] = {**p["trajectories"], "precision": "fp32"}
    do_distill(p, one, str(tmp_path / "run"))
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["precision"] == "fp16" and m["optimizer_steps"] > 0


def test_teacher_training_two_processes_equal_one(tmp_path):
    do_teacher(str(tmp_path / "one"))
    spawn("do_teacher", out=str(tmp_path / "two"))
    w1, w2 = _weights(tmp_path / "one" / "teacher"), _weights(tmp_path / "two" / "teacher")
    init = _weights_of_fresh_teacher()
    assert max(float((w1[k] - init[k]).abs().max()) for k in w1) > 1e-3  # it trained (a short EMA half-life)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=2e-6)


def _weights_of_fresh_teacher() -> dict[str, torch.Tensor]:
    from pipeline.networks.unet import build_network

    torch.manual_seed(0)  # train_teacher seeds the global RNG with params.seed before building the net
    return build_network(**UNET).state_dict()


@pytest.mark.slow  # 2-process spawn of two baselines (~40 s on a 2-core CPU)
def test_baselines_two_processes_equal_one(tmp_path):
    do_baselines(str(tmp_path / "one"))
    spawn("do_baselines", out=str(tmp_path / "two"))
    for sub in ("pd/nfe2", "vanilla"):
        w1, w2 = _weights(tmp_path / "one" / sub), _weights(tmp_path / "two" / sub)
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=2e-6, msg=lambda m: f"{sub}: {k}: {m}")
