"""Step for step with the authors' sfd-main: this project's SFD stage 1 and sfd-main's own training loop on
one tiny EDM teacher, the same x_T per batch, on a CPU in float32; one row per optimizer step.

    .venv/bin/python bench/authors/side_by_side.py --sfd-main /tmp/authors/diff-sampler/sfd-main \\
        --edm /tmp/authors/edm --pythonpath /tmp/authors/pylib [--modes authors,defaults,legacy]

--sfd-main: a checkout of zju-pi/diff-sampler's sfd-main folder; --edm: a checkout of NVlabs/edm (nothing of
either is copied here: both run from their checkouts, in their own processes). --pythonpath: a folder with
what sfd-main imports and this environment lacks (its training/loss.py imports piq, its models/ldm imports
einops: `pip install --no-deps --target DIR piq==0.8.0 einops`).

1. EDM's own code (``training.networks.EDMPrecond`` + ``SongUNet``, a tiny DDPM++: 16 px, 16 channels) builds
   the teacher with random weights (every parameter perturbed, so no layer is zero) and pickles it as an
   EDM snapshot (``dict(ema=net)``, EDM's persistence).
2. This project: ``sfd teacher import`` of that pickle, then the ``trajectories`` stage function
   (DPM-Solver++(3M), M = 3, N = 4, polynomial rho 7, t 0.006..80; one seed per trajectory of the budget)
   and the ``distill`` stage function (N = 4 + AFS, L1, Adam 5e-5, lr x0.1 at half, batch B, BATCHES
   batches: each trajectory used once, as sfd-main's fresh noise). Recorded per batch: its x_T and targets;
   per optimizer step: loss, lr, gradients, weights after the step.
3. sfd-main: ``training.training_loop.training_loop`` with its loss and solvers, run as its train.py
   configures it for CIFAR-10 (dataset_name cifar10, sampler_tea dpmpp, max_order 3, M 3, afs, ...).
   Run-time patches only, none of its files edited: a one-process gloo group and DDP without device_ids
   (it calls torchrun/NCCL/CUDA), torch.cuda memory statistics as 0, ``create_model`` building its
   EDMPrecond with the bench's tiny SongUNet instead of its hard-coded CIFAR-10 one (otherwise its own
   code: ``pickle.load(f)['ema']``, ``load_state_dict(strict=False)``, sigma 0.006..80), and its latents:
   in training_loop ``loss_fn.sigma_max * torch.randn(...)`` gives the project's x_T of that batch bit for
   bit (``torch.randn`` there returns an object whose product with 80 is that x_T).
   Recording subclasses of its loss and of torch.optim.Adam (passed by class name as train.py does).
4. Both trained students sample the same 16 fresh x_T with their 2-NFE sampler (Euler + AFS, N = 4):
   the project's ``solve`` and sfd-main's ``solvers.euler_sampler``.

Modes (project side; sfd-main is always itself): ``authors`` = trajectories.dynamic_thresholding true,
distill.lr_decay_check after_batch, precision fp16_authors (on a CPU EDM's use_fp16 is float32, so that is
sfd-main's CPU run); ``defaults`` = this project's defaults (no thresholding); ``legacy`` = before issue 21
(no thresholding, lr_decay_check before_batch); ``authors-lr-before`` = ``authors`` but the lr decision of
before issue 21 (isolates that difference; ``defaults`` isolates the thresholding). The last section cross-checks the authors' LPIPS variant
(lpips_scaling piq, avg pooling, 224 px) against piq itself on a random-weight VGG16 when piq imports, after
checking that ``step_condition: authors`` networks (SFD-v, sfd-main's step layers) load sfd-main's own SongUNet
and DhariwalUNet weights and give its D(x, sigma, N).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
NET = dict(  # a tiny DDPM++ (EDM's SongUNet, --arch=ddpmpp keywords), dropout 0 so both sides draw no random numbers
    model_type="SongUNet", embedding_type="positional", encoder_type="standard", decoder_type="standard",
    channel_mult_noise=1, resample_filter=[1, 1], model_channels=16, channel_mult=[1, 2], num_blocks=1,
    attn_resolutions=[8], dropout=0.0, augment_dim=9,
)
IFACE = dict(img_resolution=16, img_channels=3, label_dim=0)
SIGMA_MIN, SIGMA_MAX, RHO, NUM_STEPS, M, LR = 0.006, 80.0, 7.0, 4, 3, 5e-5
MODES = {
    "authors": {"trajectories": {"dynamic_thresholding": True},
                "distill": {"lr_decay_check": "after_batch", "precision": "fp16_authors"}},
    "defaults": {"trajectories": {}, "distill": {}},
    "legacy": {"trajectories": {"dynamic_thresholding": False}, "distill": {"lr_decay_check": "before_batch"}},
    "authors-lr-before": {"trajectories": {"dynamic_thresholding": True},
                          "distill": {"lr_decay_check": "before_batch", "precision": "fp16_authors"}},
}


# ------------------------------------------------------------------ 1. the teacher, by EDM's code


def build_edm_teacher(edm: str, out: Path, seed: int) -> None:
    sys.path.insert(0, edm)
    from training.networks import EDMPrecond  # NVlabs/edm

    torch.manual_seed(seed)
    net = EDMPrecond(**IFACE, use_fp16=False, **NET)
    with torch.no_grad():  # random weights everywhere: EDM zero-initialises output layers, which would hide the network
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p) / max(1.0, p[0].numel() ** 0.5 / 4))
    with open(out, "wb") as f:
        pickle.dump(dict(ema=copy.deepcopy(net).eval().requires_grad_(False)), f)
    print(json.dumps({"parameters": sum(p.numel() for p in net.parameters())}))


# ------------------------------------------------------------------ 3. sfd-main's training loop


class RecordingAdam(torch.optim.Adam):
    """torch.optim.Adam that records lr, gradients (after sfd-main's nan_to_num) and weights around each step."""

    names: dict[int, str] = {}
    steps: list[dict] = []

    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"]]
        rec = {"lr": self.param_groups[0]["lr"],
               "grad": {self.names[id(p)]: p.grad.detach().clone() for p in params if p.grad is not None}}
        out = super().step(closure)
        rec["weight"] = {self.names[id(p)]: p.detach().clone() for p in params if id(p) in self.names}
        RecordingAdam.steps.append(rec)
        return out


def run_sfd_main(sfd_main: str, work: Path) -> None:
    sys.path[:0] = [sfd_main]
    os.chdir(sfd_main)
    inputs = torch.load(work / "sfd_inputs.pt")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(inputs["port"]), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)

    import dnnlib
    import solvers
    import training.loss
    import training.training_loop as tl

    main = sys.modules["__main__"]
    ddp_class = torch.nn.parallel.DistributedDataParallel

    class CPUDDP(ddp_class):  # sfd-main passes device_ids=[device]; a CPU module takes none
        def __init__(self, module, device_ids=None, **kwargs):
            super().__init__(module, device_ids=None, **kwargs)

    torch.nn.parallel.DistributedDataParallel = CPUDDP
    torch.cuda.max_memory_allocated = lambda *a, **k: 0
    torch.cuda.max_memory_reserved = lambda *a, **k: 0
    torch.cuda.reset_peak_memory_stats = lambda *a, **k: None
    holder = {}

    def create_model(dataset_name=None, model_path=None, guidance_type=None, guidance_rate=None, device=None,
                     is_second_stage=False):
        """sfd-main's create_model for an EDM teacher, with the bench's SongUNet instead of its CIFAR-10 one."""
        with dnnlib.util.open_url(model_path, verbose=False) as f:
            net_temp = pickle.load(f)["ema"].to(device)
        net = dnnlib.util.construct_class_by_name(class_name="models.networks_edm.EDMPrecond", use_fp16=False,
                                                  **{k: v for k, v in NET.items()}, **IFACE)
        net.to(device)
        net.load_state_dict(net_temp.state_dict(), strict=False)
        del net_temp
        net.sigma_min = SIGMA_MIN
        net.sigma_max = SIGMA_MAX
        holder["net"] = net
        RecordingAdam.names = {id(p): n for n, p in net.named_parameters()}
        return net, "edm"

    tl.create_model = create_model
    x_T = list(inputs["x_T"])  # per batch: the project's x_T

    class Latent:  # what `loss_fn.sigma_max * torch.randn(...)` evaluates to: the project's x_T, bit for bit
        def __init__(self, x):
            self.x = x

        def __rmul__(self, scale):
            assert scale == SIGMA_MAX, scale
            return self.x

    class TorchWithLatents:  # training_loop's `torch`, whose randn gives the project's latents
        def __getattr__(self, name):
            return getattr(torch, name)

        def randn(self, size, device=None, **kwargs):
            x = x_T.pop(0)
            assert list(x.shape) == list(size), (x.shape, size)
            return Latent(x.to(device))

    tl.torch = TorchWithLatents()
    losses, targets = [], []

    class RecordingLoss(training.loss.loss):
        def __call__(self, net, tensor_in, labels=None, step_idx=None, **kwargs):
            loss, out = super().__call__(net, tensor_in, labels=labels, step_idx=step_idx, **kwargs)
            if not (self.afs and step_idx == 0):  # what training_loop backpropagates: loss.sum() / batch
                losses.append(float(loss.sum() / tensor_in.shape[0]))
            return loss, out

        def get_teacher_traj(self, net, tensor_in, labels=None, **kwargs):
            traj = super().get_teacher_traj(net, tensor_in, labels=labels, **kwargs)
            targets.append(traj.detach().clone())
            return traj

    main.RecordingLoss, main.RecordingAdam = RecordingLoss, RecordingAdam
    b, n = inputs["batch"], inputs["batches"]
    (work / "sfd_main_run").mkdir(exist_ok=True)
    tl.training_loop(
        run_dir=str(work / "sfd_main_run"),
        loss_kwargs=dnnlib.EasyDict(class_name="__main__.RecordingLoss", num_steps=NUM_STEPS, sampler_tea="dpmpp", M=M,
                                    schedule_type="polynomial", schedule_rho=RHO, afs=True, max_order=3, predict_x0=True,
                                    lower_order_final=True, use_step_condition=False, is_second_stage=False),
        optimizer_kwargs=dnnlib.EasyDict(class_name="__main__.RecordingAdam", lr=LR, betas=[0.9, 0.999], eps=1e-8),
        seed=0, batch_size=b, total_kimg=b * n / 1000, kimg_per_tick=1, snapshot_ticks=None, state_dump_ticks=None,
        cudnn_benchmark=False, dataset_name="cifar10", guidance_type=None, guidance_rate=0.0,
        device=torch.device("cpu"), model_path=str(work / "teacher.pkl"),
    )  # fmt: skip
    net = holder["net"].eval()
    with torch.no_grad():
        sample = solvers.euler_sampler(net, inputs["z_eval"], num_steps=NUM_STEPS, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX,
                                       schedule_type="polynomial", schedule_rho=RHO, afs=True)
    torch.save({"losses": losses, "targets": targets, "steps": RecordingAdam.steps, "sample": sample,
                "weights": {k: v.detach().clone() for k, v in net.named_parameters()}, "sfdv": sfdv_outputs(dnnlib)},
               work / "sfd_main.pt")
    torch.distributed.destroy_process_group()


SFDV_NETS = {  # sfd-main's SFD-v networks (networks_edm.py: map_step*, affine_step in every block), tiny
    "SongUNet": dict(NET),
    "DhariwalUNet": dict(model_type="DhariwalUNet", model_channels=64, channel_mult=[1, 2], num_blocks=1,
                         attn_resolutions=[8], dropout=0.0),
}


def sfdv_outputs(dnnlib) -> dict:
    """sfd-main's EDMPrecond with each network, random weights (all perturbed), D(x, sigma, N) for N = 4..7."""
    out = {}
    g = torch.Generator().manual_seed(1)
    x = 5 * torch.randn(3, 3, 16, 16, generator=g)
    sigma = torch.tensor([0.3, 2.0, 20.0])
    for name, kw in SFDV_NETS.items():
        label_dim = 4 if name == "DhariwalUNet" else 0
        torch.manual_seed(0)
        net = dnnlib.util.construct_class_by_name(class_name="models.networks_edm.EDMPrecond", use_fp16=False, **kw,
                                                  img_resolution=16, img_channels=3, label_dim=label_dim).eval()
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=g))
            labels = torch.eye(4)[torch.tensor([0, 3, 1])] if label_dim else None
            out[name] = {"state": {k: v.clone() for k, v in net.state_dict().items()}, "x": x, "sigma": sigma,
                         "labels": labels, "D": {n: net(x, sigma, labels, step_condition=n) for n in (4, 5, 6, 7)}}
    return out


def sfdv_parity(theirs: dict) -> None:
    """This project's EDM port with step_condition "authors" loads sfd-main's SFD-v weights and computes its D."""
    from pipeline.networks.edm import build_edm_model

    for name, r in theirs.items():
        kw = {**SFDV_NETS[name], "img_resolution": 16, "img_channels": 3, "label_dim": 4 if name == "DhariwalUNet" else 0,
              "step_condition": "authors"}
        ours = build_edm_model("EDMPrecond", kw).eval()
        ours.load_state_dict(r["state"], strict=True)
        labels = None if r["labels"] is None else r["labels"].argmax(1)
        with torch.no_grad():
            diffs = {n: float((ours(r["x"], r["sigma"], labels, num_steps=torch.full((3,), n)) - d).abs().max())
                     for n, d in r["D"].items()}
        spread = max(float((r["D"][4] - d).abs().max()) for d in r["D"].values())
        print(f"SFD-v network {name} (sfd-main's weights loaded strictly, {len(r['state'])} tensors): max abs D diff "
              f"per N {', '.join(f'{n}: {v:.1e}' for n, v in diffs.items())} (max abs D {float(r['D'][4].abs().max()):.3g}; "
              f"D moves by up to {spread:.3g} between N = 4 and 7)")


# ------------------------------------------------------------------ 2. this project


def run_project(work: Path, mode: str, batches: int, batch: int, threads: int = 1, tag: str = "") -> dict:
    import pipeline.distill.sfd as sfd
    from pipeline.config.params import parse_params
    from pipeline.distill.sfd import run_distill_stage
    from pipeline.teachers.import_cli import import_edm_pickle
    from pipeline.trajectories.generation import run_trajectories_stage

    teacher_dir = work / "teacher_ckpt"
    if not teacher_dir.exists():
        import_edm_pickle(work / "teacher.pkl", teacher_dir)
    out = work / (mode + tag)
    torch.set_num_threads(threads)
    schedule = {"kind": "polynomial", "num_steps": NUM_STEPS, "t_min": SIGMA_MIN, "t_max": SIGMA_MAX, "rho": RHO}
    raw = {
        "loss": "l1",
        "trajectories": {"solver": "dpmpp", "max_order": 3, "lower_order_final": True, "M": M, "schedule": schedule,
                         "seeds": f"0-{batches * batch - 1}", "chunk_size": batch, "batch_size": batch,
                         **MODES[mode]["trajectories"]},
        "distill": {"afs": True, "lr": LR, "lr_decay": 0.1, "lr_decay_at": 0.5, "kimg": batches * batch / 1000,
                    "batch_size": batch, "checkpoint_every_kimg": 1000.0, "log_every_kimg": batch / 1000,
                    "device": "cpu", "threads": threads, **MODES[mode]["distill"]},
        "evaluate": {"seeds": "100000-100015"},
    }  # fmt: skip
    p = parse_params(raw)
    run_trajectories_stage(p.trajectories, out / "store.zarr", name="trajectories", device="cpu",
                           teacher_ckpt=teacher_dir, progress=False)
    rec: dict = {"x_T": [], "targets": [], "steps": []}
    names: dict[int, str] = {}
    sfd_batch, optimizer_step = sfd.sfd_batch, sfd.optimizer_step

    def recording_batch(model, optimizer, b, *args, **kwargs):
        if not names:
            names.update({id(q): n for n, q in model.named_parameters()})
            rec["w0"] = {n: q.detach().clone() for n, q in model.named_parameters()}
        rec["x_T"].append(b.x_T.clone())
        rec["targets"].append(b.states.clone())
        return sfd_batch(model, optimizer, b, *args, **kwargs)

    def recording_step(optimizer, loss, **kwargs):
        lr = optimizer.param_groups[0]["lr"]
        value = optimizer_step(optimizer, loss, **kwargs)
        params = [q for g in optimizer.param_groups for q in g["params"]]
        rec["steps"].append({"lr": lr, "loss": value,
                             "grad": {names[id(q)]: q.grad.detach().clone() for q in params if q.grad is not None},
                             "weight": {names[id(q)]: q.detach().clone() for q in params}})
        return value

    sfd.sfd_batch, sfd.optimizer_step = recording_batch, recording_step
    try:
        run_distill_stage(p.distill, trajectories=p.trajectories, loss="l1", name="distill", store=out / "store.zarr",
                          teacher_ckpt=teacher_dir, out=out / "student", state_dir=None, progress=False)
    finally:
        sfd.sfd_batch, sfd.optimizer_step = sfd_batch, optimizer_step
    from pipeline.diffusion.schedules import Schedule
    from pipeline.diffusion.seeds import seed_noise
    from pipeline.diffusion.solvers import solve
    from pipeline.teachers.loader import load_student

    student = load_student(out / "student")
    sampler = student.config["sampler"]
    t = Schedule.from_dict(sampler["schedule"]).t_steps()
    x_eval = (SIGMA_MAX * seed_noise(range(100000, 100016), (3, 16, 16), dtype=torch.float64)).float()
    with torch.no_grad():
        rec["sample"] = solve(student.denoiser, x_eval, t, sampler["solver"], afs=sampler["afs"])
    rec["x_eval"] = x_eval
    torch.set_num_threads(1)
    return rec


def self_control(work: Path, first: dict, batches: int, batch: int) -> None:
    """The project against itself with 2 threads instead of 1: other summation orders in the CPU kernels, the
    same maths. Its differences are this machine's round-off, amplified by Adam as in the comparison above."""
    other = run_project(work, "authors", batches, batch, threads=2, tag="-2threads")
    target = max(float((a - b).abs().max()) for a, b in zip(first["targets"], other["targets"]))
    grad = max(max_abs(a["grad"], b["grad"]) for a, b in zip(first["steps"], other["steps"]))
    weight = max(max_abs(a["weight"], b["weight"]) for a, b in zip(first["steps"], other["steps"]))
    last_a, last_b = first["steps"][-1]["weight"], other["steps"][-1]["weight"]
    rel = (sum(float((last_a[k] - last_b[k]).square().sum()) for k in last_a)
           / sum(float((last_a[k] - first["w0"][k]).square().sum()) for k in last_a)) ** 0.5
    loss = max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(first["steps"], other["steps"]))
    print(f"\ncontrol, this project (authors mode) on 1 vs 2 threads: target {target:.2e} | loss rel {loss:.2e} | "
          f"grad {grad:.2e} | weight {weight:.2e} (L2 relative to the weight change {rel:.2e}) | samples "
          f"{float((first['sample'] - other['sample']).abs().max()):.2e}")


# ------------------------------------------------------------------ comparison


def max_abs(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def compare(mode: str, ours: dict, theirs: dict, batch: int) -> dict:
    steps_per_batch = NUM_STEPS - 2  # AFS: no optimizer step at student step 0
    rows = []
    y_scale = max(float(y.abs().max()) for y in ours["targets"])
    for k, (a, b) in enumerate(zip(ours["steps"], theirs["steps"])):
        bi, j = divmod(k, steps_per_batch)
        step_idx = j + 1  # the student step n = step_idx lands on t_{n+1}: target y_{n+1}
        y_ours = ours["targets"][bi][:, step_idx]  # the project's stored states y_1..y_{N-1}
        y_theirs = theirs["targets"][bi][step_idx]  # sfd-main's teacher_traj[tea_slice][step_idx]
        grad_scale = max(float(g.abs().max()) for g in a["grad"].values())
        rows.append({
            "step": k, "batch": bi, "n": step_idx + 1,
            "target": float((y_ours - y_theirs).abs().max()),
            "loss_ours": a["loss"], "loss_theirs": theirs["losses"][k],
            "lr_ours": a["lr"], "lr_theirs": b["lr"],
            "grad": max_abs(a["grad"], b["grad"]), "grad_scale": grad_scale,
            "weight": max_abs(a["weight"], {kk: b["weight"][kk] for kk in a["weight"]}),
            "weight_rel": (sum(float((a["weight"][kk] - b["weight"][kk]).square().sum()) for kk in a["weight"])
                           / sum(float((a["weight"][kk] - ours["w0"][kk]).square().sum()) for kk in a["weight"])) ** 0.5,
        })  # fmt: skip
    # Adam's first step moves every element by ~lr sign(g) whatever |g|: where |g| is at round-off level the two
    # sides can step in opposite directions. Which gradients do the elements that differ by more than lr/10 have?
    a0, b0 = ours["steps"][0], theirs["steps"][0]
    moved = [(b0["grad"][k].abs()[(a0["weight"][k] - b0["weight"][k]).abs() > LR / 10]) for k in a0["weight"] if k in b0["grad"]]
    moved = torch.cat([m.flatten() for m in moved])
    first_step = {"elements": int(moved.numel()), "of": sum(v.numel() for v in a0["weight"].values()),
                  "max_abs_grad": float(moved.max()) if moved.numel() else 0.0}
    sample = float((ours["sample"] - theirs["sample"]).abs().max())
    return {"mode": mode, "rows": rows, "first_step": first_step, "steps": (len(ours["steps"]), len(theirs["steps"])), "y_scale": y_scale,
            "sample_diff": sample, "sample_scale": float(ours["sample"].abs().max())}


def print_table(r: dict) -> None:
    print(f"\n### mode: {r['mode']}  (optimizer steps: project {r['steps'][0]}, sfd-main {r['steps'][1]}; "
          f"max |y| {r['y_scale']:.3g})\n")
    print("| step | batch | y_n | max abs target diff | loss (project) | loss (sfd-main) | lr (project) | lr (sfd-main) "
          "| max abs grad diff (max abs grad) | max abs weight diff | weight diff / weight change (L2) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for w in r["rows"]:
        print(f"| {w['step']} | {w['batch']} | y{w['n']} | {w['target']:.2e} | {w['loss_ours']:.9g} | {w['loss_theirs']:.9g} "
              f"| {w['lr_ours']:.3g} | {w['lr_theirs']:.3g} | {w['grad']:.2e} ({w['grad_scale']:.2e}) | {w['weight']:.2e} "
              f"| {w['weight_rel']:.2e} |")
    rows = r["rows"]
    loss_rel = max(abs(w["loss_ours"] - w["loss_theirs"]) / abs(w["loss_theirs"]) for w in rows)
    lr_same = sum(w["lr_ours"] == w["lr_theirs"] for w in rows)
    print(f"\nmax over steps: target {max(w['target'] for w in rows):.2e} | loss rel {loss_rel:.2e} | lr equal in "
          f"{lr_same}/{len(rows)} steps | grad {max(w['grad'] for w in rows):.2e} (relative to max abs grad "
          f"{max(w['grad'] / w['grad_scale'] for w in rows):.2e}) | weight {max(w['weight'] for w in rows):.2e} "
          f"(L2 relative to the weight change {max(w['weight_rel'] for w in rows):.2e})"
          f" | 2-NFE samples of the trained students (16 x_T): max abs diff {r['sample_diff']:.2e} (max abs sample "
          f"{r['sample_scale']:.3g})")
    f = r["first_step"]
    print(f"after the first optimizer step, {f['elements']} of {f['of']} weights differ by more than lr/10; their "
          f"gradients (sfd-main's) are at most {f['max_abs_grad']:.2e} in absolute value (Adam steps ~lr sign(g) "
          f"whatever |g|, so a gradient at round-off level can step either way)")


def lpips_cross_check() -> None:
    """The authors' LPIPS variant of pipeline.distill.losses against piq itself (ContentLoss with LPIPS's layers,
    the same random VGG16 features and heads; piq.LPIPS() would download its weights)."""
    try:
        from piq.perceptual import ContentLoss
    except ImportError as e:
        print(f"\nLPIPS cross-check skipped: piq does not import ({e})")
        return
    from pipeline.distill.losses import LPIPSLoss

    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    features = make_layers(cfgs["D"])  # torchvision's VGG16 features, random
    with tempfile.TemporaryDirectory() as d:
        torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, Path(d) / "vgg16.pth")
        heads = [torch.rand(c) for c in (64, 128, 256, 512, 512)]
        torch.save(heads, Path(d) / "lpips_weights.pt")
        ours = LPIPSLoss(Path(d) / "vgg16.pth", "vgg", size=224, pooling="avg", scaling="piq", heads=Path(d) / "lpips_weights.pt")
    piq_lpips = ContentLoss(feature_extractor=copy.deepcopy(features), layers=["3", "8", "15", "22", "29"],
                            weights=[h.view(1, -1, 1, 1) for h in heads], replace_pooling=True, distance="mse",
                            reduction="none", normalize_features=True)
    g = torch.Generator().manual_seed(0)
    x = torch.tanh(torch.randn(4, 3, 32, 32, generator=g))
    y = (x + 0.2 * torch.randn(4, 3, 32, 32, generator=g)).clamp(-1, 1)
    with torch.no_grad():  # sfd-main's get_lpips_measure: both resized to 224 bilinearly, then piq's LPIPS
        theirs = piq_lpips(torch.nn.functional.interpolate(x, size=224, mode="bilinear"),
                           torch.nn.functional.interpolate(y, size=224, mode="bilinear"))
        mine = torch.stack([ours(x[i : i + 1], y[i : i + 1]) for i in range(4)])
    print(f"\nLPIPS, authors' variant vs piq {__import__('piq').__version__} (random VGG16 and heads, 4 pairs in [-1, 1]): "
          f"project {[round(float(v), 8) for v in mine]}, piq {[round(float(v), 8) for v in theirs]}, "
          f"max rel diff {float(((mine - theirs).abs() / theirs.abs()).max()):.2e}")


def git_commit(path: str) -> str:
    try:
        return subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sfd-main", required=True, help="checkout of zju-pi/diff-sampler's sfd-main folder")
    ap.add_argument("--edm", required=True, help="checkout of NVlabs/edm")
    ap.add_argument("--pythonpath", default="", help="folder with piq and einops for sfd-main (pip install --target)")
    ap.add_argument("--modes", default="authors,defaults,authors-lr-before,legacy")
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0, help="the teacher's random weights")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--role", default="main", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.role == "edm-teacher":
        return build_edm_teacher(args.edm, Path(args.work) / "teacher.pkl", args.seed)
    if args.role == "sfd-main":
        return run_sfd_main(args.sfd_main, Path(args.work))

    sys.path.insert(0, str(ROOT))
    if args.pythonpath:
        sys.path.append(args.pythonpath)  # piq for the LPIPS cross-check (after this environment's packages)
    work = Path(args.work or tempfile.mkdtemp(prefix="sfd-authors-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [args.pythonpath, os.environ.get("PYTHONPATH", "")] if p),
           "OMP_NUM_THREADS": "1"}
    me = [sys.executable, str(Path(__file__).resolve()), "--sfd-main", args.sfd_main, "--edm", args.edm, "--work", str(work)]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"machine: {cpu}, {platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}, 1 thread")
    print(f"sfd-main: {args.sfd_main} @ {git_commit(args.sfd_main)}\nedm: {args.edm} @ {git_commit(args.edm)}")
    print(f"this project: {ROOT} @ {git_commit(str(ROOT))}")
    print(f"teacher: EDM EDMPrecond + SongUNet {json.dumps({**IFACE, **NET})}, seed {args.seed}; batches {args.batches} x {args.batch}")
    built = subprocess.run([*me, "--role", "edm-teacher", "--seed", str(args.seed)], env=env, capture_output=True, text=True)
    if built.returncode:
        sys.exit(f"error: EDM's code could not build the teacher:\n{built.stderr[-3000:]}")
    print(f"teacher parameters: {json.loads(built.stdout.strip().splitlines()[-1])['parameters']}")

    theirs = None
    x_T_order = None
    runs = {}
    for mode in args.modes.split(","):
        ours = runs[mode] = run_project(work, mode, args.batches, args.batch)
        if theirs is None or not all(torch.equal(a, b) for a, b in zip(x_T_order, ours["x_T"])):
            torch.save({"x_T": ours["x_T"], "z_eval": ours["x_eval"] / SIGMA_MAX, "batch": args.batch, "batches": args.batches,
                        "port": 29500 + os.getpid() % 1000}, work / "sfd_inputs.pt")
            run = subprocess.run([*me, "--role", "sfd-main"], env=env, capture_output=True, text=True)
            if run.returncode:
                sys.exit(f"error: sfd-main's training loop failed:\n{run.stderr[-5000:]}")
            theirs, x_T_order = torch.load(work / "sfd_main.pt"), ours["x_T"]
            print(f"sfd-main ran {len(theirs['steps'])} optimizer steps on the project's x_T")
        print_table(compare(mode, ours, theirs, args.batch))
    if "authors" in runs:
        self_control(work, runs["authors"], args.batches, args.batch)
    print()
    sfdv_parity(theirs["sfdv"])
    lpips_cross_check()


if __name__ == "__main__":
    main()
