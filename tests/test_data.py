"""The data pipeline: packing, exact resume (also in a new process), rank sharding, mixing, bad input,
the async producer and validation batches. Expectations are computed here from the fixture files
with the byte tokenizer's definition (BOS 256, UTF-8 bytes, EOS 257)."""

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from lingua.args import ConfigError, config_from_dict
from lingua.data import (
    DataArgs,
    DataError,
    DataLoaderState,
    build_dataloader,
    find_chunks,
    init_dataloader_state,
    iter_validation_batches,
)

BOS, EOS = 256, 257
REPO = Path(__file__).resolve().parents[1]


def _write_source(root: Path, source: str, chunks: list[list[str]], val: list[str] | None = None) -> None:
    """chunks: raw lines per chunk file (already JSON or deliberately broken)."""
    folder = root / source
    folder.mkdir(parents=True, exist_ok=True)
    for index, lines in enumerate(chunks):
        (folder / f"{source}.chunk.{index:02d}.jsonl").write_text("".join(line + "\n" for line in lines))
    if val is not None:
        (folder / f"{source}.val.jsonl").write_text("".join(line + "\n" for line in val))


def _docs(texts: list[str], key: str = "text") -> list[str]:
    return [json.dumps({key: text}) for text in texts]


def _encode(text: str) -> list[int]:
    return [BOS, *text.encode("utf-8"), EOS]


def _args(root: Path, **overrides) -> DataArgs:
    settings = dict(root_dir=str(root), sources={"s": 1.0}, batch_size=1, seq_len=7, prefetch_size=1, load_async=False)
    settings.update(overrides)
    return DataArgs(**settings)


def _batches(args: DataArgs, n: int, rank: int = 0, world_size: int = 1, state: DataLoaderState | None = None):
    state = state or init_dataloader_state(args, rank, world_size)
    with build_dataloader(args, state, rank, world_size) as stream:
        return [(batch.copy(), batch_state) for batch, batch_state in islice(stream, n)]


def _stream_tokens(windows: list[np.ndarray]) -> np.ndarray:
    """Undo the packing: column 0 of every window, then the last window's overlap tail."""
    return np.concatenate([w[:, 0] for w in windows] + [windows[-1][-1, 1:]])


def _complete_docs(tokens: np.ndarray) -> list[str]:
    docs, current = [], None
    for token in tokens.tolist():
        if token == BOS:
            current = []
        elif token == EOS:
            if current is not None:
                docs.append(bytes(current).decode("utf-8"))
            current = None
        elif current is not None:
            current.append(token)
    return docs


def _roundtrip(state: DataLoaderState) -> DataLoaderState:
    return DataLoaderState.from_dict(json.loads(json.dumps(state.to_dict())))


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_views", [2, 3])
def test_packing_loses_no_token(tmp_path, n_views):
    chunk0 = ["short", "", "a much longer document that spans several windows " * 3, "héllo wörld ✓"]
    chunk1 = ["x", "the last one"]
    _write_source(tmp_path, "s", [_docs(chunk0), _docs(chunk1, key="content")])
    args = _args(tmp_path, n_views=n_views)
    windows = [batch[0] for batch, _ in _batches(args, 60)]
    assert all(w.shape == (7, n_views) and w.dtype == np.int64 for w in windows)

    epoch = [t for text in chunk0 + chunk1 for t in _encode(text)]
    expected = np.array(epoch * (60 * 7 // len(epoch) + 2))
    stream = _stream_tokens(windows)
    np.testing.assert_array_equal(stream, expected[: len(stream)])
    assert len(stream) == 60 * 7 + n_views - 1
    for i, window in enumerate(windows):  # column j holds the tokens j positions ahead
        for j in range(n_views):
            np.testing.assert_array_equal(window[:, j], expected[i * 7 + j : i * 7 + j + 7])


def test_shuffle_buffer_permutes_each_block(tmp_path):
    _write_source(tmp_path, "s", [_docs([f"document number {i}" for i in range(30)])])
    in_order = [batch[0] for batch, _ in _batches(_args(tmp_path), 24)]
    shuffled = _batches(_args(tmp_path, batch_size=3, prefetch_size=4), 4)
    assert all(batch.shape == (3, 7, 2) and batch.dtype == np.int64 for batch, _ in shuffled)
    rows = [row for batch, _ in shuffled for row in batch]  # one block: 4 batches of 3
    as_set = lambda ws: sorted(w.tobytes() for w in ws)  # noqa: E731
    assert as_set(rows) == as_set(in_order[:12])
    assert not all((a == b).all() for a, b in zip(rows, in_order[:12]))


def _mixed_fixture(root: Path) -> DataArgs:
    long_doc = "long " * 40
    _write_source(root, "a", [_docs([f"a{i}" for i in range(7)] + [long_doc]), _docs(["a-last", ""]) + ["{bad"]])
    _write_source(root, "b", [_docs([f"b{i} {'y' * i}" for i in range(11)])])
    return DataArgs(root_dir=str(root), sources={"a": 2.0, "b": 1.0}, batch_size=2, seq_len=9, n_views=3,
                    prefetch_size=3, load_async=False, bad_lines="skip", seed=7)


def test_resume_at_every_batch_in_process(tmp_path):
    args = _mixed_fixture(tmp_path)
    full = _batches(args, 40)
    for k in range(len(full) - 1):
        resumed = _batches(args, 6, state=_roundtrip(full[k][1]))
        for (expected, expected_state), (batch, state) in zip(full[k + 1 :], resumed):
            np.testing.assert_array_equal(batch, expected)
            assert state == expected_state
    assert full[-1][1].pack.mix.readers["a"].epoch >= 1  # the run crossed an epoch boundary


_RESUME_SCRIPT = """
import json, sys
from itertools import islice
import numpy as np
from lingua.args import config_from_dict
from lingua.data import DataArgs, DataLoaderState, build_dataloader

if __name__ == "__main__":
    config, state_file, n, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    args = config_from_dict(DataArgs, json.loads(config))
    state = DataLoaderState.from_dict(json.loads(open(state_file).read()))
    with build_dataloader(args, state, state.rank, state.world_size) as stream:
        batches = [batch.copy() for batch, _ in islice(stream, n)]
    np.save(out, np.stack(batches))
"""


@pytest.mark.parametrize("load_async", [False, True])
def test_resume_in_a_new_process(tmp_path, load_async):
    args = _mixed_fixture(tmp_path / "data")
    args.load_async = load_async
    full = _batches(args, 14, rank=1, world_size=2)
    if load_async:  # the producer process makes the same stream as the in-process chain
        args.load_async = False
        np.testing.assert_array_equal([b for b, _ in full], [b for b, _ in _batches(args, 14, 1, 2)])
        args.load_async = True
    stop = 4  # mid-block: prefetch_size 3
    (tmp_path / "state.json").write_text(json.dumps(full[stop][1].to_dict()))
    config = {"root_dir": args.root_dir, "sources": args.sources, "batch_size": 2, "seq_len": 9, "n_views": 3,
              "prefetch_size": 3, "load_async": load_async, "bad_lines": "skip", "seed": 7}
    (tmp_path / "resume.py").write_text(_RESUME_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(tmp_path / "resume.py"), json.dumps(config), str(tmp_path / "state.json"),
               str(len(full) - stop - 1), str(tmp_path / "out.npy")]
    subprocess.run(command, check=True, env=env, timeout=60)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), np.stack([b for b, _ in full[stop + 1 :]]))


@pytest.mark.parametrize("world_size,n_chunks", [(2, 1), (2, 2), (3, 2), (2, 3), (4, 3), (2, 5)])
def test_ranks_are_disjoint_and_cover_every_line(tmp_path, world_size, n_chunks):
    lines = {c: [f"c{c}-l{i}" for i in range(5 + c)] for c in range(n_chunks)}
    _write_source(tmp_path, "s", [_docs(lines[c]) for c in range(n_chunks)])
    seen = []
    for rank in range(world_size):
        batches = _batches(_args(tmp_path, seq_len=16), 60, rank, world_size)
        assert batches[-1][1].pack.mix.readers["s"].epoch >= 2
        seen.append(set(_complete_docs(_stream_tokens([b[0] for b, _ in batches]))))
    all_lines = {line for chunk in lines.values() for line in chunk}
    assert set.union(*seen) == all_lines
    assert sum(len(s) for s in seen) == len(all_lines)  # disjoint


def test_chunks_are_sorted(tmp_path):
    _write_source(tmp_path, "s", [["{}"]] * 3)
    (tmp_path / "s" / "s.val.jsonl").write_text("{}\n")
    names = [Path(p).name for p in find_chunks(str(tmp_path), "s")]
    assert names == ["s.chunk.00.jsonl", "s.chunk.01.jsonl", "s.chunk.02.jsonl"]


def test_mixing_follows_the_weights(tmp_path):
    _write_source(tmp_path, "a", [_docs([f"a{i}" for i in range(13)])])
    _write_source(tmp_path, "b", [_docs([f"b{i}" for i in range(7)])])
    _write_source(tmp_path, "c", [_docs(["c"])])
    args = _args(tmp_path, sources={"a": 3.0, "b": 1.0, "c": 0.0}, seq_len=64)
    docs = _complete_docs(_stream_tokens([b[0] for b, _ in _batches(args, 300)]))
    counts = {source: sum(doc.startswith(source) for doc in docs) for source in "abc"}
    assert sum(counts.values()) > 1500
    assert counts["c"] == 0
    assert abs(counts["a"] / (counts["a"] + counts["b"]) - 0.75) < 0.04


def test_malformed_line_fails_naming_file_and_line(tmp_path):
    _write_source(tmp_path, "s", [_docs(["ok", "ok"]) + ['{"text": "unterminated'] + _docs(["ok"])])
    with pytest.raises(DataError, match=r"line 3 of '.*s\.chunk\.00\.jsonl'.*bad_lines=skip"):
        _batches(_args(tmp_path), 5)
    _write_source(tmp_path, "t", [_docs(["ok"]) + ['{"title": "no text"}']])
    with pytest.raises(DataError, match=r"line 2 of '.*t\.chunk\.00\.jsonl' has no string field text or content"):
        _batches(_args(tmp_path, sources={"t": 1.0}), 5)


def test_skip_mode_skips_and_counts(tmp_path):
    good = ["first", "second", "third"]
    lines = [json.dumps({"text": good[0]}), "{oops", json.dumps({"text": good[1]}), "   ", '["a list"]',
             json.dumps({"text": good[2]})]
    bad_line_numbers = (2, 5)  # line 4 is blank: ignored, not counted
    _write_source(tmp_path, "s", [lines])
    batches = _batches(_args(tmp_path, bad_lines="skip"), 30)
    stream = _stream_tokens([b[0] for b, _ in batches])
    epoch = [t for text in good for t in _encode(text)]
    np.testing.assert_array_equal(stream, np.array(epoch * 20)[: len(stream)])
    for _, state in batches:
        reader = state.pack.mix.readers["s"]
        assert state.lines_skipped == 2 * reader.epoch + sum(n <= reader.line for n in bad_line_numbers)
    assert batches[-1][1].lines_skipped >= 4


def test_missing_paths_are_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=f"data.root_dir '{missing}' does not exist"):
        init_dataloader_state(_args(missing), 0, 1)
    _write_source(tmp_path, "s", [_docs(["x"])])
    with pytest.raises(DataError, match=f"source folder '{tmp_path / 'other'}' does not exist"):
        init_dataloader_state(_args(tmp_path, sources={"s": 1.0, "other": 1.0}), 0, 1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "empty.val.jsonl").write_text(_docs(["v"])[0])
    with pytest.raises(DataError, match=rf"no files matching '\*\.chunk\.\*\.jsonl' in '{tmp_path / 'empty'}'"):
        init_dataloader_state(_args(tmp_path, sources={"empty": 1.0}), 0, 1)
    with pytest.raises(DataError, match=r"'\*\.val\.jsonl'"):
        iter_validation_batches(_args(tmp_path), "s", 2, None)
    state = init_dataloader_state(_args(tmp_path), 0, 1)
    with pytest.raises(DataError, match=f"data.root_dir '{missing}'"):
        with build_dataloader(_args(missing), state, 0, 1):
            pass


def test_bad_state_and_args_are_rejected(tmp_path):
    _write_source(tmp_path, "s", [_docs(["x"]), _docs(["y"])])
    state = init_dataloader_state(_args(tmp_path), 0, 2)
    with pytest.raises(DataError, match="rank 0 of 2, not rank 0 of 1"):
        with build_dataloader(_args(tmp_path), state, 0, 1):
            pass
    (tmp_path / "s" / "s.chunk.00.jsonl").rename(tmp_path / "s" / "s.chunk.09.jsonl")
    with pytest.raises(DataError, match="chunk files changed"):
        with build_dataloader(_args(tmp_path), state, 0, 2):
            pass
    with pytest.raises(DataError, match="malformed data loader state"):
        DataLoaderState.from_dict({"rank": 0})
    with pytest.raises(DataError, match="rank 2 of world size 2"):
        init_dataloader_state(_args(tmp_path), 2, 2)
    with pytest.raises(ConfigError, match="n_views=1 must be >= 2"):
        config_from_dict(DataArgs, {"n_views": 1})
    with pytest.raises(ConfigError, match="sum to 0"):
        config_from_dict(DataArgs, {"sources": {"a": 0.0}})
    with pytest.raises(ConfigError, match="data.sources.a=-1.0"):
        config_from_dict(DataArgs, {"sources": {"a": -1.0, "b": 2.0}})
    with pytest.raises(ConfigError, match="bad_lines"):
        config_from_dict(DataArgs, {"bad_lines": "ignore"})
    assert config_from_dict(DataArgs, {"sources": {"x": 2, "y": 1}}).sources == {"x": 2.0, "y": 1.0}


def test_fsspec_url_root_gives_the_local_stream(tmp_path):
    _write_source(tmp_path, "s", [_docs(["one", "two"]), _docs(["three"])])
    local = _batches(_args(tmp_path), 8)
    remote = _batches(_args(f"file://{tmp_path}"), 8)
    np.testing.assert_array_equal([b for b, _ in local], [b for b, _ in remote])


# ---------------------------------------------------------------------------------------------


def _producers() -> list:
    return [p for p in mp.active_children() if p.name.startswith("data-producer")]


def test_async_producer_error_reaches_the_consumer(tmp_path):
    _write_source(tmp_path, "s", [_docs(["fine"] * 3) + ["not json"]])
    with pytest.raises(DataError, match=r"line 4 of '.*s\.chunk\.00\.jsonl'") as error:
        _batches(_args(tmp_path, load_async=True), 50)
    cause = str(error.value.__cause__)
    assert "Traceback (most recent call last)" in cause and "line 4 of" in cause
    assert not _producers()


def test_killed_producer_makes_the_consumer_raise(tmp_path):
    _write_source(tmp_path, "s", [_docs([f"doc {i}" for i in range(20)])])
    args = _args(tmp_path, load_async=True, prefetch_size=2)
    with build_dataloader(args, init_dataloader_state(args, 0, 1), 0, 1) as stream:
        next(stream)
        (producer,) = _producers()
        os.kill(producer.pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(DataError, match=r"exited with code -9 without reporting an error"):
            for _ in range(1000):
                next(stream)
        assert time.monotonic() - start < 5
    assert not _producers()


def test_producer_is_stopped_and_joined_on_exit(tmp_path):
    _write_source(tmp_path, "s", [_docs([f"doc {i}" for i in range(20)])])
    args = _args(tmp_path, load_async=True, prefetch_size=2)
    with build_dataloader(args, init_dataloader_state(args, 0, 1), 0, 1) as stream:
        next(stream)
        (producer,) = _producers()
        time.sleep(0.3)  # let it fill its slots and wait
    assert producer.exitcode == 0  # it stopped by itself, not killed
    assert not _producers()


# ---------------------------------------------------------------------------------------------


def test_validation_batches(tmp_path):
    val = [f"validation doc {i}" for i in range(9)]
    _write_source(tmp_path, "s", [_docs(["train only"] * 4)], val=_docs(val))
    args = _args(tmp_path, seq_len=10)
    batches = list(iter_validation_batches(args, "s", batch_size=4, max_batches=None))
    assert [b.shape for b in batches] == [(4, 10, 2)] * (len(batches) - 1) + [batches[-1].shape]
    expected = np.array([t for text in val for t in _encode(text)])
    windows = [w for b in batches for w in b]
    assert len(windows) == (len(expected) - 1) // 10  # only the tail after the last full window is dropped
    np.testing.assert_array_equal(_stream_tokens(windows), expected[: len(windows) * 10 + 1])
    again = list(iter_validation_batches(args, "s", batch_size=4, max_batches=None))
    np.testing.assert_array_equal(np.concatenate(batches), np.concatenate(again))
    assert len(list(iter_validation_batches(args, "s", batch_size=4, max_batches=2))) == 2

    for rank in range(2):  # rank r reads lines r, r + 2, ...
        (batch,) = iter_validation_batches(args, "s", 100, None, rank, 2)
        expected = np.array([t for text in val[rank::2] for t in _encode(text)])
        np.testing.assert_array_equal(_stream_tokens(list(batch)), expected[: len(batch) * 10 + 1])


@pytest.mark.parametrize("world_size,n_chunks", [(2, 3), (3, 2)])
def test_every_chunk_is_read_at_the_same_rate(tmp_path, world_size, n_chunks):
    """Ranks consume at one rate; with chunks that do not divide among them, no chunk's lines are
    drawn more often than another's (owning whole chunks, one rank would cycle a chunk alone)."""
    _write_source(tmp_path, "s", [_docs([f"c{c}-l{i:02d}" for i in range(12)]) for c in range(n_chunks)])
    per_chunk = dict.fromkeys(range(n_chunks), 0)
    for rank in range(world_size):
        batches = _batches(_args(tmp_path, seq_len=16), 100, rank, world_size)
        for doc in _complete_docs(_stream_tokens([b[0] for b, _ in batches])):
            per_chunk[int(doc[1])] += 1
    lines_per_rank_and_chunk = 12 // world_size
    # Each rank reads its lines of chunk 0, 1, ... in turn: a partial epoch favours early chunks by at most that much.
    assert max(per_chunk.values()) - min(per_chunk.values()) <= lines_per_rank_and_chunk * world_size, per_chunk
