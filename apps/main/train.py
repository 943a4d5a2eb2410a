"""Train the Llama-style LM of apps/main: `python -m apps.main.train config=... a.b=c`.

This file only tells the shared loop (`lingua.trainer`) how to build the model; everything else
is the loop's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from torch import nn

from apps.main.transformer import LMTransformer, LMTransformerArgs
from lingua.args import ConfigError, cli_main
from lingua.tokenizer import Tokenizer
from lingua.trainer import ModelSpec, TrainArgs, train
from lingua.transformer import flops_per_token


@dataclass
class MainTrainArgs(TrainArgs):
    model: LMTransformerArgs = field(default_factory=LMTransformerArgs)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.data.seq_len > self.model.max_seqlen:
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_seqlen={self.model.max_seqlen}: "
                "raise model.max_seqlen or lower data.seq_len"
            )


def build_model(args: LMTransformerArgs, tokenizer: Tokenizer) -> LMTransformer:
    """The model for `tokenizer` (model.vocab_size=-1 takes the tokenizer's vocabulary size)."""
    if args.vocab_size == -1:
        args = dataclasses.replace(args, vocab_size=tokenizer.n_words)
    elif args.vocab_size < tokenizer.n_words:
        raise ConfigError(f"model.vocab_size={args.vocab_size} is smaller than the tokenizer's {tokenizer.n_words} tokens")
    return LMTransformer(args, document_delimiters=(tokenizer.bos_id, tokenizer.eos_id))


def model_flops_per_token(model: nn.Module, seq_len: int) -> float:
    args = model.args
    return flops_per_token(model.dense_param_count(), args.n_layers, args.n_heads * args.resolved_head_dim, seq_len)


MODEL_SPEC = ModelSpec(build=build_model, flops_per_token=model_flops_per_token)


def main(cfg: MainTrainArgs) -> None:
    train(cfg, MODEL_SPEC)


if __name__ == "__main__":
    cli_main(MainTrainArgs, main)
