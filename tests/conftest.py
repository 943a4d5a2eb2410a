"""Test session setup: Triton kernels run through the Triton interpreter on machines without CUDA,
compiled on the GPU otherwise (the `device` fixture puts kernel tests' tensors there). Under
pytest-xdist each worker gets its share of the cores as threads (OMP_NUM_THREADS, inherited by the
commands the tests start, unless already set): torch's default of one thread per core in every
worker oversubscribes the cores, and its threads then wait on each other (steps about 10x slower).

TRITON_INTERPRET must be set before any @triton.jit function is defined, i.e. before the modules
holding kernels are imported; conftest.py is loaded before the test modules.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)  # no affinity on macOS
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _CORES // _WORKERS)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests run: the GPU when there is one (compiled kernels), else the CPU (interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def compile_backend(device) -> str:
    """torch.compile backend for graph-break tests: inductor on the GPU; on the CPU aot_eager, which
    traces the same graph (fullgraph, with autograd) without building C++ kernels."""
    return "inductor" if device.type == "cuda" else "aot_eager"
