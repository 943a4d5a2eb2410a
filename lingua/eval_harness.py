"""Evaluation both apps share: the lm-eval `LM` adapter, task resolution, validation loss, result files.

The adapter (`LinguaLM`) needs only a tokenizer and a `logits(tokens [B, S]) -> [B, S, V]` function
(plus, optionally, a generate function), so any causal model plugs in. `run_harness` runs lm-eval on
local task YAMLs (configs/tasks) or hub task names; `validation_metrics` gives loss and perplexity
per source on the val shards; `write_results` writes results.json and results.md. Apps own loading.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Sequence

import torch
import torch.nn.functional as F
import yaml
from lm_eval.api.model import LM

from lingua.args import ConfigError, InputError
from lingua.data import DataArgs, iter_validation_batches
from lingua.generation import cut_at_stops
from lingua.hub import hub_unreachable_reason
from lingua.metrics import format_duration
from lingua.precision import accumulation_dtype
from lingua.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # tokens [B, S] (long, on the model's device) -> logits [B, S, V]
LOCAL_TASKS_DIR = Path(__file__).resolve().parents[1] / "configs" / "tasks"  # the project's offline tasks
OFFLINE_TASKS = ("synthetic_mc", "synthetic_qa")
DEFAULT_TASKS: list[Any] = ["hellaswag", "piqa", {"task": "nq_open", "num_fewshot": 5}]


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------


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
            _task_spec(spec, f"harness.tasks[{i}]")


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


def _task_spec(spec: Any, key: str) -> tuple[str, int | None]:
    """(task, num_fewshot) of one harness.tasks entry; ConfigError naming `key` when malformed."""
    if isinstance(spec, str) and spec:
        return spec, None
    if isinstance(spec, dict) and isinstance(spec.get("task"), str) and set(spec) <= {"task", "num_fewshot"}:
        shots = spec.get("num_fewshot")
        if shots is None or (isinstance(shots, int) and shots >= 0):
            return spec["task"], shots
    raise ConfigError(f"{key}={spec!r}: give a task name or {{task: name, num_fewshot: k}} with k >= 0")


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------


def rolling_windows(n_tokens: int, max_length: int) -> list[tuple[int, int, int]]:
    """Windows over s = [BOS] + text (n_tokens text tokens) that score every text token exactly once.

    Each (start, first, end) feeds s[start:end-1] (at most max_length tokens) and scores
    s[first:end]; every window but the first has a full max_length of context."""
    windows = []
    first = 1
    while first <= n_tokens:
        end = min(first + max_length, n_tokens + 1)
        windows.append((max(0, end - 1 - max_length), first, end))
        first = end
    return windows


class Progress:
    """A log line every `every_s` seconds while requests are answered: done / total and the time
    left at the pace so far (`every_s=0`: after every batch), and one when all are done."""

    def __init__(self, what: str, total: int, every_s: float = 10.0) -> None:
        self.what, self.total, self.every_s = what, total, every_s
        self.done = 0
        self._start = self._last = time.perf_counter()

    def advance(self, n: int) -> None:
        if n == 0:
            return
        self.done += n
        now = time.perf_counter()
        if self.done < self.total and now - self._last < self.every_s:
            return
        self._last = now
        eta = (now - self._start) / self.done * (self.total - self.done) if self.done else float("nan")
        left = f", eta {format_duration(eta)}" if self.done < self.total else f", took {format_duration(now - self._start)}"
        logger.info("%s: %d/%d done%s", self.what, self.done, self.total, left)


@torch.no_grad()
def score_sequences(
    logits_fn: LogitsFn,
    sequences: Sequence[Sequence[int]],
    n_scored: Sequence[int],
    batch_size: int,
    device: torch.device,
    progress: Progress | None = None,
) -> list[tuple[float, bool]]:
    """For each token sequence, the summed log-probability of its last n_scored tokens given all
    tokens before them, and whether each of them is the argmax. Sequences are sorted by length
    and right-padded into batches (causal attention: padding never reaches a real token, and rows
    never see each other); results come back in input order. `progress` counts the sequences."""
    results: list[tuple[float, bool]] = [(0.0, True)] * len(sequences)
    order = sorted((i for i in range(len(sequences)) if n_scored[i] > 0), key=lambda i: -len(sequences[i]))
    if progress is not None:
        progress.advance(len(sequences) - len(order))  # sequences with nothing to score
    for b in range(0, len(order), batch_size):
        rows = order[b : b + batch_size]
        width = len(sequences[rows[0]]) - 1
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        row_idx, pos_idx, targets = [], [], []
        for r, i in enumerate(rows):
            seq, n = sequences[i], n_scored[i]
            if not 0 < n < len(seq):
                raise ValueError(f"sequence {i}: cannot score {n} of its {len(seq)} tokens (the first token has no context)")
            tokens[r, : len(seq) - 1] = torch.tensor(seq[:-1])
            row_idx += [r] * n
            pos_idx += range(len(seq) - 1 - n, len(seq) - 1)  # logits at position p predict token p + 1
            targets += seq[len(seq) - n :]
        logits = logits_fn(tokens.to(device))
        rows_t, pos_t = torch.tensor(row_idx, device=logits.device), torch.tensor(pos_idx, device=logits.device)
        selected = logits[rows_t, pos_t]
        logprobs_NV = selected.to(accumulation_dtype(selected.dtype)).log_softmax(dim=-1)
        target_N = torch.tensor(targets, device=logits.device)
        token_lp = logprobs_NV.gather(1, target_N[:, None]).squeeze(1).double().cpu()
        greedy = (logprobs_NV.argmax(dim=-1) == target_N).cpu()
        row_of = torch.tensor(row_idx)
        sums = torch.zeros(len(rows), dtype=torch.float64).index_add_(0, row_of, token_lp)
        misses = torch.zeros(len(rows), dtype=torch.long).index_add_(0, row_of, (~greedy).long())
        for r, i in enumerate(rows):
            results[i] = (float(sums[r]), bool(misses[r] == 0))
        if progress is not None:
            progress.advance(len(rows))
    return results


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationOptions:
    """What one group of generate_until requests asks for."""

    until: tuple[str, ...] = ()  # stop strings (EOS always stops)
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None
    top_k: int | None = None


GenerateFn = Callable[[list[str], GenerationOptions], list[str]]  # prompts -> continuations


def generate_by_recompute(logits_fn: LogitsFn, tokenizer: Tokenizer, max_length: int, device: torch.device, seed: int = 0) -> GenerateFn:
    """A generate function for any model with a logits function (no KV cache: each step recomputes
    the last max_length tokens of every row): greedy at options.temperature 0, sampled above it."""

    @torch.no_grad()
    def generate(prompts: list[str], options: GenerationOptions) -> list[str]:
        rows = [tokenizer.encode(p, add_bos=True) for p in prompts]
        new: list[list[int]] = [[] for _ in prompts]
        live = list(range(len(prompts)))
        rng = torch.Generator().manual_seed(seed)
        for _ in range(options.max_new_tokens):
            if not live:
                break
            inputs = [(rows[i] + new[i])[-max_length:] for i in live]
            tokens = torch.zeros(len(live), max(len(t) for t in inputs), dtype=torch.long)
            for r, t in enumerate(inputs):
                tokens[r, : len(t)] = torch.tensor(t)
            logits = logits_fn(tokens.to(device))
            last = logits[torch.arange(len(live)), torch.tensor([len(t) - 1 for t in inputs])].float().cpu()
            if options.temperature > 0:
                next_tokens = torch.multinomial(torch.softmax(last / options.temperature, -1), 1, generator=rng)[:, 0]
            else:
                next_tokens = last.argmax(dim=-1)
            still = []
            for i, token in zip(live, next_tokens.tolist()):
                if token == tokenizer.eos_id:
                    continue
                new[i].append(token)
                if not any(s in tokenizer.decode(new[i]) for s in options.until):
                    still.append(i)
            live = still
        return [tokenizer.decode(t) for t in new]

    return generate


# ----------------------------------------------------------------------------------------------
# The lm-eval adapter
# ----------------------------------------------------------------------------------------------


class LinguaLM(LM):
    """lm-eval model over a tokenizer and a logits function.

    loglikelihood scores every continuation token (the first included) given BOS + context,
    keeping the last max_length + 1 tokens when the pair is longer; loglikelihood_rolling scores
    every token of a text once, in windows of max_length; generate_until calls `generate_fn`
    (default: `generate_by_recompute`) per group of equal generation options. Requests are batched by
    length and answered in request order. One process: lm-eval's rank is 0, world size 1.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        logits_fn: LogitsFn,
        max_length: int,
        device: torch.device | str = "cpu",
        generate_fn: GenerateFn | None = None,
        batch_size: int = 8,
        max_gen_toks: int = 128,
        progress_every_s: float = 10.0,
    ) -> None:
        super().__init__()
        if max_length < 1 or batch_size < 1 or max_gen_toks < 1:
            raise ValueError(f"max_length={max_length}, batch_size={batch_size}, max_gen_toks={max_gen_toks} must all be >= 1")
        self.tokenizer = tokenizer
        self.logits_fn = logits_fn
        self.max_length = max_length
        self._device = torch.device(device)
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks
        self.progress_every_s = progress_every_s  # how often a progress line is logged
        self.generate_fn = generate_fn or generate_by_recompute(logits_fn, tokenizer, max_length, self._device)

    def _pair_tokens(self, context: str, continuation: str) -> tuple[list[int], int]:
        """BOS + context + continuation tokens (left-truncated to max_length + 1) and the number of
        continuation tokens. Trailing spaces of the context move to the continuation, and the
        continuation's tokens are those of the joined text after the context's (lm-eval's convention)."""
        spaces = len(context) - len(context.rstrip(" "))
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        context_tokens = self.tokenizer.encode(context, add_bos=True)
        whole = self.tokenizer.encode(context + continuation, add_bos=True)
        continuation_tokens = whole[len(context_tokens) :]
        if len(continuation_tokens) > self.max_length:
            raise ValueError(
                f"a continuation of {len(continuation_tokens)} tokens does not fit the model's {self.max_length} positions"
            )
        sequence = (context_tokens + continuation_tokens)[-(self.max_length + 1) :]
        return sequence, len(continuation_tokens)

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        pairs = [self._pair_tokens(*request.args) for request in requests]
        progress = Progress("loglikelihood requests", len(pairs), self.progress_every_s)
        results = score_sequences(self.logits_fn, [p[0] for p in pairs], [p[1] for p in pairs], self.batch_size, self._device, progress)
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        sequences, n_scored, owner = [], [], []
        for k, request in enumerate(requests):
            tokens = self.tokenizer.encode(request.args[0], add_bos=True)
            for start, first, end in rolling_windows(len(tokens) - 1, self.max_length):
                sequences.append(tokens[start:end])
                n_scored.append(end - first)
                owner.append(k)
        totals = [0.0] * len(requests)
        progress = Progress(f"loglikelihood_rolling windows ({len(requests)} texts)", len(sequences), self.progress_every_s)
        for k, (logprob, _) in zip(owner, score_sequences(self.logits_fn, sequences, n_scored, self.batch_size, self._device, progress)):
            totals[k] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def _options(self, gen_kwargs: dict[str, Any]) -> GenerationOptions:
        until = gen_kwargs.get("until") or ()
        until = (until,) if isinstance(until, str) else tuple(until)
        sample = bool(gen_kwargs.get("do_sample", False))  # lm-eval's tasks decode greedily unless they say so
        return GenerationOptions(
            until=until,
            max_new_tokens=min(int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)), self.max_length - 1),
            temperature=float(gen_kwargs.get("temperature", 1.0)) if sample else 0.0,
            top_p=gen_kwargs.get("top_p"),
            top_k=gen_kwargs.get("top_k"),
        )

    def generate_until(self, requests: list[Any]) -> list[str]:
        groups: dict[GenerationOptions, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            groups[self._options(request.args[1])].append(i)
        outputs = [""] * len(requests)
        progress = Progress("generate_until requests", len(requests), self.progress_every_s)
        for options, members in groups.items():
            members = sorted(members, key=lambda i: -len(requests[i].args[0]))
            for b in range(0, len(members), self.batch_size):
                batch = members[b : b + self.batch_size]
                texts = self.generate_fn([requests[i].args[0] for i in batch], options)
                for i, text in zip(batch, texts):
                    outputs[i] = cut_at_stops(text, options.until)
                    self.cache_hook.add_partial("generate_until", requests[i].args, outputs[i])
                progress.advance(len(batch))
        return outputs


# ----------------------------------------------------------------------------------------------
# Tasks and the harness run
# ----------------------------------------------------------------------------------------------


def _task_dirs(dirs: Sequence[str]) -> list[Path]:
    """Task folders; a relative one is taken from the current directory, else from the project root."""
    found = []
    for d in dirs:
        path = Path(d)
        if not path.is_absolute() and not path.is_dir():
            path = LOCAL_TASKS_DIR.parents[1] / d
        found.append(path)
    return found


def find_local_task(name: str, dirs: Sequence[str]) -> Path | None:
    """The YAML file of a local task: a path to a .yaml file, or <name>.yaml in one of `dirs`."""
    if name.endswith((".yaml", ".yml")):
        path = Path(name)
        if not path.is_file():
            raise InputError(f"task file '{name}' does not exist")
        return path
    for folder in _task_dirs(dirs):
        if (folder / f"{name}.yaml").is_file():
            return folder / f"{name}.yaml"
    return None


def _absolute_files(value: Any, base: Path) -> Any:
    if isinstance(value, str):
        return value if "://" in value or Path(value).is_absolute() else str((base / value).resolve())
    if isinstance(value, list):
        return [_absolute_files(v, base) for v in value]
    if isinstance(value, dict):
        return {k: _absolute_files(v, base) for k, v in value.items()}
    return value


def local_task_config(path: Path, cache_dir: Path) -> dict[str, Any]:
    """A local task YAML as an inline lm-eval config: data_files made absolute (relative ones are
    relative to the YAML's folder) and the dataset cache kept in `cache_dir`."""
    cfg = yaml.safe_load(path.read_text())
    if not isinstance(cfg, dict) or "task" not in cfg:
        raise InputError(f"task file '{path}' must be a mapping with a 'task' key")
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    if "data_files" in kwargs:
        kwargs["data_files"] = _absolute_files(kwargs["data_files"], path.parent)
    kwargs.setdefault("cache_dir", str(cache_dir))
    return {**cfg, "dataset_kwargs": kwargs}


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def _check_hub(hub_tasks: list[str]) -> None:
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        return  # the user says the datasets are cached
    reason = hub_unreachable_reason(_hub_endpoint())
    if reason is not None:
        raise InputError(
            f"task(s) {', '.join(hub_tasks)} download their data from {_hub_endpoint()}, which is unreachable ({reason}). "
            f"Offline, evaluate the local tasks instead: harness.tasks=[{','.join(OFFLINE_TASKS)}] (configs/tasks); "
            "if the datasets are already in the Hugging Face cache, set HF_DATASETS_OFFLINE=1"
        )


def check_tasks_available(args: HarnessArgs) -> None:
    """Fail at once (before a model is loaded) when a task needs the hub and the hub is unreachable."""
    specs = [_task_spec(spec, f"harness.tasks[{i}]")[0] for i, spec in enumerate(args.tasks)]
    hub = [name for name in specs if find_local_task(name, args.task_dirs) is None]
    if hub and args.check_hub:
        _check_hub(hub)


def load_tasks(args: HarnessArgs, cache_dir: Path) -> tuple[list[Any], Any]:
    """(tasks and groups for lm-eval's simple_evaluate, their TaskManager), with num_fewshot set per
    task (its entry's, else harness.num_fewshot, else the task's own)."""
    from lm_eval.tasks import TaskManager

    specs = [_task_spec(spec, f"harness.tasks[{i}]") for i, spec in enumerate(args.tasks)]
    local = {name: find_local_task(name, args.task_dirs) for name, _ in specs}
    hub = [name for name, path in local.items() if path is None]
    check_tasks_available(args)
    manager = TaskManager(include_defaults=bool(hub))  # indexing lm-eval's own tasks takes seconds: only when needed
    items: list[Any] = []
    for name, shots in specs:
        path = local[name]
        try:
            loaded = manager.load([local_task_config(path, cache_dir) if path else name])
        except KeyError:
            raise InputError(
                f"harness.tasks: '{name}' is neither a local task ({', '.join(str(d) for d in _task_dirs(args.task_dirs))}) "
                "nor an lm-eval task name"
            ) from None
        shots = shots if shots is not None else args.num_fewshot
        if shots is not None:
            for task in loaded["tasks"].values():
                task.set_config(key="num_fewshot", value=shots)
        children = {c for kids in loaded.get("group_map", {}).values() for c in kids}
        roots = [g for g_name, g in loaded.get("groups", {}).items() if g_name not in children]
        items += roots or list(loaded["tasks"].values())
    return items, manager


def run_harness(lm: LM, args: HarnessArgs) -> dict[str, Any]:
    """lm-eval's results for the configured tasks (the dict simple_evaluate returns)."""
    from lm_eval.evaluator import simple_evaluate

    with tempfile.TemporaryDirectory(prefix="lingua-eval-cache-") as cache_dir:
        tasks, manager = load_tasks(args, Path(cache_dir))
        limit = args.limit if args.limit is None or args.limit < 1 else int(args.limit)
        results = simple_evaluate(
            model=lm,
            tasks=tasks,
            task_manager=manager,
            limit=limit,
            bootstrap_iters=args.bootstrap_iters,
            log_samples=args.log_samples,
            random_seed=args.seed,
            numpy_random_seed=args.seed,
            torch_random_seed=args.seed,
            fewshot_random_seed=args.seed,
        )
    if results is None:
        raise RuntimeError("lm-eval returned no results")
    return results


def harness_metrics(results: dict[str, Any]) -> dict[str, float]:
    """Flat metrics of lm-eval results: eval/<task>/<metric>[/<filter>] -> value."""
    flat = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            suffix = "" if filter_name == "none" else f"/{filter_name}"
            flat[f"eval/{task}/{metric}{suffix}"] = float(value)
    return flat


# ----------------------------------------------------------------------------------------------
# Validation loss
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def validation_metrics(
    logits_fn: LogitsFn, data: DataArgs, args: ValidationEvalArgs, device: torch.device
) -> dict[str, float]:
    """Token-level loss and perplexity on each source's val shards (`val/<source>/loss|ppl|tokens`)
    and over all sources weighted by tokens (`val/loss`, `val/ppl`)."""
    out: dict[str, float] = {}
    total_nll, total_tokens = 0.0, 0
    for source in args.sources or list(data.sources):
        nll, n_tokens = 0.0, 0
        for batch in iter_validation_batches(data, source, args.batch_size, args.max_batches):
            tokens = torch.from_numpy(batch).to(device)
            logits = logits_fn(tokens[..., 0])
            nll += float(F.cross_entropy(logits.flatten(0, 1).float(), tokens[..., 1].flatten(), reduction="sum"))
            n_tokens += tokens[..., 1].numel()
        if n_tokens:
            out.update({f"val/{source}/loss": nll / n_tokens, f"val/{source}/ppl": math.exp(nll / n_tokens), f"val/{source}/tokens": n_tokens})
            total_nll, total_tokens = total_nll + nll, total_tokens + n_tokens
    if total_tokens:
        out.update({"val/loss": total_nll / total_tokens, "val/ppl": math.exp(total_nll / total_tokens)})
    return out


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------


def results_markdown(step: int, results: dict[str, Any] | None, validation: dict[str, float]) -> str:
    lines = [f"# Evaluation at step {step}", ""]
    if results is not None:
        lines += ["| task | n-shot | metric | value | stderr |", "|---|---|---|---|---|"]
        for task, metrics in sorted(results.get("results", {}).items()):
            shots = results.get("n-shot", {}).get(task, "")
            for key, value in metrics.items():
                metric, _, filter_name = key.partition(",")
                if not filter_name or "_stderr" in metric or not isinstance(value, (int, float)):
                    continue
                stderr = metrics.get(f"{metric}_stderr,{filter_name}", "")
                stderr = f"{stderr:.4f}" if isinstance(stderr, float) else stderr
                name = metric if filter_name == "none" else f"{metric} ({filter_name})"
                lines.append(f"| {task} | {shots} | {name} | {value:.4f} | {stderr} |")
        lines.append("")
    sources = sorted({k.split("/")[1] for k in validation if k.count("/") == 2})
    if sources:
        lines += ["| validation source | loss | perplexity | tokens |", "|---|---|---|---|"]
        for s in sources:
            lines.append(f"| {s} | {validation[f'val/{s}/loss']:.4f} | {validation[f'val/{s}/ppl']:.3f} | {int(validation[f'val/{s}/tokens'])} |")
        lines.append(f"| all | {validation['val/loss']:.4f} | {validation['val/ppl']:.3f} | |")
        lines.append("")
    return "\n".join(lines)


def write_results(
    out_dir: Path, step: int, results: dict[str, Any] | None, validation: dict[str, float], extra: dict[str, Any] | None = None
) -> Path:
    """Write results.json (lm-eval results, validation metrics, `extra`) and results.md into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"step": step, **(extra or {}), "validation": validation}
    if results is not None:
        keep = ("results", "groups", "group_subtasks", "n-shot", "n-samples", "versions", "higher_is_better", "config")
        record["harness"] = {k: results[k] for k in keep if k in results}
        if "samples" in results:
            record["harness"]["samples"] = results["samples"]
    path = out_dir / "results.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(path)
    (out_dir / "results.md").write_text(results_markdown(step, results, validation))
    return path
