"""Triton kernels of the gated key scan (chunked, forward and backward) and their launchers.

One program owns one (batch, head) and walks time in chunks of BT steps (backward: from the last
chunk to the first). Inside a chunk a [BT, BT] weight matrix exp(W - m) times the [BT, D] input
(tensor cores), between chunks the carried rescaled state (m, s) (backward: Q and dM). The whole
head is one tile because the unit key needs the norm over all D channels. Any T (a runtime loop
bound, int64 offsets); fp32 accumulation (fp64 for fp64 inputs). The math and the backward formulas
are those of `chunked.scan_forward` / `chunked.scan_backward`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from lingua.precision import accumulation_dtype


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _chunk(
    x_ptr, g_ptr, d_ptr, doc_ptr, b, h, n, T, H: tl.constexpr, C: tl.constexpr, D: tl.constexpr,
    HAS_DOC: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr,
):
    """Load chunk n of head h and its log weights: (offs, mask, in_t, x, W, restart, b_cum), with
    W [BT, BT] the log weight of input i in the state at t (-inf where not visible)."""
    rows = tl.arange(0, BT)
    cols = tl.arange(0, BD)
    t = n * BT + rows  # [BT]
    in_t = t < T
    offs = b * T * C + t.to(tl.int64)[:, None] * C + (h * D + cols)[None, :]  # [BT, BD]
    mask = in_t[:, None] & (cols < D)[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)  # [BT, BD]
    scalar_offs = (b * T + t.to(tl.int64)) * H + h  # [BT]
    g = tl.load(g_ptr + scalar_offs, mask=in_t, other=0.0).to(ACC)
    d = tl.load(d_ptr + scalar_offs, mask=in_t, other=0.0).to(ACC)
    restart = t == 0
    if HAS_DOC:
        restart = restart | (tl.load(doc_ptr + b * T + t.to(tl.int64), mask=in_t, other=0) != 0)
    segment = tl.cumsum(restart.to(tl.int32), axis=0)  # [BT]
    visible = (rows[:, None] >= rows[None, :]) & (segment[:, None] == segment[None, :])  # [BT, BT]
    # sum_{j in (i, t]} d_j as a cumulative sum of its own terms (no cancellation of b_t - b_i)
    seg_sum = tl.cumsum(tl.where(rows[:, None] > rows[None, :], d[:, None], 0.0), axis=0)  # [BT, BT]
    W = tl.where(visible, seg_sum + g[None, :], float("-inf"))
    b_cum = tl.where(segment == 0, tl.cumsum(d, axis=0), float("-inf"))  # [BT] -inf: carry cut
    return offs, mask, in_t, x, W, restart, b_cum


@triton.jit
def _state(x, W, b_cum, m_prev, s_prev, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """(m [BT], P [BT, BT], cw [BT], s [BT, BD]): the rescaled states of the chunk's steps."""
    carried = m_prev + b_cum  # [BT]
    m = tl.maximum(tl.max(W, axis=1), carried)
    P = tl.exp(W - m[:, None])
    cw = tl.exp(carried - m)
    s = tl.dot(P.to(DOT_DTYPE), x.to(DOT_DTYPE), input_precision=PRECISION, out_dtype=ACC)
    return m, P, cw, s + cw[:, None] * s_prev[None, :]


@triton.jit
def _last_row(v, rows, BT: tl.constexpr):
    """Row BT - 1 of a [BT, BD] tile as a [BD] vector."""
    return tl.sum(tl.where(rows[:, None] == BT - 1, v, 0.0), axis=0)


@triton.jit(do_not_specialize=["T", "NT"])
def _gated_fwd_kernel(
    x_ptr, g_ptr, d_ptr, doc_ptr, k_ptr, m_states_ptr, s_states_ptr, T, NT, eps,
    H: tl.constexpr, C: tl.constexpr, D: tl.constexpr, HAS_DOC: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    ACC = s_states_ptr.dtype.element_ty
    rows = tl.arange(0, BT)
    cols = tl.arange(0, BD)
    state_row = (b * H + h) * NT  # chunk 0 of this (batch, head) in the states
    m_prev = tl.max(tl.full([BT], float("-inf"), ACC), axis=0)
    s_prev = tl.zeros([BD], dtype=ACC)
    for n in range(0, NT):
        offs, mask, in_t, x, W, restart, b_cum = _chunk(
            x_ptr, g_ptr, d_ptr, doc_ptr, b, h, n, T, H, C, D, HAS_DOC, BT, BD, ACC
        )
        tl.store(m_states_ptr + state_row + n, m_prev)
        tl.store(s_states_ptr + (state_row + n) * D + cols, s_prev, mask=cols < D)
        m, P, cw, s = _state(x, W, b_cum, m_prev, s_prev, DOT_DTYPE, PRECISION, ACC)
        norm = tl.sqrt(tl.sum(s * s, axis=1))  # [BT]
        k = s / tl.maximum(norm, eps)[:, None]
        tl.store(k_ptr + offs, k.to(k_ptr.dtype.element_ty), mask=mask)
        m_prev = tl.max(tl.where(rows == BT - 1, m, float("-inf")), axis=0)
        s_prev = _last_row(s, rows, BT)


@triton.jit(do_not_specialize=["T", "NT"])
def _gated_bwd_kernel(
    dk_ptr, x_ptr, g_ptr, d_ptr, doc_ptr, m_states_ptr, s_states_ptr, dx_ptr, dg_ptr, dd_ptr, T, NT, eps,
    H: tl.constexpr, C: tl.constexpr, D: tl.constexpr, HAS_DOC: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    ACC = s_states_ptr.dtype.element_ty
    rows = tl.arange(0, BT)
    cols = tl.arange(0, BD)
    last = rows == BT - 1
    state_row = (b * H + h) * NT
    Q = tl.zeros([BD], dtype=ACC)  # gradient of the state carried out of this chunk, m held fixed
    dM = tl.sum(tl.zeros([BT], dtype=ACC), axis=0)  # gradient of the carried m
    for k in range(0, NT):
        n = NT - 1 - k
        offs, mask, in_t, x, W, restart, b_cum = _chunk(
            x_ptr, g_ptr, d_ptr, doc_ptr, b, h, n, T, H, C, D, HAS_DOC, BT, BD, ACC
        )
        dk = tl.load(dk_ptr + offs, mask=mask, other=0.0).to(ACC)  # [BT, BD]
        m_prev = tl.load(m_states_ptr + state_row + n)
        s_prev = tl.load(s_states_ptr + (state_row + n) * D + cols, mask=cols < D, other=0.0)
        m, P, cw, s = _state(x, W, b_cum, m_prev, s_prev, DOT_DTYPE, PRECISION, ACC)

        norm = tl.sqrt(tl.sum(s * s, axis=1))  # [BT]
        unclamped = norm >= eps
        scale = tl.maximum(norm, eps)
        unit = s / scale[:, None]
        tangent = (dk - unit * tl.sum(unit * dk, axis=1)[:, None]) / scale[:, None]
        ds = tl.where(unclamped[:, None], tangent, dk / eps)  # [BT, BD]
        dm = tl.where(unclamped, 0.0, -tl.sum(dk * s, axis=1) / eps)
        dm_total = dm + tl.where(last, dM, 0.0)

        # Who holds each m_t: an input of the chunk or the carried state; ties share dm equally.
        holds = W == m[:, None]  # [BT, BT]
        carry_holds = b_cum + m_prev == m
        share_dm = dm_total / (tl.sum(holds.to(ACC), axis=1) + carry_holds.to(ACC))
        a = tl.sum(tl.where(holds, share_dm[:, None], 0.0), axis=0)  # [BT] per input i
        dM_prev = tl.sum(tl.where(carry_holds, share_dm, 0.0), axis=0)

        P_last = tl.sum(tl.where(last[:, None], P, 0.0), axis=0)  # [BT] weights of the inputs in the last state
        dx = tl.dot(tl.trans(P).to(DOT_DTYPE), ds.to(DOT_DTYPE), input_precision=PRECISION, out_dtype=ACC)
        dx = dx + P_last[:, None] * Q[None, :]
        x_dx = tl.sum(x * dx, axis=1)
        u = -x_dx - a + tl.where(last, dM, 0.0)
        to_end = tl.cumsum(u, axis=0, reverse=True)
        dd = tl.where(restart, 0.0, to_end + tl.sum(_last_row(s, rows, BT) * Q, axis=0))

        scalar_offs = (b * T + (n * BT + rows).to(tl.int64)) * H + h
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dg_ptr + scalar_offs, (x_dx + a).to(dg_ptr.dtype.element_ty), mask=in_t)
        tl.store(dd_ptr + scalar_offs, dd.to(dd_ptr.dtype.element_ty), mask=in_t)

        cw_last = tl.sum(tl.where(last, cw, 0.0), axis=0)
        Q = tl.sum(cw[:, None] * ds, axis=0) + cw_last * Q
        dM = dM_prev


def launch_config(x: Tensor, n_heads: int, chunk_size: int) -> dict:
    """The constexprs and launch options of both kernels for x (B, T, C) split into n_heads heads."""
    D = x.shape[-1] // n_heads
    acc = accumulation_dtype(x.dtype)
    # The interpreter's bf16 dot is wrong: interpreted code multiplies in the accumulation dtype.
    dot_dtype = acc if (x.dtype != torch.bfloat16 or _interpreted()) else torch.bfloat16
    block_d = max(16, triton.next_power_of_2(D))
    return {
        "H": n_heads,
        "C": x.shape[-1],
        "D": D,
        "BT": chunk_size,
        "BD": block_d,
        "DOT_DTYPE": {torch.float64: tl.float64, torch.float32: tl.float32, torch.bfloat16: tl.bfloat16}[dot_dtype],
        "PRECISION": "ieee",
        "num_warps": 8 if chunk_size * block_d >= 64 * 128 else 4,
        # Prefetch buffers of the next chunk's [BT, BD] tiles: at BT = 64, D = 128 one fp32 stage
        # (117 KiB in the backward) fits an A100 block (163 KiB), two do not; fp64 gets none (128 KiB).
        "num_stages": 1 if acc == torch.float64 else 2,
    }


def _alloc(shape: tuple[int, ...], like: Tensor, dtype: torch.dtype, fill_nan: bool) -> Tensor:
    if fill_nan:  # tests: entries a kernel fails to write show up as NaN
        return torch.full(shape, float("nan"), device=like.device, dtype=dtype)
    return torch.empty(shape, device=like.device, dtype=dtype)


def _doc_arg(doc_start: Tensor | None, x: Tensor) -> tuple[Tensor, bool]:
    """The document starts as bytes (any tensor when there are none: HAS_DOC=False never reads it)."""
    if doc_start is None:
        return x, False
    return doc_start.contiguous().view(torch.uint8), True


def scan_fwd(
    x: Tensor, log_gate: Tensor, log_decay: Tensor, doc_start: Tensor | None, eps: float, chunk_size: int,
    fill_nan: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the forward kernel: (keys (B, T, C) in x's dtype, m_states (B, H, N), s_states (B, H, N, D))."""
    x, log_gate, log_decay = x.contiguous(), log_gate.contiguous(), log_decay.contiguous()
    B, T, C = x.shape
    H = log_gate.shape[-1]
    cfg = launch_config(x, H, chunk_size)
    NT = triton.cdiv(T, chunk_size)
    acc = accumulation_dtype(x.dtype)
    keys = _alloc(x.shape, x, x.dtype, fill_nan)
    m_states = _alloc((B, H, NT), x, acc, fill_nan)
    s_states = _alloc((B, H, NT, cfg["D"]), x, acc, fill_nan)
    doc, has_doc = _doc_arg(doc_start, x)
    _gated_fwd_kernel[(B, H)](x, log_gate, log_decay, doc, keys, m_states, s_states, T, NT, eps, HAS_DOC=has_doc, **cfg)
    return keys, m_states, s_states


def scan_bwd(
    grad: Tensor, x: Tensor, log_gate: Tensor, log_decay: Tensor, doc_start: Tensor | None,
    m_states: Tensor, s_states: Tensor, eps: float, chunk_size: int, fill_nan: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the backward kernel: (dx (B, T, C), dlog_gate (B, T, H), dlog_decay (B, T, H)) in the inputs' dtypes."""
    grad, x = grad.contiguous(), x.contiguous()
    log_gate, log_decay = log_gate.contiguous(), log_decay.contiguous()
    B, T, C = x.shape
    H = log_gate.shape[-1]
    cfg = launch_config(x, H, chunk_size)
    NT = triton.cdiv(T, chunk_size)
    dx = _alloc(x.shape, x, x.dtype, fill_nan)
    dg = _alloc(log_gate.shape, x, log_gate.dtype, fill_nan)
    dd = _alloc(log_decay.shape, x, log_decay.dtype, fill_nan)
    doc, has_doc = _doc_arg(doc_start, x)
    _gated_bwd_kernel[(B, H)](
        grad, x, log_gate, log_decay, doc, m_states.contiguous(), s_states.contiguous(), dx, dg, dd, T, NT, eps,
        HAS_DOC=has_doc, **cfg,
    )
    return dx, dg, dd
