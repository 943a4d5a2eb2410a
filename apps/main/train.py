"""Train the Llama-style LM of apps/main: `python -m apps.main.train config=... a.b=c`.

This file only tells the shared loop (`lingua.trainer`) how to build the model, its parameter
groups (product-key values: own lr, row-sparse updates), its FLOPs and its extra metrics (memory
usage); everything else is the loop's.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from apps.main.transformer import LMTransformer, LMTransformerArgs
from lingua.args import ConfigError, cli_main
from lingua.distributed import local_world_size
from lingua.optim import OptimArgs, ParamGroupSpec
from lingua.product_key import log_metrics, memory_flops_per_token, memory_param_groups
from lingua.product_key.zero_copy import check_host_capacity
from lingua.tokenizer import Tokenizer
from lingua.trainer import ModelSpec, TrainArgs, train
from lingua.transformer import flops_per_token


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


def model_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Dense FLOPs plus the memory rows actually read (never the whole value table)."""
    args = model.args
    dense = flops_per_token(model.dense_param_count(), args.n_layers, args.n_heads * args.resolved_head_dim, seq_len)
    return dense + memory_flops_per_token(model)


def param_groups(model: nn.Module, args: OptimArgs) -> list[ParamGroupSpec]:
    """Memory value tables get their own group (value lr, decay and row-sparse update rule)."""
    return memory_param_groups(model)


def evaluate_during_training(cfg: MainTrainArgs, folder: Path, step: int) -> dict[str, float]:
    """The `eval` section run on a checkpoint the loop just saved: in this process, or, inside a
    SLURM job, as its own job (which appends its results to <dump_dir>/metrics.eval.jsonl)."""
    from apps.main.eval import evaluate_checkpoint, submit_evaluation  # eval imports this module

    assert cfg.eval is not None
    args = dataclasses.replace(cfg.eval, dump_dir=cfg.dump_dir)
    if "SLURM_JOB_ID" in os.environ:
        gpus = {"gpus_per_node": 1} if torch.cuda.is_available() else {}
        submit_evaluation(folder, args, step, folder=Path(cfg.dump_dir) / "eval" / "slurm", timeout_min=60, tasks_per_node=1, **gpus)
        return {}
    return evaluate_checkpoint(folder, args, step)


MODEL_SPEC = ModelSpec(
    build=build_model,
    flops_per_token=model_flops_per_token,
    param_groups=param_groups,
    log_metrics=log_metrics,
    evaluate=evaluate_during_training,
)


def check_host_memory(cfg: MainTrainArgs) -> None:
    """Zero-copy values: the node must hold the tables and their optimizer state (one copy per node)."""
    needed = cfg.model.productkey_args.host_bytes(cfg.model.dim, training=True)
    if needed:
        shared = local_world_size() > 1  # the node's ranks share one table in /dev/shm
        check_host_capacity(needed, "model.productkey_args.zero_copy=true (value tables and their optimizer state)", shared)


def main(cfg: MainTrainArgs) -> int:
    check_host_memory(cfg)
    return train(cfg, MODEL_SPEC).exit_code


if __name__ == "__main__":
    raise SystemExit(cli_main(MainTrainArgs, main))
