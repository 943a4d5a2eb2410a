"""The leaky average as explicit T x T weights: the readable math every faster form is tested against.

Shapes: x_BTC is (batch, time, channels); beta_H holds one decay rate per head, the C channels split
into H contiguous heads of C/H channels. Works in any float dtype (float64 for tight tests).
"""

from __future__ import annotations

import torch
from torch import Tensor


def decay_weights(beta_H: Tensor, T: int) -> Tensor:
    """W[h, t, i] = exp(-beta_h (t - i)) for i <= t, else 0: (H, T, T)."""
    steps = torch.arange(T, device=beta_H.device)
    lag_TT = (steps[:, None] - steps[None, :]).to(beta_H.dtype)
    causal_TT = lag_TT >= 0
    weights = torch.exp(-beta_H[:, None, None] * lag_TT.clamp(min=0))
    return weights * causal_TT


def _per_head(x_BTC: Tensor, n_heads: int) -> Tensor:
    B, T, C = x_BTC.shape
    return x_BTC.view(B, T, n_heads, C // n_heads)


def discounted_sum_naive(x_BTC: Tensor, beta_H: Tensor) -> Tensor:
    """S_t = sum_{i<=t} exp(-beta (t-i)) x_i per head: (B, T, C)."""
    weights_HTT = decay_weights(beta_H.to(x_BTC.dtype), x_BTC.shape[1])
    y_BTHD = torch.einsum("hti,bihd->bthd", weights_HTT, _per_head(x_BTC, beta_H.numel()))
    return y_BTHD.flatten(2)


def leaky_average_naive(x_BTC: Tensor, beta_H: Tensor) -> Tensor:
    """The EMA k~_t = a k~_{t-1} + (1 - a) x_t, k~_{-1} = 0, a = exp(-beta): (B, T, C)."""
    beta_C = beta_H.to(x_BTC.dtype).repeat_interleave(x_BTC.shape[-1] // beta_H.numel())
    return -torch.expm1(-beta_C) * discounted_sum_naive(x_BTC, beta_H)


def normalized_leaky_average_naive(x_BTC: Tensor, beta_H: Tensor, bonus_H: Tensor) -> Tensor:
    """The RWKV-style normalized form of the public CUDA kernel (gate k = 0, w = -beta, u = bonus):

        y_t = (sum_{i<t} e^{-beta (t-1-i)} x_i + e^{u} x_t) / (sum_{i<t} e^{-beta (t-1-i)} + e^{u})

    With u = beta this is the bias-corrected EMA. (B, T, C)."""
    T = x_BTC.shape[1]
    dtype = x_BTC.dtype
    steps = torch.arange(T, device=x_BTC.device)
    lag_TT = (steps[:, None] - 1 - steps[None, :]).to(dtype)
    past = torch.exp(-beta_H.to(dtype)[:, None, None] * lag_TT.clamp(min=0)) * (lag_TT >= 0)
    weights_HTT = past + torch.diag_embed(torch.exp(bonus_H.to(dtype))[:, None].expand(-1, T))
    weights_HTT = weights_HTT / weights_HTT.sum(dim=-1, keepdim=True)
    y_BTHD = torch.einsum("hti,bihd->bthd", weights_HTT, _per_head(x_BTC, beta_H.numel()))
    return y_BTHD.flatten(2)
