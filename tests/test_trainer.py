"""The training loop end to end on CPU: learning, exact resume, crash safety, non-finite loss."""

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from apps.main.train import MODEL_SPEC, MainTrainArgs
from lingua.args import config_from_dict, load_config
from lingua.checkpoint import CheckpointManager, step_dirs
from lingua.metrics import read_metrics
from lingua.optim import lr_multiplier
from lingua.synthetic import write_corpus
from lingua.tokenizer import ByteTokenizer
from lingua.trainer import NonFiniteLossError, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_corpus(root, "stories", n_train=400, n_val=40, n_chunks=2, seed=0)
    return root


def tiny_config(corpus: Path, dump_dir: Path, **overrides) -> MainTrainArgs:
    config = {
        "dump_dir": str(dump_dir),
        "steps": 60,
        "seed": 3,
        "data": {"root_dir": str(corpus), "batch_size": 4, "seq_len": 32, "load_async": False, "prefetch_size": 4},
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "max_seqlen": 32, "multiple_of": 16},
        "optim": {"lr": 3e-3, "warmup": 5},
        "checkpoint": {"dump": {"every": 30, "keep": 2}},
        "logging": {"freq": 1},
    }
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return config_from_dict(MainTrainArgs, config)


class Crash(Exception):
    pass


def crash_at_first_save_and_resume(cfg: MainTrainArgs, monkeypatch):
    """Train until the first checkpoint is written, crash, then resume: the resumed run's result."""
    original_save = CheckpointManager.save

    def save_then_crash(self, step, *args, **kwargs):
        original_save(self, step, *args, **kwargs)
        raise Crash(step)

    monkeypatch.setattr(CheckpointManager, "save", save_then_crash)
    with pytest.raises(Crash):
        train(cfg, MODEL_SPEC)
    monkeypatch.setattr(CheckpointManager, "save", original_save)
    return train(cfg, MODEL_SPEC)


def test_loss_and_validation_decrease(corpus, tmp_path, caplog):
    cfg = tiny_config(corpus, tmp_path / "run", steps=80, **{"validation.every": 40, "validation.max_batches": 4})
    with caplog.at_level(logging.INFO, logger="lingua"):
        result = train(cfg, MODEL_SPEC)
    run = tmp_path / "run"  # one line at the start names every place the run writes to
    assert f"dump_dir {run} | metrics {run / 'metrics.jsonl'} | config {run / 'config.yaml'} | checkpoints {run / 'checkpoints'}" in caplog.messages[0]
    progress = [m for m in caplog.messages if m.startswith("step 80/80 |")]
    assert progress and "host rss " in progress[0] and "eta 0:00" in progress[0]
    assert result.step == 80
    val = [result.val_losses[s] for s in sorted(result.val_losses)]
    assert val[0] > 5.0  # byte vocabulary: ln(258) = 5.55 at init
    assert val[-1] < 0.6 * val[0]
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert {"step", "loss", "grad_norm", "lr", "speed/tokens_per_s"} <= set(records[1])
    assert load_config(MainTrainArgs, str(tmp_path / "run" / "config.yaml")) == cfg


def test_resume_is_bit_identical(corpus, tmp_path, monkeypatch):
    full = train(tiny_config(corpus, tmp_path / "full"), MODEL_SPEC)

    original_save = CheckpointManager.save

    def save_then_crash(self, step, *args, **kwargs):
        folder = original_save(self, step, *args, **kwargs)
        if step == 30:
            raise Crash(step)
        return folder

    monkeypatch.setattr(CheckpointManager, "save", save_then_crash)
    with pytest.raises(Crash):
        train(tiny_config(corpus, tmp_path / "split"), MODEL_SPEC)
    monkeypatch.setattr(CheckpointManager, "save", original_save)
    resumed = train(tiny_config(corpus, tmp_path / "split"), MODEL_SPEC)

    assert sorted(resumed.losses) == list(range(31, 61))
    for step in range(31, 61):
        assert resumed.losses[step] == full.losses[step], f"step {step}"


def test_resume_with_async_loader_and_grad_accumulation(corpus, tmp_path, monkeypatch):
    overrides = {"data.load_async": True, "grad_acc_steps": 2, "steps": 12, "checkpoint.dump.every": 6}
    full = train(tiny_config(corpus, tmp_path / "full", **overrides), MODEL_SPEC)
    resumed = crash_at_first_save_and_resume(tiny_config(corpus, tmp_path / "split", **overrides), monkeypatch)
    assert {s: resumed.losses[s] for s in range(7, 13)} == {s: full.losses[s] for s in range(7, 13)}


def test_sigkill_during_checkpoint_write_keeps_previous(corpus, tmp_path):
    """A process killed while writing the step-20 checkpoint leaves step 10 loadable; the rerun resumes from it."""
    dump_dir = tmp_path / "run"
    overrides = {"steps": 30, "checkpoint.dump.every": 10, "checkpoint.dump.keep": 3}
    cfg = tiny_config(corpus, dump_dir, **overrides)
    script = tmp_path / "killed_run.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, signal
            import lingua.checkpoint as checkpoint
            from apps.main.train import MODEL_SPEC, MainTrainArgs
            from lingua.args import load_config
            from lingua.trainer import train

            original = checkpoint._write_json
            def write_then_die(path, data):
                original(path, data)
                if data.get("step") == 20:  # the rank's train state of step 20 is on disk, params.json is not
                    os.kill(os.getpid(), signal.SIGKILL)
            checkpoint._write_json = write_then_die
            train(load_config(MainTrainArgs, {str(dump_dir / 'config.yaml')!r}), MODEL_SPEC)
            """
        )
    )
    dump_dir.mkdir()
    from lingua.args import dump_config

    dump_config(cfg, dump_dir / "config.yaml")
    killed = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    checkpoints = dump_dir / "checkpoints"
    assert [p.name for p in step_dirs(checkpoints)] == ["0000000010"]
    assert list(checkpoints.glob(".partial-*"))  # the interrupted write is left where resume never looks

    resumed = train(cfg, MODEL_SPEC)
    assert sorted(resumed.losses) == list(range(11, 31))
    reference = train(tiny_config(corpus, tmp_path / "reference", **overrides), MODEL_SPEC)
    assert all(resumed.losses[s] == reference.losses[s] for s in range(11, 31))
    assert not list(checkpoints.glob(".partial-*"))  # cleaned up by the next save
    assert [p.name for p in step_dirs(checkpoints)] == ["0000000010", "0000000020", "0000000030"]


def test_non_finite_loss_stops_naming_step_and_keeps_checkpoint(corpus, tmp_path, monkeypatch):
    cfg = tiny_config(corpus, tmp_path / "run", steps=20, **{"checkpoint.dump.every": 5, "logging.freq": 4})
    model_forward = type(MODEL_SPEC.build(cfg.model, ByteTokenizer())).forward
    calls = {"n": 0}

    def forward(self, tokens, target=None, **kwargs):
        calls["n"] += 1
        loss = model_forward(self, tokens, target, **kwargs)
        return loss * float("nan") if calls["n"] == 7 else loss

    monkeypatch.setattr(type(MODEL_SPEC.build(cfg.model, ByteTokenizer())), "forward", forward)
    with pytest.raises(NonFiniteLossError, match="step 7"):
        train(cfg, MODEL_SPEC)
    assert [p.name for p in step_dirs(tmp_path / "run" / "checkpoints")] == ["0000000005"]
    state = json.loads((tmp_path / "run" / "checkpoints" / "0000000005" / "train_state_00000.json").read_text())
    assert state["step"] == 5


def test_logged_lr_is_the_updates_and_a_skipped_step_advances_the_schedule(corpus, tmp_path, monkeypatch):
    """The lr logged at step s is the one its update used (multiplier of step s-1); a step skipped
    for a non-finite loss still moves the schedule on; validation time is reported on its own."""
    overrides = {"steps": 8, "on_nonfinite": "skip", "validation.every": 4, "validation.max_batches": 1, "optim.warmup": 5}
    cfg = tiny_config(corpus, tmp_path / "run", **overrides)
    model_class = type(MODEL_SPEC.build(cfg.model, ByteTokenizer()))
    model_forward = model_class.forward
    calls = {"n": 0}

    def forward(self, tokens, target=None, **kwargs):
        loss = model_forward(self, tokens, target, **kwargs)
        if self.training:
            calls["n"] += 1
            return loss * float("nan") if calls["n"] == 3 else loss
        return loss

    monkeypatch.setattr(model_class, "forward", forward)
    result = train(cfg, MODEL_SPEC)
    assert result.skipped_steps == [3]
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "lr" in r]
    for record in records:
        assert record["lr"] == pytest.approx(cfg.optim.lr * lr_multiplier(record["step"] - 1, cfg.optim, cfg.steps)), record["step"]
    assert [r["step"] for r in records] == [1, 2, 4, 5, 6, 7, 8]  # step 3 logged nothing: its loss was dropped
    after_validation = next(r for r in records if r["step"] == 5)
    assert after_validation["time/validation_s"] > 0 and "time/validation_s" not in records[1]


def test_init_ckpt_path_loads_weights_only(corpus, tmp_path):
    first = train(tiny_config(corpus, tmp_path / "first", steps=10, **{"checkpoint.dump.every": 10}), MODEL_SPEC)
    cfg = tiny_config(corpus, tmp_path / "second", steps=1, **{"checkpoint.init_ckpt_path": str(first.last_checkpoint), "optim.warmup": 0})
    second = train(cfg, MODEL_SPEC)
    fresh = train(tiny_config(corpus, tmp_path / "fresh", steps=1, **{"optim.warmup": 0}), MODEL_SPEC)
    assert second.losses[1] < fresh.losses[1] - 0.5  # trained weights, fresh optimizer and schedule
    assert torch.isfinite(torch.tensor(second.losses[1]))


def test_profiler_trace_and_plots(corpus, tmp_path):
    from lingua.plot import plot_run

    overrides = {"steps": 6, "profiling.run": True, "profiling.profile_warmup": 2, "profiling.profile_steps": 2, "validation.every": 3}
    train(tiny_config(corpus, tmp_path / "run", **overrides), MODEL_SPEC)
    traces = list((tmp_path / "run" / "profiling").glob("trace_step*.json"))
    assert len(traces) == 1 and json.loads(traces[0].read_text())["traceEvents"]
    assert traces[0].name == "trace_step4_rank0.json"  # ranks write their own files
    written = plot_run(tmp_path / "run")
    assert {p.name for p in written} == {"loss.png", "lr.png", "throughput.png"}
    assert all(p.stat().st_size > 1000 for p in written)


@pytest.mark.parametrize("option", ["distributed.selective_activation_checkpointing", "distributed.checkpoint_each_layer", "distributed.compile"])
def test_parallelize_options_keep_the_losses(corpus, tmp_path, option):
    """Activation checkpointing recomputes the same math; compiled blocks match eager closely."""
    baseline = train(tiny_config(corpus, tmp_path / "base", steps=4), MODEL_SPEC)
    varied = train(tiny_config(corpus, tmp_path / "varied", steps=4, **{option: True}), MODEL_SPEC)
    for step, loss in baseline.losses.items():
        assert varied.losses[step] == pytest.approx(loss, rel=1e-5), f"step {step}"


def test_evaluation_during_training(corpus, tmp_path, monkeypatch):
    """An eval section runs the harness and validation on each eval checkpoint and logs the results."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.chdir(REPO)
    overrides = {
        "steps": 6,
        "checkpoint.eval.every": 3,
        "eval": {"harness": {"tasks": ["synthetic_mc"], "limit": 4, "bootstrap_iters": 0}, "validation": {"max_batches": 1}},
    }
    train(tiny_config(corpus, tmp_path / "run", **overrides), MODEL_SPEC)
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval/synthetic_mc/acc" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert (tmp_path / "run" / "eval" / "0000000003" / "results.json").is_file()


def test_evaluation_during_training_keeps_resume_exact(corpus, tmp_path, monkeypatch):
    """lm-eval reseeds the global generators and loading the checkpoint for evaluation draws from
    them: evaluation runs on its own RNG state, so with dropout a run resumed from an evaluated
    checkpoint logs the uninterrupted run's losses."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.chdir(REPO)
    memory = {"is_enabled": True, "layers": "1", "mem_n_keys": 8, "mem_heads": 2, "mem_knn": 4, "mem_k_dim": 8, "mem_value_dropout": 0.5}
    overrides = {
        "steps": 4, "checkpoint.dump.every": 2, "checkpoint.eval.every": 2, "model.productkey_args": memory,
        "eval": {"harness": {"tasks": ["synthetic_mc"], "limit": 2, "bootstrap_iters": 0}, "validation": {"max_batches": 1}},
    }
    full = train(tiny_config(corpus, tmp_path / "full", **overrides), MODEL_SPEC)
    resumed = crash_at_first_save_and_resume(tiny_config(corpus, tmp_path / "split", **overrides), monkeypatch)
    assert sorted(resumed.losses) == [3, 4]
    assert resumed.losses == {step: full.losses[step] for step in (3, 4)}


def test_padded_validation_batch_keeps_the_short_batch_loss():
    """Validation pads a short last batch (so every rank's forward has one shape) with rows whose
    targets are ignored: the loss stays the short batch's."""
    import numpy as np

    from apps.main.transformer import LMTransformer, LMTransformerArgs
    from lingua.trainer import _pad_rows

    torch.manual_seed(0)
    model = LMTransformer(LMTransformerArgs(dim=32, n_layers=1, n_heads=2, vocab_size=40, max_seqlen=16, multiple_of=16))
    model.init_weights()
    short = np.random.default_rng(0).integers(0, 40, (2, 16, 2))
    padded = _pad_rows(short, 5)
    assert padded.shape == (5, 16, 2) and (padded[:2] == short).all() and (padded[2:, :, 1] == -100).all()
    with torch.no_grad():
        losses = [model(torch.from_numpy(b[..., 0]), torch.from_numpy(b[..., 1])).item() for b in (short, padded)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
