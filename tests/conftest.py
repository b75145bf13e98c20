"""Test session setup: the Triton kernels run through Triton's interpreter when there is no GPU.

TRITON_INTERPRET is read when `@triton.jit` decorates, so it is set here, before any test module
imports resnet_ablate. The default backend ("auto") never runs the interpreter, so model-level tests
stay fast; tests of the op itself choose "triton" or "torch" explicitly with `use_backend`.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
