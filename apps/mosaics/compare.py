"""Compare models of either app on the same data in one command: train each briefly (or take its
checkpoint), run the context evaluations (apps.mosaics.context_eval) and print one table.

    python -m apps.mosaics.compare config=apps/mosaics/configs/compare_debug.yaml
    python -m apps.mosaics.compare config=apps/mosaics/configs/compare_debug.yaml train=false   # re-evaluate

Each run is a training config (its app found from its keys) trained into <dump_dir>/<name> with
the shared `overrides` then its own, or an existing `ckpt`. Writes <dump_dir>/compare.json,
compare.md (the table), extrapolation.png (every model at the longest window) and in_context.png.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apps.main.eval import checkpoint_step_and_run
from apps.mosaics.context_eval import RESULT_FILE, ContextEvalArgs, default_out_dir, evaluate
from apps.registry import app_of_checkpoint, app_of_yaml
from lingua.args import ConfigError, cli_main
from lingua.checkpoint import step_dirs
from lingua.evaluation.extrapolation import plot_buckets
from lingua.evaluation.in_context import plot_in_context

logger = logging.getLogger(__name__)


@dataclass
class CompareRun:
    name: str = "???"  # the table row; a trained run goes to <dump_dir>/<name>
    config: str = ""  # training config (apps/<app>/configs/*.yaml); empty: evaluate `ckpt`
    ckpt: str = ""  # an existing checkpoint to evaluate instead of training
    overrides: list[str] = field(default_factory=list)  # a.b=c for this run, after the shared ones


@dataclass
class CompareArgs:
    runs: list[CompareRun] = field(default_factory=list)
    dump_dir: str = "runs/compare"  # runs, their evaluations and the table go here
    overrides: list[str] = field(default_factory=list)  # a.b=c for every trained run (same data, length, steps)
    train: bool = True  # false: evaluate the checkpoints the runs already have in <dump_dir>/<name>
    eval: ContextEvalArgs = field(default_factory=ContextEvalArgs)

    def __post_init__(self) -> None:
        if not self.runs:
            raise ConfigError("runs is empty: list the models to compare, e.g. runs=[{name: v1, config: apps/mosaics/configs/debug.yaml}]")
        names = [run.name for run in self.runs]
        if len(set(names)) != len(names) or not all(n and "/" not in n for n in names):
            raise ConfigError(f"runs[].name={names}: give each run a distinct name without '/'")
        for i, run in enumerate(self.runs):
            if bool(run.config) == bool(run.ckpt):
                raise ConfigError(f"runs[{i}] ({run.name}): give exactly one of config (train it) and ckpt (evaluate it)")
            if run.ckpt and run.overrides:
                raise ConfigError(f"runs[{i}] ({run.name}): overrides apply to training; a ckpt run takes none")


def _checkpoint_of(run: CompareRun, args: CompareArgs) -> tuple[str, Any]:
    """(checkpoint to evaluate, training config to run first or None), checked before any work."""
    if run.ckpt:
        app_of_checkpoint(run.ckpt, f"runs[{args.runs.index(run)}].ckpt")  # exists, and belongs to an app
        return run.ckpt, None
    folder = Path(args.dump_dir) / run.name
    overrides = [*args.overrides, *run.overrides, f"dump_dir={folder}", f"name={run.name}"]
    app, cfg = app_of_yaml(run.config, overrides)
    has_checkpoint = bool(step_dirs(folder / "checkpoints"))
    if args.train and has_checkpoint:
        raise ConfigError(f"run '{run.name}': {folder} already holds checkpoints; pass train=false to evaluate them, or remove the folder")
    if not args.train and not has_checkpoint:
        raise ConfigError(f"run '{run.name}': train=false but {folder} holds no checkpoint; train it first (train=true)")
    return str(folder), (app, cfg) if args.train else None


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of the runs' results (losses averaged over the validation sources), and a
    note for each model evaluated with changed model settings."""
    first = rows[0]["result"]
    factors = [x["factor"] for x in next(iter(first["extrapolation"]["sources"].values()))] if "extrapolation" in first else []
    shots = [s["shots"] for s in first["in_context"]["shots"]] if "in_context" in first else []
    header = ["model", "app", "params", "non-emb. params", "steps", "train len"]
    header += [f"val loss {f}x" for f in factors] + ([f"loss past train len ({factors[-1]}x)"] if len(factors) > 1 else [])
    header += [f"acc_norm {k} shots" for k in shots]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        r = row["result"]
        cells = [row["name"], r["app"], f"{r['params']:,}", f"{r['non_embedding_params']:,}", str(row["step"]), str(r["train_seq_len"])]
        if factors:
            lengths = [x for source in r["extrapolation"]["sources"].values() for x in source]
            cells += [f"{_mean([x['loss'] for x in lengths if x['factor'] == f]):.3f}" for f in factors]
            if len(factors) > 1:
                cells.append(f"{_mean([x['loss_beyond_train'] for x in lengths if x['factor'] == factors[-1]]):.3f}")
        cells += [f"{s['acc_norm']:.3f}" for s in r["in_context"]["shots"]] if shots else []
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        f"- {row['name']}: evaluated with {', '.join(f'model.{k}={v}' for k, v in row['result']['length_overrides'].items())} "
        f"(same weights; positions past its training length {row['result']['train_seq_len']} were never trained, no interpolation)"
        for row in rows if row["result"]["length_overrides"]
    ]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def main(args: CompareArgs) -> list[dict[str, Any]]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    plans = [(run, *_checkpoint_of(run, args)) for run in args.runs]  # every config checked before the first run trains
    rows = []
    for run, ckpt, training in plans:
        if training is not None:
            app, cfg = training
            logger.info("training %s (%s app, %d steps) in %s", run.name, app.name, cfg.steps, cfg.dump_dir)
            app.train(cfg)
        result = evaluate(ckpt, args.eval, default_out_dir(ckpt))
        rows.append({"name": run.name, "ckpt": ckpt, "step": checkpoint_step_and_run(ckpt)[0], "result": result, "result_file": str(default_out_dir(ckpt) / RESULT_FILE)})
    out = Path(args.dump_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(rows, indent=1))
    text = table(rows)
    (out / "compare.md").write_text(text)
    if args.eval.extrapolation:
        curves = {}
        for row in rows:
            longest = next(iter(row["result"]["extrapolation"]["sources"].values()))[-1]
            curves[f"{row['name']} ({longest['factor']}x)"] = longest["buckets"]
        plot_buckets(curves, {row["result"]["train_seq_len"] for row in rows}, out / "extrapolation.png", "every model at its longest window (first source)")
    if args.eval.in_context:
        plot_in_context({row["name"]: row["result"]["in_context"] for row in rows}, out / "in_context.png", "per-document in-context test (synthetic_mc)")
    print(text)
    logger.info("wrote %s", out / "compare.md")
    return rows


if __name__ == "__main__":
    cli_main(CompareArgs, main)
