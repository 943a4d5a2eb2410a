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
