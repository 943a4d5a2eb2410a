"""Every numeric config key declares the values it accepts, and a value outside them is one line
naming the full dotted key (exit 2) before anything is written.

The walk starts from the config class of every command that parses its arguments with
`lingua.args.cli_main`, so a new section or field without a declared range fails here.
"""

import dataclasses
import re
import types
import typing
from pathlib import Path

import pytest

from lingua.args import ANY_RANGE, ConfigError, cli_main, config_from_dict, parse_range, ranges_of
from lingua.stool import StoolArgs, config_class

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = [
    "apps.main.train", "apps.main.eval", "apps.main.generate", "apps.mosaics.train", "apps.mosaics.eval",
    "apps.mosaics.generate", "apps.mosaics.context_eval", "apps.mosaics.compare",
]


def _command_modules() -> set[str]:
    """Modules of apps/ and lingua/ whose command line goes through cli_main."""
    found = set()
    for path in [*REPO.glob("apps/**/*.py"), *REPO.glob("lingua/**/*.py")]:
        if path.name != "args.py" and re.search(r"^\s*(raise SystemExit\()?cli_main\(", path.read_text(), re.MULTILINE):
            found.add(".".join(path.relative_to(REPO).with_suffix("").parts))
    return found


def _members(annotation) -> list:
    """The types an annotation is made of (`int | None` -> int, None; `list[X]` -> X)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, dict, tuple):
        return [t for arg in typing.get_args(annotation) for t in _members(arg)]
    return [annotation]


def _config_classes() -> list[type]:
    roots = [config_class(script) for script in SCRIPTS] + [StoolArgs]
    seen: list[type] = []
    stack = list(roots)
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.append(cls)
        for annotation in typing.get_type_hints(cls).values():
            stack.extend(t for t in _members(annotation) if dataclasses.is_dataclass(t))
    return seen


def _numeric_fields(cls: type) -> list[str]:
    hints = typing.get_type_hints(cls)
    scalar = lambda t: t in (int, float)  # noqa: E731  (bool is not a numeric field)
    return [
        f.name for f in dataclasses.fields(cls)
        if typing.get_origin(hints[f.name]) not in (list, dict, tuple) and any(scalar(t) for t in _members(hints[f.name]))
    ]


def test_the_command_list_is_complete():
    assert _command_modules() == {*SCRIPTS, "lingua.stool"}


@pytest.mark.parametrize("cls", _config_classes(), ids=lambda cls: f"{cls.__module__}.{cls.__qualname__}")
def test_every_numeric_field_declares_its_range(cls):
    ranges = ranges_of(cls)
    missing = [name for name in _numeric_fields(cls) if name not in ranges]
    assert not missing, f"{cls.__qualname__}: add {missing} to RANGES ('{ANY_RANGE}' when every value is meaningful)"
    fields = {f.name for f in dataclasses.fields(cls)}
    assert set(ranges) <= fields, f"{cls.__qualname__}.RANGES names no field {sorted(set(ranges) - fields)}"
    for spec in ranges.values():
        parse_range(spec)  # raises on a malformed spec


@pytest.mark.parametrize(
    "spec, inside, outside",
    [
        (">= 1", [1, 7, 1e9], [0, -1, 0.5, float("nan")]),
        ("> 0", [1e-12, 3.0], [0, -2.0]),
        ("[0, 1)", [0, 0.5], [1, -0.1, 1.5]),
        ("(0, 1]", [1, 0.01], [0, 1.01]),
        (">= 1 or -1", [-1, 1, 64], [0, -2]),
        ("any", [-5, 0, float("nan")], []),
    ],
)
def test_range_specs(spec, inside, outside):
    test = parse_range(spec)
    assert all(test(x) for x in inside) and not any(test(x) for x in outside)


def test_malformed_specs_are_refused():
    for spec in (">= one", "[0, 1", "between 0 and 1"):
        with pytest.raises(ValueError):
            parse_range(spec)


def test_nested_keys_are_named_in_full():
    from apps.main.train import MainTrainArgs

    with pytest.raises(ConfigError, match=r"^model\.productkey_args\.mem_query_dropout=1\.0 must be in \[0, 1\)$"):
        config_from_dict(MainTrainArgs, {"model": {"productkey_args": {"mem_query_dropout": 1.0}}})
    with pytest.raises(ConfigError, match=r"^eval\.harness\.batch_size=0 must be >= 1$"):
        config_from_dict(MainTrainArgs, {"eval": {"harness": {"batch_size": 0}}})
    with pytest.raises(ConfigError, match=r"^model\.max_seqlen=0 must be >= 1$"):  # a derived default: the key it follows is fine
        config_from_dict(MainTrainArgs, {"data": {"seq_len": 8}, "model": {"max_seqlen": 0}})


@pytest.mark.parametrize(
    "override, message",
    [
        ("steps=0", "steps=0 must be >= 1"),
        ("logging.freq=0", "logging.freq=0 must be >= 1"),
        ("checkpoint.dump.every=-1", "checkpoint.dump.every=-1 must be >= 0"),
        ("grad_acc_steps=0", "grad_acc_steps=0 must be >= 1"),
        ("optim.beta2=1.0", "optim.beta2=1.0 must be in [0, 1)"),
        ("model.vocab_size=0", "model.vocab_size=0 must be >= 1 or -1"),
    ],
)
def test_out_of_range_value_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, override, message):
    from apps.main.train import MainTrainArgs, main

    dump_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        cli_main(MainTrainArgs, main, ["config=apps/main/configs/debug.yaml", f"dump_dir={dump_dir}", override])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"config error: {message}\n"
    assert not dump_dir.exists()


def test_a_post_init_value_error_is_a_config_error():
    @dataclasses.dataclass
    class Odd:
        n: int = 1

        def __post_init__(self) -> None:
            if self.n % 2 == 0:
                raise ValueError(f"n={self.n} must be odd")

    with pytest.raises(ConfigError, match="^n=2 must be odd$"):
        config_from_dict(Odd, {"n": 2})
