"""A real single-node SLURM cluster (setup/local_slurm.sh): jobs launched through lingua.stool run
to completion, and a job signalled before its time limit saves, requeues and finishes from its
checkpoint. Skipped only where slurm-wlm and munge cannot be installed."""

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from lingua.metrics import read_metrics
from lingua.synthetic import write_corpus

REPO = Path(__file__).resolve().parents[1]
CANNOT_INSTALL = 3  # local_slurm.sh's exit code when slurm cannot be installed here


def cluster_env(folder: Path) -> dict:
    """The environment of a local cluster kept in `folder` on two free ports (another cluster on this
    machine, e.g. a second test session, keeps its own folder and ports)."""
    with socket.socket() as ctld, socket.socket() as slurmd:
        ctld.bind(("127.0.0.1", 0))
        slurmd.bind(("127.0.0.1", 0))
        ports = ctld.getsockname()[1], slurmd.getsockname()[1]
    return {
        **os.environ, "LINGUA_SLURM_DIR": str(folder), "LINGUA_SLURM_CTLD_PORT": str(ports[0]), "LINGUA_SLURM_SLURMD_PORT": str(ports[1]),
        "SLURM_CONF": str(folder / "slurm.conf"), "PATH": f"{folder / 'bin'}:{os.environ['PATH']}",
    }


def local_slurm(env: dict, action: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "setup/local_slurm.sh", action], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def scratch_folder(name: str) -> Path:
    """A folder the script creates itself below /tmp (the munge user must reach it; pytest's are private)."""
    return Path(tempfile.gettempdir()) / f"lingua-slurm-{name}-{os.getpid()}"


@pytest.fixture(scope="module")
def slurm_env():
    folder = scratch_folder("main")
    env = cluster_env(folder)
    started = local_slurm(env, "start")
    if started.returncode == CANNOT_INSTALL:
        pytest.skip(f"no SLURM here: {started.stderr.strip()}")
    assert started.returncode == 0, started.stdout + started.stderr
    yield env
    local_slurm(env, "stop")
    shutil.rmtree(folder, ignore_errors=True)


def test_second_cluster_beside_the_first_and_stop_ends_all_it_started(slurm_env):
    """Another folder and other ports give a second cluster on the same machine; `stop` ends its
    slurmctld, slurmd and munged, and the first cluster keeps running."""
    folder = scratch_folder("second")
    env = cluster_env(folder)
    try:
        started = local_slurm(env, "start")
        assert started.returncode == 0, started.stdout + started.stderr
        pid_files = [folder / "slurmctld.pid", folder / "slurmd.pid", folder / "munge" / "munged.pid"]
        pids = [int(f.read_text()) for f in pid_files]
        assert all(_alive(pid) for pid in pids)
        stopped = local_slurm(env, "stop")
        assert stopped.returncode == 0 and "munged" in stopped.stdout
        assert not any(_alive(pid) for pid in pids) and not any(f.exists() for f in pid_files)
    finally:
        local_slurm(env, "stop")
        shutil.rmtree(folder, ignore_errors=True)
    assert "idle" in subprocess.run(["sinfo", "-h", "-o", "%t"], env=slurm_env, capture_output=True, text=True).stdout


def _alive(pid: int) -> bool:
    try:
        return "(zombie)" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slurm-data")
    write_corpus(root, "stories", n_train=200, n_val=20, n_chunks=1, seed=0)
    return root


def submit(env: dict, dump_dir: Path, data_root: Path, steps: int, every: int) -> str:
    overrides = [
        f"dump_dir={dump_dir}", f"steps={steps}", f"data.root_dir={data_root}", "data.synthesize_missing=false",
        "data.tokenizer.name=bytes", "data.batch_size=2", "data.seq_len=32", "model.dim=32", "model.n_layers=1",
        "model.n_heads=2", "model.multiple_of=16", "model.max_seqlen=32", "validation.every=0", "optim.warmup=2",
        f"checkpoint.dump.every={every}", "checkpoint.dump.keep=0",
    ]
    command = [
        sys.executable, "-m", "lingua.stool", "script=apps.main.train", "config=apps/main/configs/debug.yaml",
        f"overrides=[{','.join(overrides)}]", "nodes=1", "ngpus=0", "ncpu=1", "time=10",
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return re.search(r"submitted job (\d+)", result.stdout).group(1)


def job_state(env: dict, job_id: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    match = re.search(r"JobState=(\w+)", shown)
    return match.group(1) if match else "GONE"


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def logged_steps(dump_dir: Path) -> list[int]:
    path = dump_dir / "metrics.jsonl"
    return [r["step"] for r in read_metrics(path) if "loss" in r] if path.exists() else []


def test_job_runs_to_completion(slurm_env, data_root, tmp_path):
    dump_dir = tmp_path / "run"
    job_id = submit(slurm_env, dump_dir, data_root, steps=20, every=10)
    wait_for(lambda: job_state(slurm_env, job_id) in ("COMPLETED", "FAILED", "CANCELLED", "GONE"), 180, "the job")
    log = (dump_dir / "submitit" / f"{job_id}_0_log.out").read_text()
    assert job_state(slurm_env, job_id) in ("COMPLETED", "GONE"), log + (dump_dir / "submitit" / f"{job_id}_0_log.err").read_text()[-3000:]
    assert f"from {dump_dir / 'code' / 'apps' / 'main' / 'train.py'}" in log  # ran from the code snapshot
    assert logged_steps(dump_dir)[-1] == 20
    assert (dump_dir / "checkpoints" / "0000000020" / ".metadata").is_file()


def test_time_limit_signal_saves_requeues_and_resumes(slurm_env, data_root, tmp_path):
    dump_dir = tmp_path / "run"
    steps = 2000
    job_id = submit(slurm_env, dump_dir, data_root, steps=steps, every=500)
    wait_for(lambda: len(logged_steps(dump_dir)) >= 3, 180, "training to start")
    subprocess.run(["scancel", "--signal=USR1", job_id], env=slurm_env, check=True)
    # SLURM holds a requeued job for a while before it may start again; an operator can release it.
    wait_for(lambda: job_state(slurm_env, job_id) == "PENDING", 60, "the requeue")
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=slurm_env, check=True)
    wait_for(lambda: job_state(slurm_env, job_id) in ("COMPLETED", "FAILED", "CANCELLED", "GONE"), 240, "the requeued job")

    err = (dump_dir / "submitit" / f"{job_id}_0_log.err").read_text()
    saved = [int(s) for s in re.findall(r"saved checkpoint \S+/(\d{10})", err)]
    preempt_step = next(s for s in saved if s % 500)  # the checkpoint written on the signal
    assert "received SIGUSR1" in err and f"requeued SLURM job {job_id}" in err
    assert f"resumed from checkpoint {dump_dir / 'checkpoints' / f'{preempt_step:010d}'}" in err
    assert (dump_dir / "checkpoints" / f"{steps:010d}" / ".metadata").is_file()
    steps_logged = logged_steps(dump_dir)
    assert steps_logged[-1] == steps
    resumed_part = steps_logged[steps_logged.index(preempt_step) + 1 :]
    assert resumed_part and resumed_part[0] > preempt_step  # the requeued run continued after the saved step


def test_dry_run_prints_and_writes_nothing(tmp_path):
    dump_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "lingua.stool", "script=apps.main.train", "config=apps/main/configs/debug.yaml",
         f"overrides=[dump_dir={dump_dir}]", "nodes=2", "ngpus=8", "partition=gpu", "time=60", "dry_run=true"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "2 node(s) x 8 task(s)" in result.stdout and "gpus_per_node: 8" in result.stdout
    assert "slurm_partition: gpu" in result.stdout and "timeout_min: 60" in result.stdout
    assert not dump_dir.exists()


def test_bad_run_config_fails_before_submitting(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lingua.stool", "script=apps.main.train", "config=apps/main/configs/debug.yaml",
         "overrides=[optim.lrr=1]", "dry_run=true"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and "optim.lrr" in result.stderr and "optim.lr" in result.stderr
