"""KV-cache generation: equals recomputing the whole prefix, batched equals one by one, loads checkpoints."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apps.main.generate import Generator, GeneratorArgs, load_model_and_tokenizer, sample_next
from apps.main.train import MODEL_SPEC, MainTrainArgs
from apps.main.transformer import LMTransformer, LMTransformerArgs
from lingua.args import InputError, config_from_dict
from lingua.checkpoint import consolidate
from lingua.generation import cut_at_stops
from lingua.synthetic import write_corpus
from lingua.tokenizer import ByteTokenizer
from lingua.trainer import train

REPO = Path(__file__).resolve().parents[1]


def tiny_model(seed: int = 0) -> LMTransformer:
    tokenizer = ByteTokenizer()
    args = LMTransformerArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tokenizer.n_words, max_seqlen=64, multiple_of=16)
    torch.manual_seed(seed)
    model = LMTransformer(args, document_delimiters=(tokenizer.bos_id, tokenizer.eos_id))
    model.init_weights()
    with torch.no_grad():  # sharpen the output so greedy choices are not near-ties
        model.output.weight.mul_(20)
    return model.eval()


def greedy_by_recompute(model: LMTransformer, prompt: list[int], n_new: int, eos_id: int) -> list[int]:
    tokens = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(n_new):
            token = int(model(torch.tensor([tokens]))[0, -1].argmax())
            if token == eos_id:
                break
            out.append(token)
            tokens.append(token)
    return out


def test_cached_greedy_equals_recompute_batched_and_alone():
    model, tokenizer = tiny_model(), ByteTokenizer()
    prompts = ["a", "hello there", "The quick brown fox"]
    args = GeneratorArgs(max_gen_len=12)
    batched = Generator(model, tokenizer, args).generate(prompts)
    for prompt, text in zip(prompts, batched):
        expected = greedy_by_recompute(model, tokenizer.encode(prompt, add_bos=True), 12, tokenizer.eos_id)
        assert text == tokenizer.decode(expected)
        assert Generator(model, tokenizer, args).generate([prompt]) == [text]


def test_until_stops_and_is_cut():
    model, tokenizer = tiny_model(), ByteTokenizer()
    full = Generator(model, tokenizer, GeneratorArgs(max_gen_len=12)).generate(["hello"])[0]
    stop = full[3:5]
    cut = Generator(model, tokenizer, GeneratorArgs(max_gen_len=12, until=[stop])).generate(["hello"])[0]
    assert cut == full[: full.index(stop)]


def test_cut_at_stops_cuts_at_the_earliest_stop_of_any():
    assert cut_at_stops("a\nQ: b", ["Q", "\nQ"]) == "a"  # the later-listed stop starts first
    assert cut_at_stops("abc", ["", "x"]) == "abc"  # empty stops never cut
    assert cut_at_stops("one. two.", ["."]) == "one"


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 4.9]])
    greedy = sample_next(logits, GeneratorArgs(), None)
    assert greedy.tolist() == [1, 0]
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert sample_next(logits, GeneratorArgs(temperature=1.0, top_k=1), gen).tolist() == [1, 0]
        assert sample_next(logits, GeneratorArgs(temperature=1.0, top_p=0.01), gen).tolist() == [1, 0]
        top2 = sample_next(logits, GeneratorArgs(temperature=1.0, top_k=2), gen).tolist()
        assert top2[0] in (1, 3) and top2[1] in (0, 3)


def test_generate_from_trained_checkpoint_and_consolidated(tmp_path):
    write_corpus(tmp_path / "data", "stories", n_train=100, n_val=10, n_chunks=1, seed=0)
    cfg = config_from_dict(
        MainTrainArgs,
        {
            "dump_dir": str(tmp_path / "run"),
            "steps": 4,
            "data": {"root_dir": str(tmp_path / "data"), "batch_size": 2, "seq_len": 32, "load_async": False},
            "model": {"dim": 32, "n_layers": 1, "n_heads": 2, "max_seqlen": 64, "multiple_of": 16},
            "optim": {"warmup": 1},
        },
    )
    result = train(cfg, MODEL_SPEC)
    model, tokenizer, loaded_cfg = load_model_and_tokenizer(str(tmp_path / "run"), device="cpu")
    assert loaded_cfg == cfg
    from_dcp = Generator(model, tokenizer, GeneratorArgs(max_gen_len=8)).generate(["Once"])

    consolidated = consolidate(result.last_checkpoint)
    assert consolidated.is_file()
    model2, _, _ = load_model_and_tokenizer(str(consolidated), device="cpu")
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name
    assert Generator(model2, tokenizer, GeneratorArgs(max_gen_len=8)).generate(["Once"]) == from_dcp

    cli = subprocess.run(
        [sys.executable, "-m", "apps.main.generate", f"ckpt={tmp_path / 'run'}", "prompt=Once", "generator.max_gen_len=8"],
        cwd=REPO, capture_output=True, text=True,
    )
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert f"Once{from_dcp[0]}" in cli.stdout

    # A prompt longer than max_seqlen - max_gen_len = 56 tokens: a warning, and the output shows what the model saw.
    long_prompt = "Once upon a time there was a girl." * 20
    budget = 64 - 8
    seen = tokenizer.decode(tokenizer.encode(long_prompt, add_bos=True)[-budget:])
    cli = subprocess.run(
        [sys.executable, "-m", "apps.main.generate", f"ckpt={tmp_path / 'run'}", f"prompt={long_prompt}", "generator.max_gen_len=8"],
        cwd=REPO, capture_output=True, text=True,
    )
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert f"the model sees only its last {budget} tokens" in cli.stderr
    expected = Generator(model, tokenizer, GeneratorArgs(max_gen_len=8)).generate([long_prompt])[0]
    assert f"...{seen}{expected}" in cli.stdout and long_prompt not in cli.stdout


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(InputError, match="ckpt='.*nothing-here' does not exist"):
        load_model_and_tokenizer(str(tmp_path / "nothing-here"))
