"""Training metrics: `dump_dir/metrics.jsonl`, the console progress line, throughput, MFU, memory.

The trainer owns when to log; this module owns what a record holds and where it goes (a jsonl
file on rank 0 and, when configured, wandb). MFU uses the FLOPs per token the model spec reports
(dense FLOPs plus retrieved memory rows, never a whole sparse table) against the device's peak.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import resource
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator

import torch

logger = logging.getLogger(__name__)

# Dense bf16 peak of known accelerators, FLOP/s (vendor datasheets, no sparsity).
PEAK_BF16_FLOPS = (
    ("H200", 989.4e12),
    ("H100", 989.4e12),
    ("A100", 312e12),
    ("L40S", 362.05e12),
    ("A10G", 70e12),
)


@dataclass
class WandbArgs:
    project: str = "lingua"  # wandb project
    entity: str | None = None  # wandb entity (team); None: the user's default
    name: str | None = None  # run name; None: the run's `name`
    mode: str = "online"  # online | offline | disabled


@dataclass
class LoggingArgs:
    RANGES: ClassVar[dict[str, str]] = {"freq": ">= 1", "peak_flops": "> 0"}

    freq: int = 10  # print and record metrics every this many optimizer steps
    peak_flops: float | None = None  # device peak FLOP/s for MFU; None: known GPUs by name, no MFU on CPU
    wandb: WandbArgs | None = None  # set (e.g. logging.wandb.project=x) to also log to wandb


def device_peak_flops(configured: float | None) -> float | None:
    """Peak FLOP/s for MFU: the configured value, else a known GPU's bf16 peak, else None."""
    if configured is not None:
        return configured
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for marker, flops in PEAK_BF16_FLOPS:
        if marker in name:
            return flops
    logger.warning("unknown GPU '%s': set logging.peak_flops to get MFU", name)
    return None


def _max_rss_bytes() -> int:
    """The process's peak resident set size (getrusage: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def host_memory_stats() -> dict[str, float]:
    """Host memory of this process, GiB: resident set size now (`memory/host_rss_gib`, VmRSS) and
    its peak over the process's life (`memory/host_max_rss_gib`, VmHWM). Pinned and zero-copy
    host tables count, so on GPU runs this is where host-resident values show up. Without
    /proc (macOS), the peak comes from getrusage and the current size is left out."""
    fields: dict[str, int] = {}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    fields[name] = int(value.split()[0]) * 1024  # reported in kB
    except OSError:
        pass
    stats = {}
    if "VmRSS" in fields:
        stats["memory/host_rss_gib"] = fields["VmRSS"] / 2**30
    stats["memory/host_max_rss_gib"] = fields.get("VmHWM", _max_rss_bytes()) / 2**30
    return stats


def memory_stats() -> dict[str, float]:
    """Peak memory since the last call: GPU allocated/reserved GiB, or the process's max RSS on CPU;
    plus the host memory of the process (host_memory_stats) on either."""
    if torch.cuda.is_available():
        stats = {
            "memory/max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "memory/max_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        }
        torch.cuda.reset_peak_memory_stats()
    else:
        stats = {"memory/max_rss_gib": _max_rss_bytes() / 2**30}
    return {**stats, **host_memory_stats()}


class Throughput:
    """Tokens/s and MFU over the training time since the previous `measure` call; time spent in
    `excluding(kind)` blocks (validation, checkpoint saves, evaluation) is left out and reported
    on its own as `time/<kind>_s`."""

    def __init__(self, flops_per_token: float, peak_flops: float | None) -> None:
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self._start = time.perf_counter()
        self._tokens = 0
        self._excluded: dict[str, float] = {}

    def add_tokens(self, n_tokens: int) -> None:
        self._tokens += n_tokens

    @contextlib.contextmanager
    def excluding(self, kind: str) -> Iterator[None]:
        """Leave the time spent inside out of the training window (`time/<kind>_s` instead)."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # training work still queued on the GPU counts as training
        start = time.perf_counter()
        try:
            yield
        finally:
            self._excluded[kind] = self._excluded.get(kind, 0.0) + time.perf_counter() - start

    def measure(self) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - self._start - sum(self._excluded.values()), 1e-9)
        tokens_per_s = self._tokens / elapsed  # this rank's tokens
        record = {"speed/tokens_per_s": tokens_per_s, "speed/flops_per_s": tokens_per_s * self.flops_per_token}
        if self.peak_flops:
            record["speed/mfu"] = tokens_per_s * self.flops_per_token / self.peak_flops
        record |= {f"time/{kind}_s": seconds for kind, seconds in self._excluded.items()}
        self._start, self._tokens, self._excluded = now, 0, {}
        return record


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def progress_line(record: dict[str, Any], total_steps: int, eta_s: float) -> str:
    """One console line: step/total, loss, grad norm, lr, tokens/s, MFU, memory, ETA. Memory is named:
    `gpu mem` is the peak GPU memory allocated since the previous line, `host rss` the process's
    resident host memory (current, or its peak where the current size is unknown)."""
    parts = [f"step {record['step']}/{total_steps}", f"loss {record['loss']:.4f}"]
    if "grad_norm" in record:
        parts.append(f"gnorm {record['grad_norm']:.3f}")
    parts.append(f"lr {record['lr']:.2e}")
    parts.append(f"tok/s {record['speed/tokens_per_s']:,.0f}")
    if "speed/mfu" in record:
        parts.append(f"mfu {100 * record['speed/mfu']:.1f}%")
    if "memory/max_allocated_gib" in record:
        parts.append(f"gpu mem {record['memory/max_allocated_gib']:.2f}GiB (peak allocated)")
    if "memory/host_rss_gib" in record or "memory/max_rss_gib" in record:
        parts.append(f"host rss {record.get('memory/host_rss_gib', record.get('memory/max_rss_gib')):.2f}GiB")
    parts.append(f"eta {format_duration(eta_s)}")
    return " | ".join(parts)


class RecentStepRate:
    """The remaining time of a run from the pace of its last `window` logged intervals (an average
    since the start would carry the startup, compilation and any slow phase into every estimate)."""

    def __init__(self, total_steps: int, window: int = 5) -> None:
        self.total_steps = total_steps
        self._points: deque[tuple[float, int]] = deque(maxlen=window + 1)  # (time, step) of recent log points

    def eta_s(self, step: int, now: float | None = None) -> float:
        """Seconds left after `step`, from the log points up to now; NaN until there are two."""
        self._points.append((time.perf_counter() if now is None else now, step))
        (start, first), (end, last) = self._points[0], self._points[-1]
        if last <= first:
            return float("nan")
        return (end - start) / (last - first) * (self.total_steps - step)


class MetricLogger:
    """Appends one JSON object per record to a jsonl file; mirrors to wandb when configured."""

    def __init__(self, path: str | Path, wandb_args: WandbArgs | None = None, run_name: str = "", config: dict | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")
        self._wandb = None
        if wandb_args is not None:
            import wandb  # optional dependency, only when configured

            self._wandb = wandb.init(
                project=wandb_args.project,
                entity=wandb_args.entity,
                name=wandb_args.name or run_name,
                mode=wandb_args.mode,
                config=config,
                resume="allow",
            )

    def log(self, record: dict[str, Any]) -> None:
        record = {"created_at": time.time(), **record}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(record, step=record.get("step"))

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()

    def __enter__(self) -> "MetricLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NullLogger:
    """Stands in for MetricLogger on ranks that do not write metrics."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def __enter__(self) -> "NullLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def metric_path(dump_dir: str | Path) -> Path:
    return Path(dump_dir) / "metrics.jsonl"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file; a torn last line (a crash mid-write) is ignored."""
    lines = Path(path).read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise ValueError(f"{path}:{number}: not a JSON record") from None
    return records
