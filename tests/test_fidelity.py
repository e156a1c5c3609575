"""Offline FID / KID / precision / recall through the registered classifier extractor; Inception errors;
the evaluation stage on a tiny teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch_fidelity

from pipeline.core.checkpoints import save_checkpoint
from pipeline.config.data import DataParams
from pipeline.data.datasets import load_split, prepare_dataset
from pipeline.evaluation.evaluate import EvalParams, parse_student_args, run_evaluation
from pipeline.evaluation.feature_net import FeatureNetParams, train_feature_net
from pipeline.evaluation.fidelity import (
    CLASSIFIER_EXTRACTOR, INCEPTION_FILE, InceptionWeightsMissing, UInt8Images, check_inception_weights, classifier_space,
    fidelity_metrics, inception_space, label_accuracy, reference_features,
)
from pipeline.networks.unet import build_network
from pipeline.core.param_checks import ParamError
from pipeline.diffusion.schedules import Schedule



@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("fidelity")
    prepare_dataset(DataParams(), root / "digits")
    p = FeatureNetParams(channels=8, feature_dim=32, epochs=2, min_accuracy=0.0)
    metrics = train_feature_net(p, load_split(root / "digits", "train"), load_split(root / "digits", "held_out"), 10,
                                root / "feature_net", progress=False)
    return root, metrics


def test_fid_self_zero_shifted_positive_via_registered_extractor(digits):
    root, _ = digits
    images, labels = load_split(root / "digits", "train")
    space = classifier_space(root / "feature_net")
    feats = space.extract(images[:600])
    same = fidelity_metrics(feats["features"], feats["features"], kid_subset_size=300)
    assert abs(same["fid"]) < 1e-6  # numerically zero
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    shifted = torch.roll(images[:600], shifts=2, dims=3).clamp(-1, 1)
    other = fidelity_metrics(space.extract(shifted)["features"], feats["features"], kid_subset_size=300)
    assert other["fid"] > 0.1 and other["kid"] > 10 * abs(same["kid"])  # KID subsets differ: ~0, not exactly 0
    # the same numbers through torch-fidelity's own entry point with the registered extractor
    tf = torch_fidelity.calculate_metrics(
        input1=UInt8Images(images[:600]), input2=UInt8Images(shifted), fid=True, cuda=False, cache=False,
        feature_extractor=CLASSIFIER_EXTRACTOR, feature_extractor_weights_path=str(root / "feature_net"),
        save_cpu_ram=True, verbose=False,
    )
    assert tf["frechet_inception_distance"] == pytest.approx(other["fid"], rel=1e-3)


def test_label_accuracy_and_reference_cache(digits, tmp_path):
    root, metrics = digits
    images, labels = load_split(root / "digits", "held_out")
    space = classifier_space(root / "feature_net")
    logits = space.extract(images)["logits"]
    assert label_accuracy(logits, labels) == pytest.approx(metrics["held_out_accuracy"], abs=1e-9)
    assert label_accuracy(logits, None) is None
    first = reference_features(space, images, tmp_path / "cache")
    files = list((tmp_path / "cache").glob("*.safetensors"))
    assert len(files) == 1 and space.weights_hash[:16] in files[0].name
    again = reference_features(space, images, tmp_path / "cache")
    torch.testing.assert_close(again["features"], first["features"], rtol=0, atol=0)


def test_missing_inception_weights_error_names_the_file(tmp_path):
    missing = tmp_path / "weights" / INCEPTION_FILE
    with pytest.raises(InceptionWeightsMissing, match=str(missing)) as err:
        inception_space(missing)
    assert "copy that file to" in str(err.value) and "evaluate.inception_weights" in str(err.value)
    with pytest.raises(InceptionWeightsMissing, match=INCEPTION_FILE):
        check_inception_weights(None)


def test_evaluation_stage_on_a_tiny_teacher(digits, tmp_path):
    root, _ = digits
    torch.manual_seed(0)
    cfg = {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [], "img_resolution": 8,
           "in_channels": 1, "label_dim": 10}
    net = build_network(**cfg)
    base = {"network": cfg, "sigma_data": 0.5, "data": {"sample_shape": [1, 8, 8], "num_classes": 10}, "provenance": {}}
    save_checkpoint(tmp_path / "teacher", net.state_dict(), {**base, "sampler": None})
    student_sampler = {"solver": "euler", "max_order": 1, "schedule": Schedule(num_steps=4).to_dict(), "afs": True,
                       "guidance": 1.0}
    save_checkpoint(tmp_path / "s1", net.state_dict(), {**base, "sampler": {**student_sampler, "step_condition": None}})
    sfdv = build_network(**cfg, step_condition=True)
    sfdv.load_state_dict(net.state_dict(), strict=False)
    save_checkpoint(tmp_path / "sv", sfdv.state_dict(),
                    {**base, "network": {**cfg, "step_condition": True}, "sampler": {**student_sampler, "step_condition": [4, 5]}})
    params = EvalParams.from_dict({"seeds": "1000000-1000031", "grid_seeds": 16, "nfes": [2, 3], "solvers": ["euler", "dpmpp3m"],
                                   "cache_dir": str(tmp_path / "cache"), "device": "cpu", "kid_subsets": 10,
                                   "noise_floor_seeds": "2000000-2000031", "bootstrap": 20,
                                   "paired_seeds": 24})  # the paired metric on the first 24 of the 32 seeds
    results = run_evaluation(params, teacher_dir=tmp_path / "teacher", data_dir=root / "digits", feature_net_dir=root / "feature_net",
                             students=parse_student_args([f"sfd={tmp_path / 's1'}", f"sfdv={tmp_path / 'sv'}"]),
                             grids_dir=tmp_path / "grids", noise_floor_out=tmp_path / "floor.json",
                             paired_reference_out=tmp_path / "ref.safetensors", paired_out=tmp_path / "paired.safetensors")
    assert sorted(results) == sorted(["teacher/nfe35", "euler/nfe2", "euler/nfe3", "dpmpp3m/nfe2", "dpmpp3m/nfe3",
                                      "sfd/nfe2", "sfdv/nfe2", "sfdv/nfe3"])
    paired = ("paired_pixel_rms", "paired_pixel_rms_se", "paired_feature_l2", "paired_feature_l2_se", "paired_seeds")
    for key, m in results.items():
        assert set(m) == {"fid", "fid_sd", "kid", "kid_std", "precision", "recall", "label_accuracy", *paired}
        assert m["fid"] >= 0 and 0 <= m["label_accuracy"] <= 1 and 0 <= m["precision"] <= 1 and m["fid_sd"] > 0
        assert m["kid_std"] > 0 and m["paired_seeds"] == 24
        assert (tmp_path / "grids" / f"{key.replace('/', '_')}.png").is_file()
    # the step-conditioned student starts equal to the teacher, so N=4 gives the same samples as s1
    assert results["sfdv/nfe2"]["fid"] == pytest.approx(results["sfd/nfe2"]["fid"], rel=1e-6)
    assert results["sfdv/nfe2"]["paired_pixel_rms"] == pytest.approx(results["sfd/nfe2"]["paired_pixel_rms"], rel=1e-6)
    # the reference to itself: the float16 round-off of the stored images; fewer steps lie further from it
    assert results["teacher/nfe35"]["paired_pixel_rms"] < 1e-3 and results["teacher/nfe35"]["paired_feature_l2"] < 1e-5
    assert results["euler/nfe2"]["paired_pixel_rms"] > results["euler/nfe3"]["paired_pixel_rms"] > 0.01
    # a students-only stage reads the reference and measures the same distances
    again = run_evaluation(params, teacher_dir=tmp_path / "teacher", data_dir=root / "digits", feature_net_dir=root / "feature_net",
                           students=parse_student_args([f"sfd={tmp_path / 's1'}"]), reference_and_solvers=False,
                           paired_reference=tmp_path / "ref.safetensors", paired_out=tmp_path / "paired_students.safetensors")
    assert again["sfd/nfe2"]["paired_pixel_rms"] == results["sfd/nfe2"]["paired_pixel_rms"]
    from pipeline.evaluation.paired import load_distances

    per_seed = load_distances([tmp_path / "paired.safetensors"])
    assert per_seed.seeds == list(range(1000000, 1000024)) and set(per_seed.pixel) == set(results)
    assert float(per_seed.pixel["euler/nfe2"].mean()) == pytest.approx(results["euler/nfe2"]["paired_pixel_rms"], rel=1e-12)
    students = load_distances([tmp_path / "paired_students.safetensors"])
    torch.testing.assert_close(students.pixel["sfd/nfe2"], per_seed.pixel["sfd/nfe2"], rtol=0, atol=0)
    json.dumps(results)
    # the noise floor: the same teacher sampler on the second seed range (32 samples, as evaluated)
    floor = json.loads((tmp_path / "floor.json").read_text())
    assert floor["samples"] == 32 and floor["sampler"] == "teacher/nfe35"
    assert floor["teacher_fid"] == pytest.approx(results["teacher/nfe35"]["fid"], rel=1e-9)
    assert floor["floor"] == floor["teacher_vs_teacher_fid"] > 0
    assert floor["teacher_fid_seed_difference"] == pytest.approx(abs(floor["teacher_fid"] - floor["teacher_fid_second_seeds"]))
    held, _ = load_split(root / "digits", "held_out")
    assert floor["held_out_samples"] == len(held) and floor["held_out_fid"] >= 0


def test_fast_fid_of_the_bootstrap_matches_torch_fidelity():
    from pipeline.evaluation.fidelity import ReferenceStats, _reference_fid, bootstrap_fid, fid_between

    g = torch.randn(400, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r = 1.3 * torch.randn(500, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.2
    assert _reference_fid(r)(g.numpy()) == pytest.approx(fid_between(g, r), rel=1e-6)
    stats = ReferenceStats(r.mean(0), torch.cov(r.T), "test")
    assert _reference_fid(stats)(g.numpy()) == pytest.approx(fid_between(g, stats), rel=1e-6)
    boot = bootstrap_fid(g, r, resamples=30)
    # resampling repeats points: the mean sits above the FID; the spread is of the FID's own scale
    assert boot["fid_boot_mean"] > fid_between(g, r) and 0 < boot["fid_sd"] < fid_between(g, r)
    assert bootstrap_fid(g, r, resamples=30) == boot  # seeded


def test_eval_params_and_student_args():
    p = EvalParams.from_dict({})
    specs = p.solver_specs()
    assert sorted(specs) == sorted(f"{s}/nfe{k}" for s in ("euler", "ipndm", "dpmpp3m") for k in (2, 3, 4, 5))
    assert specs["euler/nfe2"].schedule.num_steps == 3 and specs["dpmpp3m/nfe5"].schedule.num_steps == 6
    assert all(s.schedule.t_min == 0.006 and s.schedule.t_max == 80.0 for s in specs.values())
    assert p.reference_spec().nfe == 35
    with pytest.raises(ParamError, match="evaluate.solvers"):
        EvalParams.from_dict({"solvers": ["rk4"]})
    with pytest.raises(ParamError, match="NAME=CKPT_DIR"):
        parse_student_args(["nodir"])


def test_student_dirs_expands_per_nfe_checkpoints(tmp_path):
    from pipeline.evaluation.evaluate import student_dirs

    for k in (16, 2, 1):
        (tmp_path / "pd" / f"nfe{k}").mkdir(parents=True)
        (tmp_path / "pd" / f"nfe{k}" / "model.json").write_text("{}")
    (tmp_path / "pd" / "nfe_notes").mkdir()
    assert [d.name for d in student_dirs(tmp_path / "pd")] == ["nfe1", "nfe2", "nfe16"]  # numeric order
    assert student_dirs(tmp_path / "pd" / "nfe2") == [tmp_path / "pd" / "nfe2"]
    with pytest.raises(ParamError, match="nfe<k>"):
        student_dirs(tmp_path)
    # evaluate.round_nfes keeps only those rounds, and refuses a filter that keeps none
    assert [d.name for d in student_dirs(tmp_path / "pd", [1, 2, 4])] == ["nfe1", "nfe2"]
    with pytest.raises(ParamError, match=r"round_nfes: \[8\] keeps none of .*NFE 1, 2, 16"):
        student_dirs(tmp_path / "pd", [8])


def test_reference_stats_npz_and_image_folder(digits, tmp_path):
    """evaluate.reference_stats: EDM's (mu, sigma) .npz gives the FID of the features it summarises; a folder of
    PNGs gives the same metrics as the same images from the data split; bad files are named."""
    import numpy as np
    from PIL import Image
    from torch_fidelity.metric_fid import fid_features_to_statistics

    from pipeline.core.images import to_uint8
    from pipeline.evaluation.fidelity import ReferenceStatsError, fid_from_stats, load_reference_stats

    root, _ = digits
    space = classifier_space(root / "feature_net")
    images, _ = load_split(root / "digits", "train")
    held, _ = load_split(root / "digits", "held_out")
    ref = reference_features(space, images, None)["features"]
    gen = space.extract(held)["features"]
    stats = fid_features_to_statistics(ref)
    np.savez(tmp_path / "ref.npz", mu=stats["mu"], sigma=stats["sigma"])
    loaded = load_reference_stats(tmp_path / "ref.npz")
    assert fid_from_stats(gen, loaded) == pytest.approx(fidelity_metrics(gen, ref, kid_subsets=5)["fid"], rel=1e-9)

    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(to_uint8(images[:300])):
        Image.fromarray(img[0].numpy()).save(folder / f"{i:05d}.png")
    from pipeline.data.datasets import load_image_folder

    pixels, _, _ = load_image_folder(folder)
    torch.testing.assert_close(reference_features(space, pixels, None)["features"], reference_features(space, images[:300], None)["features"])

    with pytest.raises(ReferenceStatsError, match=str(tmp_path / "missing.npz")):
        load_reference_stats(tmp_path / "missing.npz")
    np.savez(tmp_path / "bad.npz", mean=stats["mu"])
    with pytest.raises(ReferenceStatsError, match="'mu' and 'sigma'"):
        load_reference_stats(tmp_path / "bad.npz")
    np.savez(tmp_path / "wide.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ReferenceStatsError, match="2048-d statistics"):
        fid_from_stats(gen, load_reference_stats(tmp_path / "wide.npz"))


def test_evaluation_with_reference_stats_reports_fid_only(digits, tmp_path):
    import numpy as np
    from torch_fidelity.metric_fid import fid_features_to_statistics

    root, _ = digits
    torch.manual_seed(0)
    cfg = {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [], "img_resolution": 8,
           "in_channels": 1, "label_dim": 10}
    base = {"network": cfg, "sigma_data": 0.5, "data": {"sample_shape": [1, 8, 8], "num_classes": 10}, "provenance": {}}
    save_checkpoint(tmp_path / "teacher", build_network(**cfg).state_dict(), {**base, "sampler": None})
    images, _ = load_split(root / "digits", "train")
    stats = fid_features_to_statistics(reference_features(classifier_space(root / "feature_net"), images, None)["features"])
    np.savez(tmp_path / "ref.npz", mu=stats["mu"], sigma=stats["sigma"])
    common = {"seeds": "1000000-1000031", "grid_seeds": 0, "nfes": [2], "solvers": ["euler"], "device": "cpu", "kid_subsets": 5,
              "cache_dir": str(tmp_path / "cache")}
    by_split = run_evaluation(EvalParams.from_dict(common), teacher_dir=tmp_path / "teacher", data_dir=root / "digits",
                              feature_net_dir=root / "feature_net", reference_and_solvers=True)
    by_stats = run_evaluation(EvalParams.from_dict({**common, "reference_stats": str(tmp_path / "ref.npz")}),
                              teacher_dir=tmp_path / "teacher", data_dir=root / "digits", feature_net_dir=root / "feature_net")
    for key in by_split:
        assert by_stats[key]["fid"] == pytest.approx(by_split[key]["fid"], rel=1e-9)
        assert by_stats[key]["kid"] is None and by_stats[key]["precision"] is None


def test_feature_net_stage_skips_unlabelled_data_with_inception_features(tmp_path):
    """FFHQ-like data (no labels) with evaluate.features: inception: the stage writes skipped.json instead of
    failing; with classifier features it refuses with a message naming the way out."""
    import subprocess
    import sys

    import numpy as np
    import yaml
    from PIL import Image

    root = Path(__file__).resolve().parents[1]
    folder = tmp_path / "pngs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(20):
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"].update(dataset="images", path=str(folder), num_classes=None)
    params["evaluate"].update(features="inception")
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(params))
    prepare_dataset(DataParams.from_dict(params["data"]), tmp_path / "data")
    cmd = [sys.executable, "-m", "stages.feature_net", "--params", str(pfile), "--data", str(tmp_path / "data"),
           "--out", str(tmp_path / "fnet"), "--metrics", str(tmp_path / "m.json")]
    ok = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    assert ok.returncode == 0, ok.stderr
    assert "skipped" in json.loads((tmp_path / "fnet" / "skipped.json").read_text())
    params["evaluate"].update(features="classifier")
    pfile.write_text(yaml.safe_dump(params))
    bad = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    assert bad.returncode == 2 and "no labels" in bad.stderr and "inception" in bad.stderr


def test_kid_equals_torch_fidelitys_estimator():
    """kernel_inception_distance computes the whole-set kernels once; its subsets, kernel and unbiased MMD^2 are
    torch-fidelity's, so mean and sd agree to float64 round-off (rel 1e-9), including with unequal set sizes."""
    import numpy as np
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    from pipeline.evaluation.fidelity import kernel_inception_distance

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 16)), rng.normal(size=(437, 16)) + 0.2
    mine = kernel_inception_distance(x, y, subsets=20, subset_size=150, rng_seed=2020)
    ref = kid_features_to_metric(torch.tensor(x), torch.tensor(y), kid_subsets=20, kid_subset_size=150, rng_seed=2020,
                                 verbose=False)
    assert mine == pytest.approx((ref[KEY_METRIC_KID_MEAN], ref[KEY_METRIC_KID_STD]), rel=1e-9)
    assert mine[0] > 0.01  # the shift is seen (not a trivially equal pair of zeros)
