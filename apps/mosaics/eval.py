"""Evaluate an apps/mosaics checkpoint: validation loss and loss by token position.

    python -m apps.mosaics.eval ckpt=runs/mosaics_debug            # writes <ckpt>/eval/ (or out_dir=...)

    python -m apps.mosaics.eval ckpt=runs/mosaics_debug 'harness={tasks: [synthetic_mc, synthetic_qa]}'

Loss by position is the in-context learning curve: the mean loss of the prediction made at each
position of the packed validation windows (lingua.evaluation.extrapolation; apps.mosaics.context_eval takes it
to 2x and 4x the training length). Writes eval.json and loss_by_position.png (matplotlib Agg).
With a `harness` section, lm-eval tasks run through the shared adapter (lingua.evaluation) on
the model's logits, and their results go into eval.json too.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch

from apps.main.eval import model_logits_fn
from apps.mosaics.generate import load_model_and_tokenizer
from lingua.args import cli_main
from lingua.data import iter_validation_batches
from lingua.evaluation import HarnessArgs, LinguaLM, check_tasks_available, generate_by_recompute, harness_metrics, run_harness
from lingua.evaluation.extrapolation import position_losses
from lingua.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class EvalArgs:
    RANGES: ClassVar[dict[str, str]] = {"seq_len": ">= 2", "batch_size": ">= 1", "max_batches": "any", "max_length": ">= 1"}

    ckpt: str = "???"  # run dump_dir, checkpoint folder, or consolidated folder/file
    out_dir: str = ""  # where eval.json and the plot go; empty: <ckpt>/eval
    sources: list[str] | None = None  # validation sources; None: those of the training config
    root_dir: str | None = None  # data folder; None: the training config's data.root_dir
    seq_len: int | None = None  # window length; None: the training config's (longer shows more of the curve)
    batch_size: int = 8  # windows per batch
    max_batches: int = 50  # batches per source (<= 0: every window of the val files)
    dtype: Literal["fp32", "bf16"] = "fp32"  # compute dtype (bf16: autocast)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    harness: HarnessArgs | None = None  # lm-eval tasks to run as well (None: loss curves only)
    max_length: int = 2048  # longest sequence the harness feeds the model (the model has no length limit)


def plot_curves(curves: dict[str, np.ndarray], path: Path, title: str) -> None:
    from lingua.plot import plt, save_figure

    figure, axes = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        width = max(1, len(curve) // 32)  # moving average: single positions are noisy
        smooth = np.convolve(curve, np.ones(width) / width, mode="valid")
        line = axes.plot(np.arange(len(curve)), curve, alpha=0.3)[0]
        axes.plot(np.arange(len(smooth)) + (width - 1) / 2, smooth, color=line.get_color(), label=f"{name} (mean of {width})")
    save_figure(figure, axes, path, "token position in the window", "validation loss", title)


def _harness_model(model: torch.nn.Module, tokenizer: Tokenizer, args: EvalArgs, device: torch.device) -> LinguaLM:
    """The lm-eval adapter over the model's logits (right-padded batches keep leaky states exact)."""
    logits = model_logits_fn(model, args.dtype)
    generate = generate_by_recompute(logits, tokenizer, args.max_length, device, seed=args.harness.seed)
    return LinguaLM(tokenizer, logits, args.max_length, device, generate, args.harness.batch_size, args.harness.max_gen_toks)


def main(args: EvalArgs) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.harness is not None:
        check_tasks_available(args.harness)  # before loading anything: hub tasks offline fail at once
    model, tokenizer, cfg = load_model_and_tokenizer(args.ckpt, args.device)
    device = next(model.parameters()).device
    data = replace(cfg.data, root_dir=args.root_dir or cfg.data.root_dir, seq_len=args.seq_len or cfg.data.seq_len)
    sources = args.sources if args.sources is not None else sorted(cfg.data.sources)
    max_batches = args.max_batches if args.max_batches > 0 else None
    curves, result = {}, {"ckpt": args.ckpt, "seq_len": data.seq_len, "sources": {}}
    for source in sources:
        batches = iter_validation_batches(data, source, args.batch_size, max_batches)
        curve, windows = position_losses(model_logits_fn(model, args.dtype), batches, device)
        curves[source] = curve
        result["sources"][source] = {"loss": float(curve.mean()), "windows": windows, "loss_by_position": curve.tolist()}
        logger.info("%s: val loss %.4f over %d windows (first position %.3f, last %.3f)", source, curve.mean(), windows, curve[0], curve[-1])
    result["val_loss"] = float(np.mean([s["loss"] for s in result["sources"].values()]))
    if args.harness is not None:
        result["harness"] = harness_metrics(run_harness(_harness_model(model, tokenizer, args, device), args.harness))
        logger.info("harness: %s", " ".join(f"{k}={v:.4f}" for k, v in result["harness"].items()))
    out = Path(args.out_dir) if args.out_dir else Path(args.ckpt) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    plot_curves(curves, out / "loss_by_position.png", f"loss by position: {Path(args.ckpt).name}")
    logger.info("wrote %s and %s", out / "eval.json", out / "loss_by_position.png")
    return result


if __name__ == "__main__":
    cli_main(EvalArgs, main)
