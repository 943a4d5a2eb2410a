"""Rerunning in a dump_dir that holds a checkpoint: harmless config changes are applied and listed,
changes of the model, data or optimization are refused before anything is written (unless
forced), a finished run says so, every config key has a rule; Ctrl-C saves at the step end."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from apps.main.train import MODEL_SPEC, MainTrainArgs
from apps.mosaics.train import MosaicsTrainArgs
from lingua.args import flatten_dict, load_config, parse_args, to_dict
from lingua.checkpoint import PARAMS_FILE, step_dirs, write_manifest
from lingua.evaluation import EvalArgs
from lingua.preemption import PreemptionWatcher
from lingua.resume import KEY_RULES, classify
from lingua.synthetic import write_corpus
from lingua.trainer import train
from tests.test_faults import as_from_a_terminal, logged, run_args, start_cli, train_cli, wait_until

REPO = Path(__file__).resolve().parents[1]
FAST = ["data.load_async=false", "checkpoint.dump.every=2", "steps=4"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume-data")
    write_corpus(root, "stories", n_train=200, n_val=10, n_chunks=1, seed=0)
    return root


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory) -> Path:
    """A run trained to its last step (4), checkpoints at steps 2 and 4."""
    dump_dir = tmp_path_factory.mktemp("finished") / "run"
    train(parse_args(MainTrainArgs, run_args(corpus, dump_dir, *FAST)), MODEL_SPEC)
    return dump_dir


@pytest.fixture
def run_dir(finished, tmp_path) -> Path:
    """A copy of the finished run in a dump_dir of its own (its config keeps the original dump_dir)."""
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def snapshot(dump_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(dump_dir)): p.read_bytes() for p in sorted(dump_dir.rglob("*")) if p.is_file()}


def rerun(corpus: Path, dump_dir: Path, *overrides: str):
    return train(parse_args(MainTrainArgs, run_args(corpus, dump_dir, *FAST, *overrides)), MODEL_SPEC)


# Which keys a rerun may change ------------------------------------------------------------------


def _app_configs() -> list[tuple[type, dict]]:
    configs = [(cls, to_dict(cls(eval=EvalArgs()))) for cls in (MainTrainArgs, MosaicsTrainArgs)]
    for cls, app, skip in ((MainTrainArgs, "main", ("eval",)), (MosaicsTrainArgs, "mosaics", ("compare_",))):
        for path in sorted((REPO / "apps" / app / "configs").glob("*.yaml")):
            if not path.stem.startswith(skip):
                configs.append((cls, to_dict(load_config(cls, str(path)))))
    return configs


def test_every_config_key_of_every_app_has_a_rule():
    """A key added to any app's train config must be classified in lingua.resume.KEY_RULES, and
    every rule names keys that exist (a renamed key cannot leave a stale rule behind)."""
    keys = {key for _, config in _app_configs() for key in flatten_dict(config)}
    assert not sorted(k for k in keys if classify(k) is None)
    named = {prefix for prefix in KEY_RULES if any(k == prefix or k.startswith(prefix + ".") for k in keys)}
    assert named == set(KEY_RULES)
    assert classify("model.dim") == classify("optim.lr") == classify("data.sources.stories") == "refused"
    assert classify("steps") == classify("logging.freq") == classify("checkpoint.force_resume") == "harmless"


# Reruns -----------------------------------------------------------------------------------------


def test_changed_model_and_lr_are_refused_naming_them_and_nothing_is_written(corpus, run_dir):
    before = snapshot(run_dir)
    result = train_cli(run_args(corpus, run_dir, *FAST, "steps=6", "model.dim=64", "optim.lr=1e-3", "logging.freq=2"))
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "model.dim: 32 -> 64" in lines[0] and "optim.lr: 0.003 -> 0.001" in lines[0]
    assert "logging.freq" not in lines[0]  # harmless changes are not the reason
    assert "another dump_dir" in lines[0] and "checkpoint.force_resume=true" in lines[0]
    assert snapshot(run_dir) == before  # config.yaml, metrics and checkpoints byte for byte


def test_forced_resume_applies_refused_changes(corpus, run_dir, caplog):
    with caplog.at_level(logging.INFO, logger="lingua"):
        result = rerun(corpus, run_dir, "steps=6", "optim.lr=1e-3", "checkpoint.force_resume=true")
    assert sorted(result.losses) == [5, 6]
    assert any("checkpoint.force_resume=true: resuming step 4" in m and "optim.lr: 0.003 -> 0.001" in m for m in caplog.messages)
    saved = load_config(MainTrainArgs, str(run_dir / "config.yaml"))
    assert saved.optim.lr == 1e-3 and saved.steps == 6


def test_harmless_changes_are_applied_and_listed(corpus, run_dir, caplog):
    with caplog.at_level(logging.INFO, logger="lingua"):
        result = rerun(corpus, run_dir, "steps=6", "logging.freq=2")
    assert sorted(result.losses) == [6]
    listed = [m for m in caplog.messages if m.startswith("resuming step 4 with changed settings:")]
    assert len(listed) == 1 and "logging.freq: 1 -> 2" in listed[0] and "steps: 4 -> 6" in listed[0]
    saved = load_config(MainTrainArgs, str(run_dir / "config.yaml"))
    assert (saved.steps, saved.logging.freq) == (6, 2)


def test_a_key_newer_than_the_checkpoint_counts_as_unchanged_only_at_its_default(corpus, run_dir, caplog):
    """A checkpoint written before optim.warmup_from_zero existed: the rerun at the key's default
    resumes (the default is the old behaviour); any other value is refused as `(unset) -> value`."""
    latest = step_dirs(run_dir / "checkpoints")[-1]
    params = json.loads((latest / PARAMS_FILE).read_text())
    del params["optim"]["warmup_from_zero"]
    (latest / PARAMS_FILE).write_text(json.dumps(params))
    write_manifest(latest)
    refused = train_cli(run_args(corpus, run_dir, *FAST, "steps=6", "optim.warmup_from_zero=true"))
    assert refused.returncode == 2 and "optim.warmup_from_zero: (unset) -> True" in refused.stderr, refused.stderr[-2000:]
    with caplog.at_level(logging.INFO, logger="lingua"):
        result = rerun(corpus, run_dir, "steps=6")
    assert sorted(result.losses) == [5, 6]
    assert not any("warmup_from_zero" in m for m in caplog.messages)


@pytest.mark.parametrize("steps", [4, 3])
def test_finished_run_says_so_and_writes_nothing(corpus, run_dir, caplog, steps):
    before = snapshot(run_dir)
    with caplog.at_level(logging.INFO, logger="lingua"):
        result = rerun(corpus, run_dir, f"steps={steps}")
    assert result.step == 4 and result.losses == {}
    assert caplog.messages == [
        f"run debug is complete: checkpoint {run_dir / 'checkpoints' / '0000000004'} is at step 4 of steps={steps}, "
        "nothing to train (raise steps to continue it, or use another dump_dir for a new run)"
    ]
    assert snapshot(run_dir) == before


# Ctrl-C -----------------------------------------------------------------------------------------


def test_ctrl_c_saves_at_the_step_end_and_the_rerun_resumes(corpus, tmp_path):
    """SIGINT to the whole process group, as a terminal sends it (the data producer ignores it):
    the step ends, a checkpoint is saved, one line names it, exit 130; the rerun resumes from it."""
    dump_dir = tmp_path / "run"
    process = start_cli(run_args(corpus, dump_dir, "steps=100000", "checkpoint.dump.every=100000", "data.load_async=true"))
    wait_until(lambda: len(logged(dump_dir)) >= 2, process)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-3000:]
    assert "received SIGINT: saving a checkpoint at the end of this step" in stderr and "Traceback" not in stderr
    saved = step_dirs(dump_dir / "checkpoints")
    step = max(logged(dump_dir))
    assert [int(p.name) for p in saved] == [step]
    assert f"stopped by SIGINT at step {step}: checkpoint {saved[0]} holds it" in stderr
    assert "requeue" not in stderr

    result = train(parse_args(MainTrainArgs, run_args(corpus, dump_dir, f"steps={step + 1}", "data.load_async=false")), MODEL_SPEC)
    assert sorted(result.losses) == [step + 1]


def test_second_ctrl_c_stops_at_once(corpus, tmp_path):
    """A second SIGINT while the checkpoint is being written stops the run there: one line, exit
    130, no checkpoint published."""
    dump_dir = tmp_path / "run"
    script = tmp_path / "slow_save.py"
    script.write_text(
        "import sys, time\n"
        "from apps.main.train import MODEL_SPEC, MainTrainArgs\n"
        "from lingua.args import cli_main\n"
        "from lingua.checkpoint import CheckpointManager\n"
        "from lingua.trainer import train\n"
        "def slow_save(self, *args, **kwargs):\n"
        "    print('saving', file=sys.stderr, flush=True)\n"
        "    time.sleep(120)\n"
        "CheckpointManager.save = slow_save\n"
        f"cli_main(MainTrainArgs, lambda cfg: train(cfg, MODEL_SPEC), {run_args(corpus, dump_dir, 'steps=100000', 'checkpoint.dump.every=100000', 'data.load_async=false')!r})\n"
    )
    process = subprocess.Popen([sys.executable, str(script)], cwd=REPO, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                               preexec_fn=as_from_a_terminal)
    try:
        lines = []
        for line in process.stderr:
            lines.append(line)
            if " step 2/" in line:
                process.send_signal(signal.SIGINT)
            if line.strip() == "saving":
                process.send_signal(signal.SIGINT)
                break
        _, rest = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, "".join(lines) + rest
    assert rest.strip() == "interrupted" and "Traceback" not in "".join(lines) + rest
    assert not step_dirs(dump_dir / "checkpoints")


def test_ctrl_c_ignored_at_start_stays_ignored():
    """A process started with SIGINT ignored (in the background) keeps ignoring it."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with PreemptionWatcher() as watcher:
            os.kill(os.getpid(), signal.SIGINT)
            assert watcher.received is None
    finally:
        signal.signal(signal.SIGINT, previous)


def test_slurm_launch_refuses_the_same_changes_before_writing(corpus, run_dir):
    from lingua.args import ConfigError
    from lingua.stool import StoolArgs, launch

    overrides = [a for a in run_args(corpus, run_dir, *FAST) if not a.startswith("config=")]
    args = StoolArgs(config=str(REPO / "apps/main/configs/debug.yaml"), overrides=[*overrides, "model.dim=64"], ngpus=0, dry_run=True)
    before = snapshot(run_dir)
    with pytest.raises(ConfigError, match="model.dim: 32 -> 64"):
        launch(args)
    assert snapshot(run_dir) == before
    launch(StoolArgs(config=args.config, overrides=[*overrides, "steps=6"], ngpus=0, dry_run=True))  # harmless: submitted
