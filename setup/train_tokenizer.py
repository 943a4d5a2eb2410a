"""Train a tokenizer file from jsonl shards: a sentencepiece model (`--format sp`, the default) or a
byte-level BPE `.tiktoken` ranks file (`--format tiktoken`), for `lingua.tokenizer.build_tokenizer`.

    python setup/train_tokenizer.py --data data/stories --vocab-size 2000 --out tokenizer/stories_sp2k.model

The same inputs and arguments give a byte-identical file; the file is written atomically.
"""

from __future__ import annotations

import argparse
import glob
import heapq
import io
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Literal

from lingua.tokenizer import (
    LLAMA3_PATTERN,
    NUM_SPECIAL_TOKENS,
    Tokenizer,
    publish_tokenizer_file,
    serialize_tiktoken_bpe,
)

TEXT_KEYS = ("text", "content")
DEFAULT_MAX_CHARS = 10_000_000
# sentencepiece learns from lines; longer lines are cut into pieces of this many characters.
MAX_LINE_CHARS = 8192
# sentencepiece stores its thread count in the model: a fixed value keeps the file identical across machines.
SP_THREADS = 4


def list_shards(data: str) -> list[Path]:
    """The jsonl files of `data`, sorted: a directory (searched recursively; its validation files
    `*.val.jsonl` are left out) or a glob pattern (taken as it matches)."""
    root = Path(data)
    if root.is_dir():
        files = sorted(p for p in root.rglob("*.jsonl") if not p.name.endswith(".val.jsonl"))
    else:
        files = sorted(Path(p) for p in glob.glob(data, recursive=True) if Path(p).is_file())
    if not files:
        raise ValueError(f"--data '{data}' names no .jsonl file (give a directory of shards or a glob)")
    return files


def _document_text(line: str, file: Path, lineno: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{file}:{lineno}: not valid JSON ({error.msg})") from None
    if isinstance(record, dict):
        for key in TEXT_KEYS:
            if isinstance(record.get(key), str):
                return record[key]
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ValueError(f"{file}:{lineno}: no string field 'text' or 'content' (found {keys})")


def read_documents(data: str, max_chars: int = DEFAULT_MAX_CHARS) -> list[str]:
    """Document texts from the shards of `data`, at most `max_chars` characters in all.

    The budget is shared evenly over the shards (a shard that runs short leaves its rest to the
    next ones), so a capped corpus still samples every shard; the last document taken from a shard
    may be cut.
    """
    if max_chars <= 0:
        raise ValueError(f"--max-chars must be positive, got {max_chars}")
    files = list_shards(data)
    documents: list[str] = []
    remaining = max_chars
    for index, file in enumerate(files):
        budget = remaining // (len(files) - index)
        with file.open(encoding="utf-8") as lines:
            for lineno, line in enumerate(lines, start=1):
                if budget <= 0:
                    break
                if not line.strip():
                    continue
                text = _document_text(line, file, lineno)[:budget]
                documents.append(text)
                budget -= len(text)
                remaining -= len(text)
    if not any(documents):
        raise ValueError(f"--data '{data}': the shards hold no text")
    return documents


def _training_lines(documents: Iterable[str]) -> Iterable[str]:
    for document in documents:
        for line in document.splitlines():
            for start in range(0, len(line), MAX_LINE_CHARS):
                yield line[start : start + MAX_LINE_CHARS]


def sentencepiece_model_bytes(
    documents: list[str], vocab_size: int, model_type: Literal["bpe", "unigram"], seed: int
) -> bytes:
    """A sentencepiece model: unk=0, BOS=1, EOS=2, no pad; byte fallback so any text encodes,
    identity normalization and no whitespace folding so decode(encode(text)) == text."""
    import sentencepiece

    sentencepiece.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(_training_lines(documents)),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            byte_fallback=True,
            character_coverage=0.9995,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            max_sentence_length=4 * MAX_LINE_CHARS,
            num_threads=SP_THREADS,
            minloglevel=2,
        )
    except RuntimeError as error:
        raise ValueError(f"sentencepiece cannot train --vocab-size {vocab_size} on this data: {error}") from None
    return model.getvalue()


def train_sentencepiece(
    data: str,
    vocab_size: int,
    out: str | Path,
    model_type: Literal["bpe", "unigram"] = "bpe",
    max_chars: int = DEFAULT_MAX_CHARS,
    seed: int = 0,
) -> Tokenizer:
    """Train a sentencepiece model on the jsonl shards `data` and write it to `out` (n_words == vocab_size)."""
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"--model-type must be bpe or unigram, got '{model_type}'")
    documents = read_documents(data, max_chars)
    return publish_tokenizer_file(sentencepiece_model_bytes(documents, vocab_size, model_type, seed), "sp", out)


def learn_bpe_ranks(documents: Iterable[str], num_ranks: int) -> dict[bytes, int]:
    """Byte-level BPE: the 256 single bytes (rank = byte value), then merged tokens in the order
    they are learned, until there are `num_ranks`. Words are the Llama 3 pre-tokenizer's pieces;
    each step merges the most frequent adjacent pair (ties: the smallest pair of token ids)."""
    import regex

    if num_ranks <= 256:
        raise ValueError(f"a BPE vocabulary needs more than the 256 byte tokens, got {num_ranks} ranks")
    pattern = regex.compile(LLAMA3_PATTERN)
    word_counts: Counter[str] = Counter()
    for document in documents:
        word_counts.update(pattern.findall(document))

    token_bytes = [bytes([b]) for b in range(256)]  # token id -> bytes; ids are the ranks
    ranks = {token: rank for rank, token in enumerate(token_bytes)}
    words = [list(word.encode("utf-8")) for word in word_counts]
    counts = list(word_counts.values())
    pair_counts: defaultdict[tuple[int, int], int] = defaultdict(int)
    pair_words: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
    for index, (word, count) in enumerate(zip(words, counts)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += count
            pair_words[pair].add(index)
    # Max-heap by count with lazy deletion: an entry is stale when its count is no longer current.
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    while len(ranks) < num_ranks:
        while heap and -heap[0][0] != pair_counts.get(heap[0][1], 0):
            heapq.heappop(heap)
        if not heap:
            raise ValueError(
                f"the training text supports only {len(ranks)} BPE ranks; lower --vocab-size to at most "
                f"{len(ranks) + NUM_SPECIAL_TOKENS} or give more text"
            )
        _, (left, right) = heapq.heappop(heap)
        merged = token_bytes[left] + token_bytes[right]
        # Different splits can spell the same bytes: such a merge reuses the existing token.
        if merged not in ranks:
            ranks[merged] = len(token_bytes)
            token_bytes.append(merged)
        new_id = ranks[merged]
        touched: set[tuple[int, int]] = set()
        for index in pair_words.pop((left, right)):
            word, count = words[index], counts[index]
            for pair in zip(word, word[1:]):
                pair_counts[pair] -= count
                touched.add(pair)
            rewritten, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == left and word[i + 1] == right:
                    rewritten.append(new_id)
                    i += 2
                else:
                    rewritten.append(word[i])
                    i += 1
            words[index] = rewritten
            for pair in zip(rewritten, rewritten[1:]):
                pair_counts[pair] += count
                pair_words[pair].add(index)
                touched.add(pair)
        pair_counts.pop((left, right), None)
        for pair in touched:
            if pair_counts.get(pair, 0) > 0:
                heapq.heappush(heap, (-pair_counts[pair], pair))
    return ranks


def train_tiktoken(data: str, vocab_size: int, out: str | Path, max_chars: int = DEFAULT_MAX_CHARS) -> Tokenizer:
    """Learn byte-level BPE ranks on the jsonl shards `data` and write a `.tiktoken` file to `out`;
    with the 256 special tokens the tokenizer adds, n_words == vocab_size."""
    if vocab_size <= 256 + NUM_SPECIAL_TOKENS:
        raise ValueError(
            f"--vocab-size {vocab_size} is too small for --format tiktoken: it counts the 256 byte tokens "
            f"and the {NUM_SPECIAL_TOKENS} special tokens, so it must be above {256 + NUM_SPECIAL_TOKENS}"
        )
    ranks = learn_bpe_ranks(read_documents(data, max_chars), vocab_size - NUM_SPECIAL_TOKENS)
    return publish_tokenizer_file(serialize_tiktoken_bpe(ranks), "tiktoken", out)


def _chars_per_token(tokenizer: Tokenizer, documents: list[str]) -> float:
    sample = documents[:200]
    chars = sum(len(d) for d in sample)
    tokens = sum(len(tokenizer.encode(d)) for d in sample)
    return chars / max(tokens, 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder of .jsonl shards (not *.val.jsonl), or a glob")
    parser.add_argument("--vocab-size", type=int, required=True, help="n_words, special tokens included")
    parser.add_argument("--out", required=True, help="file to write: .model for sp, .tiktoken for tiktoken")
    parser.add_argument("--format", choices=("sp", "tiktoken"), default="sp", help="the tokenizer name it is for")
    parser.add_argument("--model-type", choices=("bpe", "unigram"), help="sentencepiece algorithm (sp only; bpe)")
    parser.add_argument("--max-chars", type=int, default=DEFAULT_MAX_CHARS, help="cap on the training characters")
    parser.add_argument("--seed", type=int, default=0, help="seed of sentencepiece (tiktoken BPE is deterministic)")
    args = parser.parse_args(argv)
    if args.format == "tiktoken" and args.model_type is not None:
        parser.error("--model-type applies to --format sp only")
    try:
        if args.format == "sp":
            tokenizer = train_sentencepiece(
                args.data, args.vocab_size, args.out, args.model_type or "bpe", args.max_chars, args.seed
            )
        else:
            tokenizer = train_tiktoken(args.data, args.vocab_size, args.out, args.max_chars)
        documents = read_documents(args.data, min(args.max_chars, 1_000_000))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print(
        f"wrote {args.out}: n_words={tokenizer.n_words} bos={tokenizer.bos_id} eos={tokenizer.eos_id}, "
        f"{_chars_per_token(tokenizer, documents):.2f} characters per token on a sample\n"
        f"use it with: data.tokenizer.name={args.format} data.tokenizer.path={args.out}"
    )


if __name__ == "__main__":
    main()
