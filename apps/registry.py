"""The apps a training config or a checkpoint can belong to, for commands that take any model.

Each `App` names its config class, model builder and training entry point, and the model-config
changes that let its model read windows longer than its training length (`longer_context`).
`app_of_config` finds the app of a config (a YAML file with overrides, or a checkpoint's
params.json) by parsing it strictly with each app's config class: exactly one must accept it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from apps.main import train as main_train
from apps.mosaics import train as mosaics_train
from lingua.args import ConfigError, config_from_dict, load_config
from lingua.checkpoint import resolve_checkpoint
from lingua.tokenizer import Tokenizer


@dataclass(frozen=True)
class App:
    name: str
    config_class: type
    build: Callable[[Any, Tokenizer], Any]  # (model args, tokenizer) -> model
    train: Callable[[Any], Any]  # the app's training main(cfg)
    longer_context: Callable[[Any, int], dict[str, Any]]  # (model args, length) -> model-config overrides to read `length` tokens


def _rope_tables_for(model_args: Any, length: int) -> dict[str, Any]:
    """The dense transformer's RoPE tables end at max_seqlen: lengthen them (same formula, same
    frequencies, no interpolation), so the positions past training are evaluated as they are."""
    return {"max_seqlen": length} if length > model_args.max_seqlen else {}


def _no_length_limit(model_args: Any, length: int) -> dict[str, Any]:
    """Memory Mosaics have no positional encoding and no table to lengthen."""
    return {}


APPS: dict[str, App] = {
    "main": App("main", main_train.MainTrainArgs, main_train.build_model, main_train.main, _rope_tables_for),
    "mosaics": App("mosaics", mosaics_train.MosaicsTrainArgs, mosaics_train.build_model, mosaics_train.main, _no_length_limit),
}


def app_of_config(parse: Callable[[type], Any], what: str) -> tuple[App, Any]:
    """(the one app whose config class accepts `parse(config_class)`, the parsed config)."""
    accepted, refusals = [], []
    for app in APPS.values():
        try:
            accepted.append((app, parse(app.config_class)))
        except ConfigError as error:
            refusals.append(f"{app.name}: {error}")
    if len(accepted) != 1:
        names = ", ".join(app.name for app, _ in accepted)
        reason = f"both apps accept it ({names})" if accepted else "no app accepts it: " + "; ".join(refusals)
        raise ConfigError(f"{what}: cannot tell which app it belongs to, {reason}")
    return accepted[0]


def app_of_yaml(path: str, overrides: list[str]) -> tuple[App, Any]:
    """The app and training config of a YAML file with `a.b=c` overrides."""
    if not Path(path).is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    return app_of_config(lambda cls: load_config(cls, path, overrides), f"config '{path}'")


def app_of_checkpoint(ckpt: str, key: str = "ckpt") -> tuple[App, Any]:
    """The app and training config of a checkpoint (run dump_dir, checkpoint folder, consolidated);
    `key` is the config key that named it (in the error when it names none)."""
    _, params = resolve_checkpoint(ckpt, key)
    data = json.loads(params.read_text())
    return app_of_config(lambda cls: config_from_dict(cls, data, source=str(params)), f"checkpoint '{ckpt}' ({params})")
