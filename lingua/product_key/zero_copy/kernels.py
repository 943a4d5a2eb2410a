"""Triton kernels moving table rows between host memory and the GPU over UVA, and their launchers.

A pinned (page-locked, registered) host tensor has a device-visible address: on a CUDA machine
with unified virtual addressing it is the host pointer itself. Triton takes any object with
`data_ptr()` and `dtype`, so `HostPointer(table)` hands a kernel the host table and the kernel's
loads and stores cross PCIe directly: no CPU-side indexing, no staging copy, no host sync.

    gather:  out[s] = table[rows[s]]   (rows[s] < 0: zeros)   one program per (slot block, column block)
    scatter: table[rows[u]] = values[u]
    update:  one optimizer step of rows[u] (lazy Adam or rowwise Adagrad, see lingua.optim.row_update_),
             plus the rows of a bf16 copy of the table, rounded once: each program reads its rows of
             the table (and moments) once and writes them once, so the reads and the writes cross
             PCIe at the same time, in opposite directions

`gather_rows` / `scatter_rows` / `update_rows` dispatch: CUDA compute device -> these kernels;
otherwise the torch reference in `naive.py`. Shapes: S slots, R table rows, D row width, U rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lingua.optim import RowStep
from lingua.product_key.zero_copy import naive

BLOCK_ROWS = 16  # slots per program


class HostPointer:
    """A host tensor as a kernel argument: its address, valid on the GPU for pinned memory (UVA)."""

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor
        self.dtype = tensor.dtype

    def data_ptr(self) -> int:
        return self.tensor.data_ptr()


@triton.jit(do_not_specialize=["n_slots"])
def _gather_rows_kernel(
    SRC,  # [R, D] table (host memory over UVA, or device memory)
    ROWS,  # [S] row ids, -1 for empty slots
    OUT,  # [S, D] on the device
    n_slots,
    D: tl.constexpr,
    stride_src,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    slots = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_range = slots < n_slots
    rows = tl.load(ROWS + slots, mask=in_range, other=-1).to(tl.int64)
    mask_d = offs_d < D
    read = (in_range & (rows >= 0))[:, None] & mask_d[None, :]
    values = tl.load(SRC + rows[:, None] * stride_src + offs_d[None, :], mask=read, other=0.0)
    tl.store(OUT + slots[:, None] * D + offs_d[None, :], values.to(OUT.dtype.element_ty), mask=in_range[:, None] & mask_d[None, :])


@triton.jit
def _row_block(ROWS, n_rows, D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's block of a row list: slots [BS] (int64), columns [BD], the slots in range,
    their row ids (int64; 0 out of range) and the [BS, BD] mask of valid elements."""
    slots = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_range = slots < n_rows
    rows = tl.load(ROWS + slots, mask=in_range, other=0).to(tl.int64)
    mask = in_range[:, None] & (offs_d < D)[None, :]
    return slots, offs_d, in_range, rows, mask


@triton.jit(do_not_specialize=["n_rows"])
def _scatter_rows_kernel(
    DST,  # [R, D] table
    ROWS,  # [U] unique row ids
    VALUES,  # [U, D] on the device
    n_rows,
    D: tl.constexpr,
    stride_dst,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    slots, offs_d, in_range, rows, mask = _row_block(ROWS, n_rows, D, BLOCK_S, BLOCK_D)
    values = tl.load(VALUES + slots[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
    tl.store(DST + rows[:, None] * stride_dst + offs_d[None, :], values.to(DST.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_rows", "lr", "decay", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps"])
def _update_rows_kernel(
    W,  # [R, D] fp32 table (host memory over UVA, or device memory), contiguous
    LOW,  # [R, D] low-precision copy (written only when HAS_LOW)
    M,  # [R, D] fp32 first moments (used only when ADAM)
    V,  # [R, D] fp32 second moments (used only when ADAM)
    ROWS,  # [U] unique row ids
    G,  # [U, D] row gradients on the device
    BIAS_CORRECTION1,  # [U] fp32 Adam: 1 - beta1^t (read only when ADAM)
    BIAS_CORRECTION2_SQRT,  # [U] fp32 Adam: sqrt(1 - beta2^t) (read only when ADAM)
    ADAGRAD_DENOMINATOR,  # [U] fp32 Adagrad: sqrt(accumulator) + eps (read only without ADAM)
    n_rows,
    lr,
    decay,  # 1 - lr * weight_decay
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    D: tl.constexpr,
    ADAM: tl.constexpr,
    HAS_LOW: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    slots, offs_d, in_range, rows, mask = _row_block(ROWS, n_rows, D, BLOCK_S, BLOCK_D)
    at = rows[:, None] * D + offs_d[None, :]
    g = tl.load(G + slots[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    p = tl.load(W + at, mask=mask, other=0.0) * decay
    if ADAM:
        m = tl.load(M + at, mask=mask, other=0.0) * beta1 + g * one_minus_beta1
        v = tl.load(V + at, mask=mask, other=0.0) * beta2 + one_minus_beta2 * g * g
        tl.store(M + at, m, mask=mask)
        tl.store(V + at, v, mask=mask)
        bias1 = tl.load(BIAS_CORRECTION1 + slots, mask=in_range, other=1.0)[:, None]
        bias2_sqrt = tl.load(BIAS_CORRECTION2_SQRT + slots, mask=in_range, other=1.0)[:, None]
        p = p - lr * tl.div_rn(tl.div_rn(m, bias1), tl.div_rn(tl.sqrt_rn(v), bias2_sqrt) + eps)
    else:
        denominator = tl.load(ADAGRAD_DENOMINATOR + slots, mask=in_range, other=1.0)[:, None]
        p = p - lr * tl.div_rn(g, denominator)
    tl.store(W + at, p, mask=mask)
    if HAS_LOW:
        tl.store(LOW + at, p.to(LOW.dtype.element_ty), mask=mask)


def _block_d(dim: int) -> int:
    return min(triton.next_power_of_2(dim), 128)


def _kernel_arg(tensor: Tensor, device: torch.device) -> Tensor | HostPointer:
    """Device tensors as they are; host tensors through their UVA address on a CUDA device (the
    interpreter on a CPU machine reads host tensors as they are)."""
    return HostPointer(tensor) if device.type == "cuda" and not tensor.is_cuda else tensor


def _check_2d(table: Tensor) -> None:
    if table.dim() != 2 or table.stride(1) != 1:
        raise ValueError(f"tables must be 2-D with contiguous rows, got shape {tuple(table.shape)} strides {table.stride()}")


def gather_rows_triton(table_RD: Tensor, rows_S: Tensor, out_dtype: torch.dtype) -> Tensor:
    """The Triton gather (see module docstring); output on rows' device."""
    _check_2d(table_RD)
    n_slots, dim = rows_S.numel(), table_RD.shape[1]
    out = torch.empty(n_slots, dim, dtype=out_dtype, device=rows_S.device)
    if n_slots == 0 or dim == 0:
        return out
    block_d = _block_d(dim)
    grid = (triton.cdiv(n_slots, BLOCK_ROWS), triton.cdiv(dim, block_d))
    _gather_rows_kernel[grid](
        _kernel_arg(table_RD, rows_S.device), rows_S, out, n_slots, dim, table_RD.stride(0), BLOCK_S=BLOCK_ROWS, BLOCK_D=block_d
    )
    return out


def scatter_rows_triton(table_RD: Tensor, rows_U: Tensor, values_UD: Tensor) -> None:
    """The Triton scatter (see module docstring); rows must be unique."""
    _check_2d(table_RD)
    n_rows, dim = rows_U.numel(), table_RD.shape[1]
    if n_rows == 0 or dim == 0:
        return
    block_d = _block_d(dim)
    grid = (triton.cdiv(n_rows, BLOCK_ROWS), triton.cdiv(dim, block_d))
    _scatter_rows_kernel[grid](
        _kernel_arg(table_RD, rows_U.device), rows_U, values_UD.contiguous(), n_rows, dim, table_RD.stride(0),
        BLOCK_S=BLOCK_ROWS, BLOCK_D=block_d,
    )


def update_rows_triton(table_RD: Tensor, low_precision_RD: Tensor | None, moments: tuple[Tensor, Tensor] | None, step: RowStep) -> None:
    """The Triton row update (see module docstring and `naive.update_rows`); fp32 tables."""
    tables = [table_RD, *(moments or ())] + ([low_precision_RD] if low_precision_RD is not None else [])
    if any(t.dim() != 2 or not t.is_contiguous() or t.shape != table_RD.shape for t in tables):
        raise ValueError(f"update_rows: the tables must be contiguous and shaped like the weight {tuple(table_RD.shape)}")
    if any(t.dtype != torch.float32 for t in [table_RD, *(moments or ())]):
        raise ValueError("update_rows: the table and its moments must be fp32")
    n_rows, dim = step.rows.numel(), table_RD.shape[1]
    if n_rows == 0 or dim == 0:
        return
    device = step.rows.device
    block_d = _block_d(dim)
    grid = (triton.cdiv(n_rows, BLOCK_ROWS), triton.cdiv(dim, block_d))
    first, second = moments if moments else (table_RD, table_RD)
    low = low_precision_RD if low_precision_RD is not None else table_RD
    beta1, beta2 = step.betas
    if step.is_adam:
        bias1, bias2_sqrt = step.bias_correction1.to(torch.float32).contiguous(), step.bias_correction2_sqrt.to(torch.float32).contiguous()
        denominator = bias1  # a stand-in: never read under ADAM
    else:
        denominator = step.adagrad_denominator.to(torch.float32).contiguous()
        bias1 = bias2_sqrt = denominator  # stand-ins: read only under ADAM
    _update_rows_kernel[grid](
        _kernel_arg(table_RD, device), _kernel_arg(low, device), _kernel_arg(first, device), _kernel_arg(second, device),
        step.rows, step.grads.reshape(n_rows, dim).contiguous(), bias1, bias2_sqrt, denominator, n_rows,
        step.lr, 1 - step.lr * step.weight_decay, beta1, 1 - beta1, beta2, 1 - beta2, step.eps,
        D=dim, ADAM=moments is not None, HAS_LOW=low_precision_RD is not None, BLOCK_S=BLOCK_ROWS, BLOCK_D=block_d,
    )


def gather_rows(table_RD: Tensor, rows_S: Tensor, out_dtype: torch.dtype) -> Tensor:
    """Rows of a (host or device) table onto rows' device: the kernel for CUDA rows, torch otherwise."""
    if rows_S.is_cuda:
        return gather_rows_triton(table_RD, rows_S, out_dtype)
    return naive.gather_rows(table_RD, rows_S, out_dtype)


def scatter_rows(table_RD: Tensor, rows_U: Tensor, values_UD: Tensor) -> None:
    """Write rows of a (host or device) table from rows' device: the kernel for CUDA rows, torch otherwise."""
    (scatter_rows_triton if rows_U.is_cuda else naive.scatter_rows)(table_RD, rows_U, values_UD)


def update_rows(table_RD: Tensor, low_precision_RD: Tensor | None, moments: tuple[Tensor, Tensor] | None, step: RowStep) -> None:
    """One optimizer step of rows of a (host or device) table: the kernel for CUDA rows and fp32
    tables, torch otherwise (see `naive.update_rows`)."""
    on_gpu = step.rows.is_cuda and table_RD.dtype == torch.float32
    (update_rows_triton if on_gpu else naive.update_rows)(table_RD, low_precision_RD, moments, step)
