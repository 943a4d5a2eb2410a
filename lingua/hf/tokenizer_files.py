"""Hugging Face tokenizer files (`tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`)
for lingua's tokenizers, built with the `tokenizers` library so transformers encodes and decodes
exactly as `lingua.tokenizer` does (tests/test_hf.py checks it on text with spaces, newlines,
digits and non-ASCII characters).

- bytes: one token per UTF-8 byte (ids 0..255), BOS 256, EOS 257.
- sp: the sentencepiece BPE model's pieces and merges, whitespace as "▁", words starting at each
  run of whitespace (sentencepiece's split with whitespace-only pieces), byte fallback. Only the
  models `setup/train_tokenizer.py` writes are supported (BPE, identity normalization, no dummy prefix).
- tiktoken: byte-level BPE with the Llama 3 pre-tokenizer and its 256 special tokens.
Encoding with special tokens prepends BOS, as lingua's `encode(text, add_bos=True)`. Two known
differences: transformers parses special-token text ("<|eot_id|>") where lingua keeps it plain
text, and ids that spell invalid UTF-8 through sentencepiece byte pieces decode to one U+FFFD per
byte in transformers where sentencepiece keeps the valid bytes.
"""

from __future__ import annotations

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


def _bytes_tokenizer(tokenizer: ByteTokenizer, path: str | None) -> tuple[Any, list[str]]:
    from tokenizers import models

    table = byte_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    return _byte_level(models.BPE(vocab=vocab, merges=[]), None), list(BYTES_SPECIAL)


def _tiktoken_tokenizer(tokenizer: TikTokenTokenizer, path: str | None) -> tuple[Any, list[str]]:
    from tiktoken.load import load_tiktoken_bpe
    from tokenizers import models

    ranks = load_tiktoken_bpe(str(path))
    table = byte_to_unicode()
    text = lambda token: "".join(table[b] for b in token)  # noqa: E731
    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = [(text(a), text(b)) for a, b in _bpe_merges(ranks)]
    model = models.BPE(vocab=vocab, merges=merges, ignore_merges=False)
    return _byte_level(model, LLAMA3_PATTERN), sorted(tokenizer.special_tokens, key=tokenizer.special_tokens.get)


def _check_sp_model(sp: Any, path: str | None) -> None:
    """Refuse sentencepiece models whose encoding the tokenizer.json above would not reproduce."""
    probe = "a  b\n c \uff21"  # folded whitespace or NFKC (fullwidth A -> A) would change it
    pieces = sp.encode(probe, out_type=str)
    if pieces[0].startswith(SP_SPACE) or sp.decode(sp.encode(probe)) != probe:
        raise InputError(
            f"sentencepiece model '{path}' normalizes text (dummy prefix, whitespace folding or a normalization rule), "
            "which the Hugging Face export does not reproduce; export models trained by setup/train_tokenizer.py"
        )


def _sp_tokenizer(tokenizer: SentencePieceTokenizer, path: str | None) -> tuple[Any, list[str]]:
    import sentencepiece
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers

    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    _check_sp_model(sp, path)
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


TOKENIZER_BUILDERS: Mapping[type, Callable[[Any, str | None], tuple[Any, list[str]]]] = {
    ByteTokenizer: _bytes_tokenizer,
    SentencePieceTokenizer: _sp_tokenizer,
    TikTokenTokenizer: _tiktoken_tokenizer,
}


def hf_tokenizer(tokenizer: Tokenizer, path: str | None, model_max_length: int) -> Any:
    """A transformers fast tokenizer equivalent to `tokenizer` (read from `path`)."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    builder = TOKENIZER_BUILDERS.get(type(tokenizer))
    if builder is None:
        raise InputError(f"no Hugging Face tokenizer export for {type(tokenizer).__name__}; supported: bytes, sp, tiktoken")
    tok, specials = builder(tokenizer, path)
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


# Texts every exported tokenizer must encode as lingua does before its files are written.
PROBE_TEXTS = (
    "Once upon a time, Mia  went to the shed.\n\nQ: Where is Mia? A: in the shed",
    "  spaces   around\tand\r\nlines ",
    "digits 12345, 3.14 and naïve café: 日本語 😀",
)


def checked_hf_tokenizer(tokenizer: Tokenizer, path: str | None, model_max_length: int) -> Any:
    """The transformers tokenizer of `tokenizer` (`save_pretrained(folder)` writes its files), after
    checking that it encodes the probe texts to the same ids as `tokenizer` (BOS first)."""
    hf = hf_tokenizer(tokenizer, path, model_max_length)
    for text in PROBE_TEXTS:
        ours, theirs = tokenizer.encode(text, add_bos=True), hf.encode(text)
        if ours != theirs:
            raise InputError(
                f"tokenizer '{path or type(tokenizer).__name__}': the Hugging Face tokenizer built from it encodes {text!r} "
                f"as {theirs[:12]}... where lingua gives {ours[:12]}...; it cannot be exported (only BPE models as "
                "setup/train_tokenizer.py writes them are supported)"
            )
    return hf
