"""The language model of `apps/main`: token embedding -> `BaseTransformer` blocks -> norm -> output head.

`LMTransformer.forward` returns fp32 cross-entropy when given targets, logits otherwise. The trainer
sets `vocab_size` from the tokenizer, builds the model on the meta device, materializes it and calls
`init_weights()`; memory layers enter through `ffn_for_layer`. With `productkey_args.is_enabled`
the model builds its product-key memory layers itself and owns their shared value table
(`memory_values`, registered once: state dicts, optimizers and FSDP see it once).
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from lingua.args import ConfigError
from lingua.distributed import ParallelPlan
from lingua.product_key import ProductKeyArgs, ValueTable, build_memory_layers, shard_value_tables, value_param_count, value_tables
from lingua.transformer import BaseTransformer, BaseTransformerArgs, KVCache, RMSNorm, document_ids, trunc_normal_

IGNORE_INDEX = -100  # target value that contributes no loss (torch's cross-entropy default)


@dataclass
class LMTransformerArgs(BaseTransformerArgs):
    RANGES: ClassVar[dict[str, str]] = {"seed": ">= 0", "vocab_size": ">= 1 or -1"}

    seed: int = 42  # seed the trainer sets before init_weights()
    vocab_size: int = -1  # -1: set from the tokenizer by the trainer
    weight_tying: bool = False  # the output head reuses the token embedding matrix
    productkey_args: ProductKeyArgs = field(default_factory=ProductKeyArgs)  # memory layers replacing FFNs

    def __post_init__(self) -> None:
        super().__post_init__()
        self.productkey_args.check_layers(self.n_layers)


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean token cross-entropy in fp32. logits [..., V], target [...]; targets equal to
    ignore_index are left out of the mean (all ignored gives nan)."""
    return F.cross_entropy(logits.flatten(0, -2).float(), target.flatten(), ignore_index=ignore_index)


class LMTransformer(BaseTransformer):
    """Decoder-only language model. With weight tying there is one Parameter,
    `tok_embeddings.weight`, used by the head too (`output` is then None, so a parallelize
    function must keep `tok_embeddings` unsharded until the head has run, e.g. in the root unit)."""

    def __init__(
        self,
        args: LMTransformerArgs,
        ffn_for_layer: Callable[[int], nn.Module | None] | None = None,
        document_delimiters: tuple[int | None, int | None] = (None, None),
    ) -> None:
        """document_delimiters: the (BOS, EOS) ids that separate packed documents; with
        `doc_mask` the model finds document boundaries from them when no doc_ids are passed.
        ffn_for_layer: replaces FFNs (None: the product-key memory layers of args.productkey_args)."""
        shared_values: ValueTable | None = None
        if ffn_for_layer is None and args.productkey_args.is_enabled:
            memory, shared_values = build_memory_layers(args.productkey_args, args.dim)
            ffn_for_layer = memory.get
        super().__init__(args, ffn_for_layer)
        self.memory_values = shared_values  # the one shared value table, or None
        if args.doc_mask and document_delimiters == (None, None):
            raise ConfigError("model.doc_mask=true needs the tokenizer's BOS/EOS ids to find documents")
        self.document_delimiters = document_delimiters
        if args.vocab_size <= 0:
            raise ConfigError(
                f"vocab_size={args.vocab_size}: set model.vocab_size (the trainer sets it from the tokenizer)"
            )
        self.args: LMTransformerArgs = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = None if args.weight_tying else nn.Linear(args.dim, args.vocab_size, bias=False)

    def parallel_plan(self) -> ParallelPlan:
        """The blocks' plan (TP, checkpointing, compile, FSDP per block), with memory value tables
        kept out of FSDP (row-sparse gradients, their own update rule) and sharded by columns
        under memory parallelism."""
        plan = super().parallel_plan()
        if not value_tables(self):
            return plan
        return dataclasses.replace(
            plan, ignored_params=lambda model: {p for t in value_tables(model) for p in t.parameters()}, memory_parallel=shard_value_tables
        )

    @property
    def output_weight(self) -> Tensor:
        """The [vocab_size, dim] matrix of the output head."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def forward(
        self,
        tokens: Tensor,
        target: Tensor | None = None,
        *,
        tok_idx: Tensor | None = None,
        doc_ids: Tensor | None = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> Tensor:
        """tokens [B, S] -> logits [B, S, V], or the mean loss when target [B, S] is given.
        tok_idx / doc_ids: see BaseTransformer.forward (doc_ids from lingua.transformer.document_ids)."""
        if self.args.doc_mask and doc_ids is None:
            doc_ids = document_ids(tokens, *self.document_delimiters)
        h = super().forward(self.tok_embeddings(tokens), tok_idx=tok_idx, doc_ids=doc_ids)
        logits = self._head(h)
        if target is None:
            return logits
        return cross_entropy(logits, target, ignore_index)

    def _head(self, h: Tensor) -> Tensor:
        h = self.norm(h)
        # Call the head module when it exists, so wrappers hooked on it (FSDP units) run.
        return F.linear(h, self.tok_embeddings.weight) if self.output is None else self.output(h)

    def forward_cached(self, tokens: Tensor, tok_idx: Tensor, attn_mask: Tensor, caches: list[KVCache], cache_start: int) -> Tensor:
        """Logits [B, S, V] of S new tokens decoded against the KV caches (see BaseTransformer.forward_cached)."""
        return self._head(super().forward_cached(self.tok_embeddings(tokens), tok_idx, attn_mask, caches, cache_start))

    def init_weights(self) -> None:
        super().init_weights()
        std = self.args.init_base_std or self.args.dim**-0.5
        trunc_normal_(self.tok_embeddings.weight, std)
        self.norm.init_weights()
        if self.output is not None:
            trunc_normal_(self.output.weight, std)
        if self.memory_values is not None:
            self.memory_values.init_weights()

    def dense_param_count(self) -> int:
        """Parameters that do matmul work per token, for MFU: all but embedding lookups
        (nn.Embedding / nn.EmbeddingBag tables) and product-key value tables (their read rows are
        counted by lingua.product_key.memory_flops_per_token); the output head counts once, also
        when it is tied to the token embedding."""
        lookup_params = {
            id(p) for m in self.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for p in m.parameters()
        }
        dense = sum(p.numel() for p in self.parameters() if id(p) not in lookup_params) - value_param_count(self)
        return dense + (self.output_weight.numel() if self.output is None else 0)
