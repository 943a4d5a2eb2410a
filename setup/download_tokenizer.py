"""Fetch a public tokenizer from the Hugging Face hub into a file `lingua.tokenizer.build_tokenizer` reads:

    llama2 -> OUT_DIR/llama2.model     (sp; tokenizer.model of meta-llama/Llama-2-7b-hf, gated)
    llama3 -> OUT_DIR/llama3.tiktoken  (tiktoken; original/tokenizer.model of meta-llama/Meta-Llama-3-8B, gated)
    gpt2   -> OUT_DIR/gpt2.tiktoken    (tiktoken; GPT-2's vocab.json + merges.txt, converted to BPE ranks)

    python setup/download_tokenizer.py llama3 tokenizer/ --token hf_...   (or set HF_TOKEN)
    python setup/download_tokenizer.py gpt2 tokenizer/ --from-dir ~/gpt2  (files copied by hand, no hub)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping, Sequence

from lingua.hub import hub_unreachable_reason
from lingua.tokenizer import Tokenizer, TokenizerName, publish_tokenizer_file, serialize_tiktoken_bpe

# The hub check gives up after this many seconds, so an offline machine fails at once.
CONNECT_TIMEOUT_S = 3.0


class DownloadError(RuntimeError):
    """The tokenizer could not be fetched; the message says why and how to get it otherwise."""


def gpt2_byte_alphabet() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte: printable Latin-1 bytes stand for themselves, the
    others (control characters, space, ...) map to chr(256), chr(257), ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in alphabet]
    alphabet.update({b: chr(256 + i) for i, b in enumerate(others)})
    return alphabet


def convert_gpt2_bpe(vocab_path: Path, merges_path: Path) -> dict[bytes, int]:
    """GPT-2-style byte-level BPE (vocab.json + merges.txt) as tiktoken ranks: each token's bytes
    with its vocab id. The single bytes and the merge results must be exactly ids 0..N-1, the merges
    in increasing id order (merge priority); other entries (<|endoftext|>) are special tokens and left out."""
    char_to_byte = {char: b for b, char in gpt2_byte_alphabet().items()}
    try:
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read the vocabulary '{vocab_path}': {error}") from None
    if not isinstance(vocab, dict):
        raise ValueError(f"'{vocab_path}' must map token strings to ids")

    ranks: dict[bytes, int] = {}
    for b, char in gpt2_byte_alphabet().items():
        if not isinstance(vocab.get(char), int):
            raise ValueError(f"'{vocab_path}' has no id for the single-byte token {char!r} (byte {b})")
        ranks[bytes([b])] = vocab[char]

    previous_rank = max(ranks.values())
    for lineno, line in enumerate(merges_path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{merges_path}:{lineno}: expected two tokens separated by one space, got {line!r}")
        token = parts[0] + parts[1]
        rank = vocab.get(token)
        if not isinstance(rank, int):
            raise ValueError(f"{merges_path}:{lineno}: the merge result {token!r} has no id in '{vocab_path}'")
        if rank <= previous_rank:
            raise ValueError(f"{merges_path}:{lineno}: id {rank} of {token!r} does not follow the previous merge's")
        try:
            ranks[bytes(char_to_byte[char] for char in token)] = rank
        except KeyError as error:
            raise ValueError(f"{merges_path}:{lineno}: {error.args[0]!r} is outside GPT-2's byte alphabet") from None
        previous_rank = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"the byte and merge tokens of '{vocab_path}' do not have ids exactly 0..{len(ranks) - 1}")
    return ranks


def _copy_file(files: Sequence[Path]) -> bytes:
    return files[0].read_bytes()


def _gpt2_file(files: Sequence[Path]) -> bytes:
    return serialize_tiktoken_bpe(convert_gpt2_bpe(files[0], files[1]))


@dataclass(frozen=True)
class HubTokenizer:
    repo_id: str  # hub model repository
    files: tuple[str, ...]  # paths inside the repository
    out_name: str  # the file written into OUT_DIR
    tokenizer: TokenizerName  # the build_tokenizer name that reads it
    gated: bool  # the repository needs an accepted license and a token
    to_bytes: Callable[[Sequence[Path]], bytes]  # downloaded files -> contents of the tokenizer file


HUB_TOKENIZERS: Mapping[str, HubTokenizer] = MappingProxyType(
    {
        "llama2": HubTokenizer(
            "meta-llama/Llama-2-7b-hf", ("tokenizer.model",), "llama2.model", "sp", True, _copy_file
        ),
        "llama3": HubTokenizer(
            "meta-llama/Meta-Llama-3-8B", ("original/tokenizer.model",), "llama3.tiktoken", "tiktoken", True, _copy_file
        ),
        "gpt2": HubTokenizer(
            "openai-community/gpt2", ("vocab.json", "merges.txt"), "gpt2.tiktoken", "tiktoken", False, _gpt2_file
        ),
    }
)


def install_tokenizer(name: str, files: Sequence[Path], out_dir: Path) -> tuple[Path, Tokenizer]:
    """Turn the repository files of tokenizer `name` (in `HubTokenizer.files` order) into
    OUT_DIR/out_name; the file must load before it is put in place."""
    spec = HUB_TOKENIZERS[name]
    out = out_dir / spec.out_name
    return out, publish_tokenizer_file(spec.to_bytes(files), spec.tokenizer, out)


def local_files(name: str, folder: Path) -> list[Path]:
    """The files of tokenizer `name` in `folder`, at their repository path or by their base name."""
    found = []
    for repo_path in HUB_TOKENIZERS[name].files:
        candidates = [folder / repo_path, folder / Path(repo_path).name]
        match = next((c for c in candidates if c.is_file()), None)
        if match is None:
            raise DownloadError(f"--from-dir: no {' or '.join(str(c) for c in dict.fromkeys(candidates))}")
        found.append(match)
    return found


def _unreachable_message(name: str, out_dir: Path, endpoint: str, reason: str) -> str:
    spec = HUB_TOKENIZERS[name]
    files = " and ".join(spec.files)
    if spec.tokenizer == "sp":
        train = (
            "python setup/train_tokenizer.py --data data/stories --vocab-size 2000 "
            "--out tokenizer/stories_sp2k.model"
        )
    else:
        train = (
            "python setup/train_tokenizer.py --format tiktoken --data data/stories --vocab-size 2000 "
            "--out tokenizer/stories_bpe2k.tiktoken"
        )
    copy_hint = f" (or copy it straight to {out_dir / spec.out_name})" if spec.to_bytes is _copy_file else ""
    return (
        f"cannot reach the Hugging Face hub at {endpoint} ({reason}), and the local hub cache has no copy of "
        f"{spec.repo_id}/{files}.\nGet the {name} tokenizer another way:\n"
        f"  - copy {files} of {spec.repo_id} from a machine with hub access into a folder, then run\n"
        f"      python setup/download_tokenizer.py {name} {out_dir} --from-dir FOLDER{copy_hint}\n"
        f"  - or train a tokenizer on local data:\n      {train}"
    )


def fetch(name: str, out_dir: Path, token: str | None) -> list[Path]:
    """Download the files of tokenizer `name` (or take them from the hub cache when the hub is
    unreachable or HF_HUB_OFFLINE is set). Fails within seconds when neither works."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    spec = HUB_TOKENIZERS[name]
    endpoint = constants.ENDPOINT
    reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else hub_unreachable_reason(endpoint, CONNECT_TIMEOUT_S)
    offline = reason is not None
    try:
        paths = [
            Path(hf_hub_download(spec.repo_id, file, token=token, local_files_only=offline)) for file in spec.files
        ]
    except GatedRepoError:
        raise DownloadError(
            f"{spec.repo_id} is gated: accept its license at {endpoint}/{spec.repo_id} while logged in, then pass "
            f"--token or set HF_TOKEN to a read token of that account"
        ) from None
    except RepositoryNotFoundError:
        hint = " (it is gated: pass --token or set HF_TOKEN)" if spec.gated and not token else ""
        raise DownloadError(f"the hub refused {spec.repo_id}: not found or not authorized{hint}") from None
    except HfHubHTTPError as error:
        raise DownloadError(f"the hub refused {spec.repo_id}/{' '.join(spec.files)}: {error}") from None
    except (LocalEntryNotFoundError, OSError) as error:
        raise DownloadError(_unreachable_message(name, out_dir, endpoint, reason or str(error))) from None
    if offline:
        print(f"note: the hub is unreachable ({reason}); using the copy in the local hub cache", file=sys.stderr)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(HUB_TOKENIZERS), help="which tokenizer")
    parser.add_argument("out_dir", type=Path, help="folder to write the tokenizer file into")
    parser.add_argument("--token", help="Hugging Face token for the gated llama repositories (default: $HF_TOKEN)")
    parser.add_argument("--from-dir", type=Path, help="take the repository files from this folder, not the hub")
    args = parser.parse_args(argv)
    if args.out_dir.exists() and not args.out_dir.is_dir():
        parser.error(f"out_dir '{args.out_dir}' is a file, not a folder")
    try:
        if args.from_dir is not None:
            files = local_files(args.name, args.from_dir)
        else:
            files = fetch(args.name, args.out_dir, args.token or os.environ.get("HF_TOKEN"))
        path, tokenizer = install_tokenizer(args.name, files, args.out_dir)
    except (DownloadError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    spec = HUB_TOKENIZERS[args.name]
    print(
        f"wrote {path}: n_words={tokenizer.n_words} bos={tokenizer.bos_id} eos={tokenizer.eos_id}\n"
        f"use it with: data.tokenizer.name={spec.tokenizer} data.tokenizer.path={path}"
    )


if __name__ == "__main__":
    main()
