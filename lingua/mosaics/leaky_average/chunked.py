"""The leaky average as a chunked scan in plain torch: a matmul inside chunks of L steps, a carry
between chunks. Any T, O(T L) work, fp32 accumulation for half inputs.

`discounted_sum_chunked` is differentiable through torch autograd (what torch.compile fuses);
`scan_forward` / `scan_backward` are the same math with an explicit backward, used by the custom op
on CPU and as the readable model of the Triton kernels (same chunk states, same gradient formulas).
Legend: B batch, T time, NT chunks, L chunk length, H heads, D channels per head, C = H * D.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lingua.precision import accumulation_dtype


def ema_gain(beta_H: Tensor) -> Tensor:
    """1 - exp(-beta), accurate for small beta."""
    return -torch.expm1(-beta_H)


def _split(x_BTC: Tensor, n_heads: int, L: int, dtype: torch.dtype) -> Tensor:
    """(B, T, C) -> zero-padded (B, NT, L, H, D) in `dtype`."""
    B, T, C = x_BTC.shape
    NT = -(-T // L)
    x = F.pad(x_BTC.to(dtype), (0, 0, 0, NT * L - T))
    return x.view(B, NT, L, n_heads, C // n_heads)


def _merge(x_BNLHD: Tensor, T: int) -> Tensor:
    B, NT, L, H, D = x_BNLHD.shape
    return x_BNLHD.reshape(B, NT * L, H * D)[:, :T]


def _lag_weights(beta_H: Tensor, lag: Tensor, min_lag: int) -> Tensor:
    """exp(-beta * lag) where lag >= min_lag, else 0; shape (H, *lag.shape)."""
    shape = (-1,) + (1,) * lag.ndim
    return torch.exp(-beta_H.view(shape) * (lag - min_lag).clamp(min=0).to(beta_H.dtype)) * (lag >= min_lag)


def _intra(x_BNLHD: Tensor, beta_H: Tensor, min_lag: int = 0) -> Tensor:
    """Within-chunk sums sum_{j: i-j >= min_lag} a^{i-j-min_lag} x_j."""
    i = torch.arange(x_BNLHD.shape[2], device=x_BNLHD.device)
    decay_HLL = _lag_weights(beta_H, i[:, None] - i[None, :], min_lag)
    return torch.einsum("hij,bnjhd->bnihd", decay_HLL, x_BNLHD)


def _chunk_states(intra_BNLHD: Tensor, beta_H: Tensor) -> Tensor:
    """S before each chunk, (B, NT, H, D): sum over earlier chunks m of a^{L (n-1-m)} * (chunk m's end sum)."""
    NT, L = intra_BNLHD.shape[1], intra_BNLHD.shape[2]
    n = torch.arange(NT, device=intra_BNLHD.device)
    carry_HNN = _lag_weights(beta_H * L, n[:, None] - n[None, :], 1)
    return torch.einsum("hnm,bmhd->bnhd", carry_HNN, intra_BNLHD[:, :, -1])


def _with_carry(intra_BNLHD: Tensor, states_BNHD: Tensor, beta_H: Tensor, first_power: int) -> Tensor:
    """intra + a^{i + first_power} * state of the chunk."""
    i = torch.arange(intra_BNLHD.shape[2], device=intra_BNLHD.device)
    powers_LH = torch.exp(-(i[:, None] + first_power).to(beta_H.dtype) * beta_H[None, :])
    return intra_BNLHD + powers_LH[None, None, :, :, None] * states_BNHD[:, :, None]


def discounted_sum_chunked(x_BTC: Tensor, beta_H: Tensor, ema: bool = True, chunk_size: int = 64) -> Tensor:
    """Differentiable chunked scan: ema=True gives the EMA (1-a) S_t, ema=False the plain S_t.
    x_BTC (B, T, C), beta_H (H,) with C % H == 0 -> (B, T, C) in x's dtype."""
    dtype = accumulation_dtype(x_BTC.dtype)
    beta = beta_H.to(dtype)
    x_BNLHD = _split(x_BTC, beta.numel(), chunk_size, dtype)
    intra = _intra(x_BNLHD, beta)
    S = _with_carry(intra, _chunk_states(intra, beta), beta, 1)
    if ema:
        S = S * ema_gain(beta)[:, None]
    return _merge(S, x_BTC.shape[1]).to(x_BTC.dtype)


@torch.no_grad()
def scan_forward(x_BTC: Tensor, beta_H: Tensor, ema: bool, chunk_size: int) -> tuple[Tensor, Tensor]:
    """(y (B, T, C) in x's dtype, states (B, NT, C) in the accumulation dtype: S before each chunk)."""
    dtype = accumulation_dtype(x_BTC.dtype)
    beta = beta_H.to(dtype)
    x_BNLHD = _split(x_BTC, beta.numel(), chunk_size, dtype)
    intra = _intra(x_BNLHD, beta)
    states_BNHD = _chunk_states(intra, beta)
    S = _with_carry(intra, states_BNHD, beta, 1)
    if ema:
        S = S * ema_gain(beta)[:, None]
    return _merge(S, x_BTC.shape[1]).to(x_BTC.dtype).contiguous(), states_BNHD.flatten(2).contiguous()


@torch.no_grad()
def scan_backward(
    grad_BTC: Tensor, x_BTC: Tensor, beta_H: Tensor, states_BNC: Tensor, ema: bool, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """(dx (B, T, C) in x's dtype, dbeta (H,) in beta's dtype) for y = gain * S, gain = 1 - a or 1.

    dx_i = gain * G_i with G_i = sum_{t>=i} a^{t-i} g_t (the same filter run backwards in time);
    dL/da = sum_t [-g_t S_t (ema only) + gain * G_t S_{t-1}], and dbeta = -a dL/da."""
    dtype = accumulation_dtype(x_BTC.dtype)
    beta = beta_H.to(dtype)
    H, T = beta.numel(), x_BTC.shape[1]
    x_BNLHD = _split(x_BTC, H, chunk_size, dtype)
    states_BNHD = states_BNC.to(dtype).unflatten(2, (H, -1))
    S = _merge(_with_carry(_intra(x_BNLHD, beta), states_BNHD, beta, 1), T)
    S_prev = _merge(_with_carry(_intra(x_BNLHD, beta, min_lag=1), states_BNHD, beta, 0), T)
    g = grad_BTC.to(dtype)
    G = discounted_sum_chunked(g.flip(1), beta, ema=False, chunk_size=chunk_size).flip(1)
    gain = ema_gain(beta) if ema else torch.ones_like(beta)
    gain_C = gain.repeat_interleave(x_BTC.shape[-1] // H)
    d_a = gain_C * (G * S_prev).sum(dim=(0, 1))
    if ema:
        d_a = d_a - (g * S).sum(dim=(0, 1))
    d_beta = -torch.exp(-beta) * d_a.view(H, -1).sum(dim=1)
    return (gain_C * G).to(x_BTC.dtype).contiguous(), d_beta.to(beta_H.dtype)
