import pytest
import torch

from pipeline.core.checkpoints import CheckpointError, load_checkpoint, optimizer_from_tensors, optimizer_to_tensors, save_checkpoint
from pipeline.core.hashing import hash_description, hash_state_dict
from pipeline.core.param_checks import ParamError
from pipeline.diffusion.seeds import format_seeds, parse_seeds, seed_labels, seed_noise


def test_parse_seeds():
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("5") == [5] and parse_seeds(7) == [7]
    assert parse_seeds("0-2,10") == [0, 1, 2, 10]
    assert format_seeds(parse_seeds("0-2,10,11")) == "0-2,10-11"
    for bad, match in [("5-2", "ends before"), ("a-b", "cannot parse"), ("1,,2", "empty"), ("1,1", "more than once")]:
        with pytest.raises(ParamError, match=match):
            parse_seeds(bad)


def test_seed_noise_is_independent_of_batching():
    full = seed_noise(list(range(10)), (1, 4, 4))
    parts = torch.cat([seed_noise([s], (1, 4, 4)) for s in range(10)])
    assert torch.equal(full, parts)
    assert not torch.equal(full[0], full[1])
    labels = seed_labels(list(range(100)), 10)
    assert torch.equal(labels[5:7], seed_labels([5, 6], 10))
    assert set(labels.tolist()) == set(range(10)) and seed_labels([1], 0) is None


def test_checkpoint_round_trip_and_missing_file(tmp_path):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    opt_tensors, opt_meta = optimizer_to_tensors(opt)
    save_checkpoint(tmp_path / "ck", {**net.state_dict(), **opt_tensors}, {"a": 1, "optimizer": opt_meta})
    tensors, config = load_checkpoint(tmp_path / "ck")
    assert config["a"] == 1
    assert hash_state_dict({k: v for k, v in tensors.items() if not k.startswith("optimizer.")}) == hash_state_dict(net.state_dict())
    opt2 = torch.optim.Adam(torch.nn.Linear(3, 2).parameters(), lr=1e-3)
    optimizer_from_tensors(opt2, tensors, config["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(tmp_path / "nowhere")


def test_description_hash_is_canonical():
    assert hash_description({"a": 1, "b": [1, 2]}) == hash_description({"b": [1, 2], "a": 1})
    assert hash_description({"a": 1}) != hash_description({"a": 2})


def test_state_dict_hash_handles_scalars():
    bn = torch.nn.BatchNorm1d(3)  # has a 0-dim num_batches_tracked counter
    assert hash_state_dict(bn.state_dict()) == hash_state_dict(torch.nn.BatchNorm1d(3).state_dict())
