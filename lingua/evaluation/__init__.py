"""Evaluation both apps share, one module per concern:

  config.py               EvalArgs and its harness / validation / generator sections
  scoring.py              log-likelihood of token sequences by a logits function (LogitsFn)
  recompute_generation.py generation options and generate_by_recompute (no KV cache)
  lm_eval_adapter.py      LinguaLM, the lm-eval model over a tokenizer and a logits function
  tasks.py                local and hub lm-eval tasks, the harness run, its flat metrics
  validation.py           loss and perplexity per source on the val shards
  results.py              results.json and results.md
  extrapolation.py        loss by position at multiples of the training length
  in_context.py           per-document in-context test (synthetic_mc accuracy against shots)

The harness names are re-exported here; the two context evaluations (apps.mosaics.context_eval)
are imported from their modules. Apps own loading the model.
"""

from lingua.evaluation.config import EvalArgs, GeneratorCompatArgs, HarnessArgs, ValidationEvalArgs
from lingua.evaluation.lm_eval_adapter import LinguaLM
from lingua.evaluation.recompute_generation import GenerateFn, GenerationOptions, generate_by_recompute
from lingua.evaluation.results import results_markdown, write_results
from lingua.evaluation.scoring import LogitsFn, Progress, rolling_windows, score_sequences
from lingua.evaluation.tasks import (
    LOCAL_TASKS_DIR, OFFLINE_TASKS, check_tasks_available, find_local_task, harness_metrics, load_tasks, local_task_config, run_harness,
)
from lingua.evaluation.validation import validation_metrics

__all__ = [
    "EvalArgs", "GenerateFn", "GenerationOptions", "GeneratorCompatArgs", "HarnessArgs", "LOCAL_TASKS_DIR", "LinguaLM", "LogitsFn",
    "OFFLINE_TASKS", "Progress", "ValidationEvalArgs", "check_tasks_available", "find_local_task", "generate_by_recompute",
    "harness_metrics", "load_tasks", "local_task_config", "results_markdown", "rolling_windows", "run_harness", "score_sequences",
    "validation_metrics", "write_results",
]
