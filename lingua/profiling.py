"""Profiling windows: a torch profiler trace of a few steps and, on GPU, a CUDA memory snapshot.

`maybe_profile(args, dump_dir, start_step, rank)` is entered once by the trainer; its `step()` is
called after every optimizer step. Traces go to `<dump_dir>/<trace_folder>/` as Chrome trace JSON
(open in Perfetto or chrome://tracing); memory snapshots as pickles for PyTorch's memory viz; every
file name carries the step and the rank (`trace_step12_rank0.json`), so ranks never overwrite each other.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterator

import torch
from torch.profiler import ProfilerActivity, profile, schedule

logger = logging.getLogger(__name__)


@dataclass
class ProfilerArgs:
    RANGES: ClassVar[dict[str, str]] = {"profile_warmup": ">= 0", "profile_steps": ">= 1", "mem_warmup": ">= 0", "mem_steps": ">= 1"}

    run: bool = False  # record a trace window (and a memory snapshot on GPU)
    trace_folder: str = "profiling"  # under dump_dir
    profile_warmup: int = 10  # steps before the traced window starts (counted from the run's first step)
    profile_steps: int = 2  # traced steps
    mem_warmup: int = 5  # steps before the CUDA memory history starts recording (0: from the first step)
    mem_steps: int = 2  # steps recorded in the memory snapshot


class _Window:
    """Steps a torch profiler and the CUDA memory recorder through their windows."""

    def __init__(self, args: ProfilerArgs, folder: Path, start_step: int, rank: int) -> None:
        self.args = args
        self.folder = folder
        self.rank = rank
        self.steps_seen = 0
        self.start_step = start_step
        self.profiler: profile | None = None
        self.recording_memory = False

    def start(self) -> None:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.profiler = profile(
            activities=activities,
            schedule=schedule(wait=max(self.args.profile_warmup - 1, 0), warmup=min(self.args.profile_warmup, 1), active=self.args.profile_steps, repeat=1),
            on_trace_ready=self._save_trace,
            record_shapes=True,
            profile_memory=True,
            with_flops=True,
        )
        self.profiler.start()
        if self.args.mem_warmup == 0:
            self._record_memory()

    def _record_memory(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.memory._record_memory_history(max_entries=100_000)
            self.recording_memory = True

    def _save_trace(self, prof: profile) -> None:
        path = self.folder / f"trace_step{self.start_step + self.steps_seen}_rank{self.rank}.json"
        prof.export_chrome_trace(str(path))
        logger.info("profiler trace written to %s", path)

    def step(self) -> None:
        self.steps_seen += 1
        if self.profiler is not None:
            self.profiler.step()
        if self.steps_seen == self.args.mem_warmup:
            self._record_memory()
        elif self.recording_memory and self.steps_seen == self.args.mem_warmup + self.args.mem_steps:
            path = self.folder / f"memory_snapshot_step{self.start_step + self.steps_seen}_rank{self.rank}.pickle"
            torch.cuda.memory._dump_snapshot(str(path))
            torch.cuda.memory._record_memory_history(enabled=None)
            self.recording_memory = False
            logger.info("CUDA memory snapshot written to %s", path)

    def stop(self) -> None:
        if self.profiler is not None:
            self.profiler.stop()
        if self.recording_memory:
            torch.cuda.memory._record_memory_history(enabled=None)


class _NoProfile:
    def step(self) -> None:
        pass


@contextlib.contextmanager
def maybe_profile(args: ProfilerArgs, dump_dir: Path, start_step: int = 0, rank: int = 0) -> Iterator[_Window | _NoProfile]:
    if not args.run:
        yield _NoProfile()
        return
    folder = Path(dump_dir) / args.trace_folder
    folder.mkdir(parents=True, exist_ok=True)
    window = _Window(args, folder, start_step, rank)
    window.start()
    try:
        yield window
    finally:
        window.stop()
