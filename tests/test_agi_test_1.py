"""agi_test/test_1 (zero-copy vs GPU-only training): the two configs differ only in where the values
live, both scripts train (QUICK=1: a tiny model, seconds on a CPU) and compare.py reports and plots them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agi_test.test_1 import compare
from apps.main.train import MainTrainArgs
from lingua.args import flatten_dict, load_config, to_dict
from lingua.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
TEST_1 = REPO / "agi_test" / "test_1"
ARMS = ("zero_copy", "gpu_only")
TABLE_ROWS = (
    "median step time (ms)",
    "tokens/s (all ranks)",
    "peak GPU memory (GiB)",
    "peak host memory (GiB)",
    "final train loss",
    "final val loss",
)


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHON": sys.executable, **extra}
    env.pop("NPROC", None)
    return env


def test_full_size_arm_without_a_gpu_is_refused_naming_quick(tmp_path):
    done = subprocess.run(
        ["bash", str(TEST_1 / "script" / "zero_copy_train.sh")],
        env=_env(DUMP_DIR=str(tmp_path / "run"), CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "needs a GPU" in done.stderr and "QUICK=1 bash agi_test/test_1/script/zero_copy_train.sh" in done.stderr
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both arms trained once with QUICK=1, each into its own folder."""
    root = tmp_path_factory.mktemp("test_1")
    runs = {}
    for arm in ARMS:
        dump_dir = root / arm
        done = subprocess.run(
            ["bash", str(TEST_1 / "script" / f"{arm}_train.sh")],
            env=_env(QUICK="1", DUMP_DIR=str(dump_dir)),
            capture_output=True, text=True, timeout=180, cwd="/",  # the script finds the repo itself
        )
        assert done.returncode == 0, f"{arm}_train.sh failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
        runs[arm] = dump_dir
    return runs


def _resolved(arm: str) -> dict:
    return flatten_dict(to_dict(load_config(MainTrainArgs, str(TEST_1 / "config" / f"{arm}.yaml"))))


def test_configs_differ_only_in_zero_copy() -> None:
    raw = {arm: flatten_dict(yaml.safe_load((TEST_1 / "config" / f"{arm}.yaml").read_text())) for arm in ARMS}
    for a, b in (raw["zero_copy"], raw["gpu_only"]), (_resolved("zero_copy"), _resolved("gpu_only")):
        differing = {k for k in set(a) | set(b) if a.get(k) != b.get(k)} - {"name", "dump_dir"}
        assert differing == {"model.productkey_args.zero_copy"}
        assert (a["model.productkey_args.zero_copy"], b["model.productkey_args.zero_copy"]) == (True, False)
        assert a["dump_dir"] != b["dump_dir"] and a["dump_dir"].startswith("runs/")
    cfg = _resolved("zero_copy")
    assert (cfg["model.dim"], cfg["model.n_layers"], cfg["model.n_heads"], cfg["data.seq_len"]) == (128, 24, 16, 2048)
    assert cfg["model.productkey_args.mem_n_keys"] == 1024 and cfg["model.productkey_args.layers"] == "4"
    assert cfg["optim.warmup"] <= cfg["steps"] // 5  # the lr reaches its peak well before the end
    assert cfg["distributed.model_dtype"] == "fp32" and cfg["distributed.compile"] is False


def test_no_machine_specific_paths() -> None:
    for path in [*TEST_1.glob("config/*.yaml"), *TEST_1.glob("script/*.sh")]:
        text = path.read_text()
        assert not re.search(r"(^|[\s=:\"'])/(home|storage\d*|work|tmp|mnt|root|Users)\b", text, re.M), path


def test_quick_runs_train_and_compare(quick_runs: dict[str, Path], tmp_path: Path) -> None:
    for arm, dump_dir in quick_runs.items():
        records = read_metrics(dump_dir / "metrics.jsonl")
        train = [r for r in records if "loss" in r]
        val = [r["val/loss"] for r in records if "val/loss" in r]
        assert len(train) >= 3 and train[-1]["loss"] < train[0]["loss"] - 1.0, arm
        assert len(val) >= 2 and val[-1] < val[0] - 1.0, arm
        assert all(r["memory/host_max_rss_gib"] > 0 for r in train), arm
        config = yaml.safe_load((dump_dir / "config.yaml").read_text())
        assert config["model"]["productkey_args"]["zero_copy"] is (arm == "zero_copy")

    png = tmp_path / "compare.png"
    done = subprocess.run(
        [sys.executable, "-m", "agi_test.test_1.compare", str(quick_runs["zero_copy"]), str(quick_runs["gpu_only"]), "--out", str(png)],
        env=_env(), capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    for row in TABLE_ROWS:
        line = next(line for line in done.stdout.splitlines() if line.startswith(row))
        assert len(line[len(row):].split()) == 3, line  # A, B and B/A
    assert "zero_copy=true" in done.stdout and "zero_copy=false" in done.stdout
    assert "model.productkey_args.zero_copy" in done.stdout  # the only config difference, reported
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_names_a_run_without_metrics(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "never_trained"
    empty.mkdir()
    assert compare.main([str(empty), str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(empty) in err and "metrics.jsonl" in err
