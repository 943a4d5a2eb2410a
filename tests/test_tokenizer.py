"""Tokenizers (bytes, sp, tiktoken) and the setup scripts that train and fetch their files.

Files are trained here, in temporary folders, from a small synthetic corpus with non-ASCII text;
the download script is run offline against a closed local port.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

from lingua.args import ConfigError
from lingua.tokenizer import (
    MAX_ENCODE_CHARS,
    MAX_RUN_CHARS,
    TokenizerArgs,
    TokenizerFileError,
    _encode_slices,
    build_tokenizer,
    publish_tokenizer_file,
    serialize_tiktoken_bpe,
)

REPO = Path(__file__).resolve().parents[1]
SAMPLES = [
    "Once upon a time, a little cat named Lily sat on the mat.",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\n\nlines\r\n",
    "café naïve über Straße — “quotes” 日本語の物語 😀🐈 ½ 12345",
    "symbols unseen in training: ∮ ∇ ⊗ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ﷺ",
    "",
]


def _load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "setup" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


train_tokenizer = _load_script("train_tokenizer")
download_tokenizer = _load_script("download_tokenizer")


def _story(rng: random.Random) -> str:
    words = (
        "the a cat dog sat ran over under happy little big tree house girl boy named Lily Tom said "
        "hello friend café naïve über Straße 日本 物語 😀 🐈 1 23 456 7890 ! ? , ."
    ).split()
    sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 15))) for _ in range(rng.randint(2, 6))]
    return "\n".join(sentences)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two shards: one keeps its text under "text", the other under "content"."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for shard, key in enumerate(("text", "content")):
        with open(root / f"stories.chunk.{shard:02d}.jsonl", "w", encoding="utf-8") as f:
            for _ in range(600):
                f.write(json.dumps({key: _story(rng), "id": shard}) + "\n")
    return root


@pytest.fixture(scope="module")
def sp_model(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sp") / "stories.model"
    train_tokenizer.train_sentencepiece(str(corpus), vocab_size=400, out=out)
    return out


@pytest.fixture(scope="module")
def bpe_file(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bpe") / "stories.tiktoken"
    train_tokenizer.main(["--format", "tiktoken", "--data", str(corpus), "--vocab-size", "600", "--out", str(out)])
    return out


# ---- bytes ----


def test_bytes_tokenizer() -> None:
    tok = build_tokenizer("bytes")
    assert (tok.n_words, tok.bos_id, tok.eos_id) == (258, 256, 257)
    assert tok.encode("é!", add_bos=True, add_eos=True) == [256, 0xC3, 0xA9, ord("!"), 257]
    for text in SAMPLES:
        assert tok.decode(tok.encode(text, add_bos=True, add_eos=True)) == text


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(ValueError, match="bytes.*sp.*tiktoken"):
        build_tokenizer("wordpiece")


# ---- sentencepiece ----


def test_sp_round_trip_and_specials(sp_model: Path) -> None:
    tok = build_tokenizer("sp", str(sp_model))
    assert (tok.n_words, tok.bos_id, tok.eos_id) == (400, 1, 2)
    for text in SAMPLES:
        ids = tok.encode(text, add_bos=True, add_eos=True)
        assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1] and 2 not in ids[1:-1]
        assert all(0 <= i < tok.n_words for i in ids)
        assert tok.decode(ids) == text
    # Learned merges: a frequent word takes fewer tokens than its bytes.
    assert len(tok.encode("little")) < len("little")


def test_sp_training_is_deterministic(corpus: Path, sp_model: Path, tmp_path: Path) -> None:
    again = tmp_path / "again.model"
    train_tokenizer.train_sentencepiece(str(corpus / "*.jsonl"), vocab_size=400, out=again)
    assert again.read_bytes() == sp_model.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["again.model"]  # no temporary file left


def test_sp_unigram(corpus: Path, tmp_path: Path) -> None:
    tok = train_tokenizer.train_sentencepiece(str(corpus), 350, tmp_path / "u.model", model_type="unigram")
    assert tok.n_words == 350
    for text in SAMPLES:
        assert tok.decode(tok.encode(text)) == text


def test_sp_vocab_too_large_is_explained(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--vocab-size 50000"):
        train_tokenizer.train_sentencepiece(str(corpus), 50_000, tmp_path / "big.model")
    assert not (tmp_path / "big.model").exists()


def test_sp_model_without_bos_is_rejected(tmp_path: Path) -> None:
    import sentencepiece

    prefix = tmp_path / "nobos"
    lines = [_story(random.Random(i)) for i in range(300)]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(prefix),
        vocab_size=100,
        hard_vocab_limit=False,
        bos_id=-1,
        minloglevel=2,
    )
    with pytest.raises(TokenizerFileError, match=r"nobos\.model.*no BOS"):
        build_tokenizer("sp", f"{prefix}.model")


# ---- tiktoken ----


def test_tiktoken_round_trip_and_specials(bpe_file: Path) -> None:
    tok = build_tokenizer("tiktoken", str(bpe_file))
    n_base = len(bpe_file.read_text().splitlines())
    assert n_base == 600 - 256
    assert (tok.n_words, tok.bos_id, tok.eos_id) == (600, n_base, n_base + 1)
    # The Llama 3 layout of the 256 special tokens.
    assert tok.special_tokens["<|start_header_id|>"] == n_base + 6
    assert tok.special_tokens["<|end_header_id|>"] == n_base + 7
    assert tok.special_tokens["<|reserved_special_token_4|>"] == n_base + 8
    assert tok.special_tokens["<|eot_id|>"] == n_base + 9
    assert tok.special_tokens["<|reserved_special_token_250|>"] == n_base + 255
    assert len(tok.special_tokens) == 256
    for text in SAMPLES:
        ids = tok.encode(text, add_bos=True, add_eos=True)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert all(0 <= i < n_base for i in ids[1:-1])
        assert tok.decode(ids) == text
    assert len(tok.encode(" little")) < len(" little")


def test_tiktoken_special_text_is_plain_text(bpe_file: Path) -> None:
    tok = build_tokenizer("tiktoken", str(bpe_file))
    text = "<|begin_of_text|>hi<|end_of_text|><|eot_id|>"
    ids = tok.encode(text)
    assert all(i < tok.n_words - 256 for i in ids)
    assert tok.decode(ids) == text


def test_tiktoken_long_text(bpe_file: Path) -> None:
    tok = build_tokenizer("tiktoken", str(bpe_file))
    text = "x" * (MAX_RUN_CHARS + 5000) + " " * (MAX_RUN_CHARS + 7) + "the cat sat. " * 40_000
    assert len(text) > MAX_ENCODE_CHARS
    assert tok.decode(tok.encode(text)) == text


def test_encode_slices_respect_limits() -> None:
    rng = random.Random(0)
    text = "".join(
        "a" * rng.randint(1, 3 * MAX_RUN_CHARS) if rng.random() < 0.5 else " " * rng.randint(1, 30_000)
        for _ in range(40)
    )
    slices = _encode_slices(text)
    assert "".join(slices) == text
    for piece in slices:
        assert 0 < len(piece) <= MAX_ENCODE_CHARS
        longest = max(len(m.group()) for m in re.finditer(r"\s+|\S+", piece))
        assert longest <= MAX_RUN_CHARS


def test_tiktoken_training_is_deterministic(corpus: Path, bpe_file: Path, tmp_path: Path) -> None:
    again = tmp_path / "again.tiktoken"
    train_tokenizer.train_tiktoken(str(corpus), 600, again)
    assert again.read_bytes() == bpe_file.read_bytes()


def test_bpe_merges_follow_pair_counts() -> None:
    # Llama 3 words: "ab", " ab", " ab", " cd". Counts: ab 3, then " ab" 2, then a tie of
    # " c" and "cd" (1 each) that the smaller id pair (32, 99) wins.
    ranks = train_tokenizer.learn_bpe_ranks(["ab ab ab cd"], 259)
    assert {token: rank for token, rank in ranks.items() if rank >= 256} == {b"ab": 256, b" ab": 257, b" c": 258}
    assert all(ranks[bytes([b])] == b for b in range(256))
    with pytest.raises(ValueError, match="supports only"):
        train_tokenizer.learn_bpe_ranks(["ab ab"], 300)


def test_tiktoken_vocab_size_must_cover_specials(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--vocab-size 512 is too small"):
        train_tokenizer.train_tiktoken(str(corpus), 512, tmp_path / "x.tiktoken")


def test_tiktoken_rejects_bad_ranks(tmp_path: Path) -> None:
    gaps = tmp_path / "gaps.tiktoken"
    gaps.write_bytes(b"YQ== 0\nYg== 2\n")  # "a" -> 0, "b" -> 2
    with pytest.raises(TokenizerFileError, match="gaps.tiktoken.*not exactly"):
        build_tokenizer("tiktoken", str(gaps))


def test_changed_tiktoken_file_is_reread(tmp_path: Path) -> None:
    path = tmp_path / "t.tiktoken"
    ranks = {bytes([b]): b for b in range(256)}
    publish_tokenizer_file(serialize_tiktoken_bpe(ranks), "tiktoken", path)
    assert build_tokenizer("tiktoken", str(path)).n_words == 512
    publish_tokenizer_file(serialize_tiktoken_bpe({**ranks, b"ab": 256}), "tiktoken", path)
    tok = build_tokenizer("tiktoken", str(path))
    assert tok.n_words == 513 and tok.encode("ab") == [256]


# ---- files: missing, wrong format, relative ----


@pytest.mark.parametrize(
    ("name", "fetch"),
    [("sp", "setup/download_tokenizer.py llama2"), ("tiktoken", "setup/download_tokenizer.py llama3")],
)
def test_missing_file_names_path_and_commands(name: str, fetch: str, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.bin")
    with pytest.raises(TokenizerFileError) as info:
        build_tokenizer(name, missing)
    message = str(info.value)
    assert missing in message
    assert "python setup/train_tokenizer.py" in message and f"--out {missing}" in message
    assert f"python {fetch}" in message
    with pytest.raises(TokenizerFileError, match=f"set data.tokenizer.path.*python {fetch}"):
        build_tokenizer(name, None)
    with pytest.raises(ConfigError, match="tokenizer.path"):
        TokenizerArgs(name=name)  # type: ignore[arg-type]


def test_hints_never_write_over_a_file_or_under_a_downloaded_name(tmp_path: Path, monkeypatch) -> None:
    """A training hint must not overwrite an existing file (the committed sentencepiece model read as
    tiktoken) nor put a story tokenizer where a downloaded one belongs (tokenizer/llama2.model)."""
    monkeypatch.chdir(REPO)
    with pytest.raises(TokenizerFileError) as wrong:
        build_tokenizer("tiktoken", "tokenizer/stories_sp2k.model")
    assert "--out tokenizer/stories_sp2k.model" not in str(wrong.value) and "data.tokenizer.path=" in str(wrong.value)
    with pytest.raises(TokenizerFileError) as gated:
        build_tokenizer("sp", str(tmp_path / "llama2.model"))
    message = str(gated.value)
    assert "fetch it: python setup/download_tokenizer.py llama2" in message and "--out" not in message.split("llama2.model'")[-1]
    assert "data.tokenizer.path=tokenizer/stories_sp2k.model" in message  # the committed story tokenizer instead


def test_wrong_format_is_named(sp_model: Path, bpe_file: Path) -> None:
    with pytest.raises(TokenizerFileError, match=f"'{re.escape(str(sp_model))}' is not a .tiktoken"):
        build_tokenizer("tiktoken", str(sp_model))
    with pytest.raises(TokenizerFileError, match=f"'{re.escape(str(bpe_file))}' is not a sentencepiece"):
        build_tokenizer("sp", str(bpe_file))


def test_relative_path_resolves_against_cwd(sp_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(sp_model.parent.parent)
    tok = build_tokenizer("sp", f"{sp_model.parent.name}/{sp_model.name}")
    assert tok.n_words == 400


def test_publish_refuses_unloadable_file(tmp_path: Path) -> None:
    with pytest.raises(TokenizerFileError, match="not writing"):
        publish_tokenizer_file(b"not a model", "sp", tmp_path / "bad.model")
    assert list(tmp_path.iterdir()) == []


# ---- training data ----


def test_read_documents_shares_the_cap(corpus: Path) -> None:
    everything = train_tokenizer.read_documents(str(corpus))
    assert len(everything) == 1200
    capped = train_tokenizer.read_documents(str(corpus), max_chars=5000)
    assert sum(map(len, capped)) == 5000
    # Both shards ("text" first, then "content") contribute, in order.
    first = json.loads((corpus / "stories.chunk.00.jsonl").read_text(encoding="utf-8").splitlines()[0])["text"]
    second = json.loads((corpus / "stories.chunk.01.jsonl").read_text(encoding="utf-8").splitlines()[0])["content"]
    assert capped[0] == first and second in capped


def test_bad_training_data_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n\n{"text": broken\n')
    with pytest.raises(ValueError, match=r"a\.jsonl:3: not valid JSON"):
        train_tokenizer.read_documents(str(tmp_path))
    (tmp_path / "a.jsonl").write_text('{"body": "no text key"}\n')
    with pytest.raises(ValueError, match=r"a\.jsonl:1: no string field 'text' or 'content' \(found \['body'\]\)"):
        train_tokenizer.read_documents(str(tmp_path))
    with pytest.raises(ValueError, match="names no .jsonl file"):
        train_tokenizer.read_documents(str(tmp_path / "missing"))


# ---- download: conversion, installation, offline ----


def _gpt2_fixture(folder: Path) -> None:
    """vocab.json + merges.txt in GPT-2's layout: printable bytes first, then the others shown as
    chr(256 + i); merges " t", "he", " the"; <|endoftext|> last."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    others = [b for b in range(256) if b not in printable]
    char = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    vocab = {char[b]: i for i, b in enumerate(printable + others)}
    vocab |= {"Ġt": 256, "he": 257, "Ġthe": 258, "<|endoftext|>": 259}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\nĠ t\nh e\nĠt he\n", encoding="utf-8")


def test_gpt2_conversion(tmp_path: Path) -> None:
    _gpt2_fixture(tmp_path)
    ranks = download_tokenizer.convert_gpt2_bpe(tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert len(ranks) == 259
    # Known GPT-2 ids: "!" is 0, space is 220, newline is 198.
    assert ranks[b"!"] == 0 and ranks[b" "] == 220 and ranks[b"\n"] == 198
    assert ranks[b" t"] == 256 and ranks[b"he"] == 257 and ranks[b" the"] == 258
    assert b"<|endoftext|>" not in ranks

    files = [tmp_path / "vocab.json", tmp_path / "merges.txt"]
    path, tok = download_tokenizer.install_tokenizer("gpt2", files, tmp_path / "out")
    assert path == tmp_path / "out" / "gpt2.tiktoken"
    assert tok.n_words == 259 + 256 and tok.encode(" the") == [258]
    assert tok.decode(tok.encode("the end\n")) == "the end\n"


def test_gpt2_conversion_errors(tmp_path: Path) -> None:
    _gpt2_fixture(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ t\nh e x\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"merges\.txt:3: expected two tokens"):
        download_tokenizer.convert_gpt2_bpe(tmp_path / "vocab.json", tmp_path / "merges.txt")
    (tmp_path / "merges.txt").write_text("#version: 0.2\nh e\nĠ t\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"merges\.txt:3: id 256 .* does not follow"):
        download_tokenizer.convert_gpt2_bpe(tmp_path / "vocab.json", tmp_path / "merges.txt")


def _run_download(args: list[str], home: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    # Port 9 (discard) on the loopback is closed: the hub is unreachable even on a networked machine.
    env |= {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(home)}
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(REPO / "setup" / "download_tokenizer.py"), *args],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=60,
    )
    return done, time.monotonic() - start


@pytest.mark.parametrize("name", ["llama3", "gpt2"])
def test_download_offline_fails_fast(name: str, tmp_path: Path) -> None:
    done, seconds = _run_download([name, str(tmp_path / "out")], tmp_path / "hf")
    assert done.returncode == 1 and seconds < 10
    assert "Traceback" not in done.stderr
    assert "cannot reach the Hugging Face hub at http://127.0.0.1:9" in done.stderr
    assert "--from-dir" in done.stderr and "python setup/train_tokenizer.py --format tiktoken" in done.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_download_from_local_folder(sp_model: Path, tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "tokenizer.model").write_bytes(sp_model.read_bytes())
    done, _ = _run_download(["llama2", str(tmp_path / "out"), "--from-dir", str(tmp_path / "repo")], tmp_path / "hf")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "llama2.model").read_bytes() == sp_model.read_bytes()
    assert "tokenizer.name=sp" in done.stdout


def test_local_files_finds_repo_layout_and_rejects_bad_files(bpe_file: Path, tmp_path: Path) -> None:
    (tmp_path / "snap" / "original").mkdir(parents=True)
    (tmp_path / "snap" / "original" / "tokenizer.model").write_bytes(bpe_file.read_bytes())
    files = download_tokenizer.local_files("llama3", tmp_path / "snap")
    path, tok = download_tokenizer.install_tokenizer("llama3", files, tmp_path / "out")
    assert path.name == "llama3.tiktoken" and tok.n_words == 600
    with pytest.raises(download_tokenizer.DownloadError, match="no .*tokenizer.model"):
        download_tokenizer.local_files("llama2", tmp_path / "empty")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "tokenizer.model").write_bytes(b"junk")
    with pytest.raises(TokenizerFileError, match="not writing"):
        download_tokenizer.install_tokenizer("llama2", [tmp_path / "junk" / "tokenizer.model"], tmp_path / "out2")
    assert not (tmp_path / "out2" / "llama2.model").exists()


# ---- tiktoken encodings: each file read with its own pattern and special tokens ----

BABI_STORY = (
    "Once upon a time, in a small town, there lived 3 friends.\n\nThey met at 10 o'clock; "
    "they'll play 42 games.  The end!\n\n\nAnother story: \"I'm here,\" said Tom. 2024 ... ok\t \n"
)


def _ranks_file(path: Path, n_ranks: int) -> dict[bytes, int]:
    """A ranks file with exactly n_ranks tokens: the 256 bytes, some merges a story uses, then
    filler pairs and triples (GPT-2's real ranks cannot be downloaded here)."""
    merges = [b"\n\n", b" 3", b" 1", b"10", b" t", b"he", b" the", b"On", b"ce", b"Once", b" u", b"pon", b" upon", b"'ll", b"'m", b" 4", b"42"]
    tokens = [bytes([b]) for b in range(256)] + merges
    seen = set(tokens)
    for size in (2, 3):
        for index in range(256**size):
            if len(tokens) == n_ranks:
                break
            token = index.to_bytes(size, "big")
            if token not in seen:
                tokens.append(token)
                seen.add(token)
    ranks = {token: rank for rank, token in enumerate(tokens)}
    path.write_bytes(serialize_tiktoken_bpe(ranks))
    return ranks


@pytest.mark.parametrize("encoding,n_ranks", [("gpt2", 50256), ("cl100k_base", 100256), ("o200k_base", 199998)])
def test_tiktoken_encodings_tokenize_as_tiktoken_does(tmp_path: Path, monkeypatch, encoding: str, n_ranks: int) -> None:
    """A ranks file of each public encoding (chosen by its rank count, or by name) tokenizes exactly
    as tiktoken.get_encoding(name) does with those ranks, with its special tokens and vocabulary size."""
    import tiktoken
    import tiktoken_ext.openai_public as public

    ranks = _ranks_file(tmp_path / f"{encoding}.tiktoken", n_ranks)
    monkeypatch.setattr(public, "load_tiktoken_bpe", lambda *args, **kwargs: ranks)  # get_encoding's constructors, offline
    monkeypatch.setattr(public, "data_gym_to_mergeable_bpe_ranks", lambda *args, **kwargs: ranks)
    reference = tiktoken.Encoding(**public.ENCODING_CONSTRUCTORS[encoding]())
    for chosen in ("auto", encoding):
        tok = build_tokenizer("tiktoken", str(tmp_path / f"{encoding}.tiktoken"), chosen)
        assert tok.encoding_name == encoding
        assert tok.special_tokens == reference._special_tokens
        assert tok.n_words == reference.n_vocab and tok.eos_id == reference.eot_token == tok.bos_id
        for text in [BABI_STORY, *SAMPLES]:
            assert tok.encode(text) == reference.encode_ordinary(text), text
        assert tok.encode("x", add_bos=True, add_eos=True) == [reference.eot_token, *reference.encode_ordinary("x"), reference.eot_token]
        assert tok.decode(tok.encode(BABI_STORY, add_eos=True)) == BABI_STORY


def test_gpt2_file_is_not_read_with_the_llama3_pattern(tmp_path: Path) -> None:
    """GPT-2's setting: EOS 50256 and 50257 tokens (padded to 50304 by the Mosaics model), " 3"
    one token and "\\n\\n" two; the Llama 3 reading of the same ranks (asked for by name) differs."""
    import torch

    from apps.mosaics.train import MosaicsTrainArgs, build_model
    from lingua.args import parse_args

    path = tmp_path / "gpt2.tiktoken"
    ranks = _ranks_file(path, 50256)
    config = REPO / "apps" / "mosaics" / "configs" / "babistories_12l.yaml"
    cfg = parse_args(MosaicsTrainArgs, [f"config={config}", f"data.tokenizer.path={path}", f"dump_dir={tmp_path / 'run'}"])
    tok = build_tokenizer(cfg.data.tokenizer.name, cfg.data.tokenizer.path, cfg.data.tokenizer.encoding)
    assert (tok.eos_id, tok.n_words) == (50256, 50257)
    assert tok.encode(" 3 friends")[0] == ranks[b" 3"] and tok.encode("a\n\nb") == [ranks[b"a"], ranks[b"\n"], ranks[b"\n"], ranks[b"b"]]
    with torch.device("meta"):
        assert build_model(cfg.model, tok).args.vocab_size == 50304
    llama = build_tokenizer("tiktoken", str(path), "llama3")
    assert (llama.eos_id, llama.n_words) == (50257, 50512)
    assert llama.encode(" 3")[0] != ranks[b" 3"] and ranks[b"\n\n"] in llama.encode("a\n\nb")
    _ranks_file(tmp_path / "small.tiktoken", 300)
    with pytest.raises(TokenizerFileError, match="holds 300 BPE ranks, but the gpt2 encoding has 50256"):
        build_tokenizer("tiktoken", str(tmp_path / "small.tiktoken"), "gpt2")
    with pytest.raises(ConfigError, match="tokenizer.encoding=gpt2 applies to tokenizer.name=tiktoken only"):
        TokenizerArgs(name="sp", path="x.model", encoding="gpt2")
