"""Evaluate an apps/main checkpoint: lm-eval tasks and validation loss/perplexity per source.

    python -m apps.main.eval config=apps/main/configs/eval.yaml ckpt=runs/debug
    python -m apps.main.eval config=apps/main/configs/eval.yaml ckpt=runs/debug harness.tasks=[synthetic_mc,synthetic_qa]

`ckpt_dir=` is accepted for `ckpt=` (the public lingua name). Results go to
<dump_dir>/eval/<step>/results.json and results.md, and one line per evaluation to
<dump_dir>/metrics.eval.jsonl. `evaluate_checkpoint` is what the trainer calls every
`checkpoint.eval.every` steps (inline, or in a submitit job through `submit_evaluation`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from apps.main.generate import Generator, GeneratorArgs, load_model_and_tokenizer
from apps.main.transformer import LMTransformer
from lingua.args import ConfigError, cli_main, to_dict
from lingua.checkpoint import STEP_DIR, resolve_checkpoint
from lingua.data import DataArgs
from lingua.distributed import autocast_dtype
from lingua.evaluation import (
    EvalArgs,
    GenerateFn,
    check_tasks_available,
    GenerationOptions,
    LinguaLM,
    LogitsFn,
    harness_metrics,
    run_harness,
    validation_metrics,
    write_results,
)
from lingua.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.eval.jsonl"


def model_logits_fn(model: LMTransformer, dtype: str = "fp32") -> LogitsFn:
    """tokens [B, S] -> logits [B, S, V] of the model in eval mode, under autocast for bf16."""
    autocast = autocast_dtype(dtype)
    device_type = next(model.parameters()).device.type

    @torch.no_grad()
    def logits(tokens: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type, dtype=autocast or torch.float32, enabled=autocast is not None):
            return model(tokens)

    return logits


def model_generate_fn(model: LMTransformer, tokenizer: Tokenizer, dtype: str = "fp32", seed: int = 0) -> GenerateFn:
    """Generation with the KV-cache `Generator` of apps/main."""

    def generate(prompts: list[str], options: GenerationOptions) -> list[str]:
        args = GeneratorArgs(
            max_gen_len=options.max_new_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            top_k=options.top_k,
            until=list(options.until),
            seed=seed,
            dtype="bf16" if dtype == "bf16" else "fp32",
        )
        return Generator(model, tokenizer, args).generate(prompts)

    return generate


def checkpoint_step_and_run(ckpt: str) -> tuple[int, Path]:
    """(training step, run folder) of a checkpoint path: the step is the name of the first
    <10 digits> folder on the path (0 if none); the run folder holds its `checkpoints` root."""
    weights, _ = resolve_checkpoint(ckpt)
    folder = weights if weights.is_dir() else weights.parent
    for candidate in (folder, *folder.parents):
        if STEP_DIR.match(candidate.name):
            root = candidate.parent
            return int(candidate.name), root.parent if root.name == "checkpoints" else root
    return 0, folder


def evaluate_model(
    model: LMTransformer, tokenizer: Tokenizer, data: DataArgs, args: EvalArgs, step: int, dump_dir: Path, extra: dict[str, Any] | None = None
) -> dict[str, float]:
    """Run the configured harness tasks and validation on a loaded model; write the result files
    and append the flat metrics to <dump_dir>/metrics.eval.jsonl; return those metrics."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits_fn = model_logits_fn(model, args.dtype)
    start = time.perf_counter()
    try:
        validation: dict[str, float] = {}
        if args.validation.run:
            if args.validation.root_dir is not None:
                data = dataclasses.replace(data, root_dir=args.validation.root_dir)
            validation = validation_metrics(logits_fn, data, args.validation, device)
        lm = LinguaLM(
            tokenizer,
            logits_fn,
            max_length=model.args.max_seqlen,
            device=device,
            generate_fn=model_generate_fn(model, tokenizer, args.dtype, args.seed),
            batch_size=args.harness.batch_size,
            max_gen_toks=args.harness.max_gen_toks,
        )
        results = run_harness(lm, args.harness)
    finally:
        model.train(was_training)
    out_dir = dump_dir / "eval" / f"{step:010d}"
    write_results(out_dir, step, results, validation, {"name": args.name, **(extra or {}), "eval_config": to_dict(args)})
    metrics = {**harness_metrics(results), **validation}
    with open(dump_dir / METRICS_FILE, "a") as file:
        file.write(json.dumps({"step": step, "name": args.name, "eval_seconds": time.perf_counter() - start, **metrics}) + "\n")
    logger.info("step %d eval: %s", step, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    logger.info("results: %s and %s; metrics line appended to %s", out_dir / "results.json", out_dir / "results.md", dump_dir / METRICS_FILE)
    return metrics


def evaluate_checkpoint(ckpt: str | Path, args: EvalArgs, step: int | None = None) -> dict[str, float]:
    """Load a checkpoint (run dump_dir, checkpoint folder, DCP or consolidated) and evaluate it.

    The step is `step`, else args.global_step, else the checkpoint folder's; results go to
    args.dump_dir, else the checkpoint's run folder."""
    ckpt_step, run_dir = checkpoint_step_and_run(str(ckpt))
    check_tasks_available(args.harness)
    step = step if step is not None else args.global_step if args.global_step is not None else ckpt_step
    dump_dir = Path(args.dump_dir) if args.dump_dir else run_dir
    model, tokenizer, train_cfg = load_model_and_tokenizer(str(ckpt), args.device)
    return evaluate_model(model, tokenizer, train_cfg.data, args, step, dump_dir, {"ckpt": str(ckpt)})


def submit_evaluation(ckpt: str | Path, args: EvalArgs, step: int, folder: str | Path, **executor_params: Any) -> Any:
    """Run `evaluate_checkpoint` as a submitit job (SLURM when available, else a local process);
    `executor_params` go to the executor (e.g. slurm_partition, gpus_per_node, timeout_min).
    Returns the job; its result is the metrics dict, also appended to metrics.eval.jsonl."""
    import submitit

    executor = submitit.AutoExecutor(folder=str(folder))
    executor.update_parameters(name=f"eval_{args.name}_{step}", **executor_params)
    return executor.submit(evaluate_checkpoint, str(ckpt), args, step)


def main(args: EvalArgs) -> dict[str, float]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.ckpt:
        raise ConfigError("ckpt is not set: pass ckpt=<run dump_dir or checkpoint folder>")
    metrics = evaluate_checkpoint(args.ckpt, args)
    for key, value in metrics.items():
        print(f"{key}: {value:.4f}")
    return metrics


if __name__ == "__main__":
    cli_main(EvalArgs, main)
