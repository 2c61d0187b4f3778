import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The caller's CI flag, kept before the default below (xdist workers inherit both): under CI a
# test whose optional tool is missing fails instead of skipping (tests/needs.py).
os.environ.setdefault("MECHREWARD_CALLER_CI", os.environ.get("CI", ""))
os.environ.setdefault("CI", "true")
# Tests run on CPU: sparsify's Triton decoder (picked whenever triton imports) needs a GPU.
os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
# ...and triton's jit reads TRITON_INTERPRET when first imported (sparsify imports it early), so
# the Triton kernel test's CPU interpreter must be chosen here, before any test module loads.
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

# One intra-op thread per test process: the models and SAEs in tests are tiny, and on a
# 2-core machine (with pytest-xdist workers beside) OpenMP spin-waiting makes multi-threaded
# tiny ops far slower.
torch.set_num_threads(1)


import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same RNG state, so its random inputs are the same in every run."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a test that changed it does not leak the change into the next
    yield
    torch.set_num_threads(threads)
