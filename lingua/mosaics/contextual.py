"""The contextual memories of Memory Mosaics v2 (reference: "Memory Mosaics at scale", Eq. 8-11).

A contextual memory stores one (key, value) pair per position and reads it with the query's own
key: y_t = sum_{j in S_t} softmax_j(beta(n_t) k_t . k_j) v_j over the pairs S_t it may see, n_t = |S_t|.
Two kinds, each with its own extractors and bandwidth, both restricted to the query's document:
  short-term  S_t = {t-h+1 .. t-1}   (a sliding window of h-1 pairs)
  long-term   S_t = {.. t-m}         (pairs at least m steps old; m drawn per forward in training)
Rows with no visible pair output 0. The parallel forward reads through a visibility mask (a
boolean mask with SDPA on CPU, a flex_attention BlockMask on GPU, both from `pair_visible`);
`step` reads bounded recurrent state (used by apps/mosaics/generate.py through MosaicsV2LM.step).
Legend: B batch, T time, S stored pairs, C channels, H heads, D = C / H. Positions are 0-indexed.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from lingua.mosaics.blocks import l2_normalize, merge_heads, split_heads, time_shift
from lingua.mosaics.gated_scan import GatedImpl, gated_key_scan, gated_key_step, unit_key
from lingua.precision import accumulation_dtype
from lingua.transformer import trunc_normal_

MemoryKind = Literal["short", "long"]
BANDWIDTH_LOG_CAP = 10.0  # beta0 = exp(min(theta0, cap)), beta1 = exp(min(theta1, cap))
VALUE_LOG_SCALE_CAP = 15.0  # alpha_psi = exp(min(|theta|, cap))


# ---------------------------------------------------------------------------------------------
# Which pairs a query sees


def pair_visible(kind: MemoryKind, reach: Tensor | int, q: Tensor, kv: Tensor, same_doc: Tensor, empty_q: Tensor) -> Tensor:
    """Whether the query at position q reads the pair at position kv. reach is h (short) or m (long).
    A query with no visible pair (empty_q) reads its own position instead, and its output is zeroed
    afterwards: every softmax row stays finite, forward and backward."""
    if kind == "short":
        in_range = (kv < q) & (kv > q - reach)
    else:
        in_range = kv <= q - reach
    return (in_range & same_doc) | (empty_q & (q == kv))


def visible_count(kind: MemoryKind, reach: Tensor | int, pos_in_doc: Tensor) -> Tensor:
    """n_t, the number of pairs the query sees, from its position in its document: min(p, h-1)
    short-term, max(p - m + 1, 0) long-term (the pairs of its document in range)."""
    if kind == "short":
        return pos_in_doc.clamp(max=reach - 1)
    return (pos_in_doc - reach + 1).clamp(min=0)


@dataclass
class MemoryView:
    """What every block's memory of one kind needs to read a batch (built once per forward)."""

    mask: Tensor | BlockMask  # (B, 1, T, T) bool for SDPA, or a BlockMask
    n_BT: Tensor  # pairs visible to each query (float)


@dataclass
class ContextBatch:
    """Per-forward facts shared by all blocks: document restarts, the memories' views, the read."""

    doc_start_BT: Tensor  # True where a document starts (the key states restart there)
    short: MemoryView
    long: MemoryView | None
    attend: Callable[[Tensor, Tensor, Tensor, Any], Tensor]  # (q, k, v (B, H, T, D), mask) -> (B, H, T, D)


def dense_mask(kind: MemoryKind, reach: Tensor | int, doc_ids_BT: Tensor, n_BT: Tensor) -> Tensor:
    """(B, 1, T, T) boolean visibility mask (True = read) for SDPA."""
    T = doc_ids_BT.shape[1]
    positions = torch.arange(T, device=doc_ids_BT.device)
    q, kv = positions[None, :, None], positions[None, None, :]
    same_doc = doc_ids_BT[:, :, None] == doc_ids_BT[:, None, :]
    return pair_visible(kind, reach, q, kv, same_doc, (n_BT == 0)[:, :, None])[:, None]


def block_mask(
    kind: MemoryKind, reach: Tensor | int, doc_ids_BT: Tensor, n_BT: Tensor, make: Callable[..., BlockMask] = create_block_mask
) -> BlockMask:
    """The same visibility as a flex_attention BlockMask (blocks outside the window are skipped)."""

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return pair_visible(kind, reach, q, kv, doc_ids_BT[b, q] == doc_ids_BT[b, kv], n_BT[b, q] == 0)

    B, T = doc_ids_BT.shape
    return make(mask_mod, B, None, T, T, device=doc_ids_BT.device)


def sdpa_read(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)


class FlexRead:
    """flex_attention reads and BlockMask construction, compiled on CUDA (the compiled functions
    live on this object); eager on CPU, where flex has no backward (inference and tests only)."""

    def __init__(self) -> None:
        self._attention: Callable[..., Tensor] | None = None
        self._make_mask: Callable[..., BlockMask] | None = None

    def make_mask(self, *args: Any, **kwargs: Any) -> BlockMask:
        if kwargs["device"].type != "cuda":
            return create_block_mask(*args, **kwargs)
        if self._make_mask is None:
            self._make_mask = torch.compile(create_block_mask)
        return self._make_mask(*args, **kwargs)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: BlockMask) -> Tensor:
        if q.is_cuda:
            if self._attention is None:
                self._attention = torch.compile(flex_attention, dynamic=False)
            return self._attention(q, k, v, block_mask=mask, scale=1.0)
        with warnings.catch_warnings():  # eager flex on CPU is deliberate (inference and tests)
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return flex_attention(q, k, v, block_mask=mask, scale=1.0)


# ---------------------------------------------------------------------------------------------
# One contextual memory


class AdaptiveBandwidth(nn.Module):
    """beta(n) = exp(min(theta1, 10)) n^min(|theta_alpha|, 1) + exp(min(theta0, 10)), per head."""

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.theta0 = nn.Parameter(torch.empty(n_heads))
        self.theta1 = nn.Parameter(torch.empty(n_heads))
        self.theta_alpha = nn.Parameter(torch.empty(n_heads))

    def forward(self, n: Tensor) -> Tensor:
        """n (...) pair counts -> beta (..., H). n = 0 is evaluated at 1 (such rows output 0), so the
        gradient of n^alpha stays finite."""
        n = n.float().clamp(min=1.0)[..., None]
        alpha = self.theta_alpha.abs().clamp(max=1.0)
        beta1 = torch.exp(self.theta1.clamp(max=BANDWIDTH_LOG_CAP))
        beta0 = torch.exp(self.theta0.clamp(max=BANDWIDTH_LOG_CAP))
        return beta1 * n.pow(alpha) + beta0

    def init_weights(self) -> None:
        nn.init.constant_(self.theta0, 1.5)
        nn.init.constant_(self.theta1, 1.5)
        nn.init.constant_(self.theta_alpha, 1.0 / 3.0)


@dataclass
class MemoryState:
    """Recurrent state of one contextual memory before the next position p."""

    key_log_scale: Tensor  # (B, H) m of the rescaled key state kbar = exp(m) s (-inf: empty)
    key_sum: Tensor  # (B, H, D) s
    pending_key: Tensor  # (B, H, D) unit key of position p-1 (its value needs position p)
    pending_features: Tensor  # (B, C) value features W_psi x of position p-1
    recent_keys: Tensor  # (B, H, R, D) the newest complete pairs, oldest first (a ring of capacity R)
    recent_values: Tensor  # (B, H, R, D)
    recent_positions: Tensor  # (R,) their positions
    old_keys: Tensor  # (B, H, S, D) long-term only: every pair older than the ring, in position order
    old_values: Tensor  # (B, H, S, D)


class ContextualMemory(nn.Module):
    """One contextual memory: key features W_phi x scanned by the gated key extractor, values
    alpha_psi normalize(gamma W_psi x_t + (1 - gamma) W_psi x_{t+1}), the adaptive bandwidth as a
    per-row query scale. W_phi, W_psi, W_g, W_lambda form one projection C -> 2C + 2H."""

    def __init__(self, kind: MemoryKind, dim: int, n_heads: int, l2_eps: float, scan_impl: GatedImpl, scan_chunk_size: int) -> None:
        super().__init__()
        self.kind, self.dim, self.n_heads, self.l2_eps = kind, dim, n_heads, l2_eps
        self.scan_impl, self.scan_chunk_size = scan_impl, scan_chunk_size
        self.proj = nn.Linear(dim, 2 * dim + 2 * n_heads, bias=False)
        self.value_mix = nn.Parameter(torch.empty(n_heads))  # gamma
        self.value_log_scale = nn.Parameter(torch.empty(n_heads))  # theta of alpha_psi
        self.bandwidth = AdaptiveBandwidth(n_heads)

    def _features(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(key features, value features, log gate W_g x, log decay -|W_lambda x|)."""
        C, H = self.dim, self.n_heads
        key_features, value_features, log_gate, decay_logit = self.proj(x).split([C, C, H, H], dim=-1)
        return key_features, value_features, log_gate, -decay_logit.abs()

    def _values(self, features_BTC: Tensor, next_features_BTC: Tensor) -> Tensor:
        """(B, H, T, D) values from the value features of each position and of the next one."""
        mix = self.value_mix.to(features_BTC.dtype)[:, None, None]
        mixed = mix * split_heads(features_BTC, self.n_heads) + (1 - mix) * split_heads(next_features_BTC, self.n_heads)
        theta = self.value_log_scale
        # |theta| with slope +1 at 0 (torch's abs has slope 0 there: theta = 0 at init would never move)
        magnitude = torch.where(theta >= 0, theta, -theta)
        scale = torch.exp(magnitude.clamp(max=VALUE_LOG_SCALE_CAP)).to(mixed.dtype)
        return scale[:, None, None] * l2_normalize(mixed, self.l2_eps)

    def forward(self, x_BTC: Tensor, view: MemoryView, context: ContextBatch) -> Tensor:
        """(B, T, C) normalised block input -> (B, T, C) memory output (heads merged)."""
        key_features, value_features, log_gate, log_decay = self._features(x_BTC)
        keys = gated_key_scan(
            key_features, log_gate, log_decay, context.doc_start_BT, self.l2_eps, self.scan_impl, self.scan_chunk_size
        )  # fp32 accumulation inside, keys in the features' dtype
        k = split_heads(keys, self.n_heads)
        v = self._values(value_features, time_shift(value_features, 1))
        beta = self.bandwidth(view.n_BT).to(k.dtype).transpose(1, 2)[..., None]  # (B, H, T, 1)
        y = context.attend(beta * k, k, v, view.mask)
        return merge_heads(y * (view.n_BT > 0).to(y.dtype)[:, None, :, None])

    # -- recurrent form ------------------------------------------------------------------------

    def initial_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> MemoryState:
        H, D = self.n_heads, self.dim // self.n_heads
        acc = accumulation_dtype(dtype)
        pairs = torch.zeros(batch, H, 0, D, device=device, dtype=dtype)
        return MemoryState(
            key_log_scale=torch.full((batch, H), float("-inf"), device=device, dtype=acc),
            key_sum=torch.zeros(batch, H, D, device=device, dtype=acc),
            pending_key=torch.zeros(batch, H, D, device=device, dtype=dtype),
            pending_features=torch.zeros(batch, self.dim, device=device, dtype=dtype),
            recent_keys=pairs, recent_values=pairs.clone(),
            recent_positions=torch.zeros(0, device=device, dtype=torch.long),
            old_keys=pairs.clone(), old_values=pairs.clone(),
        )

    def step(
        self, x_BC: Tensor, state: MemoryState, position: int, ring: int, doc_start_B: Tensor, restart_B: Tensor
    ) -> tuple[Tensor, MemoryState]:
        """Output (B, C) at `position` and the state after it. The pair of position-1 completes now
        (its value needs x at position), joins the ring of the newest `ring` pairs, and the pair
        leaving the ring joins the long-term store (short-term memory drops it). Short-term memory
        reads the ring (ring = h-1), long-term memory the store (ring = m-1): the visible pairs are
        those of the store or ring from the current document."""
        key_features, value_features, log_gate, log_decay = self._features(x_BC)
        B, H = x_BC.shape[0], self.n_heads
        acc = state.key_sum.dtype
        log_scale = torch.where(restart_B[:, None], torch.full_like(state.key_log_scale, float("-inf")), state.key_log_scale)
        key_sum = torch.where(restart_B[:, None, None], torch.zeros_like(state.key_sum), state.key_sum)
        log_scale, key_sum = gated_key_step(
            log_scale, key_sum, key_features.to(acc).view(B, H, -1), log_gate.to(acc), log_decay.to(acc)
        )
        key = unit_key(key_sum, self.l2_eps).to(x_BC.dtype)

        recent_k, recent_v, recent_pos = state.recent_keys, state.recent_values, state.recent_positions
        old_k, old_v = state.old_keys, state.old_values
        if position >= 1:
            value = self._values(state.pending_features[:, None], value_features[:, None])  # (B, H, 1, D)
            recent_k = torch.cat([recent_k, state.pending_key[:, :, None]], dim=2)
            recent_v = torch.cat([recent_v, value.to(recent_v.dtype)], dim=2)
            recent_pos = torch.cat([recent_pos, recent_pos.new_tensor([position - 1])])
            if recent_pos.numel() > ring:
                if self.kind == "long":
                    old_k = torch.cat([old_k, recent_k[:, :, :1]], dim=2)
                    old_v = torch.cat([old_v, recent_v[:, :, :1]], dim=2)
                recent_k, recent_v, recent_pos = recent_k[:, :, 1:], recent_v[:, :, 1:], recent_pos[1:]

        if self.kind == "short":
            keys, values, positions = recent_k, recent_v, recent_pos
        else:
            keys, values = old_k, old_v
            positions = torch.arange(old_k.shape[2], device=x_BC.device)
        visible_BS = positions[None, :] >= doc_start_B[:, None]
        n_B = visible_BS.sum(dim=-1)
        y = torch.zeros_like(key)
        if keys.shape[2]:
            beta_BH = self.bandwidth(n_B)
            query = beta_BH[..., None].to(acc) * key.to(acc)
            scores = torch.einsum("bhd,bhsd->bhs", query, keys.to(acc))
            scores = scores.masked_fill(~visible_BS[:, None], float("-inf"))
            weights = torch.nan_to_num(scores.softmax(dim=-1), nan=0.0)  # rows with no visible pair: 0
            y = torch.einsum("bhs,bhsd->bhd", weights, values.to(acc)).to(key.dtype)
        new_state = MemoryState(log_scale, key_sum, key, value_features, recent_k, recent_v, recent_pos, old_k, old_v)
        return y.flatten(1), new_state

    def init_weights(self, std: float) -> None:
        trunc_normal_(self.proj.weight, std)
        nn.init.uniform_(self.value_mix, 0.0, 1.0)
        nn.init.zeros_(self.value_log_scale)
        self.bandwidth.init_weights()
