"""`python -m lingua.hf export CKPT OUT_DIR`: a trained checkpoint as a publishable safetensors folder.

`--format llama` (default): a dense apps/main model as a transformers LlamaForCausalLM folder
(config.json, model.safetensors, generation_config.json, tokenizer files). `--format lingua`: any
model (memory layers, Memory Mosaics) with its own tensor names, a config.json naming the lingua
model type, and params.json, so `load_trained_model` loads it back. Both also hold params.json and
the lingua tokenizer file. Weights are read on the CPU (memory-mapped from a consolidated file, or
the model tensors of a sharded checkpoint without its optimizer state) and streamed to disk:
host-memory value tables never go to a GPU. The folder is written under a
temporary name beside OUT_DIR and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
from torch import Tensor

from lingua.args import InputError
from lingua.checkpoint import CONSOLIDATED_DIR, CONSOLIDATED_FILE, PARAMS_FILE, resolve_checkpoint
from lingua.hf.folders import CONFIG_FILE, LINGUA_FORMAT_VERSION, WEIGHTS_FILE
from lingua.hf.llama import LlamaShape, lingua_to_llama, llama_config
from lingua.hf.safetensors_io import write_safetensors
from lingua.hf.tokenizer_files import checked_hf_tokenizer
from lingua.tokenizer import build_tokenizer

ExportFormat = Literal["llama", "lingua"]
TOKENIZER_COPY_DIR = "lingua_tokenizer"  # the lingua tokenizer file, referenced by the exported params.json

# A key that only one app's `model` config has -> that app (the lingua model type of the export).
MODEL_TYPE_MARKERS: Mapping[str, str] = {"productkey_args": "apps.main", "v_shift": "apps.mosaics"}


def model_type_of(params: Mapping[str, Any], source: Path) -> str:
    model = params.get("model") or {}
    for key, model_type in MODEL_TYPE_MARKERS.items():
        if key in model:
            return model_type
    raise InputError(f"{source}: the model section matches no known model type ({', '.join(sorted(set(MODEL_TYPE_MARKERS.values())))})")


def llama_export_problem(model_type: str, model: Mapping[str, Any]) -> str | None:
    """Why a model cannot be a LlamaForCausalLM (None: it can)."""
    if model_type != "apps.main":
        return f"a {model_type} model is not a Llama"
    memory = model.get("productkey_args") or {}
    if memory.get("is_enabled"):
        return f"it has product-key memory layers (model.productkey_args.layers={memory.get('layers')!r}), which LlamaForCausalLM cannot hold"
    if model["dim"] % model["n_heads"]:
        return f"transformers' LlamaConfig needs model.dim={model['dim']} to be a multiple of model.n_heads={model['n_heads']}"
    return None


def checkpoint_state(weights: Path) -> dict[str, Tensor]:
    """The model state dict of a checkpoint on the CPU: memory-mapped from a consolidated .pth, or
    read from a sharded (DCP) folder, model tensors only (no optimizer state is loaded)."""
    consolidated = weights / CONSOLIDATED_DIR / CONSOLIDATED_FILE if weights.is_dir() else weights
    if consolidated.is_file():
        return torch.load(consolidated, map_location="cpu", weights_only=True, mmap=True)["model"]
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(str(weights)).read_metadata()
    state = {
        key.removeprefix("model."): torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)
    }
    with warnings.catch_warnings():  # one process, no process group: intended
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": state}, checkpoint_id=str(weights), no_dist=True)
    return state


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _state_dtype(state: Mapping[str, Tensor]) -> str:
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    return str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else "float32"


def export(ckpt: str | Path, out_dir: str | Path, fmt: ExportFormat = "llama", overwrite: bool = False) -> Path:
    """Write the checkpoint `ckpt` (a run's dump_dir, checkpoint folder or consolidated file) as a
    safetensors folder `out_dir`; returns it. Refuses an existing `out_dir` unless `overwrite`."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise InputError(f"output folder '{out}' exists: choose another one or pass --overwrite to replace it")
    weights, params_path = resolve_checkpoint(ckpt)
    params = json.loads(params_path.read_text())
    model_type = model_type_of(params, params_path)
    if fmt == "llama" and (problem := llama_export_problem(model_type, params["model"])):
        raise InputError(f"cannot export {ckpt} as a Llama: {problem}; export it with --format lingua (safetensors + params.json, loads back with load_trained_model)")
    tok_args = params["data"]["tokenizer"]
    tokenizer = build_tokenizer(tok_args["name"], tok_args.get("path"))
    hf_tokenizer = checked_hf_tokenizer(tokenizer, tok_args.get("path"), params["model"].get("max_seqlen") or params["data"]["seq_len"])

    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        state = checkpoint_state(weights)
        if fmt == "llama":
            _write_llama(staging, params["model"], state, tokenizer.bos_id, tokenizer.eos_id)
        else:
            write_safetensors(staging / WEIGHTS_FILE, state.items(), {"format": "pt", "lingua_model_type": model_type})
            _write_json(staging / CONFIG_FILE, {
                "lingua_model_type": model_type,
                "lingua_format_version": LINGUA_FORMAT_VERSION,
                "tensor_names": "the model's state-dict names (see params.json for its config)",
                "torch_dtype": _state_dtype(state),
            })
        _save_tokenizer(hf_tokenizer, staging)
        _write_params(staging, out, params)
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _write_llama(folder: Path, model: Mapping[str, Any], state: Mapping[str, Tensor], bos_id: int, eos_id: int) -> None:
    config = llama_config(model, state, bos_id, eos_id)
    config["torch_dtype"] = _state_dtype(state)
    shape = LlamaShape(config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"])
    tensors = lingua_to_llama(state, shape, tied=config["tie_word_embeddings"])
    write_safetensors(folder / WEIGHTS_FILE, tensors, {"format": "pt"})
    _write_json(folder / CONFIG_FILE, config)
    _write_json(folder / "generation_config.json", {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": eos_id, "do_sample": False})


def _save_tokenizer(hf_tokenizer: Any, folder: Path) -> None:
    """tokenizer.json and tokenizer_config.json, the latter naming the class every transformers
    version loads tokenizer.json with."""
    hf_tokenizer.save_pretrained(str(folder))
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("backend", None)
    _write_json(config_path, {**config, "tokenizer_class": "PreTrainedTokenizerFast"})


def _write_params(staging: Path, out: Path, params: dict[str, Any]) -> None:
    """params.json with the tokenizer file copied into the folder and referenced there."""
    tok_args = dict(params["data"]["tokenizer"])
    if tok_args.get("path"):
        source = Path(tok_args["path"])
        (staging / TOKENIZER_COPY_DIR).mkdir()
        shutil.copyfile(source, staging / TOKENIZER_COPY_DIR / source.name)
        tok_args["path"] = str(out.resolve() / TOKENIZER_COPY_DIR / source.name)
    _write_json(staging / PARAMS_FILE, {**params, "data": {**params["data"], "tokenizer": tok_args}})


def _publish(staging: Path, out: Path) -> None:
    """Rename the complete folder into place; an existing one is moved aside first, removed after."""
    previous = out.parent / f".{out.name}.previous-{os.getpid()}"
    if out.exists():
        os.replace(out, previous)
    os.replace(staging, out)
    shutil.rmtree(previous, ignore_errors=True)
