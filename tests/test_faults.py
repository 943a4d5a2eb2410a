"""Fault injection: nothing that goes wrong costs more than the work since the last checkpoint,
and nothing fails silently. One section per fault class:

1. crashes (SIGKILL anywhere, corrupt or truncated checkpoints)    2. preemption signals
3. bad input (each a one-line error, exit code 2, nothing written)  4. numerical faults
5. distributed and data-producer faults                             6. disk faults
(A rank killed mid-training under torchrun: tests/test_distributed.py; requeue under SLURM:
tests/test_slurm.py.)
"""

import errno
import importlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lingua.args import cli_main
from lingua.checkpoint import CorruptCheckpointError, step_dirs
from lingua.metrics import read_metrics
from lingua.stool import config_class
from lingua.synthetic import write_corpus

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fault-data")
    write_corpus(root, "stories", n_train=300, n_val=20, n_chunks=2, seed=0)
    return root


def run_args(corpus: Path, dump_dir: Path, *extra: str) -> list[str]:
    return [
        "config=apps/main/configs/debug.yaml", f"dump_dir={dump_dir}", f"data.root_dir={corpus}",
        "data.synthesize_missing=false", "data.tokenizer.name=bytes", "data.batch_size=2", "data.seq_len=32",
        "data.prefetch_size=4", "model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.multiple_of=16",
        "model.max_seqlen=32", "validation.every=0", "optim.warmup=2", "logging.freq=1", "steps=40",
        "checkpoint.dump.every=5", "checkpoint.dump.keep=0", *extra,
    ]


def train_cli(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apps.main.train", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def as_from_a_terminal() -> None:
    """Popen preexec_fn: Ctrl-C handled by default, as in a command typed at a terminal (a test run
    started in the background, e.g. `pytest &`, passes SIGINT ignored to its children)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_cli(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "apps.main.train", *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, start_new_session=True, preexec_fn=as_from_a_terminal,
    )


def logged(dump_dir: Path) -> dict[int, float]:
    """Loss per step, the last record of a step winning (a resumed run re-logs steps after its checkpoint)."""
    path = dump_dir / "metrics.jsonl"
    return {r["step"]: r["loss"] for r in read_metrics(path) if "loss" in r} if path.exists() else {}


def wait_until(predicate, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, f"training exited early: {process.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> dict[int, float]:
    dump_dir = tmp_path_factory.mktemp("reference") / "run"
    result = train_cli(run_args(corpus, dump_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    return logged(dump_dir)


# 1. Crashes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_at_a_random_point_then_resume_is_exact(corpus, reference, tmp_path, seed):
    """SIGKILL of the whole process group (trainer and data producer) at a random moment, possibly
    mid-checkpoint; the rerun resumes from the newest complete checkpoint and logs the losses of the
    uninterrupted run."""
    dump_dir = tmp_path / "run"
    args = run_args(corpus, dump_dir, "data.load_async=true")
    process = start_cli(args)
    kill_after_step = random.Random(seed).randint(3, 30)
    wait_until(lambda: max(logged(dump_dir), default=0) >= kill_after_step, process)
    time.sleep(random.Random(seed).uniform(0, 0.05))
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    complete = step_dirs(dump_dir / "checkpoints")
    resumed_from = int(complete[-1].name) if complete else 0

    result = train_cli(args)
    assert result.returncode == 0, result.stderr[-2000:]
    losses = logged(dump_dir)
    assert losses == reference, f"killed after step {kill_after_step}, resumed from {resumed_from}"
    if resumed_from:
        assert f"resumed from checkpoint {complete[-1]}" in result.stderr


def test_truncated_checkpoint_is_detected_and_the_previous_one_used(corpus, reference, tmp_path):
    dump_dir = tmp_path / "run"
    assert train_cli(run_args(corpus, dump_dir)).returncode == 0
    newest = step_dirs(dump_dir / "checkpoints")[-1]
    shard = next(newest.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    result = train_cli(run_args(corpus, dump_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    assert str(shard) in result.stderr and "truncated" in result.stderr
    assert f"resumed from checkpoint {dump_dir / 'checkpoints' / '0000000035'}" in result.stderr
    assert logged(dump_dir) == reference  # steps 36-40 redone, identically


def test_every_checkpoint_corrupt_stops_instead_of_starting_over(corpus, tmp_path):
    dump_dir = tmp_path / "run"
    assert train_cli(run_args(corpus, dump_dir, "steps=10")).returncode == 0
    for folder in step_dirs(dump_dir / "checkpoints"):
        shard = next(folder.glob("*.distcp"))
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size, altered content
        shard.write_bytes(bytes(data))
    before = (dump_dir / "metrics.jsonl").read_text()
    result = train_cli(run_args(corpus, dump_dir))
    assert result.returncode == 2
    assert "checksum mismatch" in result.stderr and "no usable checkpoint" in result.stderr
    assert (dump_dir / "metrics.jsonl").read_text() == before


# 2. Preemption ------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_saves_and_exits_cleanly(corpus, tmp_path, signum):
    dump_dir = tmp_path / "run"
    process = start_cli(run_args(corpus, dump_dir, "steps=100000", "checkpoint.dump.every=100000", "data.load_async=true"))
    wait_until(lambda: len(logged(dump_dir)) >= 3, process)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr[-3000:]
    assert f"received {signal.Signals(signum).name}" in stderr
    saved = step_dirs(dump_dir / "checkpoints")
    assert len(saved) == 1 and int(saved[0].name) == max(logged(dump_dir))


def test_ranks_agree_on_a_signal_every_n_steps(tmp_path):
    """With a process group the ranks agree (an all-reduce and a host sync) only every check_every
    steps; without one the flag is read every step."""
    import torch
    import torch.distributed as dist

    from lingua.preemption import PreemptionWatcher

    watcher = PreemptionWatcher(check_every=4)
    watcher.received = signal.SIGTERM
    assert watcher.agreed_signal(torch.device("cpu"), step=1) == signal.SIGTERM  # single process: every step
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        assert [watcher.agreed_signal(torch.device("cpu"), step) for step in range(1, 9)] == [None] * 3 + [signal.SIGTERM] + [None] * 3 + [signal.SIGTERM]
    finally:
        dist.destroy_process_group()


# 3. Bad input -------------------------------------------------------------------------------


PK = ["model.productkey_args.is_enabled=true", "model.productkey_args.layers=0", "model.productkey_args.mem_n_keys=16",
      "model.productkey_args.mem_knn=4", "model.productkey_args.mem_k_dim=16"]  # a valid small memory, then one bad value


def _previous_run(dump_dir: Path) -> dict[str, str]:
    """A dump_dir as a previous run left it; bad input must not change any of it."""
    dump_dir.mkdir(parents=True)
    files = {"config.yaml": "previous: config\n", "metrics.jsonl": '{"step": 1, "loss": 3.0}\n'}
    for name, text in files.items():
        (dump_dir / name).write_text(text)
    return files


@pytest.mark.parametrize(
    "case",
    [
        ("missing data dir", ["data.root_dir=/nonexistent/data"], "/nonexistent/data"),
        ("empty data dir", ["data.root_dir={empty}"], "{empty}"),
        ("missing tokenizer", ["data.tokenizer.name=sp", "data.tokenizer.path=/nonexistent/tok.model"], "/nonexistent/tok.model"),
        ("wrong tokenizer file", ["data.tokenizer.name=sp", "data.tokenizer.path={not_a_model}"], "{not_a_model}"),
        ("config typo", ["optim.lrr=1"], "did you mean 'optim.lr'"),
        ("wrong type", ["steps=many"], "'steps'"),
        ("value out of range", ["checkpoint.dump.every=-1"], "config error: checkpoint.dump.every=-1 must be >= 0"),
        ("seq_len beyond the model", ["data.seq_len=64"], "model.max_seqlen"),
        ("memory knn above n_keys", [*PK, "model.productkey_args.mem_knn=64"], "mem_knn=64 exceeds mem_n_keys=16"),
        ("memory odd k_dim", [*PK, "model.productkey_args.mem_k_dim=15"], "mem_k_dim=15 must be even"),
        ("memory layer out of range", [*PK, "model.productkey_args.layers=0,5"], "ids [5] are outside the 1 blocks"),
        ("zero_copy beyond host memory", [*PK, "model.productkey_args.zero_copy=true", "model.productkey_args.mem_n_keys=65536"],
         "GiB of host memory, but available host memory is"),
        ("memory on an FPGA", [*PK, "model.productkey_args.mem_offload=true"], "mem_offload=true (values on an FPGA memory device) is not supported"),
    ],
    ids=lambda case: case[0],
)
def test_bad_input_fails_before_work_and_keeps_files(corpus, tmp_path, case):
    _, overrides, expected = case
    (tmp_path / "empty").mkdir()
    (tmp_path / "not_a_model").write_text("this is not a sentencepiece model")
    paths = {"empty": tmp_path / "empty", "not_a_model": tmp_path / "not_a_model"}
    overrides = [o.format(**paths) for o in overrides]
    dump_dir = tmp_path / "run"
    files = _previous_run(dump_dir)
    result = train_cli(run_args(corpus, dump_dir, *overrides))
    assert result.returncode == 2, result.stderr[-2000:]
    assert expected.format(**paths) in result.stderr
    assert "Traceback" not in result.stderr
    assert {p.name: p.read_text() for p in dump_dir.iterdir()} == files


@pytest.mark.parametrize("target", ["missing", "empty folder"])
@pytest.mark.parametrize("module", ["apps.main.generate", "apps.mosaics.generate", "apps.main.eval", "apps.mosaics.eval"])
def test_a_ckpt_that_names_nothing_is_one_line(tmp_path, capsys, module, target):
    """In-process, as `python -m <module> ckpt=...` runs it: one line naming the path, exit 2, nothing written."""
    ckpt = tmp_path / "nothing"
    if target == "empty folder":
        ckpt.mkdir()
    extra = ["prompt=hi"] if module.endswith("generate") else []
    with pytest.raises(SystemExit) as exit_:
        cli_main(config_class(module), importlib.import_module(module).main, [f"ckpt={ckpt}", *extra])
    assert exit_.value.code == 2
    reason = "does not exist" if target == "missing" else "holds no checkpoint"
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: ckpt='{ckpt}' {reason}"), lines
    assert list(tmp_path.iterdir()) == ([ckpt] if target == "empty folder" else [])


@pytest.mark.parametrize("target", ["missing", "empty folder"])
def test_an_init_ckpt_path_that_names_nothing_fails_before_work(corpus, tmp_path, capsys, target):
    from apps.main.train import MainTrainArgs, main

    init = tmp_path / "nothing"
    if target == "empty folder":
        init.mkdir()
    dump_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        cli_main(MainTrainArgs, main, run_args(corpus, dump_dir, f"checkpoint.init_ckpt_path={init}", "data.load_async=false"))
    assert exit_.value.code == 2
    reason = "does not exist" if target == "missing" else "holds no checkpoint"
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"error: checkpoint.init_ckpt_path='{init}' {reason}")
    assert not dump_dir.exists()


def test_init_ckpt_path_takes_a_run_folder_like_ckpt(corpus, tmp_path):
    """A run's dump_dir starts the new run from that run's newest checkpoint (lr 1e-12: the one
    step of the new run leaves the weights in place)."""
    from apps.main.generate import load_model_and_tokenizer
    from apps.main.train import MODEL_SPEC, MainTrainArgs
    from lingua.args import parse_args
    from lingua.trainer import train

    first = train(parse_args(MainTrainArgs, run_args(corpus, tmp_path / "a", "steps=3", "checkpoint.dump.every=2", "data.load_async=false")), MODEL_SPEC)
    assert first.last_checkpoint.name == "0000000003"
    second = parse_args(MainTrainArgs, run_args(
        corpus, tmp_path / "b", "steps=1", "optim.lr=1e-12", "optim.warmup=0", "data.load_async=false", f"checkpoint.init_ckpt_path={tmp_path / 'a'}"))
    train(second, MODEL_SPEC)
    started, _, _ = load_model_and_tokenizer(str(tmp_path / "b"), "cpu")
    source, _, _ = load_model_and_tokenizer(str(first.last_checkpoint), "cpu")
    for name, tensor in source.state_dict().items():
        torch.testing.assert_close(started.state_dict()[name], tensor, rtol=0, atol=1e-8, msg=name)


def test_an_unwritable_dump_dir_fails_before_work(corpus, tmp_path, capsys, monkeypatch):
    """Tests may run as root, for whom a read-only mode blocks nothing: the probe write fails instead."""
    import lingua.checkpoint as checkpoint
    from apps.main.train import MainTrainArgs, main

    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(SystemExit) as exit_:
        cli_main(MainTrainArgs, main, run_args(corpus, tmp_path / "file" / "run", "data.load_async=false"))
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: dump_dir='{tmp_path / 'file' / 'run'}' is not usable: {tmp_path / 'file'} is a file, not a folder; choose another dump_dir")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", read_only)
    with pytest.raises(SystemExit) as exit_:
        cli_main(MainTrainArgs, main, run_args(corpus, tmp_path / "run", "data.load_async=false"))
    monkeypatch.undo()
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: dump_dir='{tmp_path / 'run'}' is not writable: {tmp_path}: {os.strerror(errno.EROFS)}; choose another dump_dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_only_the_story_corpus_is_ever_synthesized(tmp_path):
    """synthesize_missing writes the default corpus only: another missing source is an error naming
    its folder and the prep command, and nothing is written (not even the story corpus beside it)."""
    root, dump_dir = tmp_path / "data", tmp_path / "run"
    root.mkdir()
    result = train_cli(run_args(root, dump_dir, "data.synthesize_missing=true", "data.sources={stories: 1.0, fineweb_edu_10bt: 1.0}"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"'{root / 'fineweb_edu_10bt'}' does not exist" in result.stderr
    assert f"python setup/download_prepare_hf_data.py fineweb_edu_10bt --data-dir {root}" in result.stderr
    assert "Traceback" not in result.stderr and not list(root.iterdir()) and not dump_dir.exists()


def test_synthesized_data_says_so_in_the_log(tmp_path, caplog, monkeypatch):
    import lingua.data

    written = []
    monkeypatch.setattr(lingua.data, "ensure_corpus", lambda root, source: written.append((root, source)))
    with caplog.at_level("WARNING", logger="lingua.data"):
        lingua.data.prepare_sources(lingua.data.DataArgs(root_dir=str(tmp_path), synthesize_missing=True))
    assert written == [(str(tmp_path), "stories")]
    assert f"no shards in '{tmp_path / 'stories'}': writing the synthetic story corpus" in caplog.text


def test_malformed_jsonl_names_file_and_line_or_is_skipped(tmp_path):
    root = tmp_path / "data"
    write_corpus(root, "stories", n_train=100, n_val=10, n_chunks=1, seed=0)
    chunk = next((root / "stories").glob("*.chunk.*.jsonl"))
    lines = chunk.read_text().splitlines()
    lines.insert(6, '{"text": broken')
    chunk.write_text("\n".join(lines) + "\n")
    past_line_7 = ["data.batch_size=16", "steps=20", "checkpoint.dump.every=20"]  # 320 windows of 32 bytes
    failed = train_cli(run_args(root, tmp_path / "fail", *past_line_7))
    assert failed.returncode == 2 and f"line 7 of '{chunk}'" in failed.stderr
    skipped = train_cli(run_args(root, tmp_path / "skip", *past_line_7, "data.bad_lines=skip"))
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    state = json.loads((tmp_path / "skip" / "checkpoints" / "0000000020" / "train_state_00000.json").read_text())
    assert [reader["skipped"] for reader in state["data"]["pack"]["mix"]["readers"].values()] == [1]


def test_checkpoint_of_another_model_shape_is_refused(corpus, tmp_path):
    """Without checkpoint.force_resume the config check refuses the new shape first (tests/test_resume.py);
    forced, loading the checkpoint fails naming it, before config.yaml is rewritten."""
    dump_dir = tmp_path / "run"
    assert train_cli(run_args(corpus, dump_dir, "steps=5", "data.load_async=false")).returncode == 0
    config = (dump_dir / "config.yaml").read_bytes()
    result = train_cli(run_args(corpus, dump_dir, "steps=10", "model.dim=64", "checkpoint.force_resume=true", "data.load_async=false"))
    assert result.returncode == 2
    assert "does not fit this model" in result.stderr and "0000000005" in result.stderr
    assert [p.name for p in step_dirs(dump_dir / "checkpoints")] == ["0000000005"]
    assert (dump_dir / "config.yaml").read_bytes() == config


# 4. Numerical faults ------------------------------------------------------------------------


def _nan_at_step_script(tmp_path: Path, args: list[str], bad_step: int) -> Path:
    script = tmp_path / "nan_run.py"
    script.write_text(
        "import sys, torch\n"
        "from apps.main.transformer import LMTransformer\n"
        "from apps.main.train import MODEL_SPEC, MainTrainArgs\n"
        "from lingua.args import cli_main\n"
        "from lingua.trainer import train\n"
        "forward, calls = LMTransformer.forward, [0]\n"
        "def poisoned(self, tokens, target=None, **kw):\n"
        "    out = forward(self, tokens, target, **kw)\n"
        "    calls[0] += 1\n"
        f"    return out * float('nan') if calls[0] == {bad_step} and target is not None else out\n"
        "LMTransformer.forward = poisoned\n"
        "if __name__ == '__main__':  # the data producer process imports this file too\n"
        f"    cli_main(MainTrainArgs, lambda cfg: train(cfg, MODEL_SPEC), {args!r})\n"
    )
    return script


def test_nonfinite_loss_stops_naming_the_step(corpus, tmp_path):
    dump_dir = tmp_path / "run"
    script = _nan_at_step_script(tmp_path, run_args(corpus, dump_dir, "logging.freq=4"), bad_step=13)
    result = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "non-finite loss or gradient norm at step 13" in result.stderr
    assert [p.name for p in step_dirs(dump_dir / "checkpoints")] == ["0000000005", "0000000010"]


def test_nonfinite_loss_skip_mode_drops_only_that_update(corpus, tmp_path):
    dump_dir = tmp_path / "run"
    script = _nan_at_step_script(tmp_path, run_args(corpus, dump_dir, "on_nonfinite=skip", "steps=20"), bad_step=13)
    result = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step 13: non-finite loss or gradient norm, update skipped" in result.stderr
    losses = logged(dump_dir)
    assert 13 not in losses and max(losses) == 20
    assert all(v == v for v in losses.values())  # no NaN logged afterwards: the weights stayed finite


# 5. Distributed and data-producer faults -------------------------------------------------------------


def test_dead_data_producer_raises_in_the_trainer(corpus, tmp_path):
    dump_dir = tmp_path / "run"
    process = start_cli(run_args(corpus, dump_dir, "steps=100000", "checkpoint.dump.every=100000", "data.load_async=true"))
    wait_until(lambda: len(logged(dump_dir)) >= 3, process)
    children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    producers = [pid for pid in children if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")]
    assert producers, "no data producer process found"
    os.kill(int(producers[0]), signal.SIGKILL)
    try:
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode not in (0, None)
    assert "producer" in stderr.lower()


def test_hung_collective_ends_the_job_within_timeout(tmp_path):
    """Rank 1 never joins a collective: rank 0 fails after distributed.timeout_s instead of hanging,
    and torchrun ends the job non-zero. (A rank killed mid-training: tests/test_distributed.py.)"""
    script = tmp_path / "hang.py"
    script.write_text(
        "import time, torch, torch.distributed as dist\n"
        "from lingua.distributed import DistributedArgs, init_distributed\n"
        "env = init_distributed(DistributedArgs(timeout_s=5))\n"
        "if env.rank == 1:\n"
        "    time.sleep(120)\n"
        "dist.all_reduce(torch.ones(1))\n"
    )
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)],
        cwd=REPO, capture_output=True, text=True, timeout=100,
    )
    assert result.returncode != 0
    assert time.monotonic() - start < 60
    assert "timed out" in result.stderr.lower() or "timeout" in result.stderr.lower()


# 6. Disk faults -----------------------------------------------------------------------------


def _fail_second_save(monkeypatch, where: str, code: int) -> None:
    """Writes into the step-10 checkpoint raise OSError(code): in DCP's file writer (the tensor
    files, where a full disk is most likely) or in the JSON files written after them."""
    import lingua.checkpoint as checkpoint
    from torch.distributed.checkpoint import filesystem

    def fails(path) -> bool:
        return "0000000010" in str(path)

    if where == "tensor files":
        original_stream = filesystem.FileSystem.create_stream

        def create_stream(self, path, mode):
            if fails(path):
                raise OSError(code, os.strerror(code), str(path))
            return original_stream(self, path, mode)

        monkeypatch.setattr(filesystem.FileSystem, "create_stream", create_stream)
    else:
        original_write = checkpoint._write_json

        def write_json(path, data):
            if fails(path):
                raise OSError(code, os.strerror(code), str(path))
            original_write(path, data)

        monkeypatch.setattr(checkpoint, "_write_json", write_json)


@pytest.mark.parametrize("code, where", [(errno.ENOSPC, "tensor files"), (errno.EROFS, "json files")], ids=["disk full", "read-only"])
def test_failed_checkpoint_write_keeps_the_previous_one(corpus, tmp_path, capsys, monkeypatch, code, where):
    """A full or read-only disk during the second save: one line naming the folder and the cause
    (exit 1, no traceback), the partial write removed, the first checkpoint intact and resumable."""
    from apps.main.train import MODEL_SPEC, MainTrainArgs, main
    from lingua.args import parse_args
    from lingua.trainer import train

    args = run_args(corpus, tmp_path / "run", "steps=10", "data.load_async=false")
    _fail_second_save(monkeypatch, where, code)
    with pytest.raises(SystemExit) as exit_:
        cli_main(MainTrainArgs, main, args)
    monkeypatch.undo()
    checkpoints = tmp_path / "run" / "checkpoints"
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (
        f"error: cannot write checkpoint {checkpoints / '0000000010'}: {os.strerror(code)}; "
        f"the previous checkpoint {checkpoints / '0000000005'} is kept"
    )
    assert [p.name for p in step_dirs(checkpoints)] == ["0000000005"]
    assert not list(checkpoints.glob(".partial-*"))
    assert train(parse_args(MainTrainArgs, args), MODEL_SPEC).step == 10
    assert issubclass(CorruptCheckpointError, ValueError)
