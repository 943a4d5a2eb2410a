"""The gated key scan as a chunked scan in plain torch: matmuls inside chunks of L steps, the
rescaled state (m, s) carried between chunks. Any T, O(T L) work, fp32 accumulation under half inputs.

Inside a chunk, with b_t the cumulative log decay from the chunk's first step, the log weight of
input i in the state at t is W[t, i] = sum_{j in (i, t]} d_j + g_i (i <= t, same document), and the carried
state enters with log weight m_prev + b_t. m_t is the largest of them, so every exponent is <= 0:
s_t = sum_i exp(W[t, i] - m_t) x_i + exp(m_prev + b_t - m_t) s_prev never overflows.

`gated_key_scan_chunked` is differentiable through torch autograd. `scan_forward` / `scan_backward`
are the same math with an explicit backward (the model of the Triton kernels: same chunk states,
same gradient formulas), used by the custom op off CUDA. The backward carries two things from later
chunks to earlier ones: Q, the gradient of the carried s with m held fixed (rescaled so its
exponents are <= 0, like the forward), and the gradient of the carried m, nonzero only where a
later key's norm is under eps (above it, the unit key does not depend on the rescale m).

Legend: B batch, T time, N chunks, L chunk length, H heads, D channels per head, C = H * D.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lingua.mosaics.gated_scan.naive import unit_key
from lingua.precision import accumulation_dtype

NEG_INF = float("-inf")


def _pad_time(t: Tensor, length: int) -> Tensor:
    """Zero-pad dim 1 (time) of a (B, T, ...) tensor to `length`."""
    pad = [0, 0] * (t.ndim - 2) + [0, length - t.shape[1]]
    return F.pad(t, pad)


def _split_features(x_BTC: Tensor, n_heads: int, L: int, dtype: torch.dtype) -> Tensor:
    """(B, T, C) -> zero-padded (B, H, N, L, D) in `dtype`."""
    B, T, C = x_BTC.shape
    N = -(-T // L)
    x = _pad_time(x_BTC.to(dtype), N * L).view(B, N, L, n_heads, C // n_heads)
    return x.permute(0, 3, 1, 2, 4)


def _split_scalars(v_BTH: Tensor, L: int, dtype: torch.dtype) -> Tensor:
    """(B, T, H) -> zero-padded (B, H, N, L) in `dtype`."""
    B, T, H = v_BTH.shape
    N = -(-T // L)
    return _pad_time(v_BTH.to(dtype), N * L).view(B, N, L, H).permute(0, 3, 1, 2)


def _restarts(doc_start_BT: Tensor | None, B: int, T: int, L: int, device: torch.device) -> Tensor:
    """(B, 1, N, L) bool: True where the state starts empty (every document start, and t = 0);
    False on the padding after T."""
    starts_BT = torch.zeros(B, T, dtype=torch.bool, device=device) if doc_start_BT is None else doc_start_BT.clone()
    starts_BT[:, 0] = True
    N = -(-T // L)
    return _pad_time(starts_BT, N * L).view(B, 1, N, L)


def _merge_features(y_BHNLD: Tensor, T: int) -> Tensor:
    B, H, N, L, D = y_BHNLD.shape
    return y_BHNLD.permute(0, 2, 3, 1, 4).reshape(B, N * L, H * D)[:, :T]


def _merge_scalars(v_BHNL: Tensor, T: int) -> Tensor:
    B, H, N, L = v_BHNL.shape
    return v_BHNL.permute(0, 2, 3, 1).reshape(B, N * L, H)[:, :T]


def _chunk_log_weights(
    log_gate_BHNL: Tensor, log_decay_BHNL: Tensor, starts_B1NL: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(b, W, carry_ok): b (B, H, N, L) the cumulative log decay from each chunk's first step;
    W (B, H, N, L, L) the log weight of input i in the state at t (-inf where i > t or a document
    starts in (i, t]); carry_ok (B, 1, N, L): no document starts in the chunk up to t."""
    L = log_gate_BHNL.shape[-1]
    b_BHNL = log_decay_BHNL.cumsum(-1)
    segment_B1NL = starts_B1NL.to(torch.int32).cumsum(-1)
    steps = torch.arange(L, device=log_gate_BHNL.device)
    visible_B1NLL = (steps[:, None] >= steps[None, :]) & (segment_B1NL[..., :, None] == segment_B1NL[..., None, :])
    # sum_{j in (i, t]} d_j as a cumulative sum of its own terms: b_t - b_i would lose the digits
    # of a short segment to the magnitude of b (strong decays).
    later_BHNLL = torch.where(steps[:, None] > steps[None, :], log_decay_BHNL[..., :, None], 0.0)
    logits_BHNLL = later_BHNLL.cumsum(-2) + log_gate_BHNL[..., None, :]
    W_BHNLL = torch.where(visible_B1NLL, logits_BHNLL, NEG_INF)
    return b_BHNL, W_BHNLL, segment_B1NL == 0


def _scan(
    x_BTC: Tensor, log_gate_BTH: Tensor, log_decay_BTH: Tensor, doc_start_BT: Tensor | None, eps: float, L: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(keys (B, T, C) in x's dtype, m before each chunk (B, H, N), s before each chunk (B, H, N, D))."""
    B, T, C = x_BTC.shape
    H = log_gate_BTH.shape[-1]
    dtype = accumulation_dtype(x_BTC.dtype)
    x_BHNLD = _split_features(x_BTC, H, L, dtype)
    starts_B1NL = _restarts(doc_start_BT, B, T, L, x_BTC.device)
    b_BHNL, W_BHNLL, carry_ok_B1NL = _chunk_log_weights(
        _split_scalars(log_gate_BTH, L, dtype), _split_scalars(log_decay_BTH, L, dtype), starts_B1NL
    )
    # Inside each chunk relative to its own largest weight; the carry is folded in chunk by chunk.
    m_intra_BHNL = W_BHNLL.amax(-1)
    intra_BHNLD = torch.exp(W_BHNLL - m_intra_BHNL[..., None]) @ x_BHNLD
    m_BH = x_BHNLD.new_full((B, H), NEG_INF)
    s_BHD = x_BHNLD.new_zeros((B, H, C // H))
    keys, m_states, s_states = [], [], []
    for n in range(x_BHNLD.shape[2]):
        m_states.append(m_BH)
        s_states.append(s_BHD)
        carried_BHL = torch.where(carry_ok_B1NL[:, :, n], m_BH[..., None] + b_BHNL[:, :, n], NEG_INF)
        m_BHL = torch.maximum(m_intra_BHNL[:, :, n], carried_BHL)
        s_BHLD = (
            torch.exp(m_intra_BHNL[:, :, n] - m_BHL)[..., None] * intra_BHNLD[:, :, n]
            + torch.exp(carried_BHL - m_BHL)[..., None] * s_BHD[:, :, None]
        )
        keys.append(unit_key(s_BHLD, eps))
        m_BH, s_BHD = m_BHL[..., -1], s_BHLD[..., -1, :]
    keys_BTC = _merge_features(torch.stack(keys, dim=2), T).to(x_BTC.dtype)
    return keys_BTC, torch.stack(m_states, dim=2), torch.stack(s_states, dim=2)


def gated_key_scan_chunked(
    x_BTC: Tensor,
    log_gate_BTH: Tensor,
    log_decay_BTH: Tensor,
    doc_start_BT: Tensor | None = None,
    eps: float = 1e-6,
    chunk_size: int = 64,
) -> Tensor:
    """Differentiable chunked scan: the unit keys (B, T, C) in x's dtype."""
    return _scan(x_BTC, log_gate_BTH, log_decay_BTH, doc_start_BT, eps, chunk_size)[0]


@torch.no_grad()
def scan_forward(
    x_BTC: Tensor, log_gate_BTH: Tensor, log_decay_BTH: Tensor, doc_start_BT: Tensor | None, eps: float, chunk_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(keys (B, T, C) in x's dtype, m_states (B, H, N), s_states (B, H, N, D) in the accumulation
    dtype): the state before each chunk, what `scan_backward` recomputes the chunk from."""
    keys, m_states, s_states = _scan(x_BTC, log_gate_BTH, log_decay_BTH, doc_start_BT, eps, chunk_size)
    return keys.contiguous(), m_states.contiguous(), s_states.contiguous()


@torch.no_grad()
def scan_backward(
    grad_BTC: Tensor,
    x_BTC: Tensor,
    log_gate_BTH: Tensor,
    log_decay_BTH: Tensor,
    doc_start_BT: Tensor | None,
    m_states_BHN: Tensor,
    s_states_BHND: Tensor,
    eps: float,
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx (B, T, C), dlog_gate (B, T, H), dlog_decay (B, T, H)) in the inputs' dtypes.

    Per chunk, with P = exp(W - m), carry weights cw = exp(m_prev + b - m) and e the last step:
      ds   = (dk - k (k . dk)) / |s|, or dk / eps where |s| < eps;  dm = -(dk . s) / eps there, else 0
      dx   = P^T ds + P[e]^T Q_e                 (Q_e: from the later chunks)
      dg   = x . dx + a,   a_i = sum_t [i holds m_t] dm_t   (dm_e also takes the later chunks' dM_e)
      dd_j = sum_{t >= j} (-x_t . dx_t - a_t) + dM_e + s_e . Q_e,  0 where the state restarts
      Q_prev = sum_t cw_t ds_t + cw_e Q_e,   dM_prev = sum_t [the carry holds m_t] dm_t
    (ds_t . s_t + dm_t = 0 for every t, which is why neither appears in dd.) Ties of the max share
    dm equally."""
    B, T, C = x_BTC.shape
    H = log_gate_BTH.shape[-1]
    L = chunk_size
    dtype = accumulation_dtype(x_BTC.dtype)
    x_BHNLD = _split_features(x_BTC, H, L, dtype)
    dk_BHNLD = _split_features(grad_BTC, H, L, dtype)
    starts_B1NL = _restarts(doc_start_BT, B, T, L, x_BTC.device)
    b_BHNL, W_BHNLL, carry_ok_B1NL = _chunk_log_weights(
        _split_scalars(log_gate_BTH, L, dtype), _split_scalars(log_decay_BTH, L, dtype), starts_B1NL
    )
    m_prev_BHN, s_prev_BHND = m_states_BHN.to(dtype), s_states_BHND.to(dtype)
    carried_BHNL = torch.where(carry_ok_B1NL, m_prev_BHN[..., None] + b_BHNL, NEG_INF)
    m_BHNL = torch.maximum(W_BHNLL.amax(-1), carried_BHNL)
    P_BHNLL = torch.exp(W_BHNLL - m_BHNL[..., None])
    cw_BHNL = torch.exp(carried_BHNL - m_BHNL)
    s_BHNLD = P_BHNLL @ x_BHNLD + cw_BHNL[..., None] * s_prev_BHND[..., None, :]

    norm_BHNL1 = torch.linalg.vector_norm(s_BHNLD, dim=-1, keepdim=True)
    unclamped_BHNL1 = norm_BHNL1 >= eps
    k_BHNLD = s_BHNLD / norm_BHNL1.clamp(min=eps)
    tangent_BHNLD = (dk_BHNLD - k_BHNLD * (k_BHNLD * dk_BHNLD).sum(-1, keepdim=True)) / norm_BHNL1.clamp(min=eps)
    ds_BHNLD = torch.where(unclamped_BHNL1, tangent_BHNLD, dk_BHNLD / eps)
    dm_BHNL = torch.where(unclamped_BHNL1[..., 0], 0.0, -(dk_BHNLD * s_BHNLD).sum(-1) / eps)

    # Who holds each m_t: an input of the chunk (holds_max) or the carried state (carry_holds).
    holds_max_BHNLL = (W_BHNLL == m_BHNL[..., None]).to(dtype)
    carry_holds_BHNL = (carried_BHNL == m_BHNL).to(dtype)
    share_BHNL = 1.0 / (holds_max_BHNLL.sum(-1) + carry_holds_BHNL)

    # From the last chunk back: Q and dM that each chunk receives at its last step.
    N = x_BHNLD.shape[2]
    into_prev_BHND = (cw_BHNL[..., None] * ds_BHNLD).sum(-2)
    Q_BHND = torch.zeros_like(s_prev_BHND)
    dM_BHN = torch.zeros_like(m_prev_BHN)
    for n in range(N - 1, 0, -1):
        Q_BHND[:, :, n - 1] = into_prev_BHND[:, :, n] + cw_BHNL[:, :, n, -1, None] * Q_BHND[:, :, n]
        dm_total_BHL = dm_BHNL[:, :, n].clone()
        dm_total_BHL[..., -1] += dM_BHN[:, :, n]
        dM_BHN[:, :, n - 1] = (carry_holds_BHNL[:, :, n] * share_BHNL[:, :, n] * dm_total_BHL).sum(-1)

    dm_total_BHNL = dm_BHNL.clone()
    dm_total_BHNL[..., -1] += dM_BHN
    dx_BHNLD = P_BHNLL.transpose(-1, -2) @ ds_BHNLD + P_BHNLL[..., -1, :, None] * Q_BHND[..., None, :]
    x_dx_BHNL = (x_BHNLD * dx_BHNLD).sum(-1)
    a_BHNL = (holds_max_BHNLL * (share_BHNL * dm_total_BHNL)[..., None]).sum(-2)
    dg_BHNL = x_dx_BHNL + a_BHNL
    u_BHNL = -x_dx_BHNL - a_BHNL
    u_BHNL[..., -1] += dM_BHN
    dd_BHNL = u_BHNL.flip(-1).cumsum(-1).flip(-1) + (s_BHNLD[..., -1, :] * Q_BHND).sum(-1)[..., None]
    dd_BHNL = torch.where(starts_B1NL, 0.0, dd_BHNL)
    return (
        _merge_features(dx_BHNLD, T).to(x_BTC.dtype).contiguous(),
        _merge_scalars(dg_BHNL, T).to(log_gate_BTH.dtype).contiguous(),
        _merge_scalars(dd_BHNL, T).to(log_decay_BTH.dtype).contiguous(),
    )
