"""Weighted embedding bag with a row-sparse backward: Triton kernels, launchers, autograd op.

    out[n] = sum_l weights[n, l] * values[indices[n, l]]

Forward: one program per (bag, column block) reads its L rows and accumulates in fp32. Backward:
the N*L (bag, entry) pairs are sorted by row; one program per unique row walks that row's entries,
summing weights * grad_out into the row's gradient and writing each entry's score gradient
<grad_out[n], values[row]> (the row is read once per 16 entries, not once per entry). No atomics,
so the result is deterministic, and the value gradient is a coalesced sparse COO tensor of the U
touched rows: a dense [K, D] gradient is never built. CUDA tensors take the kernels, CPU tensors
torch's embedding bag forward and the sparse-matrix backward of `sparse_cpu.py`; `naive.py` is the
readable reference of both (the tests run the kernels on CPU through the Triton interpreter).
An optional `Overflow` makes the launchers read two sources: entries whose index is at least
`capacity` read row table_rows[index] of a second table instead of values[index] (the zero-copy
bag: a device buffer of the first `capacity` unique rows, the rest read from host memory).
Shapes: N bags, L entries per bag, K table rows, D row width, U unique rows.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from lingua.precision import accumulation_dtype
from lingua.product_key.embedding_bag import naive, sparse_cpu

Backend = Literal["auto", "triton", "torch"]

FWD_BLOCK_L = 16  # bag entries loaded together in the forward
BWD_BLOCK_L = 16  # entries of one row processed together in the backward


class Overflow(NamedTuple):
    """The second source of a two-source bag: index i >= capacity reads table[table_rows[i]]."""

    table: object  # [R, D] rows contiguous: a tensor, or any object with data_ptr() and dtype (a host table over UVA)
    row_stride: int  # elements between the table's rows
    table_rows: Tensor  # [K] int64 table row of each index (read for indices >= capacity)
    capacity: int  # indices below it read `values`


@triton.jit(do_not_specialize=["L", "capacity"])
def _bag_fwd_kernel(
    V,  # [K, D] table, row stride stride_v, unit column stride
    IDX,  # [N, L] row ids
    W,  # [N, L] weights
    OUT,  # [N, D]
    T,  # [R, D] overflow table, row stride stride_t (read only when OVERFLOW)
    T_ROWS,  # [K] row of T for each index >= capacity
    L,
    D: tl.constexpr,
    stride_v,
    stride_t,
    capacity,
    OVERFLOW: tl.constexpr,
    ACC: tl.constexpr,  # accumulation dtype: fp32 (fp64 for fp64 tables)
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    for l0 in range(0, L, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        mask_l = offs_l < L
        rows = tl.load(IDX + n * L + offs_l, mask=mask_l, other=0).to(tl.int64)  # [BL]
        w = tl.load(W + n * L + offs_l, mask=mask_l, other=0.0).to(ACC)  # [BL]
        mask = mask_l[:, None] & mask_d[None, :]
        if OVERFLOW:
            in_v = rows < capacity  # [BL]
            over = mask_l & (rows >= capacity)
            t_rows = tl.load(T_ROWS + rows, mask=over, other=0).to(tl.int64)  # [BL]
            v_in = tl.load(V + rows[:, None] * stride_v + offs_d[None, :], mask=mask & in_v[:, None], other=0.0).to(ACC)
            v_over = tl.load(T + t_rows[:, None] * stride_t + offs_d[None, :], mask=mask & over[:, None], other=0.0).to(ACC)
            v = tl.where(in_v[:, None], v_in, v_over)  # [BL, BD]
        else:
            v = tl.load(V + rows[:, None] * stride_v + offs_d[None, :], mask=mask, other=0.0).to(ACC)  # [BL, BD]
        acc += tl.sum(v * w[:, None], axis=0)
    tl.store(OUT + n * D + offs_d, acc.to(OUT.dtype.element_ty), mask=mask_d)


@triton.jit(do_not_specialize=["L", "capacity"])
def _bag_bwd_kernel(
    V,  # [K, D] table
    W,  # [N*L] weights (flat)
    GO,  # [N, D] output gradient
    ROWS,  # [U] unique row ids, sorted
    STARTS,  # [U] first position of each row in ORDER
    COUNTS,  # [U] entries of each row
    ORDER,  # [N*L] flat (bag, entry) positions sorted by row
    GV,  # [U, D] row gradients (accumulation dtype)
    GW,  # [N*L] score gradients
    T,  # [R, D] overflow table (read only when OVERFLOW)
    T_ROWS,  # [K] row of T for each index >= capacity
    L,
    D: tl.constexpr,
    stride_v,
    stride_t,
    capacity,
    OVERFLOW: tl.constexpr,
    WANT_GV: tl.constexpr,
    WANT_GW: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    u = tl.program_id(0).to(tl.int64)
    row = tl.load(ROWS + u).to(tl.int64)
    start = tl.load(STARTS + u).to(tl.int64)
    count = tl.load(COUNTS + u).to(tl.int64)
    if OVERFLOW:
        t_row = tl.load(T_ROWS + row, mask=row >= capacity, other=0).to(tl.int64)
    for s in range(0, count, BLOCK_L):
        offs_l = s + tl.arange(0, BLOCK_L)
        mask_l = offs_l < count
        pos = tl.load(ORDER + start + offs_l, mask=mask_l, other=0).to(tl.int64)  # [BL]
        bag = pos // L
        w = tl.load(W + pos, mask=mask_l, other=0.0).to(ACC)  # [BL]
        dots = tl.zeros([BLOCK_L], dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            g = tl.load(
                GO + bag[:, None] * D + offs_d[None, :], mask=mask_l[:, None] & mask_d[None, :], other=0.0
            ).to(ACC)  # [BL, BD]
            if WANT_GW:
                if OVERFLOW:
                    v_in = tl.load(V + row * stride_v + offs_d, mask=mask_d & (row < capacity), other=0.0).to(ACC)
                    v_over = tl.load(T + t_row * stride_t + offs_d, mask=mask_d & (row >= capacity), other=0.0).to(ACC)
                    v = tl.where(row < capacity, v_in, v_over)  # [BD]
                else:
                    v = tl.load(V + row * stride_v + offs_d, mask=mask_d, other=0.0).to(ACC)  # [BD]
                dots += tl.sum(g * v[None, :], axis=1)
            if WANT_GV:
                part = tl.sum(g * w[:, None], axis=0)  # [BD]
                prev = tl.load(GV + u * D + offs_d, mask=mask_d & (s > 0), other=0.0)
                tl.store(GV + u * D + offs_d, prev + part, mask=mask_d)
        if WANT_GW:
            tl.store(GW + pos, dots.to(GW.dtype.element_ty), mask=mask_l)


def _block_d(dim: int) -> int:
    return min(triton.next_power_of_2(dim), 256)


_TRITON_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}  # the ACC constexpr of each accumulation dtype


def _accumulation_dtypes(values_KD: Tensor) -> tuple[torch.dtype, object]:
    """(torch, triton) accumulation dtypes of a table: `accumulation_dtype` and its Triton twin."""
    acc = accumulation_dtype(values_KD.dtype)
    return acc, _TRITON_DTYPE[acc]


def _overflow_args(values_KD: Tensor, ids: Tensor, overflow: Overflow | None) -> tuple[object, Tensor, int, int, bool]:
    """(T, T_ROWS, stride_t, capacity, OVERFLOW) kernel arguments; without overflow, unread
    stand-ins of the same types (values, and an integer tensor `ids`)."""
    if overflow is None:
        return values_KD, ids, 0, values_KD.shape[0], False
    return overflow.table, overflow.table_rows, overflow.row_stride, overflow.capacity, True


def _fwd(values_KD: Tensor, indices_NL: Tensor, weights_NL: Tensor, overflow: Overflow | None = None) -> Tensor:
    """[N, D] bag in values' dtype; with `overflow`, indices >= its capacity read its table."""
    n_bags, bag_len = indices_NL.shape
    dim = values_KD.shape[1]
    out_ND = torch.empty(n_bags, dim, dtype=values_KD.dtype, device=values_KD.device)
    if n_bags == 0 or bag_len == 0:
        return out_ND.zero_()
    block_d = _block_d(dim)
    grid = (n_bags, triton.cdiv(dim, block_d))
    table, table_rows, stride_t, capacity, has_overflow = _overflow_args(values_KD, indices_NL, overflow)
    _bag_fwd_kernel[grid](
        values_KD, indices_NL, weights_NL, out_ND, table, table_rows, bag_len, dim, values_KD.stride(0), stride_t, capacity,
        OVERFLOW=has_overflow, ACC=_accumulation_dtypes(values_KD)[1], BLOCK_L=FWD_BLOCK_L, BLOCK_D=block_d,
    )
    return out_ND


def _bwd(
    values_KD: Tensor, indices_NL: Tensor, weights_NL: Tensor, grad_out_ND: Tensor, want_gv: bool, want_gw: bool,
    overflow: Overflow | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(rows [U], grad_rows [U, D], grad_weights [N, L]) in the accumulation dtype; unwanted outputs
    are empty. rows are the unique indices; with `overflow`, indices >= its capacity read its table."""
    n_bags, bag_len = indices_NL.shape
    dim = values_KD.shape[1]
    device = values_KD.device
    sorted_rows, order = torch.sort(indices_NL.reshape(-1), stable=True)
    rows_U, counts_U = torch.unique_consecutive(sorted_rows, return_counts=True)
    starts_U = torch.cumsum(counts_U, 0) - counts_U
    n_unique = rows_U.numel()
    acc_torch, acc_triton = _accumulation_dtypes(values_KD)
    grad_rows_UD = torch.empty(n_unique if want_gv else 0, dim, dtype=acc_torch, device=device)
    grad_weights_NL = torch.empty(n_bags if want_gw else 0, bag_len, dtype=acc_torch, device=device)
    if n_unique > 0:
        table, table_rows, stride_t, capacity, has_overflow = _overflow_args(values_KD, rows_U, overflow)
        _bag_bwd_kernel[(n_unique,)](
            values_KD, weights_NL, grad_out_ND, rows_U, starts_U, counts_U, order,
            grad_rows_UD, grad_weights_NL, table, table_rows, bag_len, dim, values_KD.stride(0), stride_t, capacity,
            OVERFLOW=has_overflow, WANT_GV=want_gv, WANT_GW=want_gw, ACC=acc_triton, BLOCK_L=BWD_BLOCK_L, BLOCK_D=_block_d(dim),
        )
    return rows_U, grad_rows_UD, grad_weights_NL


def use_triton(values_KD: Tensor, backend: Backend) -> bool:
    """Whether `backend` runs the kernels for these values (auto: on CUDA)."""
    return backend == "triton" or (backend == "auto" and values_KD.is_cuda)



def torch_fwd(values_KD: Tensor, indices_NL: Tensor, weights_NL: Tensor) -> Tensor:
    """The torch backend's forward: torch's embedding bag (the reference for fp64 and empty bags)."""
    if values_KD.dtype == torch.float64 or indices_NL.shape[1] == 0:  # embedding_bag refuses empty bags
        return naive.weighted_bag_forward(values_KD, indices_NL, weights_NL)
    return F.embedding_bag(indices_NL, values_KD, per_sample_weights=weights_NL.to(values_KD.dtype), mode="sum")


def torch_bwd(values_KD: Tensor, indices_NL: Tensor, weights_NL: Tensor, grad_out_ND: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The torch backend's backward (sparse products on CPU, the reference elsewhere): see `_bwd`."""
    torch_backward = sparse_cpu.weighted_bag_backward if values_KD.device.type == "cpu" else naive.weighted_bag_backward
    return torch_backward(values_KD, indices_NL, weights_NL, grad_out_ND)


class WeightedBagFunction(torch.autograd.Function):
    """Autograd op of `weighted_embedding_bag`: the value gradient is a coalesced sparse COO tensor."""

    @staticmethod
    def forward(ctx, values_KD: Tensor, indices_NL: Tensor, weights_NL: Tensor, backend: Backend) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(values_KD, indices_NL, weights_NL)
        ctx.backend = backend
        with torch.autocast(values_KD.device.type, enabled=False):
            if use_triton(values_KD, backend):
                return _fwd(values_KD, indices_NL, weights_NL)
            return torch_fwd(values_KD, indices_NL, weights_NL)

    @staticmethod
    def backward(ctx, grad_out_ND: Tensor) -> tuple[Tensor | None, None, Tensor | None, None]:  # type: ignore[override]
        values_KD, indices_NL, weights_NL = ctx.saved_tensors
        want_gv, want_gw = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        if not (want_gv or want_gw):
            return None, None, None, None
        grad_out_ND = grad_out_ND.contiguous()
        if use_triton(values_KD, ctx.backend):
            rows_U, grad_rows_UD, grad_weights_NL = _bwd(values_KD, indices_NL, weights_NL, grad_out_ND, want_gv, want_gw)
        else:
            rows_U, grad_rows_UD, grad_weights_NL = torch_bwd(values_KD, indices_NL, weights_NL, grad_out_ND)
        grad_values = None
        if want_gv:
            grad_values = torch.sparse_coo_tensor(
                rows_U.unsqueeze(0), grad_rows_UD.to(values_KD.dtype), values_KD.shape,
                is_coalesced=True, check_invariants=False,
            )
        grad_weights = grad_weights_NL.to(weights_NL.dtype) if want_gw else None
        return grad_values, None, grad_weights, None


@torch.compiler.disable
def weighted_embedding_bag(values_KD: Tensor, indices_NL: Tensor, weights_NL: Tensor, backend: Backend = "auto") -> Tensor:
    """out[n] = sum_l weights[n, l] * values[indices[n, l]].

    values [K, D] floating (the table; rows contiguous), indices [N, L] integer in [0, K),
    weights [N, L] floating -> out [N, D] in values' dtype (accumulated in fp32). Gradients:
    weights get a dense [N, L] gradient; values a coalesced sparse COO [K, D] gradient holding only
    the touched rows. backend: "auto" (Triton for CUDA tensors, torch otherwise), "triton", "torch".
    Runs outside torch.compile graphs (its gradient has a data-dependent number of rows).
    """
    if values_KD.dim() != 2 or indices_NL.dim() != 2 or weights_NL.shape != indices_NL.shape:
        raise ValueError(
            f"expected values [K, D], indices [N, L], weights [N, L]; got {tuple(values_KD.shape)}, "
            f"{tuple(indices_NL.shape)}, {tuple(weights_NL.shape)}"
        )
    if indices_NL.dtype.is_floating_point or indices_NL.dtype == torch.bool:
        raise TypeError(f"indices must be integers, got {indices_NL.dtype}")
    if not (values_KD.dtype.is_floating_point and weights_NL.dtype.is_floating_point):
        raise TypeError(f"values and weights must be floating point, got {values_KD.dtype} and {weights_NL.dtype}")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend={backend!r}: use 'auto', 'triton' or 'torch'")
    if values_KD.stride(1) != 1:
        values_KD = values_KD.contiguous()
    return WeightedBagFunction.apply(values_KD, indices_NL.contiguous(), weights_NL.contiguous(), backend)
