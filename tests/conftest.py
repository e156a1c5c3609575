import os

import pytest
import torch

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def gmm_teacher_small():
    from pipeline.teachers import gmm_teacher

    return gmm_teacher(num_components=4, sample_shape=(1, 4, 4), std=0.5, seed=0)
