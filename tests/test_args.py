"""Strict configs: precedence, error messages naming keys and values, dump and reload."""

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from lingua.args import ConfigError, config_from_dict, dump_config, flatten_dict, load_config, parse_args, to_dict


@dataclass
class OptimConfig:
    lr: float = 3e-4
    scheduler: Literal["cosine", "linear"] = "cosine"
    betas: tuple[float, float] = (0.9, 0.95)


@dataclass
class DataConfig:
    root_dir: str = "data"
    sources: dict[str, float] = field(default_factory=lambda: {"stories": 1.0})
    tokenizer_path: str | None = None


@dataclass
class RunConfig:
    dump_dir: str = "???"
    steps: int = 10
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_precedence_defaults_file_cli(tmp_path):
    config = write(tmp_path / "c.yaml", "dump_dir: a\nsteps: 5\noptim:\n  lr: 0.1\n")
    cfg = parse_args(RunConfig, [f"config={config}", "optim.lr=0.5", "data.tokenizer_path=tok.model"])
    assert cfg.dump_dir == "a" and cfg.steps == 5  # from the file
    assert cfg.optim.lr == 0.5  # the command line wins over the file
    assert cfg.optim.scheduler == "cosine" and cfg.optim.betas == (0.9, 0.95)  # defaults
    assert cfg.data.tokenizer_path == "tok.model"


def test_typo_names_key_and_suggests_closest():
    with pytest.raises(ConfigError) as error:
        parse_args(RunConfig, ["dump_dir=x", "optim.lrr=1"])
    message = str(error.value)
    assert "'optim.lrr'" in message and "did you mean 'optim.lr'" in message


def test_typo_in_file_names_the_file(tmp_path):
    config = write(tmp_path / "c.yaml", "dump_dir: x\ndata:\n  root_dirr: d\n")
    with pytest.raises(ConfigError, match=r"'data.root_dirr'.*c\.yaml.*did you mean 'data.root_dir'"):
        parse_args(RunConfig, [f"config={config}"])


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"'optim.lr'.*'abc'"):
        parse_args(RunConfig, ["dump_dir=x", "optim.lr=abc"])
    with pytest.raises(ConfigError, match=r"'steps'.*1.5"):
        parse_args(RunConfig, ["dump_dir=x", "steps=1.5"])


def test_literal_choice_is_checked():
    with pytest.raises(ConfigError, match=r"'optim.scheduler'.*'cosin'.*cosine"):
        parse_args(RunConfig, ["dump_dir=x", "optim.scheduler=cosin"])


def test_missing_required_value():
    with pytest.raises(ConfigError, match="dump_dir"):
        parse_args(RunConfig, [])


def test_bad_cli_argument_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        parse_args(RunConfig, ["dump_dir"])
    with pytest.raises(ConfigError, match="does not exist"):
        parse_args(RunConfig, [f"config={tmp_path / 'nope.yaml'}"])
    bad = write(tmp_path / "bad.yaml", "dump_dir: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        parse_args(RunConfig, [f"config={bad}"])


def test_dict_in_file_replaces_default_cli_adds(tmp_path):
    config = write(tmp_path / "c.yaml", "dump_dir: x\ndata:\n  sources:\n    web: 2.0\n")
    cfg = parse_args(RunConfig, [f"config={config}", "data.sources.code=1.0"])
    assert cfg.data.sources == {"web": 2.0, "code": 1.0}


def test_dump_and_reload_is_identical(tmp_path):
    cfg = parse_args(RunConfig, ["dump_dir=x", "optim.betas=[0.8,0.99]", "data.sources.web=3"])
    path = dump_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(RunConfig, str(path)) == cfg
    assert config_from_dict(RunConfig, to_dict(cfg)) == cfg


def test_flatten_dict():
    assert flatten_dict({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}


def test_cli_exits_nonzero_before_work(tmp_path):
    """A typo on a real entry point exits with code 2 and names the key, having built nothing."""
    script = tmp_path / "entry.py"
    script.write_text(
        "import sys\n"
        "from dataclasses import dataclass, field\n"
        "from lingua.args import cli_main\n"
        "@dataclass\n"
        "class Optim:\n"
        "    lr: float = 1.0\n"
        "@dataclass\n"
        "class Run:\n"
        "    dump_dir: str = '???'\n"
        "    optim: Optim = field(default_factory=Optim)\n"
        "def main(cfg):\n"
        "    open(cfg.dump_dir + '.started', 'w').close()\n"
        "cli_main(Run, main)\n"
    )
    marker = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(script), "optim.lrr=1", f"dump_dir={marker}"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "optim.lrr" in result.stderr and "optim.lr" in result.stderr
    assert not (tmp_path / "run.started").exists()
