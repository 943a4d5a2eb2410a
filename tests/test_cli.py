"""What every command offers a new user: `--help` generated from the config dataclasses (key, type,
default, comment), `print_config=true`, and the named memory and recent-pace ETA of the progress line."""

import dataclasses
import logging
import os
import runpy
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import pytest
import yaml

from apps.main.train import MainTrainArgs
from lingua.args import ConfigError, load_config, to_dict
from lingua.config_help import config_help, field_comments
from lingua.evaluation import EvalArgs, LinguaLM
from lingua.metrics import RecentStepRate, progress_line
from lingua.tokenizer import ByteTokenizer

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}

# command -> (keys its help must document with their type, default and comment)
COMMANDS = {
    "apps.main.train": ["  data.seq_len: int (>= 1) = 256", "      tokens per sequence", "  model.max_seqlen: int (>= 1) = follows data.seq_len",
                        "  checkpoint.dump.every: int (>= 0) = 1000", "  optim.beta2: float (in [0, 1)) = 0.95", "  model.vocab_size: int (>= 1 or -1) = -1", "  optim.scheduler: one of constant|linear|inv_sqrt|cosine|wsd = 'cosine'"],
    "apps.main.eval": ["  ckpt: str = ''", "  harness.batch_size: int (>= 1) = 8", "  validation.max_batches: int or null (>= 1) = 20"],
    "apps.main.generate": ["  ckpt: str = required", "  generator.max_gen_len: int (>= 1) ="],
    "apps.mosaics.train": ["  model.leaky_impl:", "  data.batch_size: int (>= 1) = 4", "  seed: int (>= 0) = 42"],
    "apps.mosaics.eval": ["  ckpt: str = required", "[harness] (HarnessArgs, lingua.evaluation.config; null unless set)"],
    "apps.mosaics.generate": ["  ckpt: str = required"],
    "lingua.stool": ["  nodes: int (>= 1) = 1", "  time: int (>= 1 or -1) = -1", "      nodes of the job", "  config: str = required"],
}


@pytest.mark.parametrize("module", COMMANDS)
def test_help_of_every_command_lists_its_keys(module, capsys, monkeypatch):
    """`python -m <module> --help`, run in this process (runpy runs the module as __main__ as the
    interpreter would, without paying for a new interpreter): exit 0 before any work, with the
    command's usage, description and keys, each key line followed by its field's comment."""
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the module is imported already; runpy runs it again as __main__
        with pytest.raises(SystemExit) as exit_:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m {module} ") and "print_config=true" in out
    for line in COMMANDS[module]:
        assert line in out, f"{module} --help lacks {line!r}:\n{out}"


def test_help_reads_types_defaults_comments_and_sections():
    @dataclass
    class Inner:
        width: int = 3  # how wide
        mode: Literal["a", "b"] = "a"
        """the mode, documented by a docstring"""

    @dataclass
    class Outer:
        DERIVED_DEFAULTS: ClassVar[dict[str, str]] = {"inner.width": "size"}
        RANGES: ClassVar[dict[str, str]] = {"size": "> 0"}

        size: int = 7  # the size
        name: str | None = None  # an optional name
        tags: list[str] = field(default_factory=lambda: ["x"])
        inner: Inner = field(default_factory=lambda: Inner(width=5))  # the inner section
        extra: Inner | None = None  # set to enable

    assert field_comments(Inner) == {"width": "how wide", "mode": "the mode, documented by a docstring"}
    text = config_help(Outer, "prog [key=value ...]", "Does things.", config_key=None)
    lines = text.splitlines()
    assert lines[0] == "usage: prog [key=value ...]" and "Does things." in lines
    for line in ["  size: int (> 0) = 7", "      the size", "  name: str or null = null", "  tags: list[str] = ['x']",
                 "  inner.width: int = follows size", "  inner.mode: one of a|b = 'a'", "      the mode, documented by a docstring",
                 "  extra.width: int = 3"]:
        assert line in lines, line
    assert any(line.startswith("[inner] (Inner, ") and line.endswith(": the inner section") for line in lines)
    assert any(line.startswith("[extra] (Inner, ") and "null unless set" in line for line in lines)


def test_help_of_a_subclass_includes_the_base_fields_comments():
    comments = field_comments(MainTrainArgs)
    assert comments["steps"] == "optimizer steps" and "compatibility" in comments["probe_freq"]


def test_print_config_prints_the_resolved_config_and_writes_nothing(tmp_path):
    dump_dir = tmp_path / "run"
    args = ["config=apps/main/configs/debug.yaml", "steps=7", f"dump_dir={dump_dir}", "print_config=true"]
    done = subprocess.run([sys.executable, "-m", "apps.main.train", *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    expected = load_config(MainTrainArgs, str(REPO / "apps/main/configs/debug.yaml"), ["steps=7", f"dump_dir={dump_dir}"])
    assert yaml.safe_load(done.stdout) == to_dict(expected)
    assert not dump_dir.exists()


def test_print_config_takes_a_boolean(capsys):
    from lingua.args import cli_main

    with pytest.raises(SystemExit) as exit_:
        cli_main(MainTrainArgs, lambda cfg: None, ["print_config=maybe"])
    assert exit_.value.code == 2 and "print_config='maybe'" in capsys.readouterr().err


def test_eval_takes_ckpt_and_ckpt_dir_as_one_key():
    assert EvalArgs(ckpt="runs/a").ckpt == "runs/a"
    moved = EvalArgs(ckpt_dir="runs/a")
    assert (moved.ckpt, moved.ckpt_dir) == ("runs/a", "")
    assert EvalArgs(ckpt="runs/a", ckpt_dir="runs/a").ckpt == "runs/a"
    with pytest.raises(ConfigError, match="ckpt='runs/a' and ckpt_dir='runs/b'"):
        EvalArgs(ckpt="runs/a", ckpt_dir="runs/b")
    assert dataclasses.replace(moved).ckpt == "runs/a"  # the dumped config reloads the same


def test_progress_line_names_the_memory():
    record = {"step": 5, "loss": 2.0, "lr": 1e-3, "speed/tokens_per_s": 100.0, "memory/max_rss_gib": 0.7, "memory/host_rss_gib": 0.5}
    line = progress_line(record, 10, 30.0)
    assert "host rss 0.50GiB" in line and "gpu" not in line and line.endswith("eta 0:30")
    gpu = progress_line({**record, "memory/max_allocated_gib": 3.25}, 10, 30.0)
    assert "gpu mem 3.25GiB (peak allocated)" in gpu and "host rss 0.50GiB" in gpu


def test_eta_follows_the_recent_pace_not_the_average_since_start():
    rate = RecentStepRate(total_steps=1000, window=3)
    assert rate.eta_s(10, now=0.0) != rate.eta_s(10, now=0.0)  # NaN until there is an interval
    rate.eta_s(20, now=100.0)  # a slow start: 10 s per step
    for k in range(1, 5):  # then 1 s per step
        eta = rate.eta_s(20 + 10 * k, now=100.0 + 10 * k)
    assert eta == pytest.approx(1.0 * (1000 - 60))  # the average since start would say about 3.3 s per step


def test_eval_requests_log_progress(caplog):
    """loglikelihood and generation log done / total with an ETA, and a last line when done."""
    from tests.test_eval import MAX_LEN, requests, tiny_model
    from apps.main.eval import model_generate_fn, model_logits_fn

    model, tokenizer = tiny_model(), ByteTokenizer()
    lm = LinguaLM(tokenizer, model_logits_fn(model), MAX_LEN, generate_fn=model_generate_fn(model, tokenizer), batch_size=2, progress_every_s=0)
    with caplog.at_level(logging.INFO, logger="lingua.evaluation.scoring"):
        lm.loglikelihood(requests("loglikelihood", [("a", "b"), ("cd", "e"), ("f", "g")]))
        lm.generate_until(requests("generate_until", [("a", {"until": [], "max_gen_toks": 2})] * 3))
    messages = [r.getMessage() for r in caplog.records]
    assert "loglikelihood requests: 2/3 done, eta" in messages[0] and messages[1].startswith("loglikelihood requests: 3/3 done, took")
    assert "generate_until requests: 2/3 done, eta" in messages[2] and messages[3].startswith("generate_until requests: 3/3 done, took")


def test_readme_lists_every_shipped_config():
    readme = (REPO / "README.md").read_text()
    shipped = sorted(REPO.glob("apps/*/configs/*.yaml")) + sorted(REPO.glob("agi_test/*/config/*.yaml"))
    assert shipped
    missing = [str(p.relative_to(REPO)) for p in shipped if f"`{p.relative_to(REPO)}`" not in readme]
    assert not missing, f"README.md's shipped-config table lacks {missing}"
