"""Load time and peak memory of a 56M-parameter EDM snapshot pickle (CIFAR-10 DDPM++, VPPrecond).

No EDM file can be downloaded here, so the snapshot is written in EDM's format from this project's port
(random weights; the same globals, persistence records and legacy storage streams as EDM's own files,
see tests/test_edm_pickle.py::write_port_snapshot). Each measurement runs in a fresh process so that
the peak RSS is the loader's own.

    .venv/bin/python bench/bench_edm_pickle_load.py [--workdir /tmp/benchedm]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DDPMPP_CIFAR10 = dict(
    img_resolution=32, img_channels=3, label_dim=0, use_fp16=False, model_type="SongUNet", embedding_type="positional",
    encoder_type="standard", decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1], model_channels=128,
    channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], dropout=0.13, augment_dim=9,
)  # EDM's train.py --arch=ddpmpp --precond=vp for CIFAR-10


def write(path: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import torch

    from pipeline.networks.edm import build_edm_model, count_parameters
    from test_edm_pickle import write_port_snapshot

    torch.manual_seed(0)
    model = build_edm_model("VPPrecond", DDPMPP_CIFAR10).eval()
    write_port_snapshot(path, model, path.with_suffix(".ran"))
    print(json.dumps({"parameters": count_parameters(model), "bytes": path.stat().st_size}))


def measure(path: Path, what: str) -> None:
    import torch

    from pipeline.teachers.edm_pickle import load_edm_pickle, read_edm_snapshot
    from pipeline.teachers.loader import load_teacher

    start = time.perf_counter()
    if what == "read":
        out = read_edm_snapshot(path).numel
    elif what == "load_edm_pickle":
        out = sum(p.numel() for p in load_edm_pickle(path).parameters())
    else:
        t = load_teacher(path)
        out = t.weights_hash
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"what": what, "seconds": round(seconds, 3), "peak_rss_mb": round(peak_mb), "result": out,
                      "torch": torch.__version__}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/benchedm"))
    ap.add_argument("--child", nargs=2, metavar=("WHAT", "PATH"))
    args = ap.parse_args()
    if args.child:
        what, path = args.child
        (write if what == "write" else lambda p: measure(p, what))(Path(path))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    pkl = args.workdir / "edm-ddpmpp-cifar10-vp-random.pkl"
    for what in ("write", "read", "load_edm_pickle", "load_teacher"):
        r = subprocess.run([sys.executable, __file__, "--child", what, str(pkl)], capture_output=True, text=True, cwd=ROOT)
        if r.returncode:
            raise SystemExit(r.stderr)
        print(what, r.stdout.strip())
    # baseline: the interpreter with torch and the project imported, nothing loaded
    r = subprocess.run([sys.executable, "-c", "import resource, torch, pipeline.teachers.loader, pipeline.networks.edm; "
                        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)"], capture_output=True, text=True,
                       cwd=ROOT)
    print("import baseline peak RSS MB", r.stdout.strip())


if __name__ == "__main__":
    main()
