"""Tokenizers: `bytes`, `sp` (sentencepiece model file) and `tiktoken` (local `.tiktoken` BPE ranks file).

`build_tokenizer(name, path, encoding)` is the one constructor; the data pipeline, generation and
eval use only the `Tokenizer` interface below. A ranks file is read with the pre-tokenizer pattern
and special tokens of its encoding (`TIKTOKEN_ENCODINGS`: Llama 3, GPT-2, cl100k_base, o200k_base). The setup scripts (`setup/train_tokenizer.py`,
`setup/download_tokenizer.py`) write tokenizer files through `publish_tokenizer_file`.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shlex
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Literal, Mapping, Sequence

from lingua.args import ConfigError, InputError

TokenizerName = Literal["bytes", "sp", "tiktoken"]
TiktokenEncodingName = Literal["auto", "llama3", "gpt2", "cl100k_base", "o200k_base"]

# Pre-tokenization of the Llama 3 tokenizer: contractions, letter runs (with one leading
# non-letter), numbers of up to 3 digits, punctuation runs, newlines, then other whitespace.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# GPT-2 (r50k_base): lowercase contractions, runs of letters, of digits or of other symbols each
# with at most one leading space, trailing whitespace, whitespace before a non-space but its last.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# cl100k_base: like Llama 3's (which derives from it) with possessive quantifiers.
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
# o200k_base: words split at case changes, each with its contraction; digits by 3; symbols; whitespace.
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

NUM_SPECIAL_TOKENS = 256


def llama3_special_tokens() -> list[str]:
    """The 256 special tokens of Llama 3, in id order after the BPE ranks."""
    named = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|reserved_special_token_2|>",
        "<|reserved_special_token_3|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|reserved_special_token_4|>",
        "<|eot_id|>",
    ]
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(5, NUM_SPECIAL_TOKENS - 5)]
    return named + reserved


@dataclass(frozen=True)
class TiktokenEncoding:
    """How a ranks file is read: its pre-tokenizer and the special tokens around its ranks."""

    pattern: str
    n_ranks: int | None  # the file holds exactly this many ranks (None: any number)
    special_tokens: Callable[[int], dict[str, int]]  # number of ranks -> {special token: id}
    bos: str  # the special token that opens a document
    eos: str  # ... and the one that ends it (the same one for encodings with a single special token)


def _llama3_specials(n_ranks: int) -> dict[str, int]:
    return {token: n_ranks + i for i, token in enumerate(llama3_special_tokens())}


TIKTOKEN_ENCODINGS: Mapping[str, TiktokenEncoding] = MappingProxyType(
    {
        # Any number of ranks, then the 256 Llama 3 specials (also the files setup/train_tokenizer.py writes).
        "llama3": TiktokenEncoding(LLAMA3_PATTERN, None, _llama3_specials, "<|begin_of_text|>", "<|end_of_text|>"),
        # 50256 ranks and <|endoftext|> = 50256: 50257 tokens.
        "gpt2": TiktokenEncoding(GPT2_PATTERN, 50256, lambda n: {"<|endoftext|>": 50256}, "<|endoftext|>", "<|endoftext|>"),
        "cl100k_base": TiktokenEncoding(
            CL100K_PATTERN, 100256,
            lambda n: {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276},
            "<|endoftext|>", "<|endoftext|>",
        ),
        "o200k_base": TiktokenEncoding(
            O200K_PATTERN, 199998, lambda n: {"<|endoftext|>": 199999, "<|endofprompt|>": 200018}, "<|endoftext|>", "<|endoftext|>"
        ),
    }
)


def resolve_encoding(encoding: str, n_ranks: int) -> str:
    """The encoding a ranks file is read with: `encoding` itself, or for "auto" the encoding whose
    rank count the file has (GPT-2: 50256, cl100k_base: 100256, o200k_base: 199998), else llama3."""
    if encoding != "auto":
        return encoding
    by_count = {spec.n_ranks: name for name, spec in TIKTOKEN_ENCODINGS.items() if spec.n_ranks is not None}
    return by_count.get(n_ranks, "llama3")


# tiktoken's encoder rejects texts past ~400K characters and gets slow on very long runs of
# whitespace or non-whitespace characters; longer texts are cut into slices below both limits.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000
_LONG_RUN = re.compile(rf"\s{{{MAX_RUN_CHARS}}}|\S{{{MAX_RUN_CHARS}}}")


class TokenizerFileError(InputError):
    """A tokenizer file that is missing or cannot be read; the message names the path and the
    `setup/` command that fetches or trains one."""


# Files setup/download_tokenizer.py writes (file name -> the name to pass it), and where a story
# tokenizer trained on the default corpus goes; the sentencepiece one is committed.
DOWNLOADED_FILES = {"llama2.model": "llama2", "llama3.tiktoken": "llama3", "gpt2.tiktoken": "gpt2"}
STORY_TOKENIZERS = {"sp": "tokenizer/stories_sp2k.model", "tiktoken": "tokenizer/stories_bpe2k.tiktoken"}
_PROJECT = Path(__file__).resolve().parents[1]


def _shown(path: Path) -> str:
    """`path` relative to the current directory when it is below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _how_to_get(name: str, path: str | None) -> str:
    """The commands that produce a tokenizer file for `name` at `path`. A training command writes to
    `path` only when nothing is there and `path` is not a downloaded tokenizer's file (a story
    tokenizer saved as tokenizer/llama2.model would pass for Llama 2's); otherwise it writes to a
    file of its own, and the hint says to point data.tokenizer.path at it."""
    downloaded = DOWNLOADED_FILES.get(Path(path).name) if path else None
    if downloaded is not None:
        fetch = f"fetch it: python setup/download_tokenizer.py {downloaded} {shlex.quote(str(Path(path).parent))}/"
        fetch += " (gated: pass --token or set HF_TOKEN)" if downloaded != "gpt2" else ""
    elif name == "sp":
        fetch = "fetch Llama 2's: python setup/download_tokenizer.py llama2 tokenizer/ (writes tokenizer/llama2.model; gated: pass --token or set HF_TOKEN)"
    else:
        fetch = (
            "fetch one: python setup/download_tokenizer.py llama3 tokenizer/ (writes tokenizer/llama3.tiktoken; gated: "
            "pass --token or set HF_TOKEN) or python setup/download_tokenizer.py gpt2 tokenizer/ (writes tokenizer/gpt2.tiktoken)"
        )
    story = _PROJECT / STORY_TOKENIZERS[name]
    if path and downloaded is None and not Path(path).exists():
        out, use = path, ""
    elif story.is_file():
        return f"{fetch}; or use the committed story tokenizer: data.tokenizer.path={_shown(story)}"
    else:
        out, use = STORY_TOKENIZERS[name], f" and set data.tokenizer.path={STORY_TOKENIZERS[name]}"
    fmt = "" if name == "sp" else " --format tiktoken"
    train = f"train one: python setup/train_tokenizer.py{fmt} --data data/stories --vocab-size 2000 --out {shlex.quote(out)}{use}"
    return f"{train}; or {fetch}" if downloaded is None else f"{fetch}; or {train}"


def _missing_path_message(name: str) -> str:
    return f"tokenizer '{name}' needs a file: set data.tokenizer.path to it. To {_how_to_get(name, None)}"


def _check_file(name: str, path: str | None) -> Path:
    """The tokenizer file as a Path, relative paths taken from the current directory."""
    if not path:
        raise TokenizerFileError(_missing_path_message(name))
    file = Path(path)
    if not file.is_file():
        where = "" if file.is_absolute() else f" (relative to {Path.cwd()})"
        problem = "is a directory, not a file" if file.is_dir() else "does not exist"
        raise TokenizerFileError(f"{name} tokenizer file '{path}'{where} {problem}. To {_how_to_get(name, path)}")
    return file


@dataclass
class TokenizerArgs:
    name: TokenizerName = "bytes"  # bytes: UTF-8 bytes, no file; sp: sentencepiece; tiktoken: BPE ranks file
    path: str | None = None  # the model file for sp / tiktoken, relative to the current directory; unused by bytes
    encoding: TiktokenEncodingName = "auto"  # tiktoken: pattern and special tokens of the file (auto: GPT-2 / cl100k / o200k by rank count, else Llama 3)

    def __post_init__(self) -> None:
        if self.name != "bytes" and not self.path:
            raise ConfigError(_missing_path_message(self.name))
        if self.encoding != "auto" and self.name != "tiktoken":
            raise ConfigError(f"tokenizer.encoding={self.encoding} applies to tokenizer.name=tiktoken only, not {self.name}")


class Tokenizer(ABC):
    """Text <-> token ids. `n_words` is the vocabulary size the model's embedding needs.

    `decode` drops BOS, EOS and other special ids, so for every tokenizer
    `decode(encode(text, add_bos=True, add_eos=True)) == text` for text it can represent.
    """

    n_words: int
    bos_id: int
    eos_id: int

    @abstractmethod
    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]: ...

    @abstractmethod
    def decode(self, tokens: Sequence[int]) -> str: ...


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0..255, then BOS = 256 and EOS = 257. Needs no file."""

    def __init__(self) -> None:
        self.bos_id = 256
        self.eos_id = 257
        self.n_words = 258

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        tokens = list(text.encode("utf-8"))
        return [self.bos_id] * add_bos + tokens + [self.eos_id] * add_eos

    def decode(self, tokens: Sequence[int]) -> str:
        return bytes(t for t in tokens if 0 <= t < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model file; BOS, EOS and the vocabulary size come from the model."""

    def __init__(self, path: str | None) -> None:
        import sentencepiece

        file = _check_file("sp", path)
        try:
            self._model = sentencepiece.SentencePieceProcessor(model_file=str(file))
        except (OSError, RuntimeError) as error:
            raise TokenizerFileError(
                f"'{path}' is not a sentencepiece model ({error}); a .tiktoken ranks file needs "
                f"tokenizer.name=tiktoken. To {_how_to_get('sp', path)}"
            ) from None
        self.bos_id = self._model.bos_id()
        self.eos_id = self._model.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            absent = " and ".join(kind for kind, i in (("BOS", self.bos_id), ("EOS", self.eos_id)) if i < 0)
            raise TokenizerFileError(
                f"sentencepiece model '{path}' has no {absent} piece, which documents need; "
                f"use a model trained with bos_id and eos_id set. To {_how_to_get('sp', path)}"
            )
        self.n_words = self._model.vocab_size()

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        tokens = self._model.encode(text)
        return [self.bos_id] * add_bos + tokens + [self.eos_id] * add_eos

    def decode(self, tokens: Sequence[int]) -> str:
        # Control pieces (BOS, EOS, pad) decode to nothing.
        return self._model.decode(list(tokens))


def _encode_slices(text: str) -> list[str]:
    """`text` cut into consecutive slices of at most MAX_ENCODE_CHARS characters, none holding
    more than MAX_RUN_CHARS consecutive whitespace or non-whitespace characters."""
    slices = []
    for start in range(0, len(text), MAX_ENCODE_CHARS):
        chunk = text[start : start + MAX_ENCODE_CHARS]
        begin = 0
        # Each match is the first MAX_RUN_CHARS characters of a long run: cut right after it.
        for match in _LONG_RUN.finditer(chunk):
            slices.append(chunk[begin : match.end()])
            begin = match.end()
        if begin < len(chunk):
            slices.append(chunk[begin:])
    return slices


class TikTokenTokenizer(Tokenizer):
    """A local `.tiktoken` BPE ranks file read as its encoding (see TIKTOKEN_ENCODINGS): Llama 3's
    pre-tokenizer and 256 special tokens numbered after the ranks (BOS <|begin_of_text|>, EOS
    <|end_of_text|>), or GPT-2's pattern and single <|endoftext|> = 50256 (BOS = EOS), ...
    `n_words` is the highest token id + 1. Special tokens are never parsed from text:
    "<|eot_id|>" in a document is plain text."""

    def __init__(self, path: str | None, encoding: str = "auto") -> None:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        file = _check_file("tiktoken", path)
        # tiktoken caches files by path name; the content hash makes it reread a changed file.
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        try:
            ranks = load_tiktoken_bpe(str(file), expected_hash=digest)
        except (ValueError, OSError) as error:
            raise TokenizerFileError(
                f"'{path}' is not a .tiktoken BPE ranks file ({str(error)[:200]}); a sentencepiece model "
                f"needs tokenizer.name=sp. To {_how_to_get('tiktoken', path)}"
            ) from None
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise TokenizerFileError(
                f"'{path}' holds {len(ranks)} BPE ranks that are not exactly 0..{len(ranks) - 1} "
                f"(empty, duplicated or with gaps). To {_how_to_get('tiktoken', path)}"
            )
        self.n_base = len(ranks)
        if encoding not in TIKTOKEN_ENCODINGS and encoding != "auto":
            raise ConfigError(f"tokenizer.encoding={encoding!r}: choose auto or one of {sorted(TIKTOKEN_ENCODINGS)}")
        self.encoding_name = resolve_encoding(encoding, self.n_base)
        spec = TIKTOKEN_ENCODINGS[self.encoding_name]
        if spec.n_ranks is not None and spec.n_ranks != self.n_base:
            raise TokenizerFileError(
                f"'{path}' holds {self.n_base} BPE ranks, but the {self.encoding_name} encoding has {spec.n_ranks}; "
                f"set tokenizer.encoding to the file's encoding (auto: by its rank count)"
            )
        self.special_tokens = spec.special_tokens(self.n_base)
        self._encoding = tiktoken.Encoding(
            name=file.name,
            pat_str=spec.pattern,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self.bos_id = self.special_tokens[spec.bos]
        self.eos_id = self.special_tokens[spec.eos]
        self.n_words = max(self.special_tokens.values()) + 1

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        if len(text) <= MAX_RUN_CHARS:
            tokens = self._encoding.encode_ordinary(text)
        else:
            tokens = [t for piece in _encode_slices(text) for t in self._encoding.encode_ordinary(piece)]
        return [self.bos_id] * add_bos + tokens + [self.eos_id] * add_eos

    def decode(self, tokens: Sequence[int]) -> str:
        return self._encoding.decode([t for t in tokens if 0 <= t < self.n_base])


def serialize_tiktoken_bpe(ranks: Mapping[bytes, int]) -> bytes:
    """The `.tiktoken` file format: one `base64(token) rank` line per token, in rank order."""
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"BPE ranks must be exactly 0..{len(ranks) - 1}, each once")
    by_rank = sorted(ranks.items(), key=lambda item: item[1])
    return b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in by_rank)


_BUILDERS: Mapping[str, Callable[[str | None, str], Tokenizer]] = MappingProxyType(
    {
        "bytes": lambda path, encoding: ByteTokenizer(),
        "sp": lambda path, encoding: SentencePieceTokenizer(path),
        "tiktoken": TikTokenTokenizer,
    }
)


def build_tokenizer(name: str, path: str | None = None, encoding: str = "auto") -> Tokenizer:
    """The tokenizer `name` (one of TokenizerName) reading `path`; `bytes` ignores `path`;
    `encoding` (one of TiktokenEncodingName) is how tiktoken reads its ranks file."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown tokenizer name '{name}'; choose one of {sorted(_BUILDERS)}")
    return _BUILDERS[name](path, encoding)


def publish_tokenizer_file(data: bytes, name: TokenizerName, path: str | Path) -> Tokenizer:
    """Write a tokenizer file atomically: the bytes go to a temporary file beside `path`, which must
    load as a `name` tokenizer before it replaces `path`. Returns the loaded tokenizer."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    try:
        build_tokenizer(name, str(tmp))
    except TokenizerFileError as error:
        tmp.unlink()
        raise TokenizerFileError(f"not writing '{path}': the new file does not load: {error}") from None
    os.replace(tmp, path)
    return build_tokenizer(name, str(path))
