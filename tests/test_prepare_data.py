"""setup/download_prepare_hf_data.py on local fixture files: every document exactly once across the
chunks and the validation file, a seeded shuffle, fsspec outputs, clear errors, and a fast failure
when the hub cannot be reached."""

import gzip
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "setup" / "download_prepare_hf_data.py"
spec = importlib.util.spec_from_file_location("download_prepare_hf_data", SCRIPT)
prep = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = prep  # dataclasses look their module up there
spec.loader.exec_module(prep)


def _has_zstandard():
    return importlib.util.find_spec("zstandard") is not None


@pytest.fixture
def inputs(tmp_path):
    """Fixture inputs of every format, and the documents they hold."""
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    docs = []
    parquet = [f"parquet doc {i}" for i in range(60)]
    pq.write_table(pa.table({"id": list(range(60)), "text": parquet}), folder / "part-0.parquet", row_group_size=16)
    docs += parquet
    jsonl = [f"jsonl doc {i}\nsecond line" for i in range(45)]
    with open(folder / "sub" / "shard.jsonl", "w") as f:
        for i, text in enumerate(jsonl):
            f.write(json.dumps({"text": text, "url": f"http://x/{i}"}) + "\n")
        f.write("\n")  # a blank line is not a document
    docs += jsonl
    # BabiStories: each line is a JSON string that is the whole story.
    stories = [f'Story {i}: "Hi," said Mia. Zoë smiled.\nThe end {i}.' for i in range(35)]
    with open(folder / "traindataset.txt", "w") as f:
        f.writelines(json.dumps(s) + "\n" for s in stories)
    docs += stories
    gz = [f"gz doc {i}" for i in range(12)]
    with gzip.open(folder / "extra.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in gz)
    docs += gz
    (folder / "README.md").write_text("not an input")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "meta.jsonl").write_text(json.dumps({"text": "download metadata"}) + "\n")
    return folder, docs


def _read(path):
    with fsspec.open(path, "rb") as f:
        return [json.loads(line)["text"] for line in f.read().decode().splitlines()]


def test_every_document_exactly_once(inputs, tmp_path):
    folder, docs = inputs
    chunks, val = prep.prepare(folder, str(tmp_path / "out"), "mix", nchunks=3, val_docs=10, seed=1,
                               memory_gb=1e-6, work_dir=tmp_path / "work")
    assert [Path(c).name for c in chunks] == [f"mix.chunk.0{k}.jsonl" for k in range(3)]
    assert Path(val).name == "mix.val.jsonl"
    assert sorted(p.name for p in (tmp_path / "out" / "mix").iterdir()) == sorted(Path(p).name for p in [*chunks, val])
    got_chunks = [_read(c) for c in chunks]
    got_val = _read(val)
    assert len(got_val) == 10
    assert len(docs) == 152
    assert [len(c) for c in got_chunks] == [48, 47, 47]  # 142 training documents dealt round-robin
    assert Counter(got_val + [t for c in got_chunks for t in c]) == Counter(docs)
    assert list((tmp_path / "work").iterdir()) == []  # the buckets are gone


def _run(folder, out, seed, memory_gb=1e-6, nchunks=2, val_docs=5):
    chunks, val = prep.prepare(folder, out, "d", nchunks=nchunks, val_docs=val_docs, seed=seed, memory_gb=memory_gb)
    return [_read(p) for p in [val, *chunks]]


def test_shuffle_is_deterministic_per_seed_and_global(inputs, tmp_path):
    folder, docs = inputs
    a = _run(folder, str(tmp_path / "a"), seed=3)
    b = _run(folder, str(tmp_path / "b"), seed=3)
    c = _run(folder, str(tmp_path / "c"), seed=4)
    assert a == b and a != c
    order = [t for part in a for t in part]
    assert order != docs
    # Documents of every input file reach the validation file's neighbourhood: the first 40 are mixed.
    kinds = {t.split()[0] for t in a[0] + a[1][:20] + a[2][:20]}
    assert {"parquet", "jsonl", "Story", "gz"} <= kinds, kinds
    # One bucket (everything in memory) is a valid shuffle too, with the same documents.
    one = _run(folder, str(tmp_path / "one"), seed=3, memory_gb=100)
    assert Counter(t for part in one for t in part) == Counter(docs)


def test_memory_and_file_urls(inputs, tmp_path):
    folder, docs = inputs
    fs = fsspec.filesystem("memory")
    try:
        chunks, val = prep.prepare(folder, "memory://prep-test", "m", nchunks=4, val_docs=7, seed=0, work_dir=tmp_path)
        assert chunks[0] == "memory://prep-test/m/m.chunk.00.jsonl" and val == "memory://prep-test/m/m.val.jsonl"
        assert sorted(fs.ls("/prep-test/m", detail=False)) == sorted(
            [f"/prep-test/m/m.chunk.0{k}.jsonl" for k in range(4)] + ["/prep-test/m/m.val.jsonl"]
        )
        memory = [_read(p) for p in [val, *chunks]]
        assert len(memory[0]) == 7
        assert Counter(t for part in memory for t in part) == Counter(docs)
    finally:
        fs.rm("/prep-test", recursive=True)
    chunks, val = prep.prepare(folder, (tmp_path / "f").as_uri(), "m", nchunks=4, val_docs=7, seed=0, work_dir=tmp_path)
    assert [_read(p) for p in [val, *chunks]] == memory  # the same seed gives the same shards anywhere


def _cli(*args, env=None):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_cli_from_local_refuses_to_overwrite_without_force(inputs, tmp_path):
    folder, docs = inputs
    out = tmp_path / "data"
    args = ["BabiStories", "--data-dir", str(out), "--from-local", str(folder), "--nchunks", "2", "--val-docs", "3"]
    # The released test split of BabiStories stays out of the shards.
    (folder / "testdataset.txt").write_text(json.dumps("a held-out test story") + "\n")
    first = _cli(*args)
    assert first.returncode == 0, first.stderr
    assert "leaving out" in first.stdout and "testdataset.txt" in first.stdout
    shards = sorted((out / "BabiStories").iterdir())
    assert [p.name for p in shards] == [f"BabiStories.{part}.jsonl" for part in ("chunk.00", "chunk.01", "val")]
    again = _cli(*args)
    assert again.returncode != 0 and "--force" in again.stderr
    forced = _cli(*args[:-4], "--nchunks", "1", "--val-docs", "3", "--force")
    assert forced.returncode == 0, forced.stderr
    names = sorted(p.name for p in (out / "BabiStories").iterdir())
    assert names == ["BabiStories.chunk.00.jsonl", "BabiStories.val.jsonl"]
    shards = [_read(out / "BabiStories" / f"BabiStories.{p}.jsonl") for p in ("val", "chunk.00")]
    assert len(shards[1]) == len(docs) - 3
    assert Counter(shards[0] + shards[1]) == Counter(docs)


def test_bad_inputs_are_named(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"text": "ok"}\n{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(SystemExit, match=r"a\.jsonl:3: expected an object"):
        prep.prepare(folder, str(tmp_path / "out"), "d", nchunks=1, val_docs=0)
    (folder / "a.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(SystemExit, match=r"a\.jsonl:2: not JSON"):
        prep.prepare(folder, str(tmp_path / "out"), "d", nchunks=1, val_docs=0)
    (folder / "a.jsonl").unlink()
    pq.write_table(pa.table({"content": ["x"]}), folder / "b.parquet")
    with pytest.raises(SystemExit, match=r"b\.parquet has no 'text' column \(columns: content\)"):
        prep.prepare(folder, str(tmp_path / "out"), "d", nchunks=1, val_docs=0)
    (folder / "b.parquet").unlink()
    (folder / "c.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    with pytest.raises(SystemExit, match=r"2 documents cannot make 2 validation documents"):
        prep.prepare(folder, str(tmp_path / "out"), "d", nchunks=1, val_docs=2)
    assert not (tmp_path / "out" / "d").exists()  # nothing written


def test_zst_without_zstandard_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import zstandard now fails
    (tmp_path / "a.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    with pytest.raises(SystemExit, match="pip install zstandard"):
        prep.prepare(tmp_path, str(tmp_path / "out"), "d", nchunks=1, val_docs=0)


class _PassThroughZstd:
    """Stands in for zstandard: "decompresses" by returning the raw bytes 7 at a time, so lines
    cross block boundaries."""

    class ZstdDecompressor:
        def stream_reader(self, raw, read_across_frames):
            assert read_across_frames  # files made of several frames must be read to the end
            return _PassThroughZstd.Reader(raw)

    class Reader:
        def __init__(self, raw):
            self.raw = raw

        def read(self, size):
            return self.raw.read(min(size, 7))


def test_zst_lines_split_across_blocks(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", _PassThroughZstd)
    texts = [f"document number {i} " + "x" * i for i in range(25)]
    body = "".join(json.dumps({"text": t}) + "\n" for t in texts).rstrip("\n")  # no final newline
    (tmp_path / "a.jsonl.zst").write_text(body)
    assert list(prep.read_texts(tmp_path / "a.jsonl.zst")) == texts


@pytest.mark.skipif(not _has_zstandard(), reason="needs zstandard")
def test_zst_inputs_with_several_frames(tmp_path):
    import zstandard

    folder = tmp_path / "in"
    folder.mkdir()
    texts = [f"zst doc {i}" for i in range(30)]
    frames = [zstandard.ZstdCompressor().compress("".join(json.dumps({"text": t}) + "\n" for t in part).encode())
              for part in (texts[:10], texts[10:])]
    (folder / "a.jsonl.zst").write_bytes(b"".join(frames))
    chunks, val = prep.prepare(folder, str(tmp_path / "out"), "z", nchunks=2, val_docs=4)
    assert Counter(t for p in [val, *chunks] for t in _read(p)) == Counter(texts)


def test_offline_download_fails_fast_with_one_clear_message(tmp_path):
    start = time.time()
    result = _cli("fineweb_edu_10bt", "--data-dir", str(tmp_path / "data"),
                  env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"})
    seconds = time.time() - start
    assert result.returncode != 0
    assert seconds < 10, seconds
    assert "cannot be reached" in result.stderr and "--from-local" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "fineweb_edu_10bt").exists()
