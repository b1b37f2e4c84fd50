"""Shared test setup. On a machine without CUDA the Triton kernels run through Triton's interpreter
(TRITON_INTERPRET=1), which must be set before triton is imported; GPU runs keep the real compiler."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # shared helpers (kernel_cases.py); tests are no package

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# A kernel failure raises instead of falling back to exact SDPA, so a broken kernel cannot pass its tests on the
# fallback's output; tests of the fallback itself turn this off.
os.environ.setdefault("COMFY_SAGE_STRICT", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
