"""Readable torch reference of the weighted embedding bag and of its row-sparse backward.

    out[n] = sum_l weights[n, l] * values[indices[n, l]]

The Triton kernels beside this file must agree with these functions; the torch backend of the
public op (CPU tensors) runs them. With an `Overflow` source (zero-copy), the kernels must agree
with these functions over `zero_copy.naive.slot_values` (the buffer, then the overflow rows). Shapes: N bags (tokens), L entries per bag (heads * knn),
K table rows, D row width, U unique rows of a batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lingua.precision import accumulation_dtype


def weighted_bag_forward(values_KD: Tensor, indices_NL: Tensor, weights_NL: Tensor) -> Tensor:
    """[N, D] in values' dtype, accumulated in fp32 (fp64 for fp64 tables)."""
    acc_dtype = accumulation_dtype(values_KD.dtype)
    rows_NLD = values_KD[indices_NL].to(acc_dtype)
    return torch.einsum("nl,nld->nd", weights_NL.to(acc_dtype), rows_NLD).to(values_KD.dtype)


def weighted_bag_backward(
    values_KD: Tensor, indices_NL: Tensor, weights_NL: Tensor, grad_out_ND: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(rows [U] sorted unique row ids, grad_rows [U, D], grad_weights [N, L]).

    grad_rows[u] = sum over (n, l) with indices[n, l] == rows[u] of weights[n, l] * grad_out[n];
    grad_weights[n, l] = <grad_out[n], values[indices[n, l]]>. Both accumulate in fp32 (fp64 for fp64).
    """
    acc_dtype = accumulation_dtype(values_KD.dtype)
    grad_out = grad_out_ND.to(acc_dtype)
    rows_U, inverse_NL = torch.unique(indices_NL, sorted=True, return_inverse=True)
    contributions_NLD = weights_NL.to(acc_dtype)[..., None] * grad_out[:, None, :]
    grad_rows_UD = torch.zeros(rows_U.numel(), values_KD.shape[1], dtype=acc_dtype, device=values_KD.device)
    grad_rows_UD.index_add_(0, inverse_NL.flatten(), contributions_NLD.flatten(0, 1))
    grad_weights_NL = torch.einsum("nd,nld->nl", grad_out, values_KD[indices_NL].to(acc_dtype))
    return rows_U, grad_rows_UD, grad_weights_NL


def weighted_bag_dense_grad(values_KD: Tensor, indices_NL: Tensor, weights_NL: Tensor, grad_out_ND: Tensor) -> Tensor:
    """The dense [K, D] value gradient (what autograd of `weighted_bag_forward` gives); tests only."""
    rows, grad_rows, _ = weighted_bag_backward(values_KD, indices_NL, weights_NL, grad_out_ND)
    dense = torch.zeros(values_KD.shape, dtype=grad_rows.dtype, device=values_KD.device)
    dense[rows] = grad_rows
    return dense
