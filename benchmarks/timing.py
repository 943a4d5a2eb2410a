"""Shared timing helper for every benchmark: warm-up, repeated timing, medians, ratios.

On CUDA each call is timed with CUDA events (no host sync inside the timed region); on CPU with
`time.perf_counter`. A benchmark times its candidates and a named reference in the same run and
prints a table of medians and ratios against the reference, headed by the device and date, ready
to paste into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call over `repeats` timed calls."""

    name: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int


def _quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def full_size_needs_gpu(tiny: bool, module: str) -> None:
    """A benchmark's full-size shapes are for a GPU: without one (and without --tiny) stop at once,
    naming the flag, instead of running for hours on CPU against goals set for an H100."""
    if not tiny and not torch.cuda.is_available():
        print(
            f"{module}: the full-size shapes need a GPU and this machine has none (nothing was run); "
            f"on CPU run the small version: python -m {module} --tiny",
            file=sys.stderr,
        )
        raise SystemExit(2)


def time_fn(name: str, fn: Callable[[], object], warmup: int = 3, repeats: int = 10) -> Timing:
    """Time `fn()` after `warmup` untimed calls; CUDA events on GPU, perf_counter on CPU."""
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup} repeats={repeats}")
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        samples = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(repeats):
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1e3)
    return Timing(name, statistics.median(samples), _quantile(samples, 0.2), _quantile(samples, 0.8), repeats)


def device_description() -> str:
    """The device the numbers come from, with torch version and date."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    today = datetime.date.today().isoformat()
    return f"{device}, torch {torch.__version__}, {today}"


def format_table(timings: list[Timing], reference: str, extra: dict[str, str] | None = None) -> str:
    """A markdown table of medians and the ratio reference/candidate (> 1 means faster than the reference)."""
    by_name = {t.name: t for t in timings}
    if reference not in by_name:
        raise ValueError(f"reference '{reference}' is not among the timed names {sorted(by_name)}")
    base = by_name[reference].median_ms
    lines = [
        f"device: {device_description()}",
        f"command: {' '.join(['python', os.path.relpath(sys.argv[0])] + sys.argv[1:])}",
        "",
        f"| name | median ms | p20-p80 ms | speedup vs {reference} |" + (" note |" if extra else ""),
        "|---|---|---|---|" + ("---|" if extra else ""),
    ]
    for t in timings:
        row = f"| {t.name} | {t.median_ms:.3f} | {t.p20_ms:.3f}-{t.p80_ms:.3f} | {base / t.median_ms:.2f}x |"
        if extra:
            row += f" {extra.get(t.name, '')} |"
        lines.append(row)
    return "\n".join(lines)


def training_step(
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    dtype: torch.dtype,
) -> Callable[[], None]:
    """One training step as the trainer runs it: autocast forward, backward, clipping at 1.0,
    optimizer step, zero_grad. `forward` is the model or its compiled form."""
    from lingua.optim import clip_grad_norm

    device_type = inputs.device.type

    def step() -> None:
        with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
            loss = forward(inputs, targets)
        loss.backward()
        clip_grad_norm(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step
