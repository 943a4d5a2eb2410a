"""Profiling windows: file names carry the rank; the CUDA memory history can start at the first step."""

from __future__ import annotations

from pathlib import Path

import torch

from lingua.profiling import ProfilerArgs, maybe_profile


def test_memory_snapshot_from_the_first_step_named_by_rank(tmp_path: Path, monkeypatch) -> None:
    """mem_warmup=0 records steps 1..mem_steps; the snapshot file names the step and the rank.
    (The CUDA recorder is replaced by a fake that writes a file, so this runs on CPU.)"""
    events: list[object] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", lambda enabled="all", **kw: events.append(enabled))
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", lambda path: Path(path).write_bytes(b"snapshot"))
    monkeypatch.setattr("lingua.profiling.profile", _NoTrace)  # the trace window is tested in test_trainer.py
    args = ProfilerArgs(run=True, profile_warmup=0, profile_steps=1, mem_warmup=0, mem_steps=2)
    with maybe_profile(args, tmp_path, start_step=10, rank=3) as window:
        assert events == ["all"]  # recording before the first step
        for _ in range(4):
            window.step()
    assert events == ["all", None]
    files = sorted(p.name for p in (tmp_path / "profiling").iterdir())
    assert files == ["memory_snapshot_step12_rank3.pickle"]


class _NoTrace:
    def __init__(self, **kwargs: object) -> None:
        pass

    def start(self) -> None:
        pass

    def step(self) -> None:
        pass

    def stop(self) -> None:
        pass
