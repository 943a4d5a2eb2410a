"""The mapping between apps/main's dense transformer and transformers' `LlamaForCausalLM`:
tensor names, the RoPE layout of the query/key projections, tied heads and `config.json`.

lingua rotates interleaved channel pairs (2i, 2i+1) of each head; Llama rotates the halves
(i, i + head_dim/2). Both use the frequency theta^(-2i/head_dim) for pair i, so converting is a
fixed permutation of the rows of wq and wk within each head (GQA: wk has n_kv_heads heads).
Everything else maps one to one (no biases; SwiGLU w1/w3/w2 = gate/up/down; RMSNorm weights).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from torch import Tensor

from lingua.args import InputError

# lingua name pattern -> Llama name (layer index as {i})
_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_TO_LAYER = {hf: ours for ours, hf in _LAYER_NAMES.items()}
_HF_TO_TOP = {hf: ours for ours, hf in _TOP_NAMES.items()}


@dataclass(frozen=True)
class LlamaShape:
    """What the conversion needs to know about a model: its heads (for the RoPE permutation)."""

    n_heads: int
    n_kv_heads: int
    head_dim: int


def hf_name(name: str) -> str | None:
    """The Llama tensor name of a lingua state-dict name (None: Llama has no such tensor)."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    match = _LAYER.match(name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return None


def lingua_name(name: str) -> str | None:
    """The lingua state-dict name of a Llama tensor name (None: lingua has no such tensor)."""
    if name in _HF_TO_TOP:
        return _HF_TO_TOP[name]
    match = _HF_LAYER.match(name)
    if match and match.group(2) in _HF_TO_LAYER:
        return f"layers.{match.group(1)}.{_HF_TO_LAYER[match.group(2)]}"
    return None


def pairs_to_halves(weight: Tensor, n_heads: int, head_dim: int) -> Tensor:
    """Rows of a q/k projection from lingua's interleaved RoPE pairs to Llama's rotate-half layout."""
    return weight.reshape(n_heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(n_heads * head_dim, -1)


def halves_to_pairs(weight: Tensor, n_heads: int, head_dim: int) -> Tensor:
    """The inverse of pairs_to_halves."""
    return weight.reshape(n_heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(n_heads * head_dim, -1)


def _heads_of(name: str, shape: LlamaShape) -> int | None:
    """Heads whose rows a RoPE projection holds (None: not a RoPE projection)."""
    if name.endswith("attention.wq.weight"):
        return shape.n_heads
    if name.endswith("attention.wk.weight"):
        return shape.n_kv_heads
    return None


def lingua_to_llama(state: Mapping[str, Tensor], shape: LlamaShape, tied: bool) -> Iterator[tuple[str, Tensor]]:
    """(Llama name, tensor) of a dense apps/main state dict; unmappable names raise InputError."""
    for name, tensor in state.items():
        target = hf_name(name)
        if target is None:
            raise InputError(f"tensor '{name}' has no LlamaForCausalLM counterpart")
        heads = _heads_of(name, shape)
        yield target, tensor if heads is None else pairs_to_halves(tensor, heads, shape.head_dim)
    if not tied and "output.weight" not in state:
        raise InputError("the checkpoint has no output.weight and is not tied (model.weight_tying=false)")


def llama_to_lingua(tensors: Mapping[str, Tensor], shape: LlamaShape) -> tuple[dict[str, Tensor], list[str]]:
    """(lingua state dict, Llama names lingua has no tensor for) of a Llama state dict."""
    state, unknown = {}, []
    for name, tensor in tensors.items():
        target = lingua_name(name)
        if target is None:
            unknown.append(name)
            continue
        heads = _heads_of(target, shape)
        state[target] = tensor if heads is None else halves_to_pairs(tensor, heads, shape.head_dim)
    return state, unknown


def llama_config(model: Mapping[str, Any], state: Mapping[str, Tensor], bos_id: int, eos_id: int) -> dict[str, Any]:
    """config.json of the LlamaForCausalLM equivalent to an apps/main model config (params.json's
    `model`) and its state dict (which gives the vocabulary and SwiGLU widths)."""
    n_heads = model["n_heads"]
    head_dim = model.get("head_dim") or model["dim"] // n_heads
    vocab_size, dim = state["tok_embeddings.weight"].shape
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dim,
        "intermediate_size": state["layers.0.feed_forward.w1.weight"].shape[0],
        "num_hidden_layers": model["n_layers"],
        "num_attention_heads": n_heads,
        "num_key_value_heads": model.get("n_kv_heads") or n_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": model["max_seqlen"],
        "rms_norm_eps": model["norm_eps"],
        "rope_theta": model["rope_theta"],
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "vocab_size": vocab_size,
        "tie_word_embeddings": bool(model.get("weight_tying", False)),
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def shape_of_config(config: Mapping[str, Any]) -> LlamaShape:
    n_heads = config["num_attention_heads"]
    return LlamaShape(
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // n_heads,
    )


def model_args_of_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The apps/main `model` section that builds the architecture of a Llama config.json (the
    SwiGLU width: multiple_of = intermediate_size, scaled down by ffn_dim_multiplier when smaller
    than lingua's default 8/3 * dim)."""
    unsupported = {key: config[key] for key in ("attention_bias", "mlp_bias") if config.get(key)}
    if config.get("hidden_act", "silu") != "silu":
        unsupported["hidden_act"] = config["hidden_act"]
    for key in ("rope_scaling", "rope_parameters"):  # scaled RoPE (Llama 3.1 and later, YaRN, ...)
        if (config.get(key) or {}).get("rope_type", "default") != "default":
            unsupported[key] = config[key]
    if unsupported:
        raise InputError(f"Llama config with {unsupported}: lingua's transformer has no such option")
    dim, hidden = config["hidden_size"], config["intermediate_size"]
    default_hidden = int(2 * 4 * dim / 3)
    shape = shape_of_config(config)
    rope = config.get("rope_parameters") or {}
    return {
        "dim": dim,
        "n_layers": config["num_hidden_layers"],
        "n_heads": shape.n_heads,
        "n_kv_heads": shape.n_kv_heads,
        "head_dim": shape.head_dim,
        "multiple_of": hidden,
        "ffn_dim_multiplier": None if default_hidden <= hidden else hidden / default_hidden,
        "norm_eps": config.get("rms_norm_eps", 1e-6),
        "rope_theta": float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        "max_seqlen": config.get("max_position_embeddings", 2048),
        "vocab_size": config["vocab_size"],
        "weight_tying": bool(config.get("tie_word_embeddings", False)),
    }
