"""Multi-process training on CPU with gloo under torchrun: every layout matches one process.

Data: every rank's chunk holds the same documents and prefetch_size=1 (shuffling only reorders rows
within a batch), so each data-parallel rank sees the same set of sequences each step as the
single-process run; the averaged gradient is then that run's gradient up to summation order.
Tolerance: losses agree to 1e-4 relative over 8 steps (fp32; reduction order differs).
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lingua.checkpoint import consolidate
from lingua.metrics import read_metrics
from lingua.synthetic import write_corpus

REPO = Path(__file__).resolve().parents[1]
STEPS = 8


def config_args(data_root: Path, dump_dir: Path, *extra: str) -> list[str]:
    return [
        "config=apps/main/configs/debug.yaml",
        f"dump_dir={dump_dir}",
        f"data.root_dir={data_root}",
        "data.synthesize_missing=false",
        "data.tokenizer.name=bytes",
        "data.batch_size=4",
        "data.seq_len=32",
        "data.prefetch_size=1",
        "data.load_async=false",
        "model.dim=32",
        "model.n_layers=2",
        "model.n_heads=4",
        "model.max_seqlen=32",
        "model.multiple_of=16",
        f"steps={STEPS}",
        "optim.warmup=2",
        "logging.freq=1",
        "validation.every=0",
        "checkpoint.dump.every=4",
        *extra,
    ]


def run(nproc: int, args: list[str], timeout: float = 240, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        command = [sys.executable, "-m", "apps.main.train", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "apps.main.train", *args]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def losses(dump_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(dump_dir / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[int, Path]:
    """Roots with 1, 2 and 4 identical chunks of one source."""
    base = tmp_path_factory.mktemp("dist-data")
    write_corpus(base / "one", "stories", n_train=200, n_val=20, n_chunks=1, seed=0)
    roots = {1: base / "one"}
    for n in (2, 4):
        source = base / f"x{n}" / "stories"
        source.mkdir(parents=True)
        shutil.copy(base / "one" / "stories" / "stories.val.jsonl", source)
        for k in range(n):
            shutil.copy(base / "one" / "stories" / "stories.chunk.00.jsonl", source / f"stories.chunk.{k:02d}.jsonl")
        roots[n] = base / f"x{n}"
    return roots


@pytest.fixture(scope="module")
def single(data, tmp_path_factory) -> dict[int, float]:
    dump_dir = tmp_path_factory.mktemp("single") / "run"
    run(1, config_args(data[1], dump_dir))
    return losses(dump_dir)


FULL_SHARD = ["distributed.fsdp_type=full_shard", "distributed.dp_shard=2"]
KEEP_ALL = "checkpoint.dump.keep=0"


@pytest.fixture(scope="module")
def full_shard_run(data, tmp_path_factory) -> Path:
    """One 2-rank FULL_SHARD run keeping every checkpoint, read (never written) by the tests below."""
    dump_dir = tmp_path_factory.mktemp("full-shard") / "run"
    run(2, config_args(data[2], dump_dir, *FULL_SHARD, KEEP_ALL))
    return dump_dir


def assert_close(got: dict[int, float], expected: dict[int, float]) -> None:
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-4), f"step {step}: {got[step]} vs {expected[step]}"


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param((2, ["distributed.fsdp_type=no_shard"]), id="replicated"),
        pytest.param((4, FULL_SHARD), id="hybrid"),
        pytest.param((2, ["distributed.tp_size=2"]), id="tp2"),
    ],
)
def test_layout_matches_single_process(layout, data, single, tmp_path):
    nproc, extra = layout
    data_ranks = nproc // 2 if "distributed.tp_size=2" in extra else nproc
    run(nproc, config_args(data[data_ranks] if data_ranks > 1 else data[1], tmp_path / "run", *extra))
    assert_close(losses(tmp_path / "run"), single)
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "dp_shard" in config


def test_full_shard_matches_single_process(full_shard_run, single):
    assert_close(losses(full_shard_run), single)
    assert "dp_shard" in (full_shard_run / "config.yaml").read_text()


def copy_checkpoint(run_dir: Path, step: int, dump_dir: Path) -> None:
    """A new dump_dir holding only run_dir's checkpoint of `step`."""
    name = f"{step:010d}"
    (dump_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(run_dir / "checkpoints" / name, dump_dir / "checkpoints" / name)


def assert_two_rank_resume_is_exact(data: dict[int, Path], tmp_path: Path, extra: list[str], full: Path | None = None) -> None:
    """A 2-rank run resumed from its step-4 checkpoint logs the uninterrupted run's losses exactly.
    `full` is an uninterrupted run of `extra` + KEEP_ALL already made; by default it runs at tmp_path/full."""
    extra = [*extra, KEEP_ALL]
    if full is None:
        full = tmp_path / "full"
        run(2, config_args(data[2], full, *extra))
    copy_checkpoint(full, 4, tmp_path / "resumed")
    run(2, config_args(data[2], tmp_path / "resumed", *extra))
    resumed, uninterrupted = losses(tmp_path / "resumed"), losses(full)
    assert sorted(resumed) == list(range(5, STEPS + 1))
    assert resumed == {step: uninterrupted[step] for step in resumed}


def test_two_rank_resume_is_exact(data, full_shard_run, tmp_path):
    assert_two_rank_resume_is_exact(data, tmp_path, FULL_SHARD, full=full_shard_run)


def test_checkpoint_reloads_on_other_world_size(data, full_shard_run, tmp_path):
    """A 2-rank FSDP checkpoint resumes model and optimizer in one process (the data stream restarts)."""
    copy_checkpoint(full_shard_run, 4, tmp_path / "run")
    consolidated = torch.load(consolidate(tmp_path / "run" / "checkpoints" / "0000000004"), weights_only=True)["model"]
    assert consolidated["layers.0.attention.wq.weight"].shape == (32, 32)  # whole, not a shard
    # The single process reads a root of one chunk: a data change resume refuses unless forced.
    result = run(1, config_args(data[1], tmp_path / "run", f"steps={STEPS}", "checkpoint.force_resume=true"))
    assert "data stream restarts" in result.stderr
    assert sorted(losses(tmp_path / "run")) == list(range(5, STEPS + 1))  # continued from step 4


MEMORY = [
    "model.productkey_args.is_enabled=true",
    "model.productkey_args.layers=1",
    "model.productkey_args.mem_n_keys=8",
    "model.productkey_args.mem_heads=2",
    "model.productkey_args.mem_knn=4",
    "model.productkey_args.mem_k_dim=16",
    "model.productkey_args.value_fixed_lr=0.01",
]


def final_table(dump_dir: Path) -> torch.Tensor:
    folder = sorted((dump_dir / "checkpoints").iterdir())[-1]
    return torch.load(consolidate(folder), weights_only=True)["model"]["memory_values.weight"]


@pytest.fixture(scope="module")
def memory_single(data, tmp_path_factory) -> Path:
    """The single-process memory-model run (device values) the multi-rank memory layouts must match."""
    dump_dir = tmp_path_factory.mktemp("memory-single") / "run"
    run(1, config_args(data[1], dump_dir, *MEMORY))
    return dump_dir


@pytest.mark.parametrize("zero_copy", [False, True], ids=["device_values", "zero_copy"])
def test_memory_model_two_ranks_match_single_process(zero_copy, data, memory_single, tmp_path):
    """Value tables stay out of FSDP, replicated (on the device) or one per node (zero-copy, the
    ranks updating disjoint rows of a shared host table); their row-sparse gradients are averaged
    over the ranks. Losses and the checkpoint's one table match a single process of the same kind."""
    extra = [*MEMORY, f"model.productkey_args.zero_copy={str(zero_copy).lower()}"]
    single = memory_single
    if zero_copy:
        single = tmp_path / "single"
        run(1, config_args(data[1], single, *extra))
    run(2, config_args(data[2], tmp_path / "two", *extra, *FULL_SHARD))
    assert_close(losses(tmp_path / "two"), losses(single))
    single_table, two_table = final_table(single), final_table(tmp_path / "two")
    torch.testing.assert_close(two_table, single_table, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("nproc", [2, 4])
def test_memory_parallel_matches_single_process(nproc, data, memory_single, tmp_path):
    """Value tables sharded by columns over pairs of ranks (4 ranks: two pairs, replicas of each
    other's slices): the losses and the checkpoint's whole table match a single process."""
    run(nproc, config_args(data[nproc], tmp_path / "mp", *MEMORY, "distributed.memory_parallel_size=2", *FULL_SHARD))
    assert_close(losses(tmp_path / "mp"), losses(memory_single))
    torch.testing.assert_close(final_table(tmp_path / "mp"), final_table(memory_single), rtol=1e-4, atol=1e-6)


def test_memory_parallel_two_rank_resume_is_exact(data, tmp_path):
    assert_two_rank_resume_is_exact(data, tmp_path, [*MEMORY, "distributed.memory_parallel_size=2", "distributed.fsdp_type=no_shard"])


def saved_optimizer_state(folder: Path, key: str) -> torch.Tensor:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(folder), str(folder.parent / "full.pt"))
    return torch.load(folder.parent / "full.pt", weights_only=True)["optim"]["state"]["memory_values.weight"][key]


def test_memory_parallel_rowwise_adagrad_matches_single_process_and_resumes_exactly(data, tmp_path):
    """Rowwise Adagrad over a table sharded by columns on 2 ranks: each row's accumulator is the
    mean over the whole row (reduced over the slices), so the table matches one process, the
    checkpoint holds the one-process accumulator, and a resumed run logs the uninterrupted one's
    losses bit for bit."""
    adagrad = [*MEMORY, "model.productkey_args.value_update=rowwise_adagrad"]
    run(1, config_args(data[1], tmp_path / "single", *adagrad))
    assert_two_rank_resume_is_exact(data, tmp_path, [*adagrad, "distributed.memory_parallel_size=2", "distributed.fsdp_type=no_shard"])
    assert_close(losses(tmp_path / "full"), losses(tmp_path / "single"))
    torch.testing.assert_close(final_table(tmp_path / "full"), final_table(tmp_path / "single"), rtol=1e-4, atol=1e-6)
    last = f"{STEPS:010d}"
    accumulators = [saved_optimizer_state(tmp_path / name / "checkpoints" / last, "row_sum_sq") for name in ("full", "single")]
    assert accumulators[0].shape == (64,)
    torch.testing.assert_close(*accumulators, rtol=1e-4, atol=1e-12)


def test_memory_parallel_validation_with_a_short_last_batch(data, tmp_path):
    """Every val line, 5 per batch: rank 0's last batch holds 1 row, rank 1's 5 (the group's
    column all-gather needs one size on every rank: the short batch is padded with ignored rows)."""
    run(2, config_args(data[2], tmp_path / "mp", *MEMORY, "distributed.memory_parallel_size=2", "distributed.fsdp_type=no_shard",
                       "steps=2", "validation.every=2", "validation.max_batches=0", "validation.batch_size=5"))
    records = [r for r in read_metrics(tmp_path / "mp" / "metrics.jsonl") if "val/loss" in r]
    assert [r["step"] for r in records] == [0, 2] and all(math.isfinite(r["val/loss"]) for r in records)


def test_zero_copy_two_rank_resume_is_exact(data, tmp_path):
    """Host table and its optimizer state go through the checkpoint and come back exactly."""
    assert_two_rank_resume_is_exact(data, tmp_path, [*MEMORY, "model.productkey_args.zero_copy=true", "distributed.fsdp_type=no_shard"])
    assert torch.equal(final_table(tmp_path / "resumed"), final_table(tmp_path / "full"))


def test_killed_rank_fails_the_job(data, tmp_path):
    """SIGKILL of one training rank mid-run: the job exits non-zero promptly, every rank ends."""
    args = config_args(data[2], tmp_path / "run", *FULL_SHARD, "steps=100000", "distributed.timeout_s=20")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "apps.main.train", *args]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline and process.poll() is None, "training did not start"
        time.sleep(0.5)
    children = subprocess.run(["pgrep", "-f", "-P", str(process.pid), "apps.main.train"], capture_output=True, text=True).stdout.split()
    assert children, "no rank processes found"
    os.kill(int(children[-1]), signal.SIGKILL)
    start = time.monotonic()
    try:
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode != 0
    assert time.monotonic() - start < 60
    json.dumps(process.returncode)


def test_ctrl_c_under_torchrun_saves_on_every_rank_and_the_rerun_resumes(data, tmp_path):
    """Ctrl-C at a terminal reaches torchrun only (it starts each rank in a session of its own);
    torchrun passes SIGINT to the ranks, which finish the step, save one checkpoint together and
    stop within its shutdown grace; torchrun itself then exits non-zero (its own SignalException
    traceback). The rerun resumes from that checkpoint."""
    from tests.test_faults import as_from_a_terminal

    dump_dir = tmp_path / "run"
    args = config_args(data[2], dump_dir, *FULL_SHARD, "steps=100000", "checkpoint.dump.every=100000")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "apps.main.train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True, preexec_fn=as_from_a_terminal)
    metrics = dump_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline and process.poll() is None, "training did not start"
        time.sleep(0.5)
    os.kill(process.pid, signal.SIGINT)
    try:
        _, stderr = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode != 0
    saved = [p.name for p in (dump_dir / "checkpoints").iterdir()]
    assert len(saved) == 1 and saved[0].isdigit(), saved  # published, no partial folder left
    step = int(saved[0])
    assert stderr.count(f"stopped by SIGINT at step {step}") == 1, stderr[-3000:]  # the main rank's line
    assert "SIGKILL" not in stderr, stderr[-3000:]  # the ranks stopped by themselves within torchrun's grace
    run(2, config_args(data[2], dump_dir, *FULL_SHARD, f"steps={step + 2}"))
    assert [r["step"] for r in read_metrics(metrics) if "loss" in r][-2:] == [step + 1, step + 2]
