"""The story corpus on disk: `write_corpus` writes a split's stories as the jsonl shards the data
loader reads (published at once, never partially), `ensure_corpus` writes them once for all the
processes that ask together, and `shard_paths` / `existing_shards` name the files.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lingua.synthetic.stories import make_story, story_indices

SOURCE = "stories"  # the one data source that may be synthesized (the default data set)


def shard_paths(root_dir: str | Path, source: str, n_chunks: int) -> list[Path]:
    """The files of a source in the loader's layout: the training chunks, then the validation file."""
    folder = Path(root_dir) / source
    width = max(2, len(str(n_chunks - 1)))  # numbers sort as names
    chunks = [folder / f"{source}.chunk.{i:0{width}d}.jsonl" for i in range(n_chunks)]
    return chunks + [folder / f"{source}.val.jsonl"]


def existing_shards(root_dir: str | Path, source: str) -> list[Path]:
    """The shards `<root_dir>/<source>` holds now: its chunks in name order, then its validation file."""
    folder = Path(root_dir) / source
    if not folder.is_dir():
        return []
    chunks = sorted(folder.glob(f"{source}.chunk.*.jsonl"))
    val = folder / f"{source}.val.jsonl"
    return chunks + ([val] if val.exists() else [])


def _write_lines(path: Path, indices: range, seed: int) -> None:
    """Writes one {"text": ...} line per story."""
    with open(path, "w", encoding="utf-8") as f:
        for i in indices:
            f.write(json.dumps({"text": make_story(seed, i).text}) + "\n")


def write_corpus(
    root_dir: str | Path,
    source: str = SOURCE,
    n_train: int = 20_000,
    n_val: int = 500,
    n_chunks: int = 4,
    seed: int = 0,
) -> list[Path]:
    """Writes `<root_dir>/<source>/<source>.chunk.NN.jsonl` and `<source>.val.jsonl`; returns their paths.

    Train story i goes to chunk i % n_chunks. The files are built in a temporary folder beside the
    target and moved in only when all are complete, so an interrupted run leaves no partial shard.
    Chunk files of the source that the new layout does not have are removed.
    """
    if n_chunks < 1 or n_train < n_chunks:
        raise ValueError(f"n_chunks={n_chunks}, n_train={n_train}: need 1 <= n_chunks <= n_train")
    if n_val < 1:
        raise ValueError(f"n_val={n_val}: the validation file needs at least one story")
    root = Path(root_dir)
    root.mkdir(parents=True, exist_ok=True)
    target = root / source
    final = shard_paths(root, source, n_chunks)
    train = story_indices("train", n_train)
    tmp = Path(tempfile.mkdtemp(prefix=f".{source}.tmp-", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it private; it may become the published folder
    try:
        for k, path in enumerate(final[:-1]):
            _write_lines(tmp / path.name, train[k::n_chunks], seed)
        _write_lines(tmp / final[-1].name, story_indices("val", n_val), seed)
        try:
            # A single rename publishes every shard at once when the target is absent or empty.
            os.rename(tmp, target)
        except OSError:
            target.mkdir(exist_ok=True)
            for stale in set(existing_shards(root, source)) - set(final):
                stale.unlink()
            for path in final:
                os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_corpus(
    root_dir: str | Path,
    source: str = SOURCE,
    n_train: int = 20_000,
    n_val: int = 500,
    n_chunks: int = 4,
    seed: int = 0,
) -> list[Path]:
    """Writes the corpus only when `<root_dir>/<source>` has no shards; returns the shard paths.

    Processes that call this at once (every rank of a job) wait on a lock file; the first writes,
    the others find its shards.
    """
    root = Path(root_dir)
    existing = existing_shards(root, source)
    if existing:
        return existing
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{source}.lock"):
        existing = existing_shards(root, source)
        if existing:
            return existing
        return write_corpus(root, source, n_train, n_val, n_chunks, seed)
