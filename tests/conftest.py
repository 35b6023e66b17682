"""Test-wide setup: Triton's interpreter on machines without CUDA, seeded RNGs, the gpu marker."""

import os
import random

import numpy as np
import pytest
import torch

# Must happen before any kernel module is imported: @triton.jit picks the interpreter at decoration time.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
