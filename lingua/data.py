"""Training data: jsonl shards -> weighted mix of sources -> tokens -> packed windows -> shuffled batches.

Each stage is a small generator yielding `(item, state)`; the state that comes with a batch resumes
the exact token stream after it, in this or a new process. The trainer uses `init_dataloader_state`
and `build_dataloader`; validation loss uses `iter_validation_batches`.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import os
import pickle
import signal
import sys
import traceback
from collections import deque
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field, replace
from itertools import count, islice
from pathlib import Path
from typing import IO, Any, ClassVar, Iterator, Literal, NamedTuple

import fsspec
import numpy as np

from lingua.args import ConfigError, InputError
from lingua.synthetic import SOURCE as SYNTHETIC_SOURCE
from lingua.synthetic import ensure_corpus, existing_shards
from lingua.tokenizer import Tokenizer, TokenizerArgs, build_tokenizer

logger = logging.getLogger(__name__)

# Layout: <root_dir>/<source>/<name>.chunk.<k>.jsonl for training, <name>.val.jsonl for validation;
# one JSON object per line, its text under "text" or else "content". Blank lines are ignored.
TRAIN_PATTERN = "*.chunk.*.jsonl"
VAL_PATTERN = "*.val.jsonl"
TEXT_KEYS = ("text", "content")

_START_METHOD = "spawn"  # never fork: the trainer may hold threads (CUDA, NCCL, compile workers)
_POLL_SECONDS = 0.5  # how often a waiting consumer checks that the producer is alive
_STOP_SECONDS = 2.0  # how long a producer gets to exit on shutdown before it is killed


class DataError(InputError):
    """Data that cannot be used: the message names the path (and line) and the fix."""


@dataclass
class DataArgs:
    RANGES: ClassVar[dict[str, str]] = {"batch_size": ">= 1", "seq_len": ">= 1", "n_views": ">= 2", "seed": ">= 0", "prefetch_size": ">= 1"}

    root_dir: str = "data"  # folder (or fsspec URL) holding one sub-folder of jsonl shards per source
    sources: dict[str, float] = field(default_factory=lambda: {SYNTHETIC_SOURCE: 1.0})  # source -> weight (normalized)
    batch_size: int = 4  # sequences per batch on each data-parallel rank
    seq_len: int = 256  # tokens per sequence
    n_views: int = 2  # columns per position: tokens t, t+1, ...; 2 gives (input, target)
    seed: int = 42  # seeds source choice and shuffling, together with the rank
    add_bos: bool = True  # prepend BOS to every document
    add_eos: bool = True  # append EOS to every document
    load_async: bool = True  # produce batches in a separate process
    prefetch_size: int = 16  # batches per shuffle buffer; also how far the producer may run ahead
    bad_lines: Literal["fail", "skip"] = "fail"  # malformed jsonl line: raise naming file:line, or skip and count
    synthesize_missing: bool = False  # the source 'stories', when its local folder has no shards, gets the synthetic story corpus first (no other source is ever synthesized)
    tokenizer: TokenizerArgs = field(default_factory=TokenizerArgs)

    def __post_init__(self) -> None:
        if not self.root_dir:
            raise ConfigError("data.root_dir is empty; set it to the folder that holds the source folders")
        if self.bad_lines not in ("fail", "skip"):
            raise ConfigError(f"data.bad_lines='{self.bad_lines}' must be 'fail' or 'skip'")
        if not self.sources:
            raise ConfigError("data.sources is empty; give at least one source, e.g. data.sources={stories: 1.0}")
        for name, weight in self.sources.items():
            if not name or not math.isfinite(weight) or weight < 0:
                raise ConfigError(f"data.sources.{name}={weight}: names must be non-empty, weights finite and >= 0")
        if sum(self.sources.values()) <= 0:
            raise ConfigError(f"data.sources weights {dict(self.sources)} sum to 0; give one a positive weight")


# ----------------------------------------------------------------------------------------------
# State. Resume restores the readers and the source-choice RNG as they were at the start of the
# current shuffle block, re-reads the documents of that block and skips the batches already
# consumed. Cost: reading and tokenizing at most prefetch_size * batch_size sequences (plus one
# partly packed document); the state itself stays a few hundred bytes, whatever the sizes.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReaderState:
    """Where a source's reader stands on this rank (its position after the last document read)."""

    file_index: int = 0  # index of the current file in this rank's file list of the source
    file: str = ""  # that file's name, checked on resume
    position: int = 0  # byte offset of the next line
    line: int = 0  # lines read from the file so far, i.e. the 1-based number of the last one
    epoch: int = 0  # completed passes over this rank's files
    skipped: int = 0  # malformed lines skipped so far (bad_lines=skip)


@dataclass(frozen=True)
class MixState:
    readers: dict[str, ReaderState]  # source -> reader position
    rng: dict[str, Any]  # numpy bit-generator state of the source choice


@dataclass(frozen=True)
class PackState:
    mix: MixState  # upstream state just before the document holding the next window's first token
    offset: int  # index of that token within its document


@dataclass(frozen=True)
class DataLoaderState:
    """Resumes the stream right after the batch it came with; `to_dict` is plain JSON."""

    rank: int  # data-parallel rank the state belongs to
    world_size: int  # data-parallel size; resharding a saved state to another size is not supported
    pack: PackState  # packer state at the start of the current shuffle block
    block: int  # index of the current shuffle block (seeds its permutation)
    batch_in_block: int  # batches of the block already yielded

    @property
    def lines_skipped(self) -> int:
        """Malformed lines skipped by this rank's readers (as of the current block's start)."""
        return sum(reader.skipped for reader in self.pack.mix.readers.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataLoaderState:
        try:
            pack, mix = data["pack"], data["pack"]["mix"]
            readers = {str(name): ReaderState(**reader) for name, reader in mix["readers"].items()}
            return cls(
                rank=int(data["rank"]),
                world_size=int(data["world_size"]),
                pack=PackState(MixState(readers, dict(mix["rng"])), int(pack["offset"])),
                block=int(data["block"]),
                batch_in_block=int(data["batch_in_block"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise DataError(
                f"malformed data loader state ({error!r}); pass what DataLoaderState.to_dict() returned"
            ) from None


# ----------------------------------------------------------------------------------------------
# Files and sharding
# ----------------------------------------------------------------------------------------------


class _Shard(NamedTuple):
    path: str
    stride: int  # this rank reads every stride-th line of the file...
    offset: int  # ...starting at this 0-based line

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def _find_files(root_dir: str, source: str, pattern: str) -> list[str]:
    """Sorted files matching `pattern` in root_dir/source; DataError naming the path if there are none."""
    if "://" in root_dir:
        fs, root = fsspec.core.url_to_fs(root_dir)
        directory = f"{root.rstrip('/')}/{source}"
        root_exists, dir_exists = fs.isdir(root), fs.isdir(directory)
        files = sorted(fs.unstrip_protocol(p) for p in fs.glob(f"{directory}/{pattern}")) if dir_exists else []
        directory = fs.unstrip_protocol(directory)
    else:
        directory = os.path.join(root_dir, source)
        root_exists, dir_exists = os.path.isdir(root_dir), os.path.isdir(directory)
        files = sorted(str(p) for p in Path(directory).glob(pattern) if p.is_file()) if dir_exists else []
    if not root_exists:
        raise DataError(f"data.root_dir '{root_dir}' does not exist; set data.root_dir to the folder of source folders")
    if not dir_exists:
        raise DataError(f"source folder '{directory}' does not exist; {_how_to_prepare(root_dir, source)}")
    if not files:
        raise DataError(f"no files matching '{pattern}' in '{directory}' (source '{source}'); {_how_to_prepare(root_dir, source)}")
    return files


def _how_to_prepare(root_dir: str, source: str) -> str:
    """The fix for a source folder without shards: the command that writes them."""
    if source == SYNTHETIC_SOURCE:
        command = f"python setup/make_synthetic_data.py --out {root_dir} --source {source}"
    else:
        command = f"python setup/download_prepare_hf_data.py {source} --data-dir {root_dir}"
    return f"prepare it with `{command}`, or fix data.sources (source '{source}') or data.root_dir"


def find_chunks(root_dir: str, source: str) -> list[str]:
    """The training chunk files of a source, sorted by name."""
    return _find_files(root_dir, source, TRAIN_PATTERN)


def chunks_divide_evenly(n_chunks: int, world_size: int) -> bool:
    """Whether each rank can own whole chunks (or an equal share of one): W divides the chunk count
    or the chunk count divides W."""
    return n_chunks % world_size == 0 or world_size % n_chunks == 0


def _assign(chunks: list[str], rank: int, world_size: int) -> tuple[_Shard, ...]:
    """This rank's part of a source. Ranks read at one rate, so every chunk must get the same share
    of readers per line: when W divides the chunk count, rank r reads chunks r, r+W, ...; when the
    chunk count divides W, chunk c is shared by the W / n_chunks ranks {r : r % n_chunks == c},
    which take every k-th line at offsets 0..k-1; otherwise every rank takes every W-th line of
    every chunk (each rank then scans all the files). Disjoint across ranks; together they cover
    every line, and every line is read once per epoch of its rank."""
    n_chunks = len(chunks)
    if n_chunks % world_size == 0:
        return tuple(_Shard(path, 1, 0) for path in chunks[rank::world_size])
    if world_size % n_chunks == 0:
        return (_Shard(chunks[rank % n_chunks], world_size // n_chunks, rank // n_chunks),)
    return tuple(_Shard(path, world_size, rank) for path in chunks)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"bad data-parallel rank {rank} of world size {world_size}: need 0 <= rank < world_size")


def _rank_shards(args: DataArgs, rank: int, world_size: int) -> dict[str, tuple[_Shard, ...]]:
    _check_rank(rank, world_size)
    return {name: _assign(find_chunks(args.root_dir, name), rank, world_size) for name in sorted(args.sources)}


def _seed(seed: int, rank: int, *purpose: int) -> np.random.SeedSequence:
    return np.random.SeedSequence(seed, spawn_key=(rank, *purpose))


def prepare_sources(args: DataArgs) -> None:
    """With `synthesize_missing`, write the synthetic story corpus (lingua.synthetic) into the
    source folder 'stories' when it has no shards yet (logged); safe when all ranks call it at once.
    No other source is ever synthesized: a missing one raises DataError naming its folder and the
    command that prepares it, before anything is written."""
    if not args.synthesize_missing or SYNTHETIC_SOURCE not in args.sources:
        return
    if "://" in args.root_dir:
        raise ConfigError(f"data.synthesize_missing needs a local data.root_dir, got '{args.root_dir}'")
    for source in sorted(set(args.sources) - {SYNTHETIC_SOURCE}):  # checked first: nothing is written for a run that cannot start
        find_chunks(args.root_dir, source)
    if not existing_shards(args.root_dir, SYNTHETIC_SOURCE):
        folder = os.path.join(args.root_dir, SYNTHETIC_SOURCE)
        logger.warning("source '%s' has no shards in '%s': writing the synthetic story corpus there (data.synthesize_missing=true)", SYNTHETIC_SOURCE, folder)
    ensure_corpus(args.root_dir, SYNTHETIC_SOURCE)


def init_dataloader_state(args: DataArgs, rank: int, world_size: int) -> DataLoaderState:
    """The state before the first batch; checks that every source has chunk files (and says, on
    rank 0, when a chunk count makes every rank scan every file of a source)."""
    shards = _rank_shards(args, rank, world_size)
    for name in sorted(args.sources):
        n_chunks = len(find_chunks(args.root_dir, name))
        if rank == 0 and not chunks_divide_evenly(n_chunks, world_size):
            logger.warning(
                "source '%s': %d chunks do not divide among %d data-parallel ranks (nor they among the chunks), so each "
                "rank reads every %dth line of every chunk (all ranks scan all files); shard it into a multiple of %d "
                "chunks to read less", name, n_chunks, world_size, world_size, world_size,
            )
    readers = {name: ReaderState(file=files[0].name) for name, files in shards.items()}
    rng = np.random.Generator(np.random.PCG64(_seed(args.seed, rank, 0)))
    return DataLoaderState(rank, world_size, PackState(MixState(readers, rng.bit_generator.state), 0), 0, 0)


def _check_state(state: DataLoaderState, shards: dict[str, tuple[_Shard, ...]], rank: int, world_size: int) -> None:
    if (state.rank, state.world_size) != (rank, world_size):
        raise DataError(
            f"the data state belongs to rank {state.rank} of {state.world_size}, not rank {rank} of {world_size}; "
            f"resume with the data-parallel size it was saved with"
        )
    readers = state.pack.mix.readers
    if set(readers) != set(shards):
        raise DataError(f"the data state has sources {sorted(readers)} but data.sources has {sorted(shards)}")
    for name, reader in readers.items():
        files = shards[name]
        if reader.file_index >= len(files) or files[reader.file_index].name != reader.file:
            raise DataError(
                f"the data state reads '{reader.file}' as file {reader.file_index} of source '{name}', but this rank's "
                f"files are now {[f.name for f in files]}; the chunk files changed since the state was saved"
            )


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------


def _open(path: str) -> IO[bytes]:
    if "://" in path:
        return fsspec.open(path, "rb").open()
    return open(path, "rb")


def _parse(raw: bytes, path: str, line: int) -> str:
    try:
        doc = json.loads(raw)
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
        raise DataError(
            f"malformed JSON on line {line} of '{path}': {error}; fix it or set data.bad_lines=skip"
        ) from None
    text = doc.get(TEXT_KEYS[0]) if isinstance(doc, dict) else None
    if text is None and isinstance(doc, dict):
        text = doc.get(TEXT_KEYS[1])
    if not isinstance(text, str):
        raise DataError(f"line {line} of '{path}' has no string field {' or '.join(TEXT_KEYS)}; "
                        f"fix it or set data.bad_lines=skip")
    return text


def _read_documents(
    shards: tuple[_Shard, ...], state: ReaderState, bad_lines: str, loop: bool
) -> Iterator[tuple[str, ReaderState]]:
    """Texts of this rank's lines, from `state` on; with `loop`, forever, counting epochs."""
    index, position, line, epoch, skipped = state.file_index, state.position, state.line, state.epoch, state.skipped
    while True:
        full_pass, found = index == 0 and position == 0, False
        for index in range(index, len(shards)):
            shard = shards[index]
            with _open(shard.path) as file:
                file.seek(position)
                for raw in file:
                    position += len(raw)
                    line += 1
                    if (line - 1) % shard.stride != shard.offset or raw.isspace():
                        continue
                    try:
                        text = _parse(raw, shard.path, line)
                    except DataError:
                        if bad_lines == "fail":
                            raise
                        skipped += 1
                        continue
                    found = True
                    yield text, ReaderState(index, shard.name, position, line, epoch, skipped)
            position = line = 0
        if not loop:
            return
        if full_pass and not found:
            raise DataError(f"no usable document in a full pass over {[s.path for s in shards]} "
                            f"(this rank reads every {shards[0].stride}th line from line {shards[0].offset + 1})")
        index, epoch = 0, epoch + 1


def _mix(
    readers: dict[str, Iterator[tuple[str, ReaderState]]], weights: dict[str, float], state: MixState
) -> Iterator[tuple[str, MixState]]:
    """One document at a time from a source drawn with probability proportional to its weight."""
    names = sorted(readers)
    cumulative = np.cumsum([weights[name] for name in names], dtype=np.float64)
    cdf = cumulative / cumulative[-1]  # ends at exactly 1.0; zero-weight sources get empty intervals
    rng = np.random.Generator(np.random.PCG64())
    rng.bit_generator.state = state.rng
    positions = dict(state.readers)
    while True:
        name = names[int(np.searchsorted(cdf, rng.random(), side="right"))]
        text, positions[name] = next(readers[name])
        yield text, MixState(dict(positions), rng.bit_generator.state)


def _tokenize(
    docs: Iterator[tuple[str, Any]], tokenizer: Tokenizer, add_bos: bool, add_eos: bool
) -> Iterator[tuple[np.ndarray, Any]]:
    for text, state in docs:
        yield np.asarray(tokenizer.encode(text, add_bos=add_bos, add_eos=add_eos), dtype=np.int64), state


def _pack(
    docs: Iterator[tuple[np.ndarray, Any]], state: Any, offset: int, seq_len: int, n_views: int
) -> Iterator[tuple[np.ndarray, Any, int]]:
    """Windows [seq_len, n_views] of the concatenated documents, the first starting at token
    `offset` of the first document. Consecutive windows overlap by n_views - 1 tokens, so every
    token is a target once. Each window comes with (state before the document holding the next
    window's first token, that token's index in the document)."""
    window = seq_len + n_views - 1
    buffer = np.empty(0, dtype=np.int64)  # tokens from the next window's first one on
    segments: deque[list] = deque()  # [state before doc, first buffered token's index in doc, tokens buffered]
    first = True
    for tokens, after in docs:
        start = offset if first else 0
        if first and offset and offset >= len(tokens):
            raise DataError(f"the data state points at token {offset} of a {len(tokens)}-token document; "
                            f"the data files or the tokenizer changed since the state was saved")
        first = False
        if len(tokens) > start:
            segments.append([state, start, len(tokens) - start])
            buffer = np.concatenate([buffer, tokens[start:]])
        state = after
        while len(buffer) >= window:
            out = np.lib.stride_tricks.sliding_window_view(buffer[:window], n_views).copy()  # [seq_len, n_views]
            buffer, drop = buffer[seq_len:], seq_len
            while drop >= segments[0][2]:
                drop -= segments.popleft()[2]
            segments[0][1] += drop
            segments[0][2] -= drop
            yield out, segments[0][0], segments[0][1]


def _shuffle_batches(
    windows: Iterator[tuple[np.ndarray, MixState, int]], state: DataLoaderState, args: DataArgs
) -> Iterator[tuple[np.ndarray, DataLoaderState]]:
    """Blocks of prefetch_size * batch_size windows, each permuted by a generator seeded from
    (seed, rank, block), cut into batches [batch_size, seq_len, n_views]."""
    n_windows = args.prefetch_size * args.batch_size
    start, block, skip = state.pack, state.block, state.batch_in_block
    while True:
        rows = list(islice(windows, n_windows))
        _, mix, offset = rows[-1]
        end = PackState(mix, offset)
        order = np.random.default_rng(_seed(args.seed, state.rank, 1, block)).permutation(n_windows)
        sequences = np.stack([window for window, _, _ in rows])[order]  # [n_windows, seq_len, n_views]
        for b in range(skip, args.prefetch_size):
            done = b + 1 == args.prefetch_size
            after = replace(state, pack=end if done else start, block=block + done, batch_in_block=0 if done else b + 1)
            yield sequences[b * args.batch_size : (b + 1) * args.batch_size], after
        start, block, skip = end, block + 1, 0


def _train_stream(
    args: DataArgs, state: DataLoaderState, shards: dict[str, tuple[_Shard, ...]], tokenizer: Tokenizer
) -> Iterator[tuple[np.ndarray, DataLoaderState]]:
    mix = state.pack.mix
    readers = {
        name: _read_documents(files, mix.readers[name], args.bad_lines, loop=True) for name, files in shards.items()
    }
    docs = _tokenize(_mix(readers, args.sources, mix), tokenizer, args.add_bos, args.add_eos)
    windows = _pack(docs, mix, state.pack.offset, args.seq_len, args.n_views)
    return _shuffle_batches(windows, state, args)


# ----------------------------------------------------------------------------------------------
# Async producer: a spawned process sends (batch, state) through a pipe whose only writer it
# holds, so its death reads as end-of-file here; a semaphore bounds how far it runs ahead.
# ----------------------------------------------------------------------------------------------


class _ProducerTraceback(Exception):
    """The data producer's traceback text, attached as the cause of the error it sent."""


def _picklable(error: BaseException) -> BaseException:
    try:
        return pickle.loads(pickle.dumps(error))
    except Exception:
        return DataError(f"{type(error).__name__}: {error}")


def _produce(args: DataArgs, state: DataLoaderState, shards: dict[str, tuple[_Shard, ...]], conn: Any,
             slots: Any, stop: Any) -> None:
    # Ctrl-C and the preemption signals (SLURM sends them to every process of a job) are the trainer's:
    # it saves and then stops this producer through `stop`.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)
    parent = mp.parent_process()
    try:
        tokenizer = build_tokenizer(args.tokenizer.name, args.tokenizer.path, args.tokenizer.encoding)
        for batch, batch_state in _train_stream(args, state, shards, tokenizer):
            while not slots.acquire(timeout=0.1):
                if stop.is_set() or (parent is not None and not parent.is_alive()):
                    return
            if stop.is_set():
                return
            try:
                conn.send(("batch", batch, batch_state))
            except OSError:  # the consumer closed its end
                return
    except Exception as error:
        with suppress(OSError):
            conn.send(("error", _picklable(error), traceback.format_exc()))
    finally:
        conn.close()


def _consume(conn: Any, slots: Any, process: Any) -> Iterator[tuple[np.ndarray, DataLoaderState]]:
    while True:
        try:
            while not conn.poll(_POLL_SECONDS):
                if not process.is_alive() and not conn.poll(0):
                    raise EOFError
            kind, *payload = conn.recv()
        except EOFError:
            process.join(_STOP_SECONDS)
            raise DataError(
                f"the data producer process (pid {process.pid}) exited with code {process.exitcode} without "
                f"reporting an error; a negative code is the signal that killed it, otherwise see its stderr"
            ) from None
        slots.release()
        if kind == "error":
            error, text = payload
            raise error from _ProducerTraceback(text)
        yield payload[0], payload[1]


@contextmanager
def _launching_script_hidden() -> Iterator[None]:
    """While a child is spawned, hide the launching script from multiprocessing: a spawned child
    otherwise re-imports `__main__` (e.g. apps.main.train with torch and the whole model stack, seconds
    per start) although the producer needs only this module."""
    main = sys.modules["__main__"]
    spec, path = main.__spec__, main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__spec__ = spec
        if path is not None:
            main.__file__ = path


@contextmanager
def build_dataloader(
    args: DataArgs, state: DataLoaderState, rank: int, world_size: int
) -> Iterator[Iterator[tuple[np.ndarray, DataLoaderState]]]:
    """Yields an endless iterator of (batch int64 [batch_size, seq_len, n_views], state after it).
    With args.load_async a spawned process produces the batches; it is stopped and joined on exit."""
    shards = _rank_shards(args, rank, world_size)
    _check_state(state, shards, rank, world_size)
    if not args.load_async:
        stream = _train_stream(args, state, shards, build_tokenizer(args.tokenizer.name, args.tokenizer.path, args.tokenizer.encoding))
        try:
            yield stream
        finally:
            stream.close()
        return
    ctx = mp.get_context(_START_METHOD)
    reader, writer = ctx.Pipe(duplex=False)
    slots, stop = ctx.Semaphore(args.prefetch_size), ctx.Event()
    process = ctx.Process(target=_produce, args=(args, state, shards, writer, slots, stop),
                          name=f"data-producer-rank{rank}", daemon=True)
    with _launching_script_hidden():
        process.start()
    writer.close()  # the producer now holds the only writer: its exit reads as end-of-file
    try:
        yield _consume(reader, slots, process)
    finally:
        stop.set()
        reader.close()  # a producer blocked in send() gets a broken pipe
        process.join(_STOP_SECONDS)
        if process.is_alive():
            process.kill()
            process.join()


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def iter_validation_batches(
    args: DataArgs, source: str, batch_size: int, max_batches: int | None = None, rank: int = 0, world_size: int = 1
) -> Iterator[np.ndarray]:
    """Batches [<= batch_size, seq_len, n_views] of packed windows of the source's *.val.jsonl files,
    in file order, unshuffled. Rank r reads lines r, r+W, ... of each file. The tokens after the last
    full window are dropped; the last batch may be smaller."""
    _check_rank(rank, world_size)
    if batch_size < 1 or (max_batches is not None and max_batches < 0):
        raise DataError(f"validation needs batch_size >= 1 and max_batches >= 0, got {batch_size}, {max_batches}")
    shards = tuple(_Shard(path, world_size, rank) for path in _find_files(args.root_dir, source, VAL_PATTERN))
    tokenizer = build_tokenizer(args.tokenizer.name, args.tokenizer.path, args.tokenizer.encoding)
    return _validation_batches(args, shards, tokenizer, batch_size, max_batches)


def _validation_batches(
    args: DataArgs, shards: tuple[_Shard, ...], tokenizer: Tokenizer, batch_size: int, max_batches: int | None
) -> Iterator[np.ndarray]:
    docs = _read_documents(shards, ReaderState(file=shards[0].name), args.bad_lines, loop=False)
    packed = _pack(_tokenize(docs, tokenizer, args.add_bos, args.add_eos), None, 0, args.seq_len, args.n_views)
    windows = (window for window, _, _ in packed)
    for _ in range(max_batches) if max_batches is not None else count():
        rows = list(islice(windows, batch_size))
        if not rows:
            return
        yield np.stack(rows)
