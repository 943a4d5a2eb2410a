"""Result files of one evaluation: results.json (lm-eval results, validation metrics and extra
fields) and the results.md tables, in <dump_dir>/eval/<step>/.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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
