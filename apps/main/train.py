"""Train the Llama-style LM of apps/main: `python -m apps.main.train config=... a.b=c`.

This file only tells the shared loop (`lingua.trainer`) how to build the model, its parameter
groups (product-key values: own lr, row-sparse updates), its FLOPs and its extra metrics (memory
usage); everything else is the loop's. The config class and the builder are `apps/main/model.py`'s
(re-exported here), so generate and eval load checkpoints without importing this module.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from torch import nn

from apps.main.eval import evaluate_checkpoint, submit_evaluation
from apps.main.model import MainTrainArgs, build_model
from lingua.args import cli_main
from lingua.distributed import local_world_size
from lingua.optim import OptimArgs, ParamGroupSpec
from lingua.product_key import log_metrics, memory_flops_per_token, memory_param_groups
from lingua.product_key.zero_copy import check_host_capacity
from lingua.trainer import ModelSpec, train
from lingua.transformer import flops_per_token


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
    """Zero-copy values: the node must hold the tables and their optimizer state, one copy mapped by
    all of the node's ranks (the trainer materializes them with share_with_node=True)."""
    needed = cfg.model.productkey_args.host_bytes(cfg.model.dim, training=True)
    if needed:
        what = "model.productkey_args.zero_copy=true (value tables and their optimizer state)"
        check_host_capacity(needed, what, sharing_ranks=local_world_size())


def main(cfg: MainTrainArgs) -> int:
    check_host_memory(cfg)
    return train(cfg, MODEL_SPEC).exit_code


if __name__ == "__main__":
    raise SystemExit(cli_main(MainTrainArgs, main))
