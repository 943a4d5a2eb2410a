"""What every apps/main command stands on: the run config (`MainTrainArgs`, the loop's `TrainArgs`
plus the `model:` section) and `build_model`, the model for a tokenizer. train.py hands both to the
shared loop; generate.py and eval.py rebuild trained models with them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from apps.main.transformer import LMTransformer, LMTransformerArgs
from lingua.args import ConfigError
from lingua.tokenizer import Tokenizer
from lingua.trainer import TrainArgs


@dataclass
class MainTrainArgs(TrainArgs):
    DERIVED_DEFAULTS: ClassVar[dict[str, str]] = {"model.max_seqlen": "data.seq_len"}  # a config that leaves model.max_seqlen out gets data.seq_len
    RANGES: ClassVar[dict[str, str]] = {"probe_freq": "any"}

    model: LMTransformerArgs = field(default_factory=LMTransformerArgs)
    probe_freq: int | None = None  # accepted for compatibility with the public Memory Layers configs; no effect (there is no activation probe)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.data.seq_len > self.model.max_seqlen:
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_seqlen={self.model.max_seqlen}: "
                "raise model.max_seqlen or lower data.seq_len"
            )
        self._check_memory_layout()

    def _check_memory_layout(self) -> None:
        """Memory layers against the distributed layout, before anything is written."""
        memory, layout = self.model.productkey_args, self.distributed
        if not memory.is_enabled:
            return
        if layout.tp_size > 1:
            raise ConfigError(
                f"distributed.tp_size={layout.tp_size} with model.productkey_args.is_enabled=true: memory layers do not support "
                "tensor parallelism; set tp_size=1 (distributed.memory_parallel_size shards the value tables)"
            )
        size = layout.memory_parallel_size
        if size > 1 and memory.zero_copy:
            raise ConfigError(
                f"distributed.memory_parallel_size={size} with model.productkey_args.zero_copy=true: zero-copy tables are "
                "shared per node in host memory; set memory_parallel_size=1"
            )
        width = memory.value_dim(self.model.dim)
        if width % size != 0:
            raise ConfigError(
                f"distributed.memory_parallel_size={size} does not divide the value width {width} "
                "(model.productkey_args.mem_v_dim, or model.dim when it is -1): change one of them"
            )


def build_model(args: LMTransformerArgs, tokenizer: Tokenizer) -> LMTransformer:
    """The model for `tokenizer` (model.vocab_size=-1 takes the tokenizer's vocabulary size)."""
    if args.vocab_size == -1:
        args = dataclasses.replace(args, vocab_size=tokenizer.n_words)
    elif args.vocab_size < tokenizer.n_words:
        raise ConfigError(f"model.vocab_size={args.vocab_size} is smaller than the tokenizer's {tokenizer.n_words} tokens")
    return LMTransformer(args, document_delimiters=(tokenizer.bos_id, tokenizer.eos_id))
