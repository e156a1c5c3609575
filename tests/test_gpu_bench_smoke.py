"""bench/gpu_bench.py --smoke runs on the CPU and reports what the GPU run will report (so the script cannot rot)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    pytest.importorskip("zarr")  # the script exits without the project's dependencies
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "bench" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    bench = load_bench()
    out = tmp_path_factory.mktemp("gpu-bench")
    result = bench.main(["--smoke", "--batches", "2", "--out", str(out)])
    return bench, result, out


def test_smoke_writes_json_and_markdown(smoke):
    bench, result, out = smoke
    saved = json.loads((out / "gpu_bench.json").read_text())
    assert saved["mode"] == "cpu-smoke" and saved["device"]["device"] == "cpu"
    md = (out / "gpu_bench.md").read_text()
    assert "CPU SMOKE RUN" in md and "not applicable to a CPU smoke run" in md
    assert [(p["precision"], p["kind"]) for p in saved["points"]] == [
        (p, k) for p in ("fp32", "bf16", "fp16") for k in ("teacher", "distill")
    ]
    assert md.count("| teacher |") == 3 and md.count("| distill |") == 3


def test_smoke_runs_the_12_nfe_teacher_and_the_nfe_2_student(smoke):
    _, result, _ = smoke
    assert result["teacher_nfe"] == 12
    for p in result["points"]:
        assert p["traj_per_s"] > 0 and p["median_s"] > 0
        if p["kind"] == "teacher":
            assert p["nfe"] == 12  # CountingDenoiser: denoiser calls per batch of DPM-Solver++(3M), N = 4, M = 3
        else:
            assert p["network_steps"] == 2  # sfd_batch with AFS at N = 4: two optimizer steps
            assert p["kimg_per_s"] == pytest.approx(p["traj_per_s"] / 1000, rel=1e-12)


def test_smoke_flops_and_projection_arithmetic(smoke):
    _, result, _ = smoke
    f = result["flops"]
    assert f["forward_flop"] > 0
    assert 2.5 < f["forward_backward_flop"] / f["forward_flop"] < 3.5  # backward ~ 2x forward
    assert f["per_trajectory"]["teacher"] == 12 * f["forward_flop"]
    assert f["per_trajectory"]["distill"] == 2 * f["forward_backward_flop"]
    for precision, proj in result["projections"].items():
        assert proj["total_s"] == pytest.approx(200_000 / proj["teacher_traj_per_s"] + 200 / proj["distill_kimg_per_s"], rel=1e-9)
        point = next(p for p in result["points"] if p["precision"] == precision and p["kind"] == "distill")
        assert proj["distill_kimg_per_s"] == point["kimg_per_s"]


def test_smoke_store_part_writes_reads_and_distills_from_the_store(smoke):
    _, result, _ = smoke
    s = result["store"]
    assert s["trajectories"] == 8 and s["writer_seconds"] > 0 and s["solver_seconds"] > 0
    assert s["reader_traj_per_s"] > 0 and s["distill_from_store_traj_per_s"] > 0
    assert isinstance(s["writer_is_bottleneck"], bool) and isinstance(s["reader_is_bottleneck"], bool)


def test_peak_table_lookup():
    bench = load_bench()
    assert bench.peak_table_name("NVIDIA H100 80GB HBM3") == "H100 SXM"
    assert bench.peak_table_name("NVIDIA H100 PCIe") == "H100 PCIe"
    assert bench.peak_table_name("NVIDIA H200") == "H200"
    assert bench.peak_table_name("NVIDIA A100-SXM4-80GB") == "A100"
    assert bench.peak_table_name("AMD EPYC") is None
    assert bench.PEAKS["H100 SXM"]["bf16"] == pytest.approx(989.4)
