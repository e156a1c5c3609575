import os

import pytest
import torch

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# Small networks run fastest on one thread (and far faster than two when the cores are shared).
torch.set_num_threads(1)


@pytest.fixture
def gmm_teacher_small():
    from pipeline.teachers import gmm_teacher

    return gmm_teacher(num_components=4, sample_shape=(1, 4, 4), std=0.5, seed=0)
