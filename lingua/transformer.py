"""The Llama-style decoder core: RMSNorm, real-valued RoPE, GQA attention (sdpa / flex / xformers),
SwiGLU feed-forward, pre-norm blocks with a replaceable FFN, and `BaseTransformer` (blocks + RoPE).

Apps build their language models on top of `BaseTransformer` (`apps/main/transformer.py`); memory
layers replace the FFN of chosen blocks through `ffn_for_layer`. Models are built on the meta device,
materialized with `to_empty` and then `init_weights()` sets every parameter and buffer.

Shapes: B batch, S sequence, H query heads, K key/value heads, D head dim, E model dim.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from lingua.args import ConfigError
from lingua.distributed import ParallelPlan

logger = logging.getLogger(__name__)

AttnImpl = Literal["sdpa", "flex_attention", "xformers"]
InitStdFactor = Literal["disabled", "global_depth", "current_depth", "dim_ratio"]


@dataclass
class BaseTransformerArgs:
    RANGES: ClassVar[dict[str, str]] = {
        "dim": ">= 1", "n_layers": ">= 1", "head_dim": ">= 1", "n_heads": ">= 1", "n_kv_heads": ">= 1", "ffn_dim_multiplier": "> 0",
        "multiple_of": ">= 1", "norm_eps": "> 0", "rope_theta": "> 0", "init_base_std": "> 0", "max_seqlen": ">= 1",
    }

    dim: int = 256  # model width E
    n_layers: int = 4  # number of transformer blocks
    head_dim: int | None = None  # per-head width; None: dim // n_heads
    n_heads: int = 8  # query heads
    n_kv_heads: int | None = None  # key/value heads (GQA); None: n_heads
    ffn_dim_multiplier: float | None = None  # scales the SwiGLU hidden width int(2*4*dim/3)
    multiple_of: int = 256  # the SwiGLU hidden width is rounded up to a multiple of this
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base
    init_base_std: float | None = None  # init std of projections; None: fan_in ** -0.5
    init_std_factor: InitStdFactor = "disabled"  # depth scaling dividing the output projections' std
    max_seqlen: int = 1024  # longest position RoPE tables cover
    attn_impl: AttnImpl = "sdpa"  # attention kernel
    doc_mask: bool = False  # packed documents do not attend to each other; positions restart per document

    def __post_init__(self) -> None:
        if self.head_dim is None and self.dim % self.n_heads != 0:
            raise ConfigError(
                f"dim={self.dim} is not divisible by n_heads={self.n_heads}: "
                "set dim to a multiple of n_heads, or set head_dim explicitly"
            )
        if self.resolved_head_dim <= 0 or self.resolved_head_dim % 2 != 0:
            raise ConfigError(f"head_dim={self.resolved_head_dim} must be a positive even number (RoPE rotates pairs)")
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads != 0:
            raise ConfigError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    @property
    def resolved_n_kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """SwiGLU width: 2/3 of 4*dim (same parameter count as a 4*dim MLP), scaled, rounded up."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


INIT_STD_FACTORS: dict[str, Callable[[BaseTransformerArgs, int], float]] = {
    "disabled": lambda args, layer_id: 1.0,
    "global_depth": lambda args, layer_id: math.sqrt(2 * (args.n_layers + 1)),
    "current_depth": lambda args, layer_id: math.sqrt(2 * (layer_id + 1)),
    "dim_ratio": lambda args, layer_id: args.dim / 4096,
}


def trunc_normal_(weight: Tensor, std: float) -> None:
    """Truncated normal at +-3 std, the init of every projection and embedding."""
    nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-3 * std, b=3 * std)


# ---------------------------------------------------------------------------------------------
# Norm and rotary embedding


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x_fp32 = x.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).type_as(x)

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)


class RotaryEmbedding(nn.Module):
    """cos/sin tables [max_seqlen, D/2] of the rotation applied to (even, odd) channel pairs.

    Real-valued (no complex dtype), so it compiles and shards like any tensor. Buffers are not
    persistent: `init_weights` recomputes them after `to_empty`.
    """

    def __init__(self, head_dim: int, max_seqlen: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_seqlen = max_seqlen
        self.theta = theta
        self.register_buffer("cos", torch.empty(max_seqlen, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_seqlen, head_dim // 2), persistent=False)
        self.init_weights()

    def init_weights(self) -> None:
        device = self.cos.device
        freqs = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, device=device).float() / self.head_dim))
        angles = torch.outer(torch.arange(self.max_seqlen, device=device).float(), freqs)
        self.cos.copy_(angles.cos())
        self.sin.copy_(angles.sin())

    def forward(self, seqlen: int, tok_idx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """cos, sin for positions 0..seqlen-1 ([S, D/2]) or for per-token positions tok_idx ([B, S, D/2])."""
        if seqlen > self.max_seqlen:
            raise ValueError(f"sequence length {seqlen} exceeds max_seqlen={self.max_seqlen}: raise model.max_seqlen")
        if tok_idx is None:
            return self.cos[:seqlen], self.sin[:seqlen]
        return self.cos[tok_idx], self.sin[tok_idx]


def apply_rotary_emb(x_BSHD: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each (x[2i], x[2i+1]) pair by position * freq_i; cos/sin are [S, D/2] or [B, S, D/2]."""
    x = x_BSHD.float().unflatten(-1, (-1, 2))
    x_even, x_odd = x[..., 0], x[..., 1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    rotated = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x_BSHD)


# ---------------------------------------------------------------------------------------------
# Document ids and attention backends


def document_ids(tokens: Tensor, bos_id: int | None = None, eos_id: int | None = None) -> Tensor:
    """Per-token document index [B, S] of packed rows: a document starts at each BOS token and
    right after each EOS token. Pass the result as `doc_ids` when `doc_mask` is on."""
    if bos_id is None and eos_id is None:
        raise ValueError("document_ids needs bos_id, eos_id or both to find document boundaries")
    starts = torch.zeros_like(tokens, dtype=torch.bool)
    if bos_id is not None:
        starts |= tokens == bos_id
    if eos_id is not None:
        starts[..., 1:] |= tokens[..., :-1] == eos_id
    starts[..., 0] = False
    return starts.long().cumsum(-1)


def positions_in_documents(doc_ids: Tensor) -> Tensor:
    """Position of each token within its document [B, S]; doc_ids must be constant along each document."""
    seqlen = doc_ids.shape[-1]
    arange = torch.arange(seqlen, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[..., 1:] = doc_ids[..., 1:] != doc_ids[..., :-1]
    start_index = torch.cummax(torch.where(starts, arange, 0), dim=-1).values
    return arange - start_index


def repeat_kv(x_BSKD: Tensor, n_rep: int) -> Tensor:
    """[B, S, K, D] -> [B, S, K*n_rep, D], each kv head repeated for its n_rep query heads."""
    if n_rep == 1:
        return x_BSKD
    return x_BSKD.repeat_interleave(n_rep, dim=2)


class AttentionBackend(Protocol):
    """An attention kernel: a mask built once per forward, then used by every block."""

    def build_mask(self, seqlen: int, doc_ids: Tensor | None, device: torch.device) -> Any: ...

    def attend(self, q_BSHD: Tensor, k_BSKD: Tensor, v_BSKD: Tensor, mask: Any) -> Tensor: ...


class SdpaBackend:
    """torch scaled_dot_product_attention: is_causal, or a boolean same-document causal mask."""

    def build_mask(self, seqlen: int, doc_ids: Tensor | None, device: torch.device) -> Tensor | None:
        if doc_ids is None:
            return None
        causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=device).tril()
        same_doc = doc_ids.unsqueeze(-1) == doc_ids.unsqueeze(-2)  # [B, S, S]
        return (same_doc & causal).unsqueeze(1)  # [B, 1, S, S], broadcast over heads

    def attend(self, q_BSHD: Tensor, k_BSKD: Tensor, v_BSKD: Tensor, mask: Tensor | None) -> Tensor:
        n_rep = q_BSHD.shape[2] // k_BSKD.shape[2]
        q, k, v = (t.transpose(1, 2) for t in (q_BSHD, repeat_kv(k_BSKD, n_rep), repeat_kv(v_BSKD, n_rep)))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return out.transpose(1, 2)


class FlexBackend:
    """flex_attention with a causal (or same-document causal) BlockMask.

    On CUDA both flex_attention and create_block_mask are compiled (the compiled functions live on
    this object; a compiled create_block_mask never materializes the [B, S, S] mask). The causal mask
    is cached per (seqlen, device). On CPU flex runs eagerly and has no backward, so
    `BaseTransformer` uses SDPA there whenever gradients are needed.
    """

    def __init__(self) -> None:
        self._compiled_attention: Callable[..., Tensor] | None = None
        self._compiled_block_mask: Callable[..., BlockMask] | None = None
        self._causal_masks: dict[tuple[int, torch.device], BlockMask] = {}

    def build_mask(self, seqlen: int, doc_ids: Tensor | None, device: torch.device) -> BlockMask:
        make_mask: Callable[..., BlockMask] = create_block_mask
        if device.type == "cuda":
            if self._compiled_block_mask is None:
                self._compiled_block_mask = torch.compile(create_block_mask)
            make_mask = self._compiled_block_mask
        if doc_ids is not None:
            return make_mask(_doc_causal_mask_mod(doc_ids), doc_ids.shape[0], None, seqlen, seqlen, device=device)
        key = (seqlen, device)
        if key not in self._causal_masks:
            self._causal_masks[key] = make_mask(_causal_mask_mod, None, None, seqlen, seqlen, device=device)
        return self._causal_masks[key]

    def attend(self, q_BSHD: Tensor, k_BSKD: Tensor, v_BSKD: Tensor, mask: BlockMask) -> Tensor:
        q, k, v = (t.transpose(1, 2) for t in (q_BSHD, k_BSKD, v_BSKD))
        gqa = q.shape[1] != k.shape[1]
        if q.is_cuda:
            if self._compiled_attention is None:
                self._compiled_attention = torch.compile(flex_attention, dynamic=False)
            out = self._compiled_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
        else:
            with warnings.catch_warnings():  # eager flex on CPU is deliberate (inference only)
                warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
                out = flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
        return out.transpose(1, 2)


def _causal_mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    return q_idx >= kv_idx


def _doc_causal_mask_mod(doc_ids: Tensor) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    return mask_mod


class XformersBackend:
    """xformers memory_efficient_attention: LowerTriangularMask, or BlockDiagonalCausalMask over the
    documents of all rows laid end to end (building it reads the document lengths on the host)."""

    def __init__(self) -> None:
        try:
            from xformers.ops import fmha
        except ImportError as error:
            raise ConfigError(
                "attn_impl='xformers' needs the xformers package: install it (pip install xformers) "
                "or set attn_impl to 'sdpa' or 'flex_attention'"
            ) from error
        self._fmha = fmha

    def build_mask(self, seqlen: int, doc_ids: Tensor | None, device: torch.device) -> Any:
        if doc_ids is None:
            return self._fmha.attn_bias.LowerTriangularMask()
        starts = torch.ones_like(doc_ids, dtype=torch.bool)  # every row starts a document
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        start_index = starts.flatten().nonzero().squeeze(1)
        lengths = torch.diff(start_index, append=start_index.new_tensor([starts.numel()])).tolist()
        return self._fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens(lengths)

    def attend(self, q_BSHD: Tensor, k_BSKD: Tensor, v_BSKD: Tensor, mask: Any) -> Tensor:
        n_rep = q_BSHD.shape[2] // k_BSKD.shape[2]
        k, v = repeat_kv(k_BSKD, n_rep), repeat_kv(v_BSKD, n_rep)
        if isinstance(mask, self._fmha.attn_bias.BlockDiagonalCausalMask):
            batch = q_BSHD.shape[0]
            q, k, v = (t.flatten(0, 1).unsqueeze(0) for t in (q_BSHD, k, v))  # [1, B*S, H, D]
            return self._fmha.memory_efficient_attention(q, k, v, attn_bias=mask).unflatten(1, (batch, -1))[0]
        return self._fmha.memory_efficient_attention(q_BSHD, k, v, attn_bias=mask)


ATTENTION_BACKENDS: dict[str, Callable[[], AttentionBackend]] = {
    "sdpa": SdpaBackend,
    "flex_attention": FlexBackend,
    "xformers": XformersBackend,
}


# ---------------------------------------------------------------------------------------------
# Layers


class KVCache:
    """Keys and values of one attention layer for incremental decoding: [B, max_len, K, D] each."""

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.k = torch.zeros(batch, max_len, n_kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, k_BSKD: Tensor, v_BSKD: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """Store the new keys/values at positions start..start+S-1; return all of 0..start+S-1."""
        end = start + k_BSKD.shape[1]
        if end > self.k.shape[1]:
            raise ValueError(f"KV cache of {self.k.shape[1]} positions cannot hold position {end - 1}")
        self.k[:, start:end] = k_BSKD
        self.v[:, start:end] = v_BSKD
        return self.k[:, :end], self.v[:, :end]


class Attention(nn.Module):
    """Multi-head attention with grouped key/value heads and RoPE; no biases."""

    def __init__(
        self, dim: int, head_dim: int, n_heads: int, n_kv_heads: int, init_std: float, out_init_std: float
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.init_std = init_std
        self.out_init_std = out_init_std
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)

    def forward(
        self,
        x_BSE: Tensor,
        rope: tuple[Tensor, Tensor],
        mask: Any,
        backend: AttentionBackend,
        cache: KVCache | None = None,
        cache_start: int = 0,
    ) -> Tensor:
        q = self.wq(x_BSE).unflatten(-1, (self.n_heads, self.head_dim))
        k = self.wk(x_BSE).unflatten(-1, (self.n_kv_heads, self.head_dim))
        v = self.wv(x_BSE).unflatten(-1, (self.n_kv_heads, self.head_dim))
        q, k = apply_rotary_emb(q, *rope), apply_rotary_emb(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, cache_start)
        out_BSHD = backend.attend(q, k, v, mask)
        return self.wo(out_BSHD.flatten(-2))

    def init_weights(self) -> None:
        for linear in (self.wq, self.wk, self.wv):
            trunc_normal_(linear.weight, self.init_std)
        trunc_normal_(self.wo.weight, self.out_init_std)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int, init_std: float, out_init_std: float) -> None:
        super().__init__()
        self.init_std = init_std
        self.out_init_std = out_init_std
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def init_weights(self) -> None:
        trunc_normal_(self.w1.weight, self.init_std)
        trunc_normal_(self.w3.weight, self.init_std)
        trunc_normal_(self.w2.weight, self.out_init_std)


class TransformerBlock(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + ffn(norm(h)).

    `ffn` replaces the SwiGLU feed-forward (memory layers); it maps [..., dim] -> [..., dim] and must
    have an `init_weights()` that sets all of its parameters and buffers.
    """

    def __init__(self, args: BaseTransformerArgs, layer_id: int, ffn: nn.Module | None = None) -> None:
        super().__init__()
        depth_factor = INIT_STD_FACTORS[args.init_std_factor](args, layer_id)
        head_dim = args.resolved_head_dim
        attn_std = args.init_base_std or args.dim**-0.5
        self.attention = Attention(
            args.dim,
            head_dim,
            args.n_heads,
            args.resolved_n_kv_heads,
            init_std=attn_std,
            out_init_std=(args.init_base_std or (args.n_heads * head_dim) ** -0.5) / depth_factor,
        )
        if ffn is None:
            hidden = ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier)
            ffn = FeedForward(
                args.dim,
                hidden,
                init_std=args.init_base_std or args.dim**-0.5,
                out_init_std=(args.init_base_std or hidden**-0.5) / depth_factor,
            )
        elif not callable(getattr(ffn, "init_weights", None)):
            raise TypeError(
                f"layer {layer_id}: the replacement ffn {type(ffn).__name__} needs an init_weights() method"
            )
        self.feed_forward = ffn
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        mask: Any,
        backend: AttentionBackend,
        cache: KVCache | None = None,
        cache_start: int = 0,
    ) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, mask, backend, cache, cache_start)
        return h + self.feed_forward(self.ffn_norm(h))

    def init_weights(self) -> None:
        self.attention_norm.init_weights()
        self.ffn_norm.init_weights()
        self.attention.init_weights()
        self.feed_forward.init_weights()


class BaseTransformer(nn.Module):
    """The stack of blocks and the RoPE tables; maps hidden states [B, S, E] -> [B, S, E].

    `ffn_for_layer(layer_id)` may return a module replacing that block's feed-forward (None keeps
    SwiGLU). The attention mask is built once per forward and shared by all blocks.
    """

    def __init__(
        self, args: BaseTransformerArgs, ffn_for_layer: Callable[[int], nn.Module | None] | None = None
    ) -> None:
        super().__init__()
        self.args = args
        self.rope_embeddings = RotaryEmbedding(args.resolved_head_dim, args.max_seqlen, args.rope_theta)
        self.layers = nn.ModuleList(
            TransformerBlock(args, layer_id, ffn_for_layer(layer_id) if ffn_for_layer else None)
            for layer_id in range(args.n_layers)
        )
        self.attn_backend = ATTENTION_BACKENDS[args.attn_impl]()
        self._sdpa_fallback = SdpaBackend()
        self._warned_cpu_flex = False

    def forward(self, h_BSE: Tensor, tok_idx: Tensor | None = None, doc_ids: Tensor | None = None) -> Tensor:
        """tok_idx: per-token positions [B, S] (default: 0..S-1, or the position within each document
        when doc_ids is given). doc_ids: [B, S] document index of each token, constant along a
        document; when given, tokens attend only to earlier tokens of their own document."""
        seqlen = h_BSE.shape[1]
        if self.args.doc_mask and doc_ids is None:
            raise ValueError("doc_mask=True needs doc_ids: pass document_ids(tokens, bos_id, eos_id) to forward")
        if doc_ids is not None and tok_idx is None:
            tok_idx = positions_in_documents(doc_ids)
        backend = self._select_backend(h_BSE)
        mask = backend.build_mask(seqlen, doc_ids, h_BSE.device)
        rope = self.rope_embeddings(seqlen, tok_idx)
        for layer in self.layers:
            h_BSE = layer(h_BSE, rope, mask, backend)
        return h_BSE

    def forward_cached(
        self, h_BSE: Tensor, tok_idx: Tensor, attn_mask: Tensor, caches: list[KVCache], cache_start: int
    ) -> Tensor:
        """Incremental decoding: the S new tokens sit at cache positions cache_start..cache_start+S-1.
        tok_idx [B, S]: their RoPE positions; attn_mask [B, 1, S, cache_start+S] (True = attend)."""
        rope = self.rope_embeddings(h_BSE.shape[1], tok_idx)
        for layer, cache in zip(self.layers, caches, strict=True):
            h_BSE = layer(h_BSE, rope, attn_mask, self._sdpa_fallback, cache, cache_start)
        return h_BSE

    def new_kv_caches(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> list[KVCache]:
        head_dim, n_kv_heads = self.args.resolved_head_dim, self.args.resolved_n_kv_heads
        return [KVCache(batch, max_len, n_kv_heads, head_dim, dtype, device) for _ in self.layers]

    def _select_backend(self, h: Tensor) -> AttentionBackend:
        """flex_attention has no CPU backward: train with SDPA there (same math), warn once."""
        if isinstance(self.attn_backend, FlexBackend) and h.device.type == "cpu" and torch.is_grad_enabled():
            if not self._warned_cpu_flex:
                logger.warning("attn_impl=flex_attention has no backward on CPU: using sdpa while gradients are on")
                self._warned_cpu_flex = True
            return self._sdpa_fallback
        return self.attn_backend

    def init_weights(self) -> None:
        self.rope_embeddings.init_weights()
        for layer in self.layers:
            layer.init_weights()

    def parallel_plan(self) -> ParallelPlan:
        """Blocks are checkpointed, compiled and sharded one by one; attention and SwiGLU are tensor-parallel."""
        return ParallelPlan(blocks=self.layers, tensor_parallel=tensor_parallel_blocks)


def tensor_parallel_blocks(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Megatron-style TP of every block: wq/wk/wv and w1/w3 split by output columns (each rank owns
    whole heads), wo and w2 split by input rows with the partial outputs summed. Embeddings, norms and
    the head stay replicated. A replacement FFN (memory layer) is left to its own parallelism."""
    tp = tp_mesh.size()
    if getattr(model, "output", False) is None:
        raise ConfigError("model.weight_tying with distributed.tp_size > 1 is not supported: untie the head or use tp_size=1")
    for block in model.layers:
        attention = block.attention
        if attention.n_heads % tp or attention.n_kv_heads % tp:
            raise ConfigError(
                f"distributed.tp_size={tp} must divide n_heads={attention.n_heads} and n_kv_heads={attention.n_kv_heads}"
            )
        plan = {f"attention.{name}": ColwiseParallel() for name in ("wq", "wk", "wv")}
        plan["attention.wo"] = RowwiseParallel()
        if isinstance(block.feed_forward, FeedForward):
            plan |= {"feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(), "feed_forward.w2": RowwiseParallel()}
        parallelize_module(block, tp_mesh, plan)
        attention.n_heads //= tp  # heads owned by this rank
        attention.n_kv_heads //= tp


def flops_per_token(n_dense_params: int, n_layers: int, dim: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) for MFU.

    6 * N: every dense weight does one multiply-add (2 FLOPs) per token forward, twice that backward.
    Attention scores and the weighted sum each cost 2 * dim * seq_len FLOPs per token forward (dim =
    n_heads * head_dim), times 3 with backward: 12 * L * dim * seq_len, halved for a causal mask.
    N counts dense matmul weights only: the token embedding lookup and sparse memory tables are
    excluded, the output projection is included (see LMTransformer.dense_param_count).
    """
    return 6.0 * n_dense_params + 12.0 * n_layers * dim * seq_len / 2
