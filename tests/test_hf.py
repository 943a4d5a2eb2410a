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


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is faster than several on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def test_model_args_command_builds_the_folder_architecture(exported, capsys, tmp_path):
    """`python -m lingua.hf model-args` prints a model section that the folder loads into exactly."""
    import yaml

    assert hf_main(["model-args", str(exported["hf_dir"])]) == 0
    model_args = yaml.safe_load(capsys.readouterr().out)["model"]
    cfg = exported["cfg"]
    rebuilt = train_config(tmp_path, to_dict(cfg)["data"]["tokenizer"], model_args)
    fresh = random_model(rebuilt, seed=3)
    load_model_weights(exported["hf_dir"], fresh)
    tokens = torch.randint(0, cfg.model.dim, (1, 13))
    with torch.no_grad():
        assert torch.equal(fresh(tokens), exported["model"](tokens))


# ---- memory layers and Memory Mosaics: the lingua safetensors layout ----

PK_ARGS = {"is_enabled": True, "layers": "1", "mem_n_keys": 8, "mem_heads": 2, "mem_knn": 4, "mem_k_dim": 16}


@pytest.mark.parametrize("zero_copy", [False, True])
def test_memory_layer_model_exports_to_lingua_format_and_loads_back(tmp_path, zero_copy):
    cfg = train_config(tmp_path / "run", {"name": "bytes"}, {"dim": 32, "n_layers": 2, "n_heads": 4, "productkey_args": {**PK_ARGS, "zero_copy": zero_copy}})
    model = random_model(cfg)
    ckpt = save_consolidated(model, cfg, tmp_path / "ckpt")
    with pytest.raises(InputError, match="product-key memory layers.*--format lingua"):
        export(ckpt, tmp_path / "as_llama")
    assert not (tmp_path / "as_llama").exists()
    out = export(ckpt, tmp_path / "out", fmt="lingua")
    config = json.loads((out / "config.json").read_text())
    assert config["lingua_model_type"] == "apps.main"
    header = read_header(out / "model.safetensors")
    assert {k for k in header if k != "__metadata__"} == set(model.state_dict())  # the model's own names
    loaded, _, _ = load_trained_model(out, MainTrainArgs, build_model, "cpu")
    tokens = torch.randint(0, 258, (2, 17))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))


def test_mosaics_model_exports_to_lingua_format_and_loads_back(tmp_path):
    from apps.mosaics.train import MosaicsTrainArgs, build_model as build_mosaics

    cfg = config_from_dict(MosaicsTrainArgs, {
        "dump_dir": str(tmp_path / "run"), "data": {"seq_len": 32},
        "model": {"dim": 24, "n_layers": 2, "n_heads": 3, "pmem_size": 7, "ic_dropout": 0.0, "hd_dropout": 0.0},
    })
    with torch.device("meta"):
        model = build_mosaics(cfg.model, build_tokenizer("bytes"))
    model = model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    model.eval()
    ckpt = save_consolidated(model, cfg, tmp_path / "ckpt")
    with pytest.raises(InputError, match="apps.mosaics model is not a Llama.*--format lingua"):
        export(ckpt, tmp_path / "as_llama")
    out = export(ckpt, tmp_path / "out", fmt="lingua")
    assert json.loads((out / "config.json").read_text())["lingua_model_type"] == "apps.mosaics"
    loaded, _, _ = load_trained_model(out, MosaicsTrainArgs, build_mosaics, "cpu")
    tokens = torch.randint(0, 258, (2, 17))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))


# ---- import: a pretrained dense Llama as the start of a run with memory layers ----


def dense_llama_folder(tmp_path: Path) -> tuple[Path, MainTrainArgs, torch.nn.Module]:
    cfg = train_config(tmp_path / "dense_run", {"name": "sp", "path": SP_MODEL}, {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2})
    model = random_model(cfg)
    return export(save_consolidated(model, cfg, tmp_path / "dense_ckpt"), tmp_path / "llama"), cfg, model


def test_import_adds_fresh_memory_layers_and_reports_tensors(tmp_path, caplog):
    folder, dense_cfg, dense = dense_llama_folder(tmp_path)
    model_args = {**to_dict(dense_cfg)["model"], "productkey_args": PK_ARGS}
    cfg = train_config(tmp_path / "pk_run", to_dict(dense_cfg)["data"]["tokenizer"], model_args)
    model = random_model(cfg, seed=7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="lingua.hf.folders"):
        load_model_weights(folder, model)
    dense_state = dense.state_dict()
    for name, tensor in model.state_dict().items():
        expected = dense_state[name] if name in dense_state else before[name]  # memory tensors keep their init
        assert torch.equal(tensor, expected), name
    message = caplog.text
    fresh = message.split("fresh (no Llama counterpart, initialized): ")[1].split(";")[0].split(", ")
    assert "memory_values.weight" in fresh and "layers.1.feed_forward.query_proj.weight" in fresh
    assert all(name.startswith(("layers.1.feed_forward.", "memory_values.")) for name in fresh)
    unused = ", ".join(f"model.layers.1.mlp.{p}_proj.weight" for p in ("down", "gate", "up"))
    assert f"unused (feed-forwards this model replaces): {unused}" in message


def test_init_ckpt_path_accepts_a_llama_folder(tmp_path):
    """A run starts from the Llama weights (lr 1e-12: one step leaves them in place) with a fresh memory layer."""
    from apps.main.train import MODEL_SPEC
    from lingua.synthetic import write_corpus
    from lingua.trainer import train

    folder, dense_cfg, dense = dense_llama_folder(tmp_path)
    write_corpus(tmp_path / "data", "stories", n_train=40, n_val=4, n_chunks=1, seed=0)
    cfg = config_from_dict(MainTrainArgs, {
        "dump_dir": str(tmp_path / "run"), "steps": 1,
        "data": {"root_dir": str(tmp_path / "data"), "tokenizer": {"name": "sp", "path": SP_MODEL}, "batch_size": 2, "seq_len": 32, "load_async": False, "prefetch_size": 2},
        "model": {**to_dict(dense_cfg)["model"], "productkey_args": PK_ARGS},
        "optim": {"lr": 1e-12, "warmup": 0},
        "checkpoint": {"init_ckpt_path": str(folder), "dump": {"every": 1, "keep": 1}},
    })
    result = train(cfg, MODEL_SPEC)
    trained = random_model(cfg, seed=9)
    load_model_weights(result.last_checkpoint, trained)
    state = trained.state_dict()
    for name, tensor in dense.state_dict().items():
        if name in state:
            torch.testing.assert_close(state[name], tensor, rtol=0, atol=1e-8, msg=name)
    assert not any(name.startswith("layers.1.feed_forward.w") for name in state)

    # the run's sharded (DCP) checkpoint exports from its dump_dir, and loads back the same
    out = export(cfg.dump_dir, tmp_path / "exported_run", fmt="lingua")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "lingua_tokenizer", "model.safetensors", "params.json", "tokenizer.json", "tokenizer_config.json"]
    loaded, _, _ = load_trained_model(out, MainTrainArgs, build_model, "cpu")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


# ---- bad input ----


def test_export_refuses_an_existing_folder_and_is_never_half_written(tmp_path, monkeypatch, capsys):
    cfg = train_config(tmp_path / "run", {"name": "bytes"}, {"dim": 32, "n_layers": 1, "n_heads": 4})
    ckpt = save_consolidated(random_model(cfg), cfg, tmp_path / "ckpt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert hf_main(["export", str(ckpt), str(out)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "exists" in error and "--overwrite" in error
    assert (out / "keep.txt").read_text() == "mine"

    import lingua.hf.export as export_module

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_module, "_write_params", fail)  # after the weights and tokenizer files
    with pytest.raises(RuntimeError, match="disk full"):
        export(ckpt, out, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"  # the old folder stays whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]  # no partial folder left
    monkeypatch.undo()
    assert hf_main(["export", str(ckpt), str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]


def test_export_of_a_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert hf_main(["export", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_bad_llama_folders_name_the_file(tmp_path):
    folder, cfg, _ = dense_llama_folder(tmp_path)
    model = random_model(cfg)
    config = json.loads((folder / "config.json").read_text())

    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(FolderFormatError, match=r"config.json: model_type='gpt2'"):
        load_model_weights(folder, model)
    (folder / "config.json").write_text(json.dumps(config))

    (folder / "model.safetensors").rename(tmp_path / "weights.safetensors")
    with pytest.raises(FolderFormatError, match=r"model.safetensors is missing"):
        load_model_weights(folder, model)
    (folder / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(FolderFormatError, match=r"model.safetensors.index.json: sharded"):
        load_model_weights(folder, model)
    (folder / "model.safetensors.index.json").unlink()
    (tmp_path / "weights.safetensors").rename(folder / "model.safetensors")

    other_heads = random_model(train_config(tmp_path / "r2", to_dict(cfg)["data"]["tokenizer"], {**to_dict(cfg)["model"], "n_kv_heads": 4}))
    with pytest.raises(FolderFormatError, match=r"tensor layers.0.attention.wk.weight has shape \[16, 32\] there but \[32, 32\].*model-args"):
        load_model_weights(folder, other_heads)
    more_layers = random_model(train_config(tmp_path / "r3", to_dict(cfg)["data"]["tokenizer"], {**to_dict(cfg)["model"], "n_layers": 3}))
    with pytest.raises(FolderFormatError, match=r"lacks: \['layers.2.attention.wk.weight'"):
        load_model_weights(folder, more_layers)


# ---- the streaming safetensors writer ----


def test_safetensors_writer_streams_in_slices(tmp_path):
    tensors = {
        "f32": torch.randn(5, 3),
        "bf16": torch.randn(4, 6).to(torch.bfloat16),
        "f16_transposed": torch.randn(3, 5).half().t(),
        "i64": torch.arange(7),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(2.5),
    }
    path = tmp_path / "x.safetensors"
    write_safetensors(path, tensors.items(), {"lingua_model_type": "apps.main"}, slice_bytes=7)
    loaded = read_safetensors(path)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    assert read_header(path)["__metadata__"] == {"lingua_model_type": "apps.main"}
    with pytest.raises(ValueError, match="appears twice"):
        write_safetensors(path, [("a", torch.zeros(1)), ("a", torch.zeros(1))])


# ---- lm-eval cross-check: lingua's adapter against lm-eval's own `hf` model ----

# A few rows in the format of lm-eval's hellaswag (after its process_docs), piqa and nq_open, with
# task YAMLs that keep the real ones' prompts, choices, delimiters, stops, filters and metrics
# (nq_open: max_gen_toks 24 instead of lm-eval's default 256, to keep the test short).
HUB_FORMAT_TASKS = {
    "hellaswag": (
        {"output_type": "multiple_choice", "doc_to_text": "{{query}}", "doc_to_target": "{{label}}", "doc_to_choice": "choices",
         "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}, {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]},
        [{"query": "Baking cookies: A woman mixes flour and sugar in a bowl. She", "choices": ["adds two eggs and stirs.", "drives to the shed.", "sings to the moon.", "paints the wall green."], "label": "0"},
         {"query": "Walking the dog: A man clips a leash to the collar. He", "choices": ["opens the door and walks out.", "bakes a cake.", "reads the sky.", "swims to the farm."], "label": "0"},
         {"query": "Gardening: Mia digs a hole in the garden. She", "choices": ["flies a kite.", "plants a small tree in it.", "counts to 12345.", "naps in the stable."], "label": "1"}],
    ),
    "piqa": (
        {"output_type": "multiple_choice", "doc_to_text": "Question: {{goal}}\nAnswer:", "doc_to_target": "label", "doc_to_choice": "{{[sol1, sol2]}}",
         "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}, {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]},
        [{"goal": "How do you keep a door open?", "sol1": "Put a wedge under it.", "sol2": "Put a wedge on top of it.", "label": 0},
         {"goal": "To dry wet shoes,", "sol1": "fill them with ice.", "sol2": "stuff them with newspaper.", "label": 1},
         {"goal": "How to cut bread evenly", "sol1": "use a sharp serrated knife", "sol2": "use a spoon", "label": 0}],
    ),
    "nq_open": (
        {"output_type": "generate_until", "description": "Answer these questions:\n\n", "doc_to_text": "Q: {{question}}?\nA:", "doc_to_target": "{{answer}}",
         "fewshot_delimiter": "\n", "target_delimiter": " ",
         "generation_kwargs": {"until": ["\n", ".", ","], "do_sample": False, "temperature": 0.0, "max_gen_toks": 24},
         "filter_list": [{"name": "remove_whitespace", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}],
         "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True, "ignore_case": True, "ignore_punctuation": True,
                          "regexes_to_ignore": ["\\b(?:The |the |An |A |The |a |an )"]}]},
        [{"question": "where was mia at the start", "answer": ["in the shed", "the shed"]},
         {"question": "who found the ball", "answer": ["Otto"]},
         {"question": "what lay in the garden", "answer": ["a tiny sock"]}],
    ),
}


def write_hub_format_tasks(folder: Path) -> list[str]:
    import yaml

    paths = []
    for name, (fields, rows) in HUB_FORMAT_TASKS.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        task = {"task": f"{name}_local", "dataset_path": "json", "dataset_kwargs": {"data_files": {"validation": f"{name}.jsonl"}},
                "validation_split": "validation", **fields, "metadata": {"version": 1.0}}
        (folder / f"{name}_local.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
        paths.append(str(folder / f"{name}_local.yaml"))
    return paths


def samples_by_doc(results: dict[str, Any], task: str) -> dict[int, Any]:
    return {s["doc_id"]: s for s in results["samples"][task]}


def test_eval_adapter_matches_lm_eval_hf_model(tmp_path, monkeypatch):
    """The offline tasks and hellaswag/piqa/nq_open-format copies, through lingua's LinguaLM on the
    lingua model and through lm-eval's HFLM on its exported folder: the same loglikelihood per
    request (within 1e-4), the same greedy flags and generations, the same accuracies and exact match."""
    from lm_eval.models.huggingface import HFLM

    from lingua.evaluation import HarnessArgs, LinguaLM, run_harness

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # bytes: transformers and lingua decode invalid UTF-8 (random models emit it) the same way;
    # sentencepiece's byte-fallback pieces do not (see lingua/hf/tokenizer_files.py)
    cfg = train_config(tmp_path / "run", {"name": "bytes"}, {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seqlen": 320})
    model = random_model(cfg)
    hf_dir = export(save_consolidated(model, cfg, tmp_path / "ckpt"), tmp_path / "hf")
    tokenizer = build_tokenizer("bytes")
    hf_lm = HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=1, add_bos_token=True)
    assert (hf_lm.max_length, hf_lm.max_gen_toks) == (320, 256)  # the context window both truncate to
    ours_lm = LinguaLM(tokenizer, model_logits_fn(model), max_length=320, generate_fn=model_generate_fn(model, tokenizer),
                       batch_size=4, max_gen_toks=hf_lm.max_gen_toks)
    tasks = ["synthetic_mc", "synthetic_qa", *write_hub_format_tasks(tmp_path)]
    args = HarnessArgs(tasks=tasks, task_dirs=[str(TASKS_DIR)], limit=2, bootstrap_iters=0, log_samples=True, check_hub=False)
    ours, theirs = run_harness(ours_lm, args), run_harness(hf_lm, args)

    assert set(ours["results"]) == set(theirs["results"]) == {"synthetic_mc", "synthetic_qa", "hellaswag_local", "piqa_local", "nq_open_local"}
    n_loglik = n_generated = 0
    for task in ours["results"]:
        mine, reference = samples_by_doc(ours, task), samples_by_doc(theirs, task)
        assert mine.keys() == reference.keys() and len(mine) == 2
        for doc_id, sample in mine.items():
            for ours_resp, their_resp in zip(sample["resps"], reference[doc_id]["resps"], strict=True):
                if isinstance(ours_resp[0], str):  # generate_until
                    assert ours_resp == their_resp, (task, doc_id)
                    n_generated += 1
                else:  # loglikelihood: (logprob, is_greedy)
                    assert ours_resp[0][0] == pytest.approx(their_resp[0][0], abs=LOGLIK_TOL), (task, doc_id)
                    assert ours_resp[0][1] == their_resp[0][1], (task, doc_id)
                    n_loglik += 1
        for metric in ("acc,none", "acc_norm,none", "exact_match,remove_whitespace"):
            if metric in ours["results"][task]:
                assert ours["results"][task][metric] == theirs["results"][task][metric], (task, metric)
    assert n_loglik == 2 * 4 + 2 * 4 + 2 * 2 and n_generated == 4


def test_a_tokenizer_that_cannot_be_reproduced_is_refused(tmp_path):
    """A unigram sentencepiece model is not a BPE: its export is refused before anything is written."""
    sys.path.insert(0, str(REPO / "setup"))
    import train_tokenizer

    docs = [json.loads(line)["ctx"] for line in (TASKS_DIR / "synthetic_mc.train.jsonl").read_text().splitlines()]
    model_file = tmp_path / "unigram.model"
    model_file.write_bytes(train_tokenizer.sentencepiece_model_bytes(docs, 500, "unigram", seed=0))
    cfg = train_config(tmp_path / "run", {"name": "sp", "path": str(model_file)}, {"dim": 32, "n_layers": 1, "n_heads": 4})
    ckpt = save_consolidated(random_model(cfg), cfg, tmp_path / "ckpt")
    with pytest.raises(InputError, match="unigram.model.*cannot be exported"):
        export(ckpt, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "unigram.model"]
