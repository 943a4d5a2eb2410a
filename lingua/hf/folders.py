"""Safetensors model folders: recognizing them, checking their files and loading their weights.

Two layouts share `config.json` + one `model.safetensors`:
- a Hugging Face Llama folder (`config.json` with model_type "llama"): converted to lingua's names
  and RoPE layout on load (`lingua.hf.llama`);
- a lingua folder (`config.json` with "lingua_model_type"), written by `python -m lingua.hf export
  --format lingua`: the model's own state-dict names, tensors unchanged, beside the run's params.json.
`lingua.checkpoint.load_model_weights` hands such folders here, so `checkpoint.init_ckpt_path` and
`load_trained_model` accept them.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from lingua.args import InputError
from lingua.hf.llama import hf_name, llama_to_lingua, shape_of_config
from lingua.hf.safetensors_io import read_safetensors

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SHARD_INDEX_FILE = "model.safetensors.index.json"
LINGUA_FORMAT_VERSION = 1  # version of the lingua folder layout (config.json "lingua_format_version")
_FFN_TENSOR = re.compile(r"^layers\.(\d+)\.feed_forward\.")


class FolderFormatError(InputError):
    """A safetensors model folder that cannot be read; the message names the file."""


def is_model_folder(path: str | Path) -> bool:
    """Whether `path` is a folder with a config.json (a Hugging Face or lingua safetensors folder)."""
    return Path(path).is_dir() and (Path(path) / CONFIG_FILE).is_file()


def read_folder_config(folder: str | Path) -> dict[str, Any]:
    """config.json of a Llama or lingua folder, after checking that its one weights file is there."""
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise FolderFormatError(f"{config_path}: not readable as JSON ({error})") from None
    if "lingua_model_type" not in config and config.get("model_type") != "llama":
        raise FolderFormatError(
            f"{config_path}: model_type={config.get('model_type')!r}; only Llama folders (model_type 'llama', "
            "LlamaForCausalLM) and lingua exports load into lingua"
        )
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        if (folder / SHARD_INDEX_FILE).is_file():
            raise FolderFormatError(
                f"{folder / SHARD_INDEX_FILE}: sharded weights are not supported; save the model as one {WEIGHTS_FILE} "
                "(save_pretrained(..., max_shard_size='1000GB'))"
            )
        raise FolderFormatError(f"{weights} is missing (only safetensors weights are read, not pytorch_model.bin)")
    return config


def load_folder_weights(folder: str | Path, model: nn.Module) -> None:
    """Load a Llama or lingua folder into `model` (its names and shapes must match; see below)."""
    folder = Path(folder)
    config = read_folder_config(folder)
    tensors = read_safetensors(folder / WEIGHTS_FILE)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if "lingua_model_type" in config:
        state, fresh, unused = dict(tensors), [], []
        missing, extra = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
        if missing or extra:
            raise FolderFormatError(
                f"{folder / WEIGHTS_FILE} does not fit the model: missing {missing or 'none'}, unexpected {extra or 'none'} "
                "(build the model from the folder's params.json)"
            )
    else:
        state, fresh, unused = _llama_state(folder, config, tensors, expected)
    _check_shapes(folder, state, expected)
    _set_state(model, state)
    logger.info(
        "loaded %d tensors from %s%s%s", len(state), folder,
        f"; fresh (no Llama counterpart, initialized): {', '.join(fresh)}" if fresh else "",
        f"; unused (feed-forwards this model replaces): {', '.join(unused)}" if unused else "",
    )


def _llama_state(
    folder: Path, config: Mapping[str, Any], tensors: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]]
) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """(lingua state dict to load, model tensors that start fresh, Llama tensors left unused).

    Fresh: model tensors Llama has no counterpart for (memory layers). Unused: the Llama
    feed-forward of a layer whose FFN the model replaces. Anything else missing or left over is
    an error naming the tensors (a config with other layers or heads)."""
    state, unknown = llama_to_lingua(tensors, shape_of_config(config))
    if config.get("tie_word_embeddings") and "output.weight" in expected and "output.weight" not in state:
        state["output.weight"] = state["tok_embeddings.weight"]  # the model unties what Llama tied
    if "output.weight" in state and "output.weight" not in expected:
        if not torch.equal(state["output.weight"], state["tok_embeddings.weight"]):
            raise FolderFormatError(f"{folder / WEIGHTS_FILE} has its own lm_head.weight: set model.weight_tying=false")
        del state["output.weight"]
    fresh = sorted(n for n in expected.keys() - state.keys() if hf_name(n) is None)
    missing = sorted(n for n in expected.keys() - state.keys() if hf_name(n) is not None)
    unused, extra = [], list(unknown)
    for name in sorted(state.keys() - expected.keys()):
        match = _FFN_TENSOR.match(name)
        replaced = match is not None and any(n.startswith(f"layers.{match.group(1)}.feed_forward.") for n in expected)
        (unused if replaced else extra).append(hf_name(name) or name)
        del state[name]
    unused.sort()
    if missing or extra:
        raise FolderFormatError(
            f"{folder / WEIGHTS_FILE} does not fit the model: tensors the model needs but the folder lacks: {missing or 'none'}; "
            f"folder tensors the model has no place for: {extra or 'none'} (python -m lingua.hf model-args {folder} prints the matching model config)"
        )
    return state, fresh, unused


def _check_shapes(folder: Path, state: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]]) -> None:
    wrong = [(n, tuple(t.shape), expected[n]) for n, t in state.items() if tuple(t.shape) != expected[n]]
    if wrong:
        name, found, want = wrong[0]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise FolderFormatError(
            f"{folder / WEIGHTS_FILE}: tensor {name} has shape {list(found)} there but {list(want)} in the model{more}; "
            f"build the model with the folder's config (python -m lingua.hf model-args {folder})"
        )


def _set_state(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Copy full tensors into the model's parameters and buffers (plain, or sharded by FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, dict(state), options=StateDictOptions(full_state_dict=True, strict=False))
