"""Train a Memory Mosaics LM: `python -m apps.mosaics.train config=apps/mosaics/configs/debug.yaml a.b=c`.

This file only tells the shared loop (`lingua.trainer`) how to build the model and count its FLOPs;
data, precision, checkpoints, validation, metrics and distribution are the loop's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from torch import nn

from lingua.args import ConfigError, cli_main
from lingua.mosaics import v2
from lingua.mosaics.lm_base import MosaicsLMBase
from lingua.mosaics.model import MosaicsArgs, MosaicsLM, flops_per_token
from lingua.tokenizer import Tokenizer
from lingua.trainer import ModelSpec, TrainArgs, train


@dataclass
class MosaicsTrainArgs(TrainArgs):
    model: MosaicsArgs = field(default_factory=MosaicsArgs)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model.skip_tokens >= self.data.seq_len:
            raise ConfigError(f"model.skip_tokens={self.model.skip_tokens} leaves no loss in data.seq_len={self.data.seq_len}")


def build_model(args: MosaicsArgs, tokenizer: Tokenizer) -> MosaicsLMBase:
    """The model.version model for `tokenizer` (v2 finds documents from its BOS/EOS ids);
    model.vocab_size=-1 takes its vocabulary rounded up to vocab_multiple."""
    if args.vocab_size == -1:
        padded = -(-tokenizer.n_words // args.vocab_multiple) * args.vocab_multiple
        args = dataclasses.replace(args, vocab_size=padded)
    elif args.vocab_size < tokenizer.n_words:
        raise ConfigError(f"model.vocab_size={args.vocab_size} is smaller than the tokenizer's {tokenizer.n_words} tokens")
    if args.version == 2:
        return v2.MosaicsV2LM(args, (tokenizer.bos_id, tokenizer.eos_id))
    return MosaicsLM(args)


def model_flops_per_token(model: nn.Module, seq_len: int) -> float:
    if isinstance(model, v2.MosaicsV2LM):
        return v2.flops_per_token(model, seq_len)
    assert isinstance(model, MosaicsLM)
    return flops_per_token(model, seq_len)


MODEL_SPEC = ModelSpec(build=build_model, flops_per_token=model_flops_per_token)


def main(cfg: MosaicsTrainArgs) -> int:
    return train(cfg, MODEL_SPEC).exit_code


if __name__ == "__main__":
    raise SystemExit(cli_main(MosaicsTrainArgs, main))
