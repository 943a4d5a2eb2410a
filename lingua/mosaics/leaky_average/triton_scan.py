"""Triton kernels of the leaky average (chunked scan, forward and backward) and their autograd Function.

One program owns one (batch, head, channel block) and walks time in chunks of BT steps: inside a
chunk a [BT, BT] decay matrix times the [BT, BC] input (tensor cores), between chunks a carried
[BC] state. Any T (a runtime loop bound, int64 offsets); fp32 accumulation (fp64 for fp64 inputs).
The math and the backward formulas are those of `chunked.scan_forward` / `chunked.scan_backward`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from lingua.mosaics.leaky_average.limits import MAX_CHUNK_SIZE
from lingua.precision import accumulation_dtype


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _decay_matrix(beta, rows, cols, MIN_LAG: tl.constexpr):
    """[BT, BT]: exp(-beta (i - j - MIN_LAG)) where i - j >= MIN_LAG, else 0."""
    lag = rows[:, None] - cols[None, :] - MIN_LAG
    return tl.where(lag >= 0, tl.exp(-beta * tl.maximum(lag, 0).to(beta.dtype)), 0.0)


@triton.jit
def _gain(beta, EMA: tl.constexpr):
    """1 - exp(-beta) (a series for small beta), or 1."""
    if EMA:
        series = beta * (1.0 - beta * 0.5 * (1.0 - beta / 3.0))
        return tl.where(beta < 1e-3, series, 1.0 - tl.exp(-beta))
    else:
        return beta * 0.0 + 1.0


@triton.jit(do_not_specialize=["T", "NT"])
def _scan_fwd_kernel(
    x_ptr, beta_ptr, y_ptr, states_ptr, T, NT, C: tl.constexpr, D: tl.constexpr,
    EMA: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    acc = states_ptr.dtype.element_ty
    beta = tl.load(beta_ptr + h).to(acc)
    cols = tl.program_id(2) * BC + tl.arange(0, BC)  # [BC] channels within the head
    col_mask = cols < D
    chan = h * D + cols
    rows = tl.arange(0, BT)
    decay = _decay_matrix(beta, rows, rows, 0).to(DOT_DTYPE)  # [BT, BT]
    carry_in = tl.exp(-beta * (rows + 1).to(acc))  # [BT] a^(i+1)
    to_end = tl.exp(-beta * (BT - 1 - rows).to(acc))  # [BT] a^(BT-1-i)
    chunk_decay = tl.exp(-beta * BT)
    gain = _gain(beta, EMA)
    state = tl.zeros([BC], dtype=acc)
    for n in range(0, NT):
        t = n * BT + rows  # [BT]
        offs = b * T * C + t.to(tl.int64)[:, None] * C + chan[None, :]  # [BT, BC]
        mask = (t < T)[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc)  # [BT, BC]
        tl.store(states_ptr + (b * NT + n) * C + chan, state, mask=col_mask)
        intra = tl.dot(decay, x.to(DOT_DTYPE), input_precision=PRECISION, out_dtype=acc)  # [BT, BC]
        y = gain * (intra + carry_in[:, None] * state[None, :])
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
        state = tl.sum(to_end[:, None] * x, axis=0) + chunk_decay * state


@triton.jit(do_not_specialize=["T", "NT"])
def _scan_bwd_kernel(
    g_ptr, x_ptr, beta_ptr, states_ptr, dx_ptr, dbeta_ptr, T, NT, C: tl.constexpr, D: tl.constexpr, NCB: tl.constexpr,
    EMA: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    cb = tl.program_id(2)
    acc = states_ptr.dtype.element_ty
    beta = tl.load(beta_ptr + h).to(acc)
    cols = cb * BC + tl.arange(0, BC)
    col_mask = cols < D
    chan = h * D + cols
    rows = tl.arange(0, BT)
    decay = _decay_matrix(beta, rows, rows, 0).to(DOT_DTYPE)  # [BT, BT] a^(i-j), j <= i
    strict = _decay_matrix(beta, rows, rows, 1).to(DOT_DTYPE)  # [BT, BT] a^(i-1-j), j < i
    decay_t = _decay_matrix(beta, rows, rows, 0).trans(1, 0).to(DOT_DTYPE)  # [BT, BT] a^(j-i), j >= i
    carry_in = tl.exp(-beta * (rows + 1).to(acc))  # a^(i+1)
    carry_prev = tl.exp(-beta * rows.to(acc))  # a^i
    from_end = tl.exp(-beta * (BT - rows).to(acc))  # a^(BT-i)
    chunk_decay = tl.exp(-beta * BT)
    gain = _gain(beta, EMA)
    g_next = tl.zeros([BC], dtype=acc)  # G at the first step of the following chunk
    d_a = tl.zeros([BC], dtype=acc)
    for k in range(0, NT):
        n = NT - 1 - k
        t = n * BT + rows
        offs = b * T * C + t.to(tl.int64)[:, None] * C + chan[None, :]
        mask = (t < T)[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(acc)
        state = tl.load(states_ptr + (b * NT + n) * C + chan, mask=col_mask, other=0.0)
        s = tl.dot(decay, x.to(DOT_DTYPE), input_precision=PRECISION, out_dtype=acc) + carry_in[:, None] * state[None, :]
        s_prev = tl.dot(strict, x.to(DOT_DTYPE), input_precision=PRECISION, out_dtype=acc) + carry_prev[:, None] * state[None, :]
        big_g = tl.dot(decay_t, g.to(DOT_DTYPE), input_precision=PRECISION, out_dtype=acc) + from_end[:, None] * g_next[None, :]
        g_next = tl.sum(carry_prev[:, None] * g, axis=0) + chunk_decay * g_next
        tl.store(dx_ptr + offs, (gain * big_g).to(dx_ptr.dtype.element_ty), mask=mask)
        contrib = gain * big_g * s_prev
        if EMA:
            contrib -= g * s
        d_a += tl.sum(contrib, axis=0)
    d_beta = -tl.exp(-beta) * tl.sum(tl.where(col_mask, d_a, 0.0), axis=0)
    tl.store(dbeta_ptr + (b * tl.num_programs(1) + h) * NCB + cb, d_beta)


def _launch_config(x: Tensor, n_heads: int, chunk_size: int) -> dict:
    D = x.shape[-1] // n_heads
    acc = accumulation_dtype(x.dtype)
    # The interpreter's bf16 dot is wrong: interpreted code multiplies in the accumulation dtype.
    dot_dtype = acc if (x.dtype != torch.bfloat16 or _interpreted()) else torch.bfloat16
    # fp64 tiles are twice as large: wider channel blocks overflow shared memory (sm_80: 163 KiB).
    block_c = min(16 if acc == torch.float64 else 64, max(16, triton.next_power_of_2(D)))
    return {
        "acc": acc,
        "D": D,
        "BC": block_c,
        "NCB": triton.cdiv(D, block_c),
        "BT": chunk_size,
        "DOT_DTYPE": {torch.float64: tl.float64, torch.float32: tl.float32, torch.bfloat16: tl.bfloat16}[dot_dtype],
        "PRECISION": "ieee",
    }


def _check(x: Tensor, beta: Tensor, chunk_size: int) -> None:
    if x.ndim != 3 or beta.ndim != 1 or x.shape[-1] % beta.numel() != 0:
        raise ValueError(f"need x (B, T, C) and beta (H,) with C % H == 0, got {tuple(x.shape)} and {tuple(beta.shape)}")
    if chunk_size < 16 or chunk_size > MAX_CHUNK_SIZE or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size={chunk_size} must be a power of two from 16 to {MAX_CHUNK_SIZE} for the Triton kernels")


def _alloc(shape: tuple[int, ...], like: Tensor, dtype: torch.dtype, fill_nan: bool) -> Tensor:
    if fill_nan:  # tests: rows a kernel fails to write show up as NaN
        return torch.full(shape, float("nan"), device=like.device, dtype=dtype)
    return torch.empty(shape, device=like.device, dtype=dtype)


def scan_fwd(x: Tensor, beta: Tensor, ema: bool, chunk_size: int = 64, fill_nan: bool = False) -> tuple[Tensor, Tensor]:
    """Launch the forward kernel: (y (B, T, C) in x's dtype, states (B, NT, C) in the accumulation dtype)."""
    _check(x, beta, chunk_size)
    x = x.contiguous()
    B, T, C = x.shape
    H = beta.numel()
    cfg = _launch_config(x, H, chunk_size)
    NT = triton.cdiv(T, chunk_size)
    y = _alloc(x.shape, x, x.dtype, fill_nan)
    states = _alloc((B, NT, C), x, cfg["acc"], fill_nan)
    _scan_fwd_kernel[(B, H, cfg["NCB"])](
        x, beta.contiguous(), y, states, T, NT, C=C, D=cfg["D"], EMA=ema,
        BT=chunk_size, BC=cfg["BC"], DOT_DTYPE=cfg["DOT_DTYPE"], PRECISION=cfg["PRECISION"],
    )
    return y, states


def scan_bwd(
    grad: Tensor, x: Tensor, beta: Tensor, states: Tensor, ema: bool, chunk_size: int = 64, fill_nan: bool = False
) -> tuple[Tensor, Tensor]:
    """Launch the backward kernel: (dx (B, T, C) in x's dtype, dbeta (H,) in beta's dtype)."""
    _check(x, beta, chunk_size)
    x, grad = x.contiguous(), grad.contiguous()
    B, T, C = x.shape
    H = beta.numel()
    cfg = _launch_config(x, H, chunk_size)
    NT = triton.cdiv(T, chunk_size)
    dx = _alloc(x.shape, x, x.dtype, fill_nan)
    dbeta_parts = _alloc((B, H, cfg["NCB"]), x, cfg["acc"], fill_nan)  # summed here: deterministic
    _scan_bwd_kernel[(B, H, cfg["NCB"])](
        grad, x, beta.contiguous(), states, dx, dbeta_parts, T, NT, C=C, D=cfg["D"], NCB=cfg["NCB"], EMA=ema,
        BT=chunk_size, BC=cfg["BC"], DOT_DTYPE=cfg["DOT_DTYPE"], PRECISION=cfg["PRECISION"],
    )
    return dx, dbeta_parts.sum(dim=(0, 2)).to(beta.dtype)


class LeakyScanTriton(torch.autograd.Function):
    """y = gain * S with S_t = a S_{t-1} + x_t per head (gain = 1 - a when ema, else 1), through the kernels."""

    @staticmethod
    def forward(ctx, x: Tensor, beta: Tensor, ema: bool, chunk_size: int) -> Tensor:  # type: ignore[override]
        y, states = scan_fwd(x, beta, ema, chunk_size)
        ctx.save_for_backward(x, beta, states)
        ctx.ema, ctx.chunk_size = ema, chunk_size
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:  # type: ignore[override]
        x, beta, states = ctx.saved_tensors
        dx, dbeta = scan_bwd(grad, x, beta, states, ctx.ema, ctx.chunk_size)
        return dx, dbeta, None, None


def leaky_scan_triton(x_BTC: Tensor, beta_H: Tensor, ema: bool = True, chunk_size: int = 64) -> Tensor:
    """Differentiable Triton leaky scan. x_BTC (B, T, C) fp32/bf16/fp64, beta_H (H,) -> (B, T, C)."""
    _check(x_BTC, beta_H, chunk_size)
    return LeakyScanTriton.apply(x_BTC, beta_H, ema, chunk_size)
