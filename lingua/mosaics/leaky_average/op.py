"""The leaky-average custom op (`lingua::leaky_scan`) and the public `leaky_average` function.

The op runs the Triton kernels on CUDA and the explicit chunked scan elsewhere; it is registered with
a fake implementation and an autograd formula, so torch.compile traces models through it without a
graph break. `leaky_average` picks an implementation (naive | chunked | op) and a form (ema |
normalized), and is what the Memory Mosaics blocks call.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor

from lingua.mosaics.leaky_average.chunked import discounted_sum_chunked, scan_backward, scan_forward
from lingua.mosaics.leaky_average.naive import discounted_sum_naive, leaky_average_naive
from lingua.precision import accumulation_dtype

LeakyImpl = Literal["naive", "chunked", "op"]
LeakyForm = Literal["ema", "normalized"]


@torch.library.custom_op("lingua::leaky_scan", mutates_args=())
def leaky_scan_op(x: Tensor, beta: Tensor, ema: bool, chunk_size: int) -> tuple[Tensor, Tensor]:
    """(y, chunk states): y = (1 - a) S (ema) or S, S_t = a S_{t-1} + x_t per head, a = exp(-beta)."""
    if x.is_cuda:
        from lingua.mosaics.leaky_average.triton_scan import scan_fwd

        return scan_fwd(x, beta, ema, chunk_size)
    return scan_forward(x, beta, ema, chunk_size)


@leaky_scan_op.register_fake
def _(x: Tensor, beta: Tensor, ema: bool, chunk_size: int) -> tuple[Tensor, Tensor]:
    B, T, C = x.shape
    n_chunks = (T + chunk_size - 1) // chunk_size
    return torch.empty_like(x), x.new_empty((B, n_chunks, C), dtype=accumulation_dtype(x.dtype))


@torch.library.custom_op("lingua::leaky_scan_backward", mutates_args=())
def leaky_scan_backward_op(
    grad: Tensor, x: Tensor, beta: Tensor, states: Tensor, ema: bool, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """(dx, dbeta) of leaky_scan."""
    if x.is_cuda:
        from lingua.mosaics.leaky_average.triton_scan import scan_bwd

        return scan_bwd(grad, x, beta, states, ema, chunk_size)
    return scan_backward(grad, x, beta, states, ema, chunk_size)


@leaky_scan_backward_op.register_fake
def _(grad: Tensor, x: Tensor, beta: Tensor, states: Tensor, ema: bool, chunk_size: int) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(beta)


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    x, beta, ema, chunk_size = inputs
    ctx.save_for_backward(x, beta, output[1])
    ctx.ema, ctx.chunk_size = ema, chunk_size


def _backward(ctx, grad_y: Tensor, grad_states: Tensor | None) -> tuple[Tensor, Tensor, None, None]:
    x, beta, states = ctx.saved_tensors
    dx, dbeta = leaky_scan_backward_op(grad_y, x, beta, states, ctx.ema, ctx.chunk_size)
    return dx, dbeta, None, None


leaky_scan_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Implementations of the plain scan, keyed by LeakyImpl: (x, beta, ema, chunk_size) -> y.


def _naive(x: Tensor, beta: Tensor, ema: bool, chunk_size: int) -> Tensor:
    return leaky_average_naive(x, beta) if ema else discounted_sum_naive(x, beta)


def _op(x: Tensor, beta: Tensor, ema: bool, chunk_size: int) -> Tensor:
    return leaky_scan_op(x, beta, ema, chunk_size)[0]


SCANS: dict[str, Callable[[Tensor, Tensor, bool, int], Tensor]] = {
    "naive": _naive,
    "chunked": discounted_sum_chunked,
    "op": _op,
}


def leaky_average(
    x_BTC: Tensor,
    beta_H: Tensor,
    *,
    form: LeakyForm = "ema",
    bonus_H: Tensor | None = None,
    impl: LeakyImpl = "op",
    chunk_size: int = 64,
) -> Tensor:
    """Per-head leaky average of x_BTC (B, T, C) with decay rates beta_H (H,), C % H == 0 -> (B, T, C).

    form="ema":        y_t = a y_{t-1} + (1 - a) x_t, y_{-1} = 0, a = exp(-beta).
    form="normalized": y_t = (S_{t-1} + e^u x_t) / (D_{t-1} + e^u) with S the discounted sum of x,
                       D that of ones and u = bonus_H (the public CUDA kernel's form; its u = beta).
    Gradients flow to x and beta (and bonus). impl: naive (T x T weights), chunked (torch scan,
    autograd), op (custom op: Triton on CUDA, explicit chunked backward elsewhere)."""
    if x_BTC.ndim != 3 or beta_H.ndim != 1 or x_BTC.shape[-1] % beta_H.numel() != 0:
        raise ValueError(f"need x (B, T, C) and beta (H,) with C % H == 0, got {tuple(x_BTC.shape)} and {tuple(beta_H.shape)}")
    if impl not in SCANS:
        raise ValueError(f"impl='{impl}' must be one of {sorted(SCANS)}")
    scan = SCANS[impl]
    if form == "ema":
        return scan(x_BTC, beta_H, True, chunk_size)
    if form != "normalized":
        raise ValueError(f"form='{form}' must be 'ema' or 'normalized'")
    bonus = beta_H if bonus_H is None else bonus_H
    H, D = beta_H.numel(), x_BTC.shape[-1] // beta_H.numel()
    acc = accumulation_dtype(x_BTC.dtype)
    S = scan(x_BTC.to(acc), beta_H, False, chunk_size)
    ones = torch.ones(1, x_BTC.shape[1], H, device=x_BTC.device, dtype=acc)
    den = scan(ones, beta_H, False, chunk_size)  # (1, T, H): D_t
    S_prev = torch.nn.functional.pad(S, (0, 0, 1, 0))[:, :-1]
    den_prev = torch.nn.functional.pad(den, (0, 0, 1, 0))[:, :-1]
    e_u_C = torch.exp(bonus.to(acc)).repeat_interleave(D)
    y = (S_prev + e_u_C * x_BTC.to(acc)) / (den_prev + torch.exp(bonus.to(acc))).repeat_interleave(D, dim=-1)
    return y.to(x_BTC.dtype)
