"""Test session setup: Triton kernels run through the Triton interpreter on machines without CUDA,
compiled on the GPU otherwise (the `device` fixture puts kernel tests' tensors there).

TRITON_INTERPRET must be set before any @triton.jit function is defined, i.e. before the modules
holding kernels are imported; conftest.py is loaded before the test modules.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests run: the GPU when there is one (compiled kernels), else the CPU (interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def compile_backend(device) -> str:
    """torch.compile backend for graph-break tests: inductor on the GPU; on the CPU aot_eager, which
    traces the same graph (fullgraph, with autograd) without building C++ kernels."""
    return "inductor" if device.type == "cuda" else "aot_eager"
