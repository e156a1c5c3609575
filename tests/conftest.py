import os

import pytest
import torch

os.environ.setdefault("DVC_NO_ANALYTICS", "1")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Small networks run fastest on one thread (far faster than two on shared cores); a test that
    changes the count (a stage applying `threads`) does not leak it into the next test."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def gmm_teacher_small():
    from pipeline.teachers.loader import gmm_teacher

    return gmm_teacher(num_components=4, sample_shape=(1, 4, 4), std=0.5, seed=0)
