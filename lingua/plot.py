"""Training curves of a run: `python -m lingua.plot <dump_dir>` writes loss, lr and throughput PNGs.

Reads `<dump_dir>/metrics.jsonl`; when a run was resumed, the records written last for a step win
(the resumed run's), so the curves show the run that produced the final model. `save_figure` ends
the evaluation plots too (labels, grid, legend, file).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

from lingua.metrics import read_metrics  # noqa: E402

PLOTS = (
    ("loss.png", "loss", (("loss", "train"), ("val/loss", "validation"))),
    ("lr.png", "learning rate", (("lr", "lr"),)),
    ("throughput.png", "tokens/s per rank", (("speed/tokens_per_s", "tokens/s"),)),
)


def latest_by_step(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`, keeping the last record written for each step."""
    values: dict[int, float] = {}
    for record in records:
        if key in record and "step" in record:
            values[int(record["step"])] = float(record[key])
    steps = sorted(values)
    return steps, [values[s] for s in steps]


def save_figure(figure: plt.Figure, axes: plt.Axes, path: Path, xlabel: str, ylabel: str, title: str = "") -> None:
    """Label the axes, add a grid and the legend, write `path` (PNG) and close the figure."""
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    if title:
        axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_run(dump_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    dump_dir = Path(dump_dir)
    metrics_file = dump_dir / "metrics.jsonl"
    if not metrics_file.is_file():
        raise FileNotFoundError(f"no metrics file at {metrics_file}: pass the dump_dir of a training run")
    records = read_metrics(metrics_file)
    out = Path(out_dir) if out_dir else dump_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, ylabel, series in PLOTS:
        figure, axes = plt.subplots(figsize=(7, 4))
        drawn = False
        for key, label in series:
            steps, values = latest_by_step(records, key)
            if steps:
                axes.plot(steps, values, label=label, marker="o" if key.startswith("val/") else None)
                drawn = True
        if drawn:
            axes.set_xlabel("step")
            axes.set_ylabel(ylabel)
            axes.grid(alpha=0.3)
            axes.legend()
            axes.set_title(f"{dump_dir.name}: {ylabel}")
            figure.tight_layout()
            figure.savefig(out / filename, dpi=100)
            written.append(out / filename)
        plt.close(figure)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description="Plot a training run's metrics.jsonl.")
    parser.add_argument("dump_dir", help="the run's dump_dir (holds metrics.jsonl)")
    parser.add_argument("--out", help="output folder (default: <dump_dir>/plots)")
    args = parser.parse_args()
    for path in plot_run(args.dump_dir, args.out):
        print(path)


if __name__ == "__main__":
    main()
