"""Benchmarks run on CPU at tiny shapes: their parity gates pass and they print the ratio table."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_dense_step_tiny_runs_and_reports():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.dense_step", "--tiny", "--warmup", "1", "--repeats", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| bare llama (reference) |" in result.stdout and "| lingua LMTransformer |" in result.stdout
    assert "tok/s" in result.stdout and "device:" in result.stdout


def test_zero_copy_tiny_runs_and_reports():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.zero_copy", "--tiny", "--warmup", "1", "--repeats", "2", "--ref-repeats", "1", "--big"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "parity: zero-copy fp32 transfer, update on device;" in result.stdout
    for name in ("zero-copy (update on device)", "zero-copy (update on host)", "zero-copy bf16 transfer", "GPU-resident"):
        assert f"| {name} |" in result.stdout, name
    assert "| public approach | " in result.stdout and "speedup vs public approach" in result.stdout
    assert "device:" in result.stdout and "goals" in result.stdout
    assert "big table: 4 steps trained (probed rows moved)" in result.stdout
