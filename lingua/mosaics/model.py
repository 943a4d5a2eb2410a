"""The Memory Mosaics language model (StackAssoMem): embedding -> MosaicBlocks -> LayerNorm -> tied head.

`MosaicsArgs` is the `model:` section of apps/mosaics configs. No positional embedding (position
comes from the leaky averages and the shifted in-context mask); logits are scaled by 1/sqrt(C).
The trainer builds the model on the meta device, materializes it and calls `init_weights()`, which
sets every parameter with the public implementation's initialization.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lingua.args import ConfigError
from lingua.distributed import ParallelPlan
from lingua.mosaics.blocks import BlockState, FeatureKind, MemoryOptions, MosaicBlock
from lingua.mosaics.leaky_average import MAX_CHUNK_SIZE, LeakyForm, LeakyImpl
from lingua.mosaics.lm_base import MosaicsLMBase
from lingua.mosaics.v2 import MosaicsV2Args


@dataclass
class MosaicsArgs:
    RANGES: ClassVar[dict[str, str]] = {
        "seed": ">= 0", "vocab_size": ">= 1 or -1", "vocab_multiple": ">= 1", "dim": ">= 1", "n_layers": ">= 1", "n_heads": ">= 1",
        "v_shift": ">= 0", "k_kernel_size": ">= 1", "v_kernel_size": ">= 1", "ic_dropout": "[0, 1)", "hd_dropout": "[0, 1)",
        "pmem_count": ">= 1", "pmem_size": ">= 1", "leaky_chunk_size": ">= 16", "kernel_beta_upbound": "> 0", "norm_eps": "> 0",
        "l2_eps": "> 0", "skip_tokens": ">= 0", "version": "[1, 2]",
    }

    seed: int = 42  # seed the trainer sets before init_weights()
    vocab_size: int = -1  # -1: the tokenizer's vocabulary, rounded up to vocab_multiple
    vocab_multiple: int = 64  # pad a tokenizer-derived vocabulary to a multiple of this (GEMM-friendly)
    dim: int = 768  # n_embd, C
    n_layers: int = 12  # blocks
    n_heads: int = 12  # heads per associative memory
    v_shift: int = 1  # values look this many steps ahead; key j is visible to query t iff j <= t - v_shift
    k_fe_type: FeatureKind = "linearconv"  # key feature extractor
    k_kernel_size: int = 1  # its taps along time
    v_fe_type: FeatureKind = "lowrlinearconv"  # value feature extractor
    v_kernel_size: int = 2  # its taps (lowrlinearconv needs 2)
    ic_dropout: float = 0.05  # attention dropout in both memories
    hd_dropout: float = 0.05  # dropout of each block output (after c_proj)
    bias: bool = False  # biases in linears and LayerNorms
    pmem_count: int = 1  # separate persistent memories per block (outputs averaged)
    pmem_size: int = 2688  # P, slots per head of each persistent memory (3.5 C matches a GPT layer's size)
    pre_ln: bool = True  # pre-LN residual blocks (false: post-LN, the norm applied to the residual stream)
    attn_only: bool = False  # in-context memory only: no persistent memory, no second LayerNorm
    weight_tying: bool = True  # the head reuses the embedding matrix
    leaky_form: LeakyForm = "ema"  # ema: the regular EMA; normalized: the public CUDA kernel's bias-corrected form
    leaky_impl: LeakyImpl = "op"  # op: custom op (Triton on GPU); chunked: torch scan; naive: T x T weights
    leaky_chunk_size: int = 64  # time steps per chunk of the scan (a power of two; 16 to 64 with leaky_impl=op)
    kernel_beta_upbound: float = 5.0  # cap on 10 * kappa, the log key scale (the public fp16 guard)
    norm_eps: float = 1e-5  # LayerNorm epsilon
    l2_eps: float = 1e-6  # epsilon of the key and value L2 normalizations
    skip_tokens: int = 0  # positions before this one carry no loss
    version: int = 1  # 1: Memory Mosaics (leaky averages, persistent slots); 2: Memory Mosaics v2 (lingua/mosaics/v2.py)
    v2: MosaicsV2Args = field(default_factory=MosaicsV2Args)  # the v2 model's own settings (model.version=2)

    def __post_init__(self) -> None:
        self._check_version_keys()
        if self.dim % self.n_heads:
            raise ConfigError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}; pick a divisor")
        if self.v_fe_type == "lowrlinearconv" and self.v_kernel_size != 2:
            raise ConfigError(f"model.v_fe_type=lowrlinearconv needs model.v_kernel_size=2, got {self.v_kernel_size}")
        if self.v_fe_type == "linearconv" and self.v_kernel_size - 1 < self.v_shift:
            raise ConfigError(
                f"model.v_fe_type=linearconv with v_shift={self.v_shift} needs v_kernel_size >= v_shift + 1"
            )
        chunk = self.leaky_chunk_size
        if chunk & (chunk - 1):
            raise ConfigError(f"model.leaky_chunk_size={chunk} must be a power of two >= 16 (e.g. 64)")
        if self.leaky_impl == "op" and chunk > MAX_CHUNK_SIZE:
            raise ConfigError(
                f"model.leaky_chunk_size={chunk}: leaky_impl=op runs GPU kernels whose chunk is at most "
                f"{MAX_CHUNK_SIZE}; use {MAX_CHUNK_SIZE}, or leaky_impl=chunked"
            )
    def _check_version_keys(self) -> None:
        """A key the chosen version does not read is refused rather than silently ignored."""
        if self.version == 1:
            if self.v2 != MosaicsV2Args():
                raise ConfigError("model.v2 settings have no effect with model.version=1: set model.version=2 or drop them")
            return
        defaults = MosaicsArgs()
        for key in (f.name for f in fields(self)):
            if key in V1_ONLY_KEYS and getattr(self, key) != getattr(defaults, key):
                raise ConfigError(f"model.{key} has no effect with model.version=2 (a v1 setting): drop it")

    def memory_options(self) -> MemoryOptions:
        return MemoryOptions(
            dim=self.dim, n_heads=self.n_heads, k_fe_type=self.k_fe_type, k_kernel_size=self.k_kernel_size,
            v_fe_type=self.v_fe_type, v_kernel_size=self.v_kernel_size, v_shift=self.v_shift, bias=self.bias,
            ic_dropout=self.ic_dropout, hd_dropout=self.hd_dropout, leaky_form=self.leaky_form,
            leaky_impl=self.leaky_impl, leaky_chunk_size=self.leaky_chunk_size,
            kernel_beta_upbound=self.kernel_beta_upbound, l2_eps=self.l2_eps,
        )


V1_ONLY_KEYS = frozenset({
    "k_fe_type", "k_kernel_size", "v_fe_type", "v_kernel_size", "v_shift", "ic_dropout", "hd_dropout", "bias",
    "pmem_count", "pmem_size", "pre_ln", "attn_only", "weight_tying", "leaky_form", "leaky_impl",
    "leaky_chunk_size", "kernel_beta_upbound",
})  # the v1 model's keys; v2 reads seed, vocab_*, dim, n_layers, n_heads, norm_eps, l2_eps, skip_tokens, v2


class MosaicsLM(MosaicsLMBase):
    """tokens (B, T) -> logits (B, T, V), or the mean cross-entropy when targets are given."""

    def __init__(self, args: MosaicsArgs) -> None:
        super().__init__()
        if args.vocab_size < 1:
            raise ConfigError(f"model.vocab_size={args.vocab_size}: set it (the trainer sets it from the tokenizer)")
        self.args = args
        opt = args.memory_options()
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(
            MosaicBlock(opt, args.pre_ln, args.attn_only, args.pmem_count, args.pmem_size, args.norm_eps)
            for _ in range(args.n_layers)
        )
        self.norm = nn.LayerNorm(args.dim, eps=args.norm_eps, bias=args.bias)
        self.output = None if args.weight_tying else nn.Linear(args.dim, args.vocab_size, bias=False)

    @property
    def output_weight(self) -> Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def _head(self, h: Tensor) -> Tensor:
        h = self.norm(h)
        logits = F.linear(h, self.tok_embeddings.weight) if self.output is None else self.output(h)
        return logits * (1.0 / math.sqrt(self.args.dim))

    def logits(self, tokens: Tensor) -> Tensor:
        """(B, T) token ids -> (B, T, V) logits; position t sees tokens <= t only."""
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h)
        return self._head(h)

    # -- recurrent generation -------------------------------------------------------------------

    def initial_state(self, batch: int, device: torch.device, dtype: torch.dtype = torch.float32) -> list[BlockState]:
        """Per-block recurrent state before the first token."""
        return [layer.initial_state(batch, device, dtype) for layer in self.layers]

    def step(self, tokens_B: Tensor, state: list[BlockState]) -> tuple[Tensor, list[BlockState]]:
        """Logits (B, V) of the next token after tokens_B (B,), and the state after it. O(1) leaky work
        per block plus attention of one query over the key/value cache; the prefix is never recomputed."""
        h = self.tok_embeddings(tokens_B)
        new_state = []
        for layer, layer_state in zip(self.layers, state):
            h, layer_state = layer.step(h, layer_state)
            new_state.append(layer_state)
        return self._head(h), new_state

    # -- trainer contract -----------------------------------------------------------------------

    def init_weights(self) -> None:
        """The public initialization: linears N(0, 1/fan_in); c_proj N(0, 1/(C n_layers)); the tied
        matrix N(0, 1/C) (the head's init wins in the public code); an untied embedding N(0, 1);
        persistent slots N(0, 1/D); theta linspace(0.5, 5, H)/10, kappa 0.1, nu -0.05, c ~ U(0, 1)."""
        C = self.args.dim
        out_std = (C**-0.5) / math.sqrt(self.args.n_layers)
        for layer in self.layers:
            layer.init_weights(out_std)
        self.norm.reset_parameters()
        if self.output is None:
            nn.init.normal_(self.tok_embeddings.weight, std=C**-0.5)
        else:
            nn.init.normal_(self.tok_embeddings.weight, std=1.0)
            nn.init.normal_(self.output.weight, std=C**-0.5)

    def parallel_plan(self) -> ParallelPlan:
        return ParallelPlan(blocks=self.layers)

    def dense_param_count(self) -> int:
        """Parameters doing matmul work per token (embedding lookups excluded, the head counted once)."""
        embedding = self.tok_embeddings.weight.numel()
        body = sum(p.numel() for p in self.parameters()) - embedding
        return body + self.output_weight.numel() * (self.output is None)


def flops_per_token(model: MosaicsLM, seq_len: int) -> float:
    """Training FLOPs per token: 6 N (dense parameters, persistent slots included: each is one
    multiply-add per token) + 6 L C T for the causal in-context attention (scores and values, half
    of the T x T pairs, times 3 for forward and backward)."""
    args = model.args
    return 6.0 * model.dense_param_count() + 6.0 * args.n_layers * args.dim * seq_len
