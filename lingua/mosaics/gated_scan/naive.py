"""The gated time-variant key extractor of Memory Mosaics v2 as an explicit loop over time.

Per head, with x_t the extracted key features, g_t = log_gate_t (= W_g x_t, unbounded) and
d_t = log_decay_t (= -|W_lambda x_t| <= 0):

    kbar_t = exp(g_t) * x_t + exp(d_t) * kbar_{t-1},    k_t = kbar_t / ||kbar_t||

and kbar restarts from zero where a document starts. exp(g_t) overflows, so the state is kept as
(m_t, s_t) with kbar_t = exp(m_t) * s_t and m_t the largest log weight of any input in kbar_t:
m_t = max(g_t, d_t + m_{t-1}). The unit key is s_t / max(||s_t||, eps); the per-position scale
exp(m_t) cancels in the norm. Every faster form is tested against this loop.

Shapes: x_BTC is (batch, time, channels) with the C channels split into H contiguous heads;
log_gate_BTH and log_decay_BTH hold one scalar per head and position; doc_start_BT (bool) is True
where a document starts (the state is reset before that position). Any float dtype; float64 for
tight tests.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gated_key_step(
    m_BH: Tensor, s_BHD: Tensor, x_BHD: Tensor, log_gate_BH: Tensor, log_decay_BH: Tensor
) -> tuple[Tensor, Tensor]:
    """One step of the rescaled recurrence: (m_t, s_t) from (m_{t-1}, s_{t-1}); m = -inf is the empty state."""
    carried_BH = log_decay_BH + m_BH
    m_new_BH = torch.maximum(log_gate_BH, carried_BH)
    input_weight_BH = torch.exp(log_gate_BH - m_new_BH)
    carry_weight_BH = torch.exp(carried_BH - m_new_BH)  # exp(-inf) = 0 for the empty state
    s_new_BHD = input_weight_BH[..., None] * x_BHD + carry_weight_BH[..., None] * s_BHD
    return m_new_BH, s_new_BHD


def unit_key(s_BHD: Tensor, eps: float) -> Tensor:
    """s / max(||s||, eps) over the head dimension."""
    return s_BHD / torch.linalg.vector_norm(s_BHD, dim=-1, keepdim=True).clamp(min=eps)


def gated_key_scan_naive(
    x_BTC: Tensor,
    log_gate_BTH: Tensor,
    log_decay_BTH: Tensor,
    doc_start_BT: Tensor | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """The unit keys k_t of every position: (B, T, C)."""
    B, T, C = x_BTC.shape
    H = log_gate_BTH.shape[-1]
    x_BTHD = x_BTC.view(B, T, H, C // H)
    m_BH = x_BTC.new_full((B, H), float("-inf"))
    s_BHD = x_BTC.new_zeros((B, H, C // H))
    keys = []
    for t in range(T):
        if doc_start_BT is not None:
            restart_B1 = doc_start_BT[:, t, None]
            m_BH = torch.where(restart_B1, torch.full_like(m_BH, float("-inf")), m_BH)
            s_BHD = torch.where(restart_B1[..., None], torch.zeros_like(s_BHD), s_BHD)
        m_BH, s_BHD = gated_key_step(m_BH, s_BHD, x_BTHD[:, t], log_gate_BTH[:, t], log_decay_BTH[:, t])
        keys.append(unit_key(s_BHD, eps))
    return torch.stack(keys, dim=1).flatten(2)
