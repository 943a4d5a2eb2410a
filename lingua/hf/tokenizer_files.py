"""Hugging Face tokenizer files (`tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`)
for lingua's tokenizers, built with the `tokenizers` library so transformers encodes and decodes
exactly as `lingua.tokenizer` does (tests/test_hf.py checks it on text with spaces, newlines,
digits and non-ASCII characters).

- bytes: one token per UTF-8 byte (ids 0..255), BOS 256, EOS 257.
- sp: the sentencepiece BPE model's pieces and merges, whitespace as "▁", words starting at each
  run of whitespace (sentencepiece's split with whitespace-only pieces), byte fallback. Only the
  models `setup/train_tokenizer.py` writes are supported (BPE, identity normalization, no dummy prefix).
- tiktoken: byte-level BPE with the Llama 3 pre-tokenizer and its 256 special tokens.
Encoding with special tokens prepends BOS, as lingua's `encode(text, add_bos=True)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from lingua.args import InputError
from lingua.tokenizer import LLAMA3_PATTERN, ByteTokenizer, SentencePieceTokenizer, TikTokenTokenizer, Tokenizer

SP_SPACE = "\u2581"  # sentencepiece's escaped whitespace
BYTES_SPECIAL = ("<|begin_of_text|>", "<|end_of_text|>")  # names of the bytes tokenizer's BOS and EOS


def byte_to_unicode() -> dict[int, str]:
    """The printable stand-in of every byte used by byte-level BPE vocabularies (GPT-2's table):
    printable Latin-1 bytes map to themselves, the others to code points from 256 on."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _bpe_merges(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list equivalent to tiktoken's rank-ordered BPE: each multi-byte token, in rank
    order, is the merge of the two parts BPE (with the lower ranks only) splits it into."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best = min(
                (i for i in range(len(parts) - 1) if ranks.get(parts[i] + parts[i + 1], rank) < rank),
                key=lambda i: ranks[parts[i] + parts[i + 1]],
                default=None,
            )
            if best is None:
                break
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
        if len(parts) != 2:
            raise InputError(f"BPE token {token!r} (rank {rank}) is not the merge of two lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges


def _byte_level(tokenizer_model: Any, pattern: str | None) -> Any:
    """A tokenizers.Tokenizer over a byte-level model, pre-split by `pattern` (None: no split)."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, pre_tokenizers

    tok = HFTokenizer(tokenizer_model)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pattern is None:
        tok.pre_tokenizer = byte_level
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"), byte_level])
    tok.decoder = decoders.ByteLevel()
    return tok


def _bytes_tokenizer(tokenizer: ByteTokenizer) -> tuple[Any, list[str]]:
    from tokenizers import models

    table = byte_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    return _byte_level(models.BPE(vocab=vocab, merges=[]), None), list(BYTES_SPECIAL)


def _tiktoken_tokenizer(tokenizer: TikTokenTokenizer) -> tuple[Any, list[str]]:
    from tokenizers import models

    ranks = tokenizer._encoding._mergeable_ranks
    table = byte_to_unicode()
    text = lambda token: "".join(table[b] for b in token)  # noqa: E731
    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = [(text(a), text(b)) for a, b in _bpe_merges(ranks)]
    model = models.BPE(vocab=vocab, merges=merges, ignore_merges=False)
    return _byte_level(model, LLAMA3_PATTERN), sorted(tokenizer.special_tokens, key=tokenizer.special_tokens.get)


def _sp_tokenizer(tokenizer: SentencePieceTokenizer) -> tuple[Any, list[str]]:
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers

    sp = tokenizer._model
    normal = [i for i in range(sp.vocab_size()) if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))]
    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    by_score = sorted(normal, key=lambda i: (-sp.get_score(i), i))
    merges = []
    for i in by_score:  # a piece is made by merging any two pieces that spell it, at its score's priority
        piece = sp.id_to_piece(i)
        merges += [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
    model = models.BPE(vocab=vocab, merges=merges, unk_token=sp.id_to_piece(sp.unk_id()), byte_fallback=True, fuse_unk=True)
    tok = HFTokenizer(model)
    tok.normalizer = normalizers.Replace(" ", SP_SPACE)
    # sentencepiece starts a word at the first of a run of whitespace pieces
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(f"{SP_SPACE}+"), behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace(SP_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = [sp.id_to_piece(i) for i in range(sp.vocab_size()) if sp.is_control(i) or sp.is_unknown(i)]
    return tok, specials


TOKENIZER_BUILDERS: Mapping[type, Callable[[Any], tuple[Any, list[str]]]] = {
    ByteTokenizer: _bytes_tokenizer,
    SentencePieceTokenizer: _sp_tokenizer,
    TikTokenTokenizer: _tiktoken_tokenizer,
}


def _check_sp_model(tokenizer: SentencePieceTokenizer, path: str | None) -> None:
    """Refuse sentencepiece models whose encoding the tokenizer.json above would not reproduce."""
    sp = tokenizer._model
    probe = "a  b\n c \uff21"  # folded whitespace or NFKC (fullwidth A -> A) would change it
    pieces = sp.encode(probe, out_type=str)
    if pieces[0].startswith(SP_SPACE) or sp.decode(sp.encode(probe)) != probe:
        raise InputError(
            f"sentencepiece model '{path}' normalizes text (dummy prefix, whitespace folding or a normalization rule), "
            "which the Hugging Face export does not reproduce; export models trained by setup/train_tokenizer.py"
        )


def hf_tokenizer(tokenizer: Tokenizer, path: str | None, model_max_length: int) -> Any:
    """A transformers fast tokenizer equivalent to `tokenizer` (read from `path`)."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    builder = TOKENIZER_BUILDERS.get(type(tokenizer))
    if builder is None:
        raise InputError(f"no Hugging Face tokenizer export for {type(tokenizer).__name__}; supported: bytes, sp, tiktoken")
    if isinstance(tokenizer, SentencePieceTokenizer):
        _check_sp_model(tokenizer, path)
    tok, specials = builder(tokenizer)
    # added after the base vocabulary (bytes, tiktoken) or marked in it (sentencepiece control pieces)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    bos, eos = tok.id_to_token(tokenizer.bos_id), tok.id_to_token(tokenizer.eos_id)
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=eos,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def write_tokenizer_files(tokenizer: Tokenizer, path: str | None, out_dir: Path, model_max_length: int) -> None:
    """Write the transformers tokenizer files of `tokenizer` into `out_dir` and check that the
    written files load and assign ids as `tokenizer` does."""
    hf = hf_tokenizer(tokenizer, path, model_max_length)
    for token_id in (tokenizer.bos_id, tokenizer.eos_id):
        if hf.convert_tokens_to_ids(hf.convert_ids_to_tokens(token_id)) != token_id:
            raise InputError(f"tokenizer '{path}': special token id {token_id} does not round-trip through tokenizer.json")
    hf.save_pretrained(str(out_dir))
