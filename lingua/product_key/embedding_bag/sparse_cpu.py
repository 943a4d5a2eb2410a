"""Backward of the weighted embedding bag on CPU through sparse-matrix products.

The bag is a sparse [N, K] matrix A (row n holds weights[n, l] at columns indices[n, l]) times the
table: out = A V. Its gradients are two sparse products that never gather an [N, L, D] tensor:

    grad_rows = A_U^T grad_out      A_U: A restricted to the U touched columns ([N, U] CSR)
    grad_weights[n, l] = <grad_out[n], V[indices[n, l]]>   the product grad_out V^T sampled at
                                                            A's entries (torch.sparse.sampled_addmm)

Same results as `naive.weighted_bag_backward` (the tests compare them), 3x to 7x faster on two CPU
cores (2048 to 4096 bags of 32 to 128 entries, rows of 128 to 512).
Shapes: N bags, L entries per bag, K table rows, D row width, U unique rows.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from lingua.precision import accumulation_dtype


def weighted_bag_backward(
    values_KD: Tensor, indices_NL: Tensor, weights_NL: Tensor, grad_out_ND: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(rows [U] sorted unique row ids, grad_rows [U, D], grad_weights [N, L]), accumulated in fp32
    (fp64 for fp64 tables); see `naive.weighted_bag_backward`."""
    acc_dtype = accumulation_dtype(values_KD.dtype)
    n_bags, bag_len = indices_NL.shape
    grad_out = grad_out_ND.to(acc_dtype)
    rows_U, inverse_NL = torch.unique(indices_NL, sorted=True, return_inverse=True)
    n_unique = rows_U.numel()
    if n_bags == 0 or bag_len == 0:
        return rows_U, grad_out.new_zeros(0, values_KD.shape[1]), grad_out.new_zeros(n_bags, bag_len)
    # A bag may read a row twice (two heads): one matrix entry per distinct (bag, row) pair, with
    # the pair's weights summed, keeps both CSR matrices valid (sorted, unique columns per row).
    bag_NL = torch.arange(n_bags).unsqueeze(1).expand(n_bags, bag_len)
    pairs_P, pair_of_entry = torch.unique((bag_NL * n_unique + inverse_NL).flatten(), sorted=True, return_inverse=True)
    crow = torch.zeros(n_bags + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(torch.bincount(pairs_P // n_unique, minlength=n_bags), 0)
    columns_P = pairs_P % n_unique
    pair_weights = grad_out.new_zeros(pairs_P.numel()).index_add_(0, pair_of_entry, weights_NL.to(acc_dtype).flatten())
    with warnings.catch_warnings():  # torch's one-time notice that CSR support is in beta
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        bags_by_rows = torch.sparse_csr_tensor(crow, columns_P, pair_weights, (n_bags, n_unique), check_invariants=False)
        pattern = torch.sparse_csr_tensor(
            crow, rows_U[columns_P], torch.zeros_like(pair_weights), (n_bags, values_KD.shape[0]), check_invariants=False
        )
    grad_rows_UD = bags_by_rows.t() @ grad_out
    sampled = torch.sparse.sampled_addmm(pattern, grad_out, values_KD.to(acc_dtype).t(), beta=0.0)
    return rows_U, grad_rows_UD, sampled.values()[pair_of_entry].view(n_bags, bag_len)
