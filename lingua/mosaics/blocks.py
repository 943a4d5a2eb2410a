"""Memory Mosaics building blocks: feature extractors, the leaky-average module, the in-context and
persistent associative memories and the residual block that holds them.

Each block has a parallel `forward` over (B, T, C) and a recurrent `step` over one new token that
keeps O(1) leaky state and a one-step-delayed key/value cache (used by apps/mosaics/generate.py).
Legend: B batch, T time, C channels, H heads, D = C / H, P persistent slots, W feature window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lingua.mosaics.leaky_average import LeakyForm, LeakyImpl, leaky_average
from lingua.precision import accumulation_dtype

EXP_PARAM_SCALE = 10.0  # per-head scalars are stored divided by this and used multiplied by it
FeatureKind = Literal["linearconv", "lowrlinearconv"]


def l2_normalize(x: Tensor, eps: float) -> Tensor:
    """x / (||x|| + eps) over the last dimension, the norm taken in fp32 (fp64 for fp64 inputs)."""
    acc = x.to(accumulation_dtype(x.dtype))
    return (acc / (torch.linalg.vector_norm(acc, dim=-1, keepdim=True) + eps)).to(x.dtype)


def time_shift(x_BTC: Tensor, offset: int) -> Tensor:
    """y_t = x_{t + offset}, zero where t + offset falls outside [0, T)."""
    if offset == 0:
        return x_BTC
    T = x_BTC.shape[1]
    if abs(offset) >= T:
        return torch.zeros_like(x_BTC)
    if offset > 0:
        return F.pad(x_BTC[:, offset:], (0, 0, 0, offset))
    return F.pad(x_BTC[:, :offset], (0, 0, -offset, 0))


def split_heads(x_BTC: Tensor, n_heads: int) -> Tensor:
    """(B, T, C) -> (B, H, T, D)."""
    return x_BTC.unflatten(-1, (n_heads, -1)).transpose(1, 2)


def merge_heads(x_BHTD: Tensor) -> Tensor:
    return x_BHTD.transpose(1, 2).flatten(2)


def shifted_causal_attention(k_BHTD: Tensor, v_BHTD: Tensor, shift: int, dropout_p: float = 0.0) -> Tensor:
    """y_t = sum_{j <= t - shift} softmax_j(k_t . k_j) v_j (query = key, scale 1); rows t < shift are 0.

    Computed as plain causal attention between the queries k[shift:] and the keys/values [:T - shift],
    so flash attention applies and no mask tensor is built."""
    T = k_BHTD.shape[2]
    if T <= shift:
        return torch.zeros_like(v_BHTD)
    y = F.scaled_dot_product_attention(
        k_BHTD[:, :, shift:], k_BHTD[:, :, : T - shift], v_BHTD[:, :, : T - shift],
        is_causal=True, scale=1.0, dropout_p=dropout_p,
    )
    return F.pad(y, (0, 0, shift, 0))


class FeatureExtractor(nn.Module):
    """(B, T, C) -> (B, T, C) features that look at a few neighbouring steps.

    linearconv: y_t = W [x_{t+shift-ks+1}; ...; x_{t+shift}] (a ks-tap conv along time as one GEMM).
    lowrlinearconv: x^ = W x, then per head y_t = (1 - c_h) x^_{t+shift} + c_h x^_t (ks must be 2)."""

    def __init__(self, dim: int, n_heads: int, kind: FeatureKind, kernel_size: int, shift: int, bias: bool) -> None:
        super().__init__()
        self.kind, self.kernel_size, self.shift, self.n_heads = kind, kernel_size, shift, n_heads
        taps = kernel_size if kind == "linearconv" else 1
        self.proj = nn.Linear(taps * dim, dim, bias=bias)
        self.mix = nn.Parameter(torch.empty(n_heads)) if kind == "lowrlinearconv" else None

    @property
    def offsets(self) -> tuple[int, int]:
        """(lowest, highest) time offset read relative to the output step."""
        if self.kind == "linearconv":
            return self.shift - self.kernel_size + 1, self.shift
        return 0, self.shift

    @property
    def window(self) -> int:
        """Input steps a recurrent step needs to produce the feature of step (newest - highest offset)."""
        low, high = self.offsets
        return high - low + 1

    def forward(self, x_BTC: Tensor) -> Tensor:
        if self.kind == "linearconv":
            low = self.offsets[0]
            taps = [time_shift(x_BTC, low + m) for m in range(self.kernel_size)]
            return self.proj(torch.cat(taps, dim=-1) if len(taps) > 1 else taps[0])
        assert self.mix is not None
        x_hat = self.proj(x_BTC)
        mix_C = self.mix.repeat_interleave(x_BTC.shape[-1] // self.n_heads).to(x_hat.dtype)
        return (1 - mix_C) * time_shift(x_hat, self.shift) + mix_C * x_hat

    def step(self, window_BWC: Tensor) -> Tensor:
        """The feature of step (newest - highest offset) from the last `window` inputs (zeros before
        the start): (B, C)."""
        return self.forward(window_BWC)[:, window_BWC.shape[1] - 1 - self.offsets[1]]

    def init_weights(self) -> None:
        nn.init.normal_(self.proj.weight, std=self.proj.in_features**-0.5)
        if self.proj.bias is not None:
            nn.init.zeros_(self.proj.bias)
        if self.mix is not None:
            nn.init.uniform_(self.mix, 0.0, 1.0)


@dataclass
class LeakyState:
    """Recurrent leaky-average state: discounted sums of inputs and of ones before the next step."""

    sums: Tensor  # (B, C) fp32: S_{t-1}
    weights: Tensor  # (H,) fp32: D_{t-1} = sum_{j<t} a^j


class LeakyAverage(nn.Module):
    """Per-head leaky average with beta = 10 |theta| (theta stored divided by 10)."""

    def __init__(self, n_heads: int, form: LeakyForm, impl: LeakyImpl, chunk_size: int) -> None:
        super().__init__()
        self.form, self.impl, self.chunk_size = form, impl, chunk_size
        self.theta = nn.Parameter(torch.empty(n_heads))

    def beta(self) -> Tensor:
        return EXP_PARAM_SCALE * self.theta.abs()

    def forward(self, x_BTC: Tensor) -> Tensor:
        return leaky_average(x_BTC, self.beta(), form=self.form, impl=self.impl, chunk_size=self.chunk_size)

    def initial_state(self, batch: int, dim: int, device: torch.device, dtype: torch.dtype) -> LeakyState:
        acc = accumulation_dtype(dtype)
        return LeakyState(torch.zeros(batch, dim, device=device, dtype=acc), torch.zeros(self.theta.numel(), device=device, dtype=acc))

    def step(self, x_BC: Tensor, state: LeakyState) -> tuple[Tensor, LeakyState]:
        """One step of the recurrence: (y_t (B, C), state after step t)."""
        beta = self.beta().to(state.sums.dtype)
        decay_C = torch.exp(-beta).repeat_interleave(x_BC.shape[-1] // beta.numel())
        x = x_BC.to(state.sums.dtype)
        sums = decay_C * state.sums + x
        if self.form == "ema":
            y = -torch.expm1(-beta).repeat_interleave(x.shape[-1] // beta.numel()) * sums
        else:
            bonus = torch.exp(beta)
            y = (state.sums + bonus.repeat_interleave(x.shape[-1] // beta.numel()) * x) / (
                state.weights + bonus
            ).repeat_interleave(x.shape[-1] // beta.numel())
        return y.to(x_BC.dtype), LeakyState(sums, torch.exp(-beta) * state.weights + 1)

    def init_weights(self) -> None:
        with torch.no_grad():
            self.theta.copy_(torch.linspace(0.5, 5.0, self.theta.numel()) / EXP_PARAM_SCALE)


@dataclass
class MemoryOptions:
    """What the associative memory blocks share (from MosaicsArgs)."""

    dim: int
    n_heads: int
    k_fe_type: FeatureKind
    k_kernel_size: int
    v_fe_type: FeatureKind
    v_kernel_size: int
    v_shift: int
    bias: bool
    ic_dropout: float
    hd_dropout: float
    leaky_form: LeakyForm
    leaky_impl: LeakyImpl
    leaky_chunk_size: int
    kernel_beta_upbound: float
    l2_eps: float


def _push(window_BWC: Tensor, x_BC: Tensor) -> Tensor:
    return torch.cat([window_BWC[:, 1:], x_BC[:, None]], dim=1)


class _KeyPath(nn.Module):
    """Keys: scale * normalize(leaky_average(features(x))), scale = exp(power * min(10 kappa, bound))."""

    def __init__(self, opt: MemoryOptions, power: float) -> None:
        super().__init__()
        self.opt, self.power = opt, power
        self.k_featurizer = FeatureExtractor(opt.dim, opt.n_heads, opt.k_fe_type, opt.k_kernel_size, 0, opt.bias)
        self.leaky = LeakyAverage(opt.n_heads, opt.leaky_form, opt.leaky_impl, opt.leaky_chunk_size)
        self.kernel_beta = nn.Parameter(torch.empty(opt.n_heads))

    def _scale(self, like: Tensor) -> Tensor:
        log_scale = self.power * torch.clamp(EXP_PARAM_SCALE * self.kernel_beta, max=self.opt.kernel_beta_upbound)
        return torch.exp(log_scale).to(like.dtype)

    def forward(self, h_BTC: Tensor) -> Tensor:
        """(B, H, T, D)."""
        k = split_heads(self.leaky(self.k_featurizer(h_BTC)), self.opt.n_heads)
        return self._scale(k)[None, :, None, None] * l2_normalize(k, self.opt.l2_eps)

    def step(self, window_BWC: Tensor, leaky: LeakyState) -> tuple[Tensor, LeakyState]:
        """(key of the newest step (B, H, 1, D), new leaky state)."""
        k_BC, leaky = self.leaky.step(self.k_featurizer.step(window_BWC), leaky)
        k = k_BC.unflatten(-1, (self.opt.n_heads, -1))[:, :, None]
        return self._scale(k)[None, :, None, None] * l2_normalize(k, self.opt.l2_eps), leaky

    def init_weights(self) -> None:
        self.k_featurizer.init_weights()
        self.leaky.init_weights()
        nn.init.constant_(self.kernel_beta, 1.0 / EXP_PARAM_SCALE)


@dataclass
class InContextState:
    leaky: LeakyState
    k_window: Tensor  # (B, Wk, C) last inputs of the key featurizer
    v_window: Tensor  # (B, Wv, C) last inputs of the value featurizer
    keys: Tensor  # (B, H, t, D) keys of every step so far
    values: Tensor  # (B, H, t - v_shift, D) values complete so far (each needs v_shift later steps)


class InContextMemory(nn.Module):
    """The in-context associative memory: query = key, key j visible to query t iff j <= t - v_shift."""

    def __init__(self, opt: MemoryOptions) -> None:
        super().__init__()
        self.opt = opt
        self.key = _KeyPath(opt, power=1.0)
        self.v_featurizer = FeatureExtractor(opt.dim, opt.n_heads, opt.v_fe_type, opt.v_kernel_size, opt.v_shift, opt.bias)
        self.value_beta = nn.Parameter(torch.empty(opt.n_heads))
        self.c_proj = nn.Linear(opt.dim, opt.dim, bias=opt.bias)
        self.dropout = nn.Dropout(opt.hd_dropout)

    def _values(self, v_raw: Tensor) -> Tensor:
        scale = torch.exp(EXP_PARAM_SCALE * self.value_beta).to(v_raw.dtype)
        return scale[None, :, None, None] * l2_normalize(v_raw, self.opt.l2_eps)

    def forward(self, h_BTC: Tensor) -> Tensor:
        k = self.key(h_BTC)
        v = self._values(split_heads(self.v_featurizer(h_BTC), self.opt.n_heads))
        dropout_p = self.opt.ic_dropout if self.training else 0.0
        y = shifted_causal_attention(k, v.to(k.dtype), self.opt.v_shift, dropout_p)
        return self.dropout(self.c_proj(merge_heads(y)))

    def initial_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> InContextState:
        C, H = self.opt.dim, self.opt.n_heads
        empty = torch.zeros(batch, H, 0, C // H, device=device, dtype=dtype)
        return InContextState(
            self.key.leaky.initial_state(batch, C, device, dtype),
            torch.zeros(batch, self.key.k_featurizer.window, C, device=device, dtype=dtype),
            torch.zeros(batch, self.v_featurizer.window, C, device=device, dtype=dtype),
            empty, empty.clone(),
        )

    def step(self, h_BC: Tensor, state: InContextState) -> tuple[Tensor, InContextState]:
        """Output for the newest step (B, C). The value of step t - v_shift completes now and joins the cache."""
        k_window, v_window = _push(state.k_window, h_BC), _push(state.v_window, h_BC)
        k_new, leaky = self.key.step(k_window, state.leaky)
        keys = torch.cat([state.keys, k_new.to(state.keys.dtype)], dim=2)
        values = state.values
        if keys.shape[2] > self.opt.v_shift:  # step t - v_shift exists
            v_raw = self.v_featurizer.step(v_window).unflatten(-1, (self.opt.n_heads, -1))[:, :, None]
            values = torch.cat([values, self._values(v_raw).to(values.dtype)], dim=2)
        n_visible = values.shape[2]
        if n_visible == 0:
            y = torch.zeros_like(k_new)
        else:
            acc = accumulation_dtype(keys.dtype)
            scores = k_new.to(acc) @ keys[:, :, :n_visible].to(acc).transpose(-1, -2)
            y = (scores.softmax(dim=-1) @ values.to(acc)).to(k_new.dtype)
        out = self.c_proj(merge_heads(y)[:, 0].to(h_BC.dtype))
        return out, InContextState(leaky, k_window, v_window, keys, values)

    def init_weights(self, out_std: float) -> None:
        self.key.init_weights()
        self.v_featurizer.init_weights()
        nn.init.constant_(self.value_beta, -0.5 / EXP_PARAM_SCALE)
        _init_proj(self.c_proj, out_std)


def _init_proj(linear: nn.Linear, std: float) -> None:
    nn.init.normal_(linear.weight, std=std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


@dataclass
class PersistentState:
    leaky: LeakyState
    k_window: Tensor  # (B, Wk, C)


class PersistentMemory(nn.Module):
    """The persistent associative memory: the (twice-scaled) key attends over P learned slots per
    head; with pmem_count > 1, the mean of that many separate memories."""

    def __init__(self, opt: MemoryOptions, pmem_count: int, pmem_size: int) -> None:
        super().__init__()
        self.opt = opt
        head_dim = opt.dim // opt.n_heads
        self.key = _KeyPath(opt, power=2.0)
        self.mem_k = nn.Parameter(torch.empty(pmem_count * opt.n_heads, pmem_size, head_dim))
        self.mem_v = nn.Parameter(torch.empty(pmem_count * opt.n_heads, pmem_size, head_dim))
        self.value_beta = nn.Parameter(torch.empty(opt.n_heads))
        self.c_proj = nn.Linear(opt.dim, opt.dim, bias=opt.bias)
        self.dropout = nn.Dropout(opt.hd_dropout)
        self.pmem_count = pmem_count

    def _read(self, k_BHTD: Tensor, dropout_p: float) -> Tensor:
        B, H, T, D = k_BHTD.shape
        count = self.pmem_count
        queries = k_BHTD if count == 1 else k_BHTD[:, None].expand(B, count, H, T, D).reshape(B, count * H, T, D)
        mem_k = self.mem_k.to(k_BHTD.dtype)[None].expand(B, -1, -1, -1)
        mem_v = self.mem_v.to(k_BHTD.dtype)[None].expand(B, -1, -1, -1)
        y = F.scaled_dot_product_attention(queries, mem_k, mem_v, scale=1.0, dropout_p=dropout_p)
        if count > 1:
            y = y.view(B, count, H, T, D).mean(dim=1)
        scale = torch.exp(EXP_PARAM_SCALE * self.value_beta).to(y.dtype)
        return scale[None, :, None, None] * y

    def forward(self, h_BTC: Tensor) -> Tensor:
        y = self._read(self.key(h_BTC), self.opt.ic_dropout if self.training else 0.0)
        return self.dropout(self.c_proj(merge_heads(y)))

    def initial_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> PersistentState:
        C = self.opt.dim
        return PersistentState(
            self.key.leaky.initial_state(batch, C, device, dtype),
            torch.zeros(batch, self.key.k_featurizer.window, C, device=device, dtype=dtype),
        )

    def step(self, h_BC: Tensor, state: PersistentState) -> tuple[Tensor, PersistentState]:
        k_window = _push(state.k_window, h_BC)
        k_new, leaky = self.key.step(k_window, state.leaky)
        y = self._read(k_new, 0.0)
        return self.c_proj(merge_heads(y)[:, 0].to(h_BC.dtype)), PersistentState(leaky, k_window)

    def init_weights(self, out_std: float) -> None:
        self.key.init_weights()
        head_dim = self.mem_k.shape[-1]
        nn.init.normal_(self.mem_k, std=head_dim**-0.5)
        nn.init.normal_(self.mem_v, std=head_dim**-0.5)
        nn.init.constant_(self.value_beta, -0.5 / EXP_PARAM_SCALE)
        _init_proj(self.c_proj, out_std)


@dataclass
class BlockState:
    in_context: InContextState
    persistent: PersistentState | None


class MosaicBlock(nn.Module):
    """pre_ln: x += Cmem(LN1(x)); x += Pmem(LN2(x)). post_ln: x = LN1(x); x += Cmem(x); x = LN2(x);
    x += Pmem(x). attn_only drops LN2 and the persistent memory."""

    def __init__(self, opt: MemoryOptions, pre_ln: bool, attn_only: bool, pmem_count: int, pmem_size: int, norm_eps: float) -> None:
        super().__init__()
        self.pre_ln = pre_ln
        self.ln_1 = nn.LayerNorm(opt.dim, eps=norm_eps, bias=opt.bias)
        self.in_context = InContextMemory(opt)
        self.ln_2 = None if attn_only else nn.LayerNorm(opt.dim, eps=norm_eps, bias=opt.bias)
        self.persistent = None if attn_only else PersistentMemory(opt, pmem_count, pmem_size)

    def forward(self, x: Tensor) -> Tensor:
        if self.pre_ln:
            x = x + self.in_context(self.ln_1(x))
            if self.persistent is not None:
                x = x + self.persistent(self.ln_2(x))
            return x
        x = self.ln_1(x)
        x = x + self.in_context(x)
        if self.persistent is not None:
            x = self.ln_2(x)
            x = x + self.persistent(x)
        return x

    def initial_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> BlockState:
        persistent = None if self.persistent is None else self.persistent.initial_state(batch, device, dtype)
        return BlockState(self.in_context.initial_state(batch, device, dtype), persistent)

    def step(self, x_BC: Tensor, state: BlockState) -> tuple[Tensor, BlockState]:
        persistent = state.persistent
        if self.pre_ln:
            y, in_context = self.in_context.step(self.ln_1(x_BC), state.in_context)
            x_BC = x_BC + y
            if self.persistent is not None:
                y, persistent = self.persistent.step(self.ln_2(x_BC), state.persistent)
                x_BC = x_BC + y
            return x_BC, BlockState(in_context, persistent)
        x_BC = self.ln_1(x_BC)
        y, in_context = self.in_context.step(x_BC, state.in_context)
        x_BC = x_BC + y
        if self.persistent is not None:
            x_BC = self.ln_2(x_BC)
            y, persistent = self.persistent.step(x_BC, state.persistent)
            x_BC = x_BC + y
        return x_BC, BlockState(in_context, persistent)

    def init_weights(self, out_std: float) -> None:
        for norm in (self.ln_1, self.ln_2):
            if norm is not None:
                norm.reset_parameters()
        self.in_context.init_weights(out_std)
        if self.persistent is not None:
            self.persistent.init_weights(out_std)
