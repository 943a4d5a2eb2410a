"""The Memory Mosaics v2 language model ("Memory Mosaics at scale", Zhang & Bottou 2025).

embedding -> blocks -> RMSNorm -> untied classifier; no positional encoding. Each pre-norm block:
  h   = x + W_o [short-term heads ; long-term heads](RMSNorm(x))   (contextual memories, contextual.py)
  out = h + SwiGLU(RMSNorm(h))                                      (the persistent memory)
Chosen with `model.version: 2`; `MosaicsV2Args` is the `model.v2` section. Documents are found
from the tokens (a document starts at BOS and after EOS); both contextual memories and the key
recurrences stay inside a document. `step` generates with bounded short-term state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
from torch import Tensor, nn

from lingua.args import ConfigError
from lingua.distributed import ParallelPlan
from lingua.mosaics.contextual import (
    ContextBatch,
    ContextualMemory,
    FlexRead,
    MemoryKind,
    MemoryState,
    MemoryView,
    block_mask,
    dense_mask,
    sdpa_read,
    visible_count,
)
from lingua.mosaics.gated_scan import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, GatedImpl
from lingua.mosaics.lm_base import MosaicsLMBase
from lingua.transformer import FeedForward, RMSNorm, document_ids, positions_in_documents, trunc_normal_

logger = logging.getLogger(__name__)


@dataclass
class MosaicsV2Args:
    RANGES: ClassVar[dict[str, str]] = {
        "ffn_dim": ">= 1 or -1", "short_window": ">= 2", "long_offset_min": ">= 1", "long_offset_max": ">= 1", "long_offset_eval": ">= 1",
        "key_scan_chunk_size": ">= 1",
    }

    ffn_dim: int = -1  # SwiGLU hidden width d'; -1: 3 * model.dim (the paper's small model: 6144 at 2048)
    short_window: int = 256  # h: short-term memory reads the pairs t-h+1 .. t-1
    long_term: bool = True  # the long-term memory (false: short-term memory only, the paper's ablation)
    long_offset_min: int = 64  # m in training is drawn uniformly from [min, max] at every forward
    long_offset_max: int = 256
    long_offset_eval: int = 64  # m at evaluation and generation: long-term memory reads pairs .. t-m
    key_scan_impl: GatedImpl = "op"  # gated key scan: op (custom op: Triton on GPU), chunked (torch), naive (loop)
    key_scan_chunk_size: int = 64  # time steps per chunk of the scan (op: a power of two from 16 to 64)

    def __post_init__(self) -> None:
        if self.long_offset_min > self.long_offset_max:
            raise ConfigError(
                f"model.v2.long_offset_min={self.long_offset_min} and long_offset_max={self.long_offset_max} "
                "must satisfy min <= max"
            )
        chunk = self.key_scan_chunk_size
        if self.key_scan_impl == "op" and (chunk < MIN_CHUNK_SIZE or chunk > MAX_CHUNK_SIZE or chunk & (chunk - 1)):
            raise ConfigError(
                f"model.v2.key_scan_chunk_size={chunk}: key_scan_impl={self.key_scan_impl} needs a power of two "
                f"from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE} (op) or any positive size (chunked)"
            )

    def resolved_ffn_dim(self, dim: int) -> int:
        return 3 * dim if self.ffn_dim == -1 else self.ffn_dim


class V2ModelArgs(Protocol):
    """The keys of the `model:` section the v2 model reads (`lingua.mosaics.model.MosaicsArgs`
    provides them; that module builds on this one, so the v2 model names only what it needs)."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    norm_eps: float
    l2_eps: float
    skip_tokens: int
    v2: MosaicsV2Args


def block_init_std(width: int, layer_id: int) -> float:
    """The paper's truncated-normal sigma 1 / sqrt(2 width (l + 1)) for block l (from 0)."""
    return (2 * width * (layer_id + 1)) ** -0.5


class MosaicsV2Block(nn.Module):
    """Pre-norm block: contextual memories (their heads concatenated into one W_o), then SwiGLU."""

    def __init__(self, args: V2ModelArgs, layer_id: int) -> None:
        super().__init__()
        v2, C = args.v2, args.dim
        self.layer_id = layer_id
        self.memory_norm = RMSNorm(C, args.norm_eps)
        scan = (v2.key_scan_impl, v2.key_scan_chunk_size)
        self.short = ContextualMemory("short", C, args.n_heads, args.l2_eps, *scan)
        self.long = ContextualMemory("long", C, args.n_heads, args.l2_eps, *scan) if v2.long_term else None
        self.memory_out = nn.Linear(C * (2 if v2.long_term else 1), C, bias=False)  # W_o
        self.ffn_norm = RMSNorm(C, args.norm_eps)
        hidden = v2.resolved_ffn_dim(C)
        self.feed_forward = FeedForward(C, hidden, block_init_std(C, layer_id), block_init_std(hidden, layer_id))

    def memories(self) -> list[ContextualMemory]:
        return [self.short] if self.long is None else [self.short, self.long]

    def forward(self, x: Tensor, context: ContextBatch) -> Tensor:
        normed = self.memory_norm(x)
        outputs = [self.short(normed, context.short, context)]
        if self.long is not None:
            assert context.long is not None
            outputs.append(self.long(normed, context.long, context))
        h = x + self.memory_out(torch.cat(outputs, dim=-1))
        return h + self.feed_forward(self.ffn_norm(h))

    def step(self, x_BC: Tensor, states: list[MemoryState], position: int, rings: list[int], doc_start_B: Tensor, restart_B: Tensor) -> tuple[Tensor, list[MemoryState]]:
        normed = self.memory_norm(x_BC)
        outputs, new_states = [], []
        for memory, state, ring in zip(self.memories(), states, rings, strict=True):
            y, state = memory.step(normed, state, position, ring, doc_start_B, restart_B)
            outputs.append(y)
            new_states.append(state)
        h = x_BC + self.memory_out(torch.cat(outputs, dim=-1))
        return h + self.feed_forward(self.ffn_norm(h)), new_states

    def init_weights(self) -> None:
        std = block_init_std(self.memory_norm.weight.numel(), self.layer_id)
        self.memory_norm.init_weights()
        self.ffn_norm.init_weights()
        for memory in self.memories():
            memory.init_weights(std)
        trunc_normal_(self.memory_out.weight, std)
        self.feed_forward.init_weights()


@dataclass
class V2State:
    """Recurrent state of the whole model before the next position."""

    position: int  # the next position
    doc_start_B: Tensor  # where each row's current document started
    ends_document_B: Tensor  # whether the last token was EOS (the next one starts a document)
    layers: list[list[MemoryState]]  # per block: [short-term, long-term] states


class MosaicsV2LM(MosaicsLMBase):
    """tokens (B, T) -> logits (B, T, V), or the mean cross-entropy when targets are given."""

    def __init__(self, args: V2ModelArgs, document_delimiters: tuple[int | None, int | None] = (None, None)) -> None:
        """document_delimiters: the (BOS, EOS) ids; (None, None): each row is one document."""
        super().__init__()
        if args.vocab_size < 1:
            raise ConfigError(f"model.vocab_size={args.vocab_size}: set it (the trainer sets it from the tokenizer)")
        self.args = args
        self.document_delimiters = document_delimiters
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(MosaicsV2Block(args, layer_id) for layer_id in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self._flex = FlexRead()

    # -- parallel forward ------------------------------------------------------------------------

    def long_offset(self, device: torch.device) -> Tensor:
        """m: drawn from [long_offset_min, long_offset_max] at every training forward (one draw for
        all blocks), long_offset_eval otherwise. A tensor, so masks never depend on a host value."""
        v2 = self.args.v2
        if self.training:
            return torch.randint(v2.long_offset_min, v2.long_offset_max + 1, (), device=device)
        return torch.tensor(v2.long_offset_eval, device=device)

    def context(self, tokens: Tensor, use_flex: bool | None = None) -> ContextBatch:
        """The per-forward masks and counts. use_flex None: flex_attention on CUDA, SDPA on CPU."""
        if self.document_delimiters == (None, None):
            doc_ids = torch.zeros_like(tokens)
        else:
            doc_ids = document_ids(tokens, *self.document_delimiters)
        pos_in_doc = positions_in_documents(doc_ids)
        flex = tokens.is_cuda if use_flex is None else use_flex

        def view(kind: MemoryKind, reach: Tensor | int) -> MemoryView:
            n_BT = visible_count(kind, reach, pos_in_doc)
            if flex:
                return MemoryView(block_mask(kind, reach, doc_ids, n_BT, self._flex.make_mask), n_BT)
            return MemoryView(dense_mask(kind, reach, doc_ids, n_BT), n_BT)

        long = view("long", self.long_offset(tokens.device)) if self.args.v2.long_term else None
        return ContextBatch(pos_in_doc == 0, view("short", self.args.v2.short_window), long, self._flex if flex else sdpa_read)

    def logits(self, tokens: Tensor, use_flex: bool | None = None) -> Tensor:
        """(B, T) token ids -> (B, T, V) logits; position t sees tokens <= t of its document only."""
        context = self.context(tokens, use_flex)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, context)
        return self.output(self.norm(h))

    # -- recurrent generation --------------------------------------------------------------------

    def _rings(self) -> list[int]:
        """Ring capacities: h - 1 pairs for short-term memory, m - 1 for long-term memory (older
        pairs move to its store)."""
        v2 = self.args.v2
        return [v2.short_window - 1] + ([v2.long_offset_eval - 1] if v2.long_term else [])

    def initial_state(self, batch: int, device: torch.device, dtype: torch.dtype = torch.float32) -> V2State:
        layers = [[memory.initial_state(batch, device, dtype) for memory in layer.memories()] for layer in self.layers]
        zeros = torch.zeros(batch, dtype=torch.long, device=device)
        return V2State(0, zeros, torch.zeros(batch, dtype=torch.bool, device=device), layers)

    def step(self, tokens_B: Tensor, state: V2State) -> tuple[Tensor, V2State]:
        """Logits (B, V) of the next token after tokens_B (B,), and the state after it. Short-term
        memory holds h - 1 pairs; long-term memory keeps every pair older than m (eval mode's m)."""
        bos, eos = self.document_delimiters
        p = state.position
        restart_B = state.ends_document_B.clone()
        if bos is not None:
            restart_B |= tokens_B == bos
        doc_start_B = torch.where(restart_B, torch.full_like(state.doc_start_B, p), state.doc_start_B)
        h = self.tok_embeddings(tokens_B)
        rings, layers = self._rings(), []
        for layer, layer_state in zip(self.layers, state.layers, strict=True):
            h, layer_state = layer.step(h, layer_state, p, rings, doc_start_B, restart_B)
            layers.append(layer_state)
        ends = tokens_B == eos if eos is not None else torch.zeros_like(restart_B)
        return self.output(self.norm(h)), V2State(p + 1, doc_start_B, ends, layers)

    # -- trainer contract ------------------------------------------------------------------------

    def init_weights(self) -> None:
        """Truncated normal (+-3 sigma): the memories' projections, W_o, W1, W3 sigma 1/sqrt(2 d (l+1)),
        W2 1/sqrt(2 d' (l+1)), embedding and classifier 1/sqrt(2 d); gamma ~ U(0, 1), alpha_psi 1,
        theta0 = theta1 = 1.5, theta_alpha = 1/3; norms 1."""
        std = (2 * self.args.dim) ** -0.5
        trunc_normal_(self.tok_embeddings.weight, std)
        trunc_normal_(self.output.weight, std)
        self.norm.init_weights()
        for layer in self.layers:
            layer.init_weights()

    def parallel_plan(self) -> ParallelPlan:
        return ParallelPlan(blocks=self.layers)

    def dense_param_count(self) -> int:
        """Parameters doing matmul work per token: all but the embedding (the classifier counts)."""
        return sum(p.numel() for p in self.parameters()) - self.tok_embeddings.weight.numel()


def mean_visible_pairs(kind: MemoryKind, reach: int, context: int) -> float:
    """Pairs a query reads on average over positions 0..context-1 of one document."""
    return float(visible_count(kind, reach, torch.arange(context)).double().mean())


def forward_flops_per_token(model: MosaicsV2LM, context: int) -> float:
    """Forward FLOPs per token, counted like the paper's table: 2 per dense weight (embedding
    lookups excluded) + 4 C per visible pair per block and memory (scores and weighted values),
    with m = long_offset_eval. 18.9B for v2_large at context 256, 15.6B without long-term memory."""
    v2, args = model.args.v2, model.args
    pairs = mean_visible_pairs("short", v2.short_window, context)
    if v2.long_term:
        pairs += mean_visible_pairs("long", v2.long_offset_eval, context)
    return 2.0 * model.dense_param_count() + 4.0 * args.n_layers * args.dim * pairs


def flops_per_token(model: MosaicsV2LM, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward), for MFU."""
    return 3.0 * forward_flops_per_token(model, seq_len)
