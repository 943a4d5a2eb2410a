"""Configs: nested dataclasses resolved from defaults < YAML file < `a.b=c` command-line overrides.

Every component declares its own dataclass next to the code that uses it (`DataArgs` in
`lingua/data.py`, ...); an app's top-level config nests them. This module turns a config class
plus a command line into a validated instance, strictly: an unknown key, a value of the wrong
type or a required value left unset raises `ConfigError` naming the full dotted key (and, for a
typo, the closest valid key) before any work starts. A config class may name, in a
`DERIVED_DEFAULTS` class variable, keys that take another key's value when no file or override sets
them. Every numeric field declares the values it accepts in a `RANGES` class variable
({"steps": ">= 1", "dropout": "[0, 1)", "vocab_size": ">= 1 or -1", "seed": "any"}); a value
outside its range is a `ConfigError` naming the full dotted key, checked before any
`__post_init__` runs (which then checks only what involves several keys). The resolved config is
dumped as YAML that `load_config` reads back unchanged.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from pathlib import Path
from typing import Any, Sequence, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from lingua.config_help import config_help
from lingua.ranges import ANY_RANGE, parse_range, range_text, ranges_of  # noqa: F401 (ANY_RANGE re-exported)

T = TypeVar("T")

CONFIG_KEY = "config"


class InputError(ValueError):
    """Bad user input (a config value, a file, data): commands print the message alone and exit 2."""


class ConfigError(InputError):
    """A config that cannot be used: the message names the key, the value and the fix."""


class RunError(RuntimeError):
    """A run stopped by its environment, not its input (a full or read-only disk while saving):
    commands print the message alone, naming what failed and why, and exit 1."""


def _check_ranges(node: Any, prefix: str = "") -> None:
    """Every numeric value of a resolved config against its field's range (nested sections and
    lists of sections included), naming the full dotted key of the first one outside it."""
    if isinstance(node, ListConfig) and not node._is_missing() and not node._is_none():
        for i in range(len(node)):
            _check_ranges(node._get_node(i), f"{prefix.rstrip('.')}[{i}].")
        return
    if not isinstance(node, DictConfig) or node._is_missing() or node._is_none():
        return
    cls = OmegaConf.get_type(node)
    ranges = ranges_of(cls) if isinstance(cls, type) and dataclasses.is_dataclass(cls) else {}
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, (DictConfig, ListConfig)):
            _check_ranges(child, f"{prefix}{key}.")
            continue
        spec = ranges.get(str(key))
        if spec is None:
            continue
        try:
            value = node[key]
        except OmegaConfBaseException:  # an interpolation that does not resolve: to_object reports it
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not parse_range(spec)(value):
            raise ConfigError(f"{prefix}{key}={value} must be {range_text(spec)}")


def _known_keys(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key (interior and leaf) of a structured config."""
    keys = []
    if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none():
        for key in node.keys():
            full = f"{prefix}{key}"
            keys.append(full)
            child = node._get_node(key)
            keys.extend(_known_keys(child, f"{full}."))
    return keys


def _closest(full_key: str, schema: DictConfig) -> str | None:
    candidates = _known_keys(schema)
    match = difflib.get_close_matches(full_key, candidates, n=1, cutoff=0.6)
    if match:
        return match[0]
    # A typo in the last component only: compare with the siblings.
    parent, _, leaf = full_key.rpartition(".")
    siblings = [k.rpartition(".")[2] for k in candidates if k.rpartition(".")[0] == parent]
    match = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.5)
    return f"{parent}.{match[0]}" if parent and match else (match[0] if match else None)


def _explain(error: OmegaConfBaseException, schema: DictConfig, source: str) -> ConfigError:
    """Turn an OmegaConf error into one message naming the full key, the value and a fix."""
    full_key = getattr(error, "full_key", None) or "?"
    if isinstance(error, ConfigKeyError) or "Key '" in str(error) and "not in" in str(error):
        hint = _closest(full_key, schema)
        suggestion = f"; did you mean '{hint}'?" if hint else ""
        return ConfigError(f"unknown config key '{full_key}' ({source}){suggestion}")
    value = getattr(error, "value", None)
    detail = str(error).split("\n")[0]
    return ConfigError(f"bad value for config key '{full_key}' ({source}): {value!r} -- {detail}")


def _clear_replaced_dicts(base: DictConfig, other: DictConfig) -> None:
    """A mapping given in a YAML file replaces a dict-typed field's default instead of adding to it
    (`data.sources: {fineweb: 1.0}` must not keep the default source beside it)."""
    for key in other.keys():
        child = other._get_node(key)
        if not isinstance(child, DictConfig) or key not in base:
            continue
        target = base._get_node(key)
        if not isinstance(target, DictConfig) or target._is_none() or target._is_missing():
            continue
        if OmegaConf.get_type(target) is dict:
            base[key] = {}
        else:
            _clear_replaced_dicts(target, child)


def _merge(base: DictConfig, other: Any, schema: DictConfig, source: str, replace_dicts: bool = False) -> DictConfig:
    try:
        if replace_dicts:
            base = base.copy()
            _clear_replaced_dicts(base, other)
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as error:
        raise _explain(error, schema, source) from None


def _check_missing(cfg: DictConfig, source: str) -> None:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"required config value(s) not set: {', '.join(missing)} ({source}); "
            f"set them in the YAML file or as key=value on the command line"
        )


def _to_object(cfg: DictConfig, cls: type[T], source: str) -> T:
    _check_missing(cfg, source)
    _check_ranges(cfg)
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as error:
        raise _explain(error, cfg, source) from None
    except InputError:
        raise
    except ValueError as error:  # a __post_init__ check: the same one line as every other config error
        raise ConfigError(str(error)) from None
    assert isinstance(obj, cls)
    return obj


def _schema(cls: type) -> DictConfig:
    """The structured config of `cls`; each key of `cls.DERIVED_DEFAULTS` ({"model.max_seqlen":
    "data.seq_len"}) follows the key it names unless a file or an override sets it."""
    schema = OmegaConf.structured(cls)
    for key, source in getattr(cls, "DERIVED_DEFAULTS", {}).items():
        OmegaConf.update(schema, key, "${" + source + "}")
    return schema


def config_from_dict(cls: type[T], data: dict | DictConfig, source: str = "dict") -> T:
    """Build `cls` from a (possibly partial) nested dict, strictly."""
    schema = _schema(cls)
    cfg = _merge(schema, OmegaConf.create(data), schema, source, replace_dicts=True)
    return _to_object(cfg, cls, source)


def _split_cli(argv: Sequence[str], config_key: str | None) -> tuple[str | None, list[str]]:
    config_path, overrides = None, []
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"command-line argument '{arg}' is not of the form key=value")
        key, _, value = arg.partition("=")
        if config_key is not None and key in (config_key, "--" + config_key):
            config_path = value
        else:
            overrides.append(arg.removeprefix("--"))
    return config_path, overrides


def _load_yaml(path: str) -> DictConfig:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        cfg = OmegaConf.load(file)
    except Exception as error:  # yaml.YAMLError and friends: name the file
        raise ConfigError(f"config file '{path}' is not valid YAML: {error}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config file '{path}' must hold a mapping at its top level")
    return cfg


def load_config(cls: type[T], config_path: str | None = None, overrides: Sequence[str] = ()) -> T:
    """Resolve `cls`: dataclass defaults < YAML file `config_path` < `a.b=c` overrides."""
    schema = _schema(cls)
    cfg = schema
    if config_path is not None:
        cfg = _merge(cfg, _load_yaml(config_path), schema, f"in {config_path}", replace_dicts=True)
    if overrides:
        try:
            cli = OmegaConf.from_dotlist(list(overrides))
        except OmegaConfBaseException as error:
            raise ConfigError(f"cannot parse command-line overrides {list(overrides)}: {error}") from None
        cfg = _merge(cfg, cli, schema, "on the command line")
    source = f"{config_path} + command line" if config_path else "command line"
    return _to_object(cfg, cls, source)


def parse_args(cls: type[T], argv: Sequence[str] | None = None, config_key: str | None = CONFIG_KEY) -> T:
    """The entry point of every command: `config=path.yaml a.b=c ...` -> a validated `cls`.
    `config_key=None` for a command whose own fields include `config` (all arguments are overrides)."""
    argv = sys.argv[1:] if argv is None else argv
    config_path, overrides = _split_cli(argv, config_key)
    return load_config(cls, config_path, overrides)


def to_dict(cfg: Any) -> dict:
    """A plain nested dict of a config dataclass (for metrics, checkpoints, JSON)."""
    container = OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)
    assert isinstance(container, dict)
    return container


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def dump_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically); `load_config(type(cfg), path)` reloads it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(path)
    return path


def flatten_dict(data: dict, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; used for metric names."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten_dict(value, name, sep))
        else:
            flat[name] = value
    return flat


HELP_FLAGS = ("-h", "--help", "help")
PRINT_CONFIG_KEY = "print_config"  # print_config=true: print the resolved config and exit


def _print_config_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """(whether `print_config=true` is among the arguments, the arguments without it)."""
    rest, requested = [], False
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.removeprefix("--") != PRINT_CONFIG_KEY:
            rest.append(arg)
        elif value.lower() in ("true", "1", "yes", ""):
            requested = True
        elif value.lower() not in ("false", "0", "no"):
            raise ConfigError(f"print_config={value!r}: use print_config=true")
    return requested, rest


def _command_help(cls: type, config_key: str | None) -> str:
    entry = sys.modules.get("__main__")
    spec = getattr(entry, "__spec__", None)
    command = f"python -m {spec.name}" if spec is not None and spec.name else Path(sys.argv[0]).name
    usage = f"{command} [{config_key}=FILE.yaml] [key=value ...]" if config_key else f"{command} [key=value ...]"
    return config_help(cls, usage, getattr(entry, "__doc__", None) or "", config_key)


def cli_main(cls: type[T], main: Any, argv: Sequence[str] | None = None, config_key: str | None = CONFIG_KEY) -> Any:
    """Parse `cls` from the command line and call `main(cfg)`. Bad input (an `InputError`, from
    the config or found later, e.g. a missing file) prints one line and exits with code 2; a
    `RunError` (e.g. a disk that filled up) prints one line and exits with code 1; Ctrl-C that
    `main` does not handle prints one line and exits with code 130.
    `--help` prints every config key (type, default, comment); `print_config=true` prints the
    resolved config; both exit 0 without running anything."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg in HELP_FLAGS for arg in argv):
        print(_command_help(cls, config_key), end="")
        raise SystemExit(0)
    try:
        show_config, argv = _print_config_requested(argv)
        cfg = parse_args(cls, argv, config_key)
    except InputError as error:
        print(f"config error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    if show_config:
        print(to_yaml(cfg), end="")
        raise SystemExit(0)
    try:
        return main(cfg)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None

