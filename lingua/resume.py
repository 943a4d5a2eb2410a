"""Resuming a run: which config changes a rerun in the same dump_dir may make.

A run whose checkpoint folder holds a checkpoint continues from it. Its new config is compared
with the one that checkpoint was written under (the checkpoint's params.json): a change of a
`harmless` key (how long to train, how often to log, save or validate, how the same math is run)
is applied and listed; a change of a `refused` key (the model, the data stream, the update math)
stops the run before anything is written, unless `checkpoint.force_resume=true`. `KEY_RULES`
classifies every config key of every app; lingua.trainer applies the decision.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omegaconf import OmegaConf

from lingua.args import ConfigError, flatten_dict, to_dict
from lingua.checkpoint import PARAMS_FILE

logger = logging.getLogger(__name__)

Rule = Literal["harmless", "refused"]

# Dotted key prefix -> rule; the longest prefix naming a key decides. A key no prefix names is
# refused (tests/test_resume.py checks that every key of every app's config is named here).
KEY_RULES: dict[str, Rule] = {
    # Where the run's files go and how long it trains: more steps continue the run (a decaying
    # schedule then stretches to the new total), fewer than the checkpoint's step end it.
    "name": "harmless",
    "dump_dir": "harmless",
    "steps": "harmless",
    "seed": "refused",  # the per-rank generators (dropout, data) after the checkpoint's RNG state
    "grad_acc_steps": "refused",  # the batch of one update
    "on_nonfinite": "harmless",
    "preemption_check_every": "harmless",
    "probe_freq": "harmless",  # accepted for compatibility, no effect
    # Observation only.
    "logging": "harmless",
    "validation": "harmless",
    "profiling": "harmless",
    "eval": "harmless",
    # Checkpoint cadence and places; the weights they hold do not change.
    "checkpoint": "harmless",
    # The data stream: any change but how it is fetched breaks the saved stream position.
    "data": "refused",
    "data.load_async": "harmless",
    "data.prefetch_size": "harmless",
    "data.bad_lines": "harmless",  # a run stopped by a malformed line may continue skipping it
    "data.synthesize_missing": "harmless",
    # The update math: lr and its schedule, AdamW, clipping, decay groups.
    "optim": "refused",
    # Layout: resharding is handled by the checkpoint (a new data-parallel size restarts the data
    # stream, with a warning); precision and the value-table split change what is computed or stored.
    "distributed": "refused",
    "distributed.dp_shard": "harmless",
    "distributed.dp_replicate": "harmless",
    "distributed.tp_size": "harmless",
    "distributed.fsdp_type": "harmless",
    "distributed.compile": "harmless",
    "distributed.selective_activation_checkpointing": "harmless",
    "distributed.checkpoint_each_layer": "harmless",
    "distributed.timeout_s": "harmless",
    "distributed.device": "harmless",
    "distributed.model_dtype": "refused",
    "distributed.matmul_allow_tf32": "refused",
    "distributed.memory_parallel_size": "refused",
    # The model: shapes, initialization, regularization. Kernel choices computing the same function are harmless.
    "model": "refused",
    "model.attn_impl": "harmless",
    "model.productkey_args.bag_backend": "harmless",
    "model.productkey_args.zero_copy_buffer_margin": "harmless",  # buffer size only: overflow rows are read exactly
    "model.productkey_args.zero_copy_first_buffer_rows": "harmless",
    "model.leaky_impl": "harmless",
    "model.leaky_chunk_size": "harmless",
    "model.v2.key_scan_impl": "harmless",
    "model.v2.key_scan_chunk_size": "harmless",
    "model.v2.long_offset_eval": "harmless",  # evaluation and generation only
}

FORCE_KEY = "checkpoint.force_resume"
_UNSET = object()


def classify(key: str) -> Rule | None:
    """The rule of the longest prefix in KEY_RULES naming dotted `key` (None: no rule names it)."""
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        rule = KEY_RULES.get(".".join(parts[:end]))
        if rule is not None:
            return rule
    return None


def _show(value: Any) -> str:
    if value is _UNSET:
        return "(unset)"
    return json.dumps(value) if isinstance(value, (str, list, dict)) or value is None else str(value)


@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any

    @property
    def refused(self) -> bool:
        return classify(self.key) != "harmless"

    def __str__(self) -> str:
        return f"{self.key}: {_show(self.old)} -> {_show(self.new)}"


def config_changes(old: dict, new: dict, defaults: dict) -> list[Change]:
    """Every dotted key whose value differs between two nested config dicts, in key order. A key
    the old config lacks (written before the key existed) whose new value is its default in
    `defaults` is no change: the default keeps what the code did before the key was added."""
    old_flat, new_flat, default_flat = flatten_dict(old), flatten_dict(new), flatten_dict(defaults)
    changes = []
    for key in sorted(old_flat.keys() | new_flat.keys()):
        before, after = old_flat.get(key, _UNSET), new_flat.get(key, _UNSET)
        if before is _UNSET and key in default_flat and after == default_flat[key]:
            continue
        if before != after:
            changes.append(Change(key, before, after))
    return changes


def saved_config(folder: Path, dump_dir: Path) -> tuple[dict | None, Path | None]:
    """(the config checkpoint `folder` was written under, its file): the checkpoint's params.json,
    else the run's config.yaml; (None, None) when neither is readable."""
    for path in (folder / PARAMS_FILE, dump_dir / "config.yaml"):
        try:
            data = json.loads(path.read_text()) if path.suffix == ".json" else OmegaConf.to_container(OmegaConf.load(path))
        except Exception:  # missing, unreadable or not JSON / YAML: try the next
            continue
        if isinstance(data, dict):
            return data, path
    return None, None


@dataclass
class ResumeDecision:
    """What a rerun does with the checkpoint it finds."""

    step: int  # the checkpoint's step
    folder: Path
    source: Path | None  # the file its config came from
    applied: list[Change] = field(default_factory=list)  # harmless changes, applied
    refused: list[Change] = field(default_factory=list)  # changes needing checkpoint.force_resume=true

    def refusal(self, dump_dir: Path) -> str:
        listed = ", ".join(str(change) for change in self.refused)
        return (
            f"{dump_dir} holds a run at step {self.step} (checkpoint {self.folder}), and this config changes what it trains: "
            f"{listed} (old values from {self.source}); use another dump_dir to start a new run, "
            f"or add {FORCE_KEY}=true to continue this checkpoint with the new values"
        )


def check_resume(cfg: Any, folder: Path, dump_dir: Path, force: bool) -> ResumeDecision:
    """Compare config dataclass `cfg` of a rerun with the one `folder` was written under (keys the
    old config lacks count at their declared defaults); raises ConfigError naming every refused
    change (unless `force`), before anything is written."""
    old, source = saved_config(folder, dump_dir)
    decision = ResumeDecision(step=int(folder.name), folder=folder, source=source)
    if old is None:
        logger.warning("checkpoint %s has no readable params.json and %s no config.yaml: its config cannot be compared", folder, dump_dir)
        return decision
    for change in config_changes(old, to_dict(cfg), to_dict(type(cfg)())):
        (decision.refused if change.refused else decision.applied).append(change)
    if decision.refused and not force:
        raise ConfigError(decision.refusal(dump_dir))
    return decision


def log_resume(decision: ResumeDecision) -> None:
    if decision.applied:
        logger.info("resuming step %d with changed settings: %s", decision.step, ", ".join(str(c) for c in decision.applied))
    if decision.refused:
        logger.warning(
            "%s=true: resuming step %d with changes that alter what it trains: %s",
            FORCE_KEY, decision.step, ", ".join(str(c) for c in decision.refused),
        )
