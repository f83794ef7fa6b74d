"""Shared fixtures. Plain helper functions (models, data, comparisons) are in ``tests/helpers.py``."""

import os
import sys

import pytest
import torch

# The test models are tiny: one thread is fastest, and avoids oversubscribing CI's two cores when
# the multi-process tests run.
torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The base optimizers GrassAdamW is checked with: (id, build from params or groups). Each keeps state
# GRASS must carry across inactive phases and offloading (moments, momentum, sums, max second moments).
BASE_OPTIMIZERS = [
    ("adamw", lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)),
    ("adamw-foreach", lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=True)),
    ("adam-amsgrad", lambda params: torch.optim.Adam(params, lr=1e-2, amsgrad=True)),
    ("sgd-momentum", lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3)),
    ("adagrad", lambda params: torch.optim.Adagrad(params, lr=0.1)),
]
OFFLOAD_MODES = [None, "inactive", "stream"]


@pytest.fixture(params=BASE_OPTIMIZERS, ids=[b[0] for b in BASE_OPTIMIZERS])
def make_base(request):
    """A function building one of BASE_OPTIMIZERS over the given parameters or groups."""
    return request.param[1]


@pytest.fixture(params=OFFLOAD_MODES, ids=["offload-off", "inactive", "stream"])
def offload_mode(request):
    return request.param
