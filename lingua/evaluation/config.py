"""The evaluation configs: `EvalArgs` (an eval command, and the `eval` section of a training
config) with its `harness` (lm-eval tasks), `validation` (val-shard loss) and public-config
`generator` sections. apps/main/eval.py, apps/mosaics/eval.py and lingua/trainer.py read them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from lingua.args import ConfigError

DEFAULT_TASKS: list[Any] = ["hellaswag", "piqa", {"task": "nq_open", "num_fewshot": 5}]


@dataclass
class HarnessArgs:
    RANGES: ClassVar[dict[str, str]] = {
        "num_fewshot": ">= 0", "limit": "> 0", "batch_size": ">= 1", "max_gen_toks": ">= 1", "bootstrap_iters": ">= 0", "seed": ">= 0",
    }

    # Each entry: a task name (a YAML in task_dirs, else any lm-eval task or group), a path to a task
    # YAML, or {task: name, num_fewshot: k}.
    tasks: list[Any] = field(default_factory=lambda: list(DEFAULT_TASKS))
    task_dirs: list[str] = field(default_factory=lambda: ["configs/tasks"])  # local task YAMLs (relative: to cwd, else the project root)
    num_fewshot: int | None = None  # few-shot examples for tasks whose entry gives none (None: the task's default)
    limit: float | None = None  # documents per task (< 1: a fraction); None: all
    batch_size: int = 8  # sequences per forward pass
    max_gen_toks: int = 128  # new tokens for generation tasks that do not set max_gen_toks
    bootstrap_iters: int = 1000  # bootstrap samples for the stderr of non-mean metrics (0: no stderr)
    log_samples: bool = False  # keep per-document outputs in results.json
    seed: int = 1234  # python/numpy/torch and few-shot sampling seed
    check_hub: bool = True  # probe the hub first when a task needs it, and fail at once if it is unreachable

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ConfigError("harness.tasks is empty; give at least one task, e.g. harness.tasks=[synthetic_mc]")
        for i, spec in enumerate(self.tasks):
            task_spec(spec, f"harness.tasks[{i}]")


@dataclass
class ValidationEvalArgs:
    RANGES: ClassVar[dict[str, str]] = {"max_batches": ">= 1", "batch_size": ">= 1"}

    run: bool = True  # compute loss and perplexity per source on the *.val.jsonl shards
    root_dir: str | None = None  # where the val shards are; None: the checkpoint's data.root_dir
    sources: list[str] = field(default_factory=list)  # sources to evaluate; empty: the checkpoint's data.sources
    max_batches: int | None = 20  # batches per source; None: every val line once
    batch_size: int = 8  # sequences per batch (of the checkpoint's data.seq_len)


@dataclass
class GeneratorCompatArgs:
    """The `generator` section of the public Memory Layers configs' `eval`: EvalArgs reads it into its own keys."""

    RANGES: ClassVar[dict[str, str]] = {"max_gen_len": ">= 1", "max_tokens": "any", "temperature": "any", "top_p": "any", "top_k": "any"}  # no effect but max_gen_len

    dtype: Literal["fp32", "bf16"] | None = None  # sets eval.dtype
    max_gen_len: int | None = None  # sets harness.max_gen_toks (new tokens of generation tasks that give none)
    max_tokens: int | None = None  # accepted for compatibility; no effect (tokens per packed batch there; here harness.batch_size sequences)
    temperature: float | None = None  # accepted for compatibility; no effect (each generation task sets its own sampling, there too)
    top_p: float | None = None  # accepted for compatibility; no effect (as temperature)
    top_k: int | None = None  # accepted for compatibility; no effect (as temperature)


@dataclass
class EvalArgs:
    """An eval command's config, and the `eval` section a training config may carry."""

    RANGES: ClassVar[dict[str, str]] = {"global_step": ">= 0", "seed": ">= 0"}

    name: str = "eval"  # run name (metric records)
    ckpt: str = ""  # run dump_dir, checkpoints root, checkpoint folder, or consolidated folder/file
    ckpt_dir: str = ""  # the same as ckpt (the public lingua name), moved into ckpt
    dump_dir: str = ""  # results go to <dump_dir>/eval/<step>/; empty: the run folder of the checkpoint
    global_step: int | None = None  # the step results are filed under; None: from the checkpoint folder name
    device: Literal["auto", "cpu", "cuda"] = "auto"  # where the model runs
    dtype: Literal["fp32", "bf16"] = "fp32"  # compute dtype (autocast; weights keep their dtype)
    seed: int = 0  # sampling seed for generation tasks that sample
    harness: HarnessArgs = field(default_factory=HarnessArgs)
    validation: ValidationEvalArgs = field(default_factory=ValidationEvalArgs)
    generator: GeneratorCompatArgs | None = None  # read into dtype and harness.max_gen_toks, then cleared

    def __post_init__(self) -> None:
        if self.ckpt_dir:
            if self.ckpt and self.ckpt != self.ckpt_dir:
                raise ConfigError(f"ckpt={self.ckpt!r} and ckpt_dir={self.ckpt_dir!r} name different checkpoints: give one")
            self.ckpt, self.ckpt_dir = self.ckpt_dir, ""
        if self.generator is None:
            return
        self.dtype = self.generator.dtype or self.dtype
        if self.generator.max_gen_len is not None:
            self.harness = dataclasses.replace(self.harness, max_gen_toks=self.generator.max_gen_len)
        self.generator = None


def task_spec(spec: Any, key: str) -> tuple[str, int | None]:
    """(task, num_fewshot) of one harness.tasks entry; ConfigError naming `key` when malformed."""
    if isinstance(spec, str) and spec:
        return spec, None
    if isinstance(spec, dict) and isinstance(spec.get("task"), str) and set(spec) <= {"task", "num_fewshot"}:
        shots = spec.get("num_fewshot")
        if shots is None or (isinstance(shots, int) and shots >= 0):
            return spec["task"], shots
    raise ConfigError(f"{key}={spec!r}: give a task name or {{task: name, num_fewshot: k}} with k >= 0")
