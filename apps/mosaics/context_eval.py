"""Evaluate what long-context memories are for, on a checkpoint of either app (dense transformer,
Memory Mosaics v1 or v2): context extrapolation and the per-document in-context test.

    python -m apps.mosaics.context_eval ckpt=runs/mosaics_debug                  # writes <ckpt>/context_eval/
    python -m apps.mosaics.context_eval ckpt=runs/debug 'extrapolation.factors=[1,2,4,8]' in_context=null

Extrapolation: validation loss per position bucket in windows of 1x, 2x, 4x the training length
(lingua.evaluation.extrapolation). In-context: synthetic_mc accuracy against the number of answered questions
of the same story before the question (lingua.evaluation.in_context). The app is found from the checkpoint's
config (apps.registry); a dense transformer's RoPE tables are lengthened to the longest window,
same frequencies, no interpolation, so what it does past its training length is what it learned.
Writes context_eval.json, extrapolation_<source>.png and in_context.png.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from apps.main.eval import model_logits_fn
from apps.registry import app_of_checkpoint
from lingua.args import cli_main
from lingua.checkpoint import load_trained_model
from lingua.evaluation.extrapolation import ExtrapolationArgs, extrapolation, plot_buckets
from lingua.evaluation.in_context import InContextArgs, build_items, in_context_accuracy, plot_in_context, read_stories, sequence_lengths
from lingua.tokenizer import build_tokenizer

logger = logging.getLogger(__name__)

RESULT_FILE = "context_eval.json"


@dataclass
class ContextEvalArgs:
    """What to evaluate and how; `ContextEvalCommand` adds the checkpoint."""

    extrapolation: ExtrapolationArgs | None = field(default_factory=ExtrapolationArgs)  # null: skip
    in_context: InContextArgs | None = field(default_factory=InContextArgs)  # null: skip
    root_dir: str | None = None  # validation data folder; None: the training config's data.root_dir
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["fp32", "bf16"] = "fp32"  # compute dtype (bf16: autocast)


@dataclass
class ContextEvalCommand(ContextEvalArgs):
    ckpt: str = "???"  # run dump_dir, checkpoint folder, or consolidated folder/file
    out_dir: str = ""  # where the JSON and plots go; empty: <ckpt>/context_eval


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """All parameters, and those outside token-embedding tables (a tied head is the embedding)."""
    total = sum(p.numel() for p in model.parameters())
    embeddings = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    return {"params": total, "non_embedding_params": total - embeddings}


@torch.no_grad()
def evaluate(ckpt: str, args: ContextEvalArgs, out_dir: Path) -> dict[str, Any]:
    """Run the configured evaluations on `ckpt`; write the JSON and plots into `out_dir`."""
    app, train_cfg = app_of_checkpoint(ckpt)
    train_len = train_cfg.data.seq_len
    tokenizer = build_tokenizer(train_cfg.data.tokenizer.name, train_cfg.data.tokenizer.path)
    items = build_items(read_stories(args.in_context.task_file), args.in_context) if args.in_context else []
    item_lengths = sequence_lengths(items, tokenizer) if items else [0]
    longest = max(train_len * args.extrapolation.factors[-1] if args.extrapolation else 0, max(item_lengths))
    overrides = app.longer_context(train_cfg.model, longest)
    if overrides:
        logger.info("%s model: %s for windows of %d tokens (trained on %d; no interpolation)", app.name, overrides, longest, train_len)
    model, _, _ = load_trained_model(ckpt, app.config_class, app.build, args.device, model_overrides=overrides)
    device = next(model.parameters()).device
    logits_fn = model_logits_fn(model, args.dtype)
    result: dict[str, Any] = {"ckpt": ckpt, "app": app.name, "train_seq_len": train_len, "length_overrides": overrides, **parameter_counts(model)}
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.extrapolation:
        data = dataclasses.replace(train_cfg.data, root_dir=args.root_dir or train_cfg.data.root_dir)
        result["extrapolation"] = extrapolation(logits_fn, data, args.extrapolation, device)
        for source, lengths in result["extrapolation"]["sources"].items():
            curves = {f"{x['factor']}x ({x['seq_len']} tokens)": x["buckets"] for x in lengths}
            plot_buckets(curves, {train_len}, out_dir / f"extrapolation_{source}.png", f"{Path(ckpt).name} ({app.name}): {source}")
            logger.info("%s extrapolation: %s", source, ", ".join(f"{x['factor']}x loss {x['loss']:.4f}" for x in lengths))
    if args.in_context:
        result["in_context"] = in_context_accuracy(logits_fn, tokenizer, items, args.in_context, device)
        result["in_context"].update(
            task_file=args.in_context.task_file,
            longest_sequence=max(item_lengths),
            longer_than_training=float(np.mean([n > train_len for n in item_lengths])),  # share of sequences past the training length
        )
        plot_in_context({Path(ckpt).name: result["in_context"]}, out_dir / "in_context.png", "per-document in-context test (synthetic_mc)")
        logger.info("in-context: %s", ", ".join(f"{s['shots']} shots acc_norm {s['acc_norm']:.3f}" for s in result["in_context"]["shots"]))
    (out_dir / RESULT_FILE).write_text(json.dumps(result, indent=1))
    logger.info("wrote %s", out_dir / RESULT_FILE)
    return result


def default_out_dir(ckpt: str) -> Path:
    """<ckpt>/context_eval (beside the file for a consolidated .pth)."""
    path = Path(ckpt)
    return (path if path.is_dir() else path.parent) / "context_eval"


def main(args: ContextEvalCommand) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return evaluate(args.ckpt, args, Path(args.out_dir) if args.out_dir else default_out_dir(args.ckpt))


if __name__ == "__main__":
    cli_main(ContextEvalCommand, main)
