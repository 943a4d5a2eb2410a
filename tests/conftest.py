"""Test session setup: Triton kernels run through the Triton interpreter on machines without CUDA.

TRITON_INTERPRET must be set before any @triton.jit function is defined, i.e. before the modules
holding kernels are imported; conftest.py is loaded before the test modules.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
