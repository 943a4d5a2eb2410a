"""The lm-eval tasks of a `harness` section: local task YAMLs (configs/tasks) or hub task names,
resolved and checked before a model loads, the lm-eval run over them (`run_harness`), and its
results as flat metrics (`harness_metrics`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import yaml
from lm_eval.api.model import LM

from lingua.args import InputError
from lingua.evaluation.config import HarnessArgs, task_spec
from lingua.hub import hub_unreachable_reason

LOCAL_TASKS_DIR = Path(__file__).resolve().parents[2] / "configs" / "tasks"  # the project's offline tasks
OFFLINE_TASKS = ("synthetic_mc", "synthetic_qa")


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
    specs = [task_spec(spec, f"harness.tasks[{i}]")[0] for i, spec in enumerate(args.tasks)]
    hub = [name for name in specs if find_local_task(name, args.task_dirs) is None]
    if hub and args.check_hub:
        _check_hub(hub)


def load_tasks(args: HarnessArgs, cache_dir: Path) -> tuple[list[Any], Any]:
    """(tasks and groups for lm-eval's simple_evaluate, their TaskManager), with num_fewshot set per
    task (its entry's, else harness.num_fewshot, else the task's own)."""
    from lm_eval.tasks import TaskManager

    specs = [task_spec(spec, f"harness.tasks[{i}]") for i, spec in enumerate(args.tasks)]
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
