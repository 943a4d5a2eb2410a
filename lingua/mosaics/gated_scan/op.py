"""The gated key scan custom op (`lingua::gated_key_scan`) and the public `gated_key_scan` function.

The op runs the Triton kernels on CUDA and the explicit chunked scan elsewhere; it is registered with
a fake implementation and an autograd formula, so torch.compile traces models through it without a
graph break. `gated_key_scan` checks its arguments, picks an implementation (naive | chunked | op),
and is what the Memory Mosaics v2 key extractors call.
"""

from __future__ import annotations

from typing import Callable, Literal, Optional

import torch
from torch import Tensor

from lingua.mosaics.gated_scan.chunked import gated_key_scan_chunked, scan_backward, scan_forward
from lingua.mosaics.gated_scan.naive import gated_key_scan_naive
from lingua.precision import accumulation_dtype

GatedImpl = Literal["naive", "chunked", "op"]

# Chunk lengths of the op: powers of two (the kernels' tile sizes), at least 16 (the smallest
# tensor-core dot), at most 64 (the backward's [chunk, chunk] and [chunk, D] tiles at D = 128 must fit
# a Hopper block's shared memory).
MIN_CHUNK_SIZE, MAX_CHUNK_SIZE = 16, 64


def _n_chunks(T: int, chunk_size: int) -> int:
    return (T + chunk_size - 1) // chunk_size


@torch.library.custom_op("lingua::gated_key_scan", mutates_args=())
def gated_key_scan_op(
    x: Tensor, log_gate: Tensor, log_decay: Tensor, doc_start: Optional[Tensor], eps: float, chunk_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(unit keys (B, T, C), m before each chunk (B, H, N), s before each chunk (B, H, N, D))."""
    if x.is_cuda:
        from lingua.mosaics.gated_scan.triton_scan import scan_fwd

        return scan_fwd(x, log_gate, log_decay, doc_start, eps, chunk_size)
    return scan_forward(x, log_gate, log_decay, doc_start, eps, chunk_size)


@gated_key_scan_op.register_fake
def _(x, log_gate, log_decay, doc_start, eps, chunk_size):
    B, T, C = x.shape
    H = log_gate.shape[-1]
    N = _n_chunks(T, chunk_size)
    acc = accumulation_dtype(x.dtype)
    return torch.empty_like(x), x.new_empty((B, H, N), dtype=acc), x.new_empty((B, H, N, C // H), dtype=acc)


@torch.library.custom_op("lingua::gated_key_scan_backward", mutates_args=())
def gated_key_scan_backward_op(
    grad: Tensor,
    x: Tensor,
    log_gate: Tensor,
    log_decay: Tensor,
    doc_start: Optional[Tensor],
    m_states: Tensor,
    s_states: Tensor,
    eps: float,
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dlog_gate, dlog_decay) of gated_key_scan."""
    if x.is_cuda:
        from lingua.mosaics.gated_scan.triton_scan import scan_bwd

        return scan_bwd(grad, x, log_gate, log_decay, doc_start, m_states, s_states, eps, chunk_size)
    return scan_backward(grad, x, log_gate, log_decay, doc_start, m_states, s_states, eps, chunk_size)


@gated_key_scan_backward_op.register_fake
def _(grad, x, log_gate, log_decay, doc_start, m_states, s_states, eps, chunk_size):
    return torch.empty_like(x), torch.empty_like(log_gate), torch.empty_like(log_decay)


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    x, log_gate, log_decay, doc_start, eps, chunk_size = inputs
    ctx.save_for_backward(x, log_gate, log_decay, doc_start, output[1], output[2])
    ctx.eps, ctx.chunk_size = eps, chunk_size


def _backward(ctx, grad_keys: Tensor, grad_m: Tensor | None, grad_s: Tensor | None) -> tuple:
    x, log_gate, log_decay, doc_start, m_states, s_states = ctx.saved_tensors
    dx, dg, dd = gated_key_scan_backward_op(
        grad_keys, x, log_gate, log_decay, doc_start, m_states, s_states, ctx.eps, ctx.chunk_size
    )
    return dx, dg, dd, None, None, None


gated_key_scan_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Implementations keyed by GatedImpl: (x, log_gate, log_decay, doc_start, eps, chunk_size) -> keys.


def _naive(x: Tensor, log_gate: Tensor, log_decay: Tensor, doc_start: Tensor | None, eps: float, chunk_size: int) -> Tensor:
    return gated_key_scan_naive(x, log_gate, log_decay, doc_start, eps)


def _op(x: Tensor, log_gate: Tensor, log_decay: Tensor, doc_start: Tensor | None, eps: float, chunk_size: int) -> Tensor:
    return gated_key_scan_op(x, log_gate, log_decay, doc_start, eps, chunk_size)[0]


GATED_SCANS: dict[str, Callable[..., Tensor]] = {
    "naive": _naive,
    "chunked": gated_key_scan_chunked,
    "op": _op,
}


def check_arguments(
    x_BTC: Tensor, log_gate_BTH: Tensor, log_decay_BTH: Tensor, doc_start_BT: Tensor | None, eps: float,
    impl: str, chunk_size: int,
) -> None:
    """One ValueError naming the argument, before any work."""
    if impl not in GATED_SCANS:
        raise ValueError(f"impl='{impl}' must be one of {sorted(GATED_SCANS)}")
    if x_BTC.ndim != 3 or not x_BTC.is_floating_point():
        raise ValueError(f"x_BTC must be a float (B, T, C) tensor, got {x_BTC.dtype} {tuple(x_BTC.shape)}")
    B, T, C = x_BTC.shape
    for name, t in (("log_gate_BTH", log_gate_BTH), ("log_decay_BTH", log_decay_BTH)):
        if t.ndim != 3 or tuple(t.shape[:2]) != (B, T) or not t.is_floating_point():
            raise ValueError(f"{name} must be a float (B, T, H) tensor with (B, T) = {(B, T)}, got {t.dtype} {tuple(t.shape)}")
        if t.device != x_BTC.device:
            raise ValueError(f"{name} is on {t.device}, x_BTC on {x_BTC.device}")
    H = log_gate_BTH.shape[-1]
    if log_decay_BTH.shape[-1] != H or H == 0 or C % H != 0:
        raise ValueError(f"need the same head count H in log_gate_BTH and log_decay_BTH with C % H == 0, got C={C}, "
                         f"log_gate H={H}, log_decay H={log_decay_BTH.shape[-1]}")
    if doc_start_BT is not None and (
        doc_start_BT.dtype != torch.bool or tuple(doc_start_BT.shape) != (B, T) or doc_start_BT.device != x_BTC.device
    ):
        raise ValueError(f"doc_start_BT must be a bool (B, T) = {(B, T)} tensor on {x_BTC.device}, "
                         f"got {doc_start_BT.dtype} {tuple(doc_start_BT.shape)} on {doc_start_BT.device}")
    if not eps > 0:
        raise ValueError(f"eps={eps} must be > 0 (the unit key divides by max(|s|, eps))")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    if impl == "op" and (chunk_size < MIN_CHUNK_SIZE or chunk_size > MAX_CHUNK_SIZE or chunk_size & (chunk_size - 1)):
        raise ValueError(f"chunk_size={chunk_size} must be a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE} for impl='op'")


def gated_key_scan(
    x_BTC: Tensor,
    log_gate_BTH: Tensor,
    log_decay_BTH: Tensor,
    doc_start_BT: Tensor | None = None,
    eps: float = 1e-6,
    impl: GatedImpl = "op",
    chunk_size: int = 64,
) -> Tensor:
    """The unit keys k_t = kbar_t / |kbar_t| of every position: (B, T, C) in x's dtype, with per head

        kbar_t = exp(log_gate_t) * x_t + exp(log_decay_t) * kbar_{t-1},   kbar restarting at documents.

    x_BTC (B, T, C), C split into H contiguous heads; log_gate_BTH and log_decay_BTH (B, T, H): one
    scalar per head and position (log_gate unbounded, log_decay <= 0 for a decay in (0, 1]; both
    finite); doc_start_BT (B, T) bool, True where a document starts. The norm is taken of the state
    rescaled by its largest input weight, clamped below at eps. Gradients flow to x, log_gate and
    log_decay. impl: naive (loop over time), chunked (torch scan, autograd), op (custom op: Triton on
    CUDA, explicit chunked backward elsewhere)."""
    check_arguments(x_BTC, log_gate_BTH, log_decay_BTH, doc_start_BT, eps, impl, chunk_size)
    return GATED_SCANS[impl](x_BTC, log_gate_BTH, log_decay_BTH, doc_start_BT, eps, chunk_size)
