"""Accumulation precision: the dtype sums, states and gradients are carried in for a given input dtype.

One rule for every kernel and reference (the mosaics scans, the product-key embedding bag, the
row-sparse optimizer updates): float64 inputs (the gradchecks) accumulate in float64, every other
floating dtype (float32, bfloat16, float16) in float32.
"""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for float32, bfloat16 and float16."""
    return torch.float64 if dtype == torch.float64 else torch.float32
