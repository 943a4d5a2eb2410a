"""Hugging Face interop (lingua.hf): export to LlamaForCausalLM and back, with logits and greedy
generation compared against transformers; the lingua safetensors layout of memory-layer and
Memory Mosaics models; import into runs with memory layers; tokenizer files; bad input; and the
lm-eval cross-check of lingua's adapter against lm-eval's own `hf` model on the exported folder."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from apps.main.eval import model_generate_fn, model_logits_fn  # noqa: E402
from apps.main.generate import Generator, GeneratorArgs  # noqa: E402
from apps.main.train import MainTrainArgs, build_model  # noqa: E402
from lingua.args import InputError, config_from_dict, to_dict  # noqa: E402
from lingua.checkpoint import load_model_weights, load_trained_model  # noqa: E402
from lingua.hf.__main__ import main as hf_main  # noqa: E402
from lingua.hf.export import export  # noqa: E402
from lingua.hf.folders import FolderFormatError  # noqa: E402
from lingua.hf.llama import halves_to_pairs, pairs_to_halves  # noqa: E402
from lingua.hf.safetensors_io import read_header, read_safetensors, write_safetensors  # noqa: E402
from lingua.tokenizer import build_tokenizer, publish_tokenizer_file, serialize_tiktoken_bpe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SP_MODEL = str(REPO / "tokenizer" / "stories_sp2k.model")
TASKS_DIR = REPO / "configs" / "tasks"
LOGIT_TOL = 1e-5  # fp32, the same math in another order (attention, RMSNorm, RoPE)
LOGLIK_TOL = 1e-4  # summed log-probabilities of a continuation, fp32
TEXTS = [
    "Once upon a time, Mia  went to the shed.\n\nQ: Where is Mia? A: in the shed",
    "  leading spaces, trailing   ",
    "digits 12345 and 3.14\tand\r\nnaïve café — 日本語 😀",
]


@pytest.fixture(scope="module")
def tiktoken_file(tmp_path_factory) -> str:
    sys.path.insert(0, str(REPO / "setup"))
    import train_tokenizer

    docs = [json.loads(line)["ctx"] for line in (TASKS_DIR / "synthetic_mc.train.jsonl").read_text().splitlines()]
    path = tmp_path_factory.mktemp("bpe") / "stories.tiktoken"
    publish_tokenizer_file(serialize_tiktoken_bpe(train_tokenizer.learn_bpe_ranks(docs, 400)), "tiktoken", path)
    return str(path)


def tokenizer_spec(name: str, tiktoken_file: str) -> dict[str, Any]:
    return {"name": name, "path": {"bytes": None, "sp": SP_MODEL, "tiktoken": tiktoken_file}[name]}


def train_config(dump_dir: Path, tokenizer: dict[str, Any], model: dict[str, Any]) -> MainTrainArgs:
    return config_from_dict(MainTrainArgs, {
        "dump_dir": str(dump_dir),
        "data": {"tokenizer": tokenizer, "seq_len": 32},
        "model": {"max_seqlen": 128, "multiple_of": 16, **model},
    })


def random_model(cfg: MainTrainArgs, seed: int = 0) -> torch.nn.Module:
    """The model of `cfg`, initialized with random weights everywhere (norms included)."""
    tokenizer = build_tokenizer(cfg.data.tokenizer.name, cfg.data.tokenizer.path)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = build_model(cfg.model, tokenizer)
    model = model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.3 * torch.randn_like(param))
    return model.eval()


def save_consolidated(model: torch.nn.Module, cfg: MainTrainArgs, folder: Path) -> Path:
    """A checkpoint in the layout `python -m lingua.checkpoint consolidate` writes."""
    (folder / "consolidated").mkdir(parents=True)
    torch.save({"model": model.state_dict()}, folder / "consolidated" / "consolidated.pth")
    (folder / "consolidated" / "params.json").write_text(json.dumps(to_dict(cfg)))
    return folder


def hf_model(folder: Path) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


# Several shapes: GQA, untied and tied heads, an odd head count, head_dim != dim / n_heads,
# a vocabulary padded past the tokenizer's, a scaled SwiGLU width; each tokenizer once.
SHAPES = {
    "gqa_untied_sp": ("sp", {"dim": 48, "n_layers": 2, "n_heads": 6, "n_kv_heads": 2}),
    "odd_heads_tied_bytes": ("bytes", {"dim": 60, "n_layers": 2, "n_heads": 5, "weight_tying": True, "rope_theta": 500000.0}),
    "padded_vocab_tiktoken": ("tiktoken", {"dim": 48, "n_layers": 3, "n_heads": 3, "head_dim": 8, "n_kv_heads": 1,
                                           "vocab_size": 704, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-6}),
}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def exported(request, tmp_path_factory, tiktoken_file) -> dict[str, Any]:
    tok_name, model_args = SHAPES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    cfg = train_config(root / "run", tokenizer_spec(tok_name, tiktoken_file), model_args)
    model = random_model(cfg)
    export(save_consolidated(model, cfg, root / "ckpt"), root / "hf")
    return {"name": request.param, "cfg": cfg, "model": model, "hf_dir": root / "hf", "root": root}


def test_rope_permutation_round_trip():
    weight = torch.randn(3 * 8, 5)
    assert torch.equal(halves_to_pairs(pairs_to_halves(weight, 3, 8), 3, 8), weight)
    assert not torch.equal(pairs_to_halves(weight, 3, 8), weight)


def test_exported_llama_logits_match(exported):
    hf = hf_model(exported["hf_dir"])
    config = json.loads((exported["hf_dir"] / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] == exported["cfg"].model.weight_tying
    tokens = torch.randint(0, exported["model"].args.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = exported["model"](tokens), hf(tokens).logits
    assert ours.shape == theirs.shape
    torch.testing.assert_close(theirs, ours, rtol=0, atol=LOGIT_TOL)


def test_import_back_matches(exported, tmp_path):
    """The exported folder, and the same model saved by transformers itself, load into a freshly
    initialized lingua model that then gives the same logits."""
    hf = hf_model(exported["hf_dir"])
    hf.save_pretrained(str(tmp_path / "saved_by_hf"))
    tokens = torch.randint(0, exported["model"].args.vocab_size, (2, 29), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = hf(tokens).logits
    for folder in (exported["hf_dir"], tmp_path / "saved_by_hf"):
        fresh = random_model(exported["cfg"], seed=5)
        load_model_weights(folder, fresh)
        with torch.no_grad():
            torch.testing.assert_close(fresh(tokens), reference, rtol=0, atol=LOGIT_TOL)
        for name, tensor in exported["model"].state_dict().items():
            assert torch.equal(fresh.state_dict()[name], tensor), name  # the conversion is exact


def test_exported_folder_loads_with_load_trained_model(exported):
    model, tokenizer, cfg = load_trained_model(exported["hf_dir"], MainTrainArgs, build_model, "cpu")
    tokens = torch.randint(0, cfg.model.dim, (1, 11))
    with torch.no_grad():
        assert torch.equal(model(tokens), exported["model"](tokens))


def test_tokenizer_files_encode_like_lingua(exported):
    tokenizer = build_tokenizer(exported["cfg"].data.tokenizer.name, exported["cfg"].data.tokenizer.path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(exported["hf_dir"]))
    for text in TEXTS:
        ids = tokenizer.encode(text, add_bos=True)
        assert hf_tok.encode(text) == ids
        assert hf_tok.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (tokenizer.bos_id, tokenizer.eos_id)


class RecordingTokenizer:
    """A tokenizer that records the token lists it decodes (the generator decodes each finished row)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.decoded: list[list[int]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def decode(self, tokens: list[int]) -> str:
        self.decoded.append(list(tokens))
        return self._tokenizer.decode(tokens)


def test_greedy_generation_matches_token_for_token(exported):
    """lingua's batched KV-cache generator (left padding) against transformers' generate with its
    KV cache, one prompt at a time; compared as token ids."""
    model, cfg = exported["model"], exported["cfg"]
    tokenizer = RecordingTokenizer(build_tokenizer(cfg.data.tokenizer.name, cfg.data.tokenizer.path))
    hf = hf_model(exported["hf_dir"])
    prompts = ["Once upon a time", "Mia went to the shed. Then she"]
    new_tokens = 12
    Generator(model, tokenizer, GeneratorArgs(max_gen_len=new_tokens, device="cpu")).generate(prompts)
    ours = tokenizer.decoded[-len(prompts) :]  # the finished rows, in prompt order
    for prompt, row in zip(prompts, ours):
        ids = torch.tensor([tokenizer.encode(prompt, add_bos=True)])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False, use_cache=True)
        theirs = out[0, ids.shape[1] :].tolist()
        if tokenizer.eos_id in theirs:
            theirs = theirs[: theirs.index(tokenizer.eos_id)]
        assert row == theirs
        assert len(theirs) >= 4
