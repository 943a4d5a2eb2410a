"""Compare the two arms of agi_test/test_1: `python -m agi_test.test_1.compare [RUN_A RUN_B] [--out PNG]`.

Reads each run's `metrics.jsonl` and `config.yaml` (RUN_A defaults to the zero-copy run, RUN_B to
the GPU-only one), prints a side-by-side table with a B/A ratio column and plots both loss curves
(train, and validation when recorded) into one PNG (default: `compare.png` in RUN_A's parent).

Step time is the median over log windows of (tokens per step per rank) / (tokens/s per rank); the
median drops the windows that include startup, validation or a checkpoint save. Peak GPU memory is
the largest `memory/max_allocated_gib` (n/a on CPU), peak host memory the process's peak resident
set size (`memory/host_max_rss_gib`; older runs: `memory/max_rss_gib`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lingua.args import flatten_dict
from lingua.metrics import metric_path, read_metrics
from lingua.plot import latest_by_step, plt

REPO = Path(__file__).resolve().parents[2]
DEFAULT_A = REPO / "runs" / "agi_test" / "test_1" / "zero_copy"
DEFAULT_B = REPO / "runs" / "agi_test" / "test_1" / "gpu_only"
IDENTITY_KEYS = {"name", "dump_dir"}  # differ between the arms by design


class RunError(Exception):
    """A run folder that cannot be compared (one line, names the folder)."""


@dataclass
class Run:
    folder: Path
    records: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        zero_copy = self.config.get("model", {}).get("productkey_args", {}).get("zero_copy")
        return self.folder.name if zero_copy is None else f"{self.folder.name} (zero_copy={str(zero_copy).lower()})"


def load_run(folder: str | Path) -> Run:
    folder = Path(folder)
    path = metric_path(folder)
    if not path.is_file():
        raise RunError(f"no metrics.jsonl in {folder}: train that run first (agi_test/test_1/script/*_train.sh)")
    records = read_metrics(path)
    if not any("loss" in r for r in records):
        raise RunError(f"{path} holds no training records yet")
    config_file = folder / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    return Run(folder, records, config or {})


def _tokens_per_step(config: dict[str, Any]) -> int | None:
    """Tokens one rank processes per optimizer step, from the run's resolved config."""
    try:
        data = config["data"]
        return int(data["batch_size"]) * int(data["seq_len"]) * int(config.get("grad_acc_steps", 1))
    except (KeyError, TypeError, ValueError):
        return None


def summarize(run: Run) -> dict[str, float | None]:
    """The table's numbers for one run (None: not recorded)."""
    train = [r for r in run.records if "loss" in r and "speed/tokens_per_s" in r]
    # The first window holds startup (and the step-0 validation); leave it out when there are others.
    windows = train[1:] if len(train) > 2 else train
    per_rank_step = _tokens_per_step(run.config)
    tokens_per_s = [r["speed/tokens_per_s"] for r in windows if r["speed/tokens_per_s"] > 0]
    step_ms = statistics.median(per_rank_step / t for t in tokens_per_s) * 1e3 if per_rank_step and tokens_per_s else None
    ranks = 1
    last = train[-1] if train else None
    if per_rank_step and last and last.get("tokens") and last.get("step"):
        ranks = max(1, round(last["tokens"] / (last["step"] * per_rank_step)))

    def peak(*keys: str) -> float | None:
        for key in keys:
            values = [r[key] for r in run.records if key in r]
            if values:
                return max(values)
        return None

    _, losses = latest_by_step(run.records, "loss")
    _, val_losses = latest_by_step(run.records, "val/loss")
    return {
        "median step time (ms)": step_ms,
        "tokens/s (all ranks)": statistics.median(tokens_per_s) * ranks if tokens_per_s else None,
        "peak GPU memory (GiB)": peak("memory/max_allocated_gib"),
        "peak host memory (GiB)": peak("memory/host_max_rss_gib", "memory/max_rss_gib"),
        "final train loss": losses[-1] if losses else None,
        "final val loss": val_losses[-1] if val_losses else None,
    }


def config_differences(a: Run, b: Run) -> list[str]:
    """Dotted keys whose values differ between the two resolved configs (run name and folder aside)."""
    if not a.config or not b.config:
        return []
    flat_a, flat_b = flatten_dict(a.config), flatten_dict(b.config)
    keys = sorted((set(flat_a) | set(flat_b)) - IDENTITY_KEYS)
    return [f"{k}: {flat_a.get(k)!r} vs {flat_b.get(k)!r}" for k in keys if flat_a.get(k) != flat_b.get(k)]


def _cell(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def format_table(a: Run, b: Run) -> str:
    sa, sb = summarize(a), summarize(b)
    digits = {"median step time (ms)": 1, "tokens/s (all ranks)": 0}
    rows = [("metric", "A", "B", "B/A")]
    for name in sa:
        va, vb = sa[name], sb[name]
        ratio = f"{vb / va:.3f}" if va and vb is not None else "n/a"
        rows.append((name, _cell(va, digits.get(name, 4)), _cell(vb, digits.get(name, 4)), ratio))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [f"A: {a.folder}  {a.label}", f"B: {b.folder}  {b.label}"]
    for row in rows:
        lines.append("  ".join([row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]))
    return "\n".join(lines)


def plot_losses(a: Run, b: Run, out: Path) -> Path:
    figure, axes = plt.subplots(figsize=(8, 4.5))
    # A wide and pale under B thin, so identical curves (the arms compute the same math) both show.
    for run, color, width, marker in ((a, "tab:blue", 4.0, "o"), (b, "tab:orange", 1.5, "x")):
        steps, values = latest_by_step(run.records, "loss")
        axes.plot(steps, values, color=color, linewidth=width, alpha=0.8, label=f"{run.label} train")
        steps, values = latest_by_step(run.records, "val/loss")
        if steps:
            axes.plot(steps, values, color=color, linewidth=width, alpha=0.8, linestyle="--", marker=marker,
                      markersize=3 * width, label=f"{run.label} validation")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    axes.set_title("agi_test/test_1: loss")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compare two test_1 runs: step time, tokens/s, memory, losses.")
    parser.add_argument("run_a", nargs="?", default=str(DEFAULT_A), help="first run's dump_dir (default: the zero-copy run)")
    parser.add_argument("run_b", nargs="?", default=str(DEFAULT_B), help="second run's dump_dir (default: the GPU-only run)")
    parser.add_argument("--out", help="loss plot PNG (default: compare.png in RUN_A's parent folder)")
    args = parser.parse_args(argv)
    try:
        a, b = load_run(args.run_a), load_run(args.run_b)
    except (RunError, ValueError, yaml.YAMLError) as error:
        print(f"compare: {error}", file=sys.stderr)
        return 2
    print(format_table(a, b))
    differences = config_differences(a, b)
    if differences:
        print("configs differ in (run name and dump_dir aside): " + "; ".join(differences))
    out = Path(args.out) if args.out else a.folder.resolve().parent / "compare.png"
    print(f"loss curves: {plot_losses(a, b, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
