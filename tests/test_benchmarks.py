"""Benchmarks run on CPU at tiny shapes: their parity gates pass and they print the ratio table."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    assert "device:" in result.stdout and "goals: not checked on CPU" in result.stdout
    assert "big table: 4 steps trained (probed rows moved)" in result.stdout
    assert "zero-copy forward buffer: 1024 rows = 0.25 MiB (capacity min(N*L, R, round_up(1.25 x recent unique rows, 128)), 0 overflowing calls); unique rows " in result.stdout
    assert "bound min(N*L, R) = 1024 rows = 0.25 MiB; one row per lookup would be 1024 rows" in result.stdout
    assert "PCIe" not in result.stdout and "(met)" not in result.stdout  # nothing crosses PCIe on CPU; the goals are for a GPU


def test_mosaics_v2_block_tiny_times_both_blocks_and_claims_no_goal():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.mosaics_v2", "--tiny", "--parts", "block", "--lengths", "48", "--warmup", "0", "--repeats", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "parity: the timed v2 block matches the naive scan" in out and "device:" in out and "command:" in out
    assert "| llama block (reference) |" in out and "| v2 block |" in out and "x the llama block's time |" in out
    assert "speedup vs llama block (reference)" in out and "v2 masks and counts (built once per forward" in out
    assert "B=2 T=48 C=48 H=4 SwiGLU 144" in out
    assert "this CPU run claims none" in out and "goal: v2 block" not in out and ", met" not in out and "goals met" not in out


@pytest.mark.parametrize("name", ["dense_step", "leaky_average", "mosaics_step", "mosaics_v2", "pk_bag", "pk_model", "zero_copy"])
def test_full_size_on_cpu_refuses_at_once_naming_tiny(name, monkeypatch, capsys):
    module = importlib.import_module(f"benchmarks.{name}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", [name])
    with pytest.raises(SystemExit) as exit_:
        module.main()
    assert exit_.value.code == 2
    assert f"python -m benchmarks.{name} --tiny" in capsys.readouterr().err


def test_run_all_keeps_each_log_and_a_summary(tmp_path):
    """benchmarks/run_all.sh: one log per name, device facts, a summary line each; a failing name
    counts in the exit status, an unknown name is refused before anything runs."""
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "BENCH_ARGS": "--tiny --warmup 1 --repeats 2"}
    result = subprocess.run(
        ["bash", "benchmarks/run_all.sh", str(tmp_path / "logs"), "pk_bag"], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| ours (row-sparse grad) |" in (tmp_path / "logs" / "pk_bag.log").read_text()
    assert "torch" in (tmp_path / "logs" / "device.txt").read_text()
    assert (tmp_path / "logs" / "summary.txt").read_text().startswith("pk_bag: ok, ")

    env["BENCH_ARGS"] = "--tiny --no-such-flag"
    failed = subprocess.run(
        ["bash", "benchmarks/run_all.sh", str(tmp_path / "failed"), "pk_bag"], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=300,
    )
    assert failed.returncode == 1 and "pk_bag: failed (exit 2)" in (tmp_path / "failed" / "summary.txt").read_text()

    unknown = subprocess.run(
        ["bash", "benchmarks/run_all.sh", str(tmp_path / "unknown"), "nope"], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=60,
    )
    assert unknown.returncode == 2 and "unknown name 'nope'" in unknown.stderr and not (tmp_path / "unknown").exists()
