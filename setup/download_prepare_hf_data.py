"""Download a text data set from the Hugging Face hub and prepare the shards the data loader reads.

    python setup/download_prepare_hf_data.py fineweb_edu_10bt --data-dir data --nchunks 8
    python setup/download_prepare_hf_data.py BabiStories --data-dir data --from-local ~/babistories

Writes `<data-dir>/<dataset>/<dataset>.chunk.NN.jsonl` and `<dataset>.val.jsonl`, one {"text": ...}
object per line: every document exactly once, in a seeded global shuffle done out of core in memory
bounded by --memory-gb. --data-dir may be an fsspec URL; downloads and shuffle buckets stay local.
"""

from __future__ import annotations

import argparse
import fnmatch
import gzip
import json
import math
import random
import resource
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from lingua.hub import hub_unreachable_reason


@dataclass(frozen=True)
class HubDataset:
    repo: str  # the hub data set repository
    patterns: tuple[str, ...]  # allow_patterns: which files of the repository to download
    held_out: tuple[str, ...] = ()  # file names of released evaluation splits, kept out of the shards


DATASETS = {
    # data/ holds the whole corpus; sample/ holds subsets of it that would duplicate documents.
    "fineweb_edu": HubDataset("HuggingFaceFW/fineweb-edu", ("data/*.parquet",)),
    "fineweb_edu_10bt": HubDataset("HuggingFaceFW/fineweb-edu", ("sample/10BT/*.parquet",)),
    "dclm_baseline_1.0": HubDataset("mlfoundations/dclm-baseline-1.0", ("*.jsonl.zst",)),
    "dclm_baseline_1.0_10prct": HubDataset("mlfoundations/dclm-baseline-1.0", ("global-shard_01_of_10/*.jsonl.zst",)),
    # BabiStories is released as a 7z archive in github.com/facebookresearch/MemoryMosaics
    # (BabiStories/data); extracted, its .txt files hold one JSON string per line and its test split
    # is a file of its own. --repo names a hub copy of those files; --from-local prepares the
    # extracted folder directly.
    "BabiStories": HubDataset("facebook/BabiStories", ("*.txt",), held_out=("*test*", "*val*")),
}

# Inputs by how the file name ends. Line formats hold one JSON value per line: an object with a
# "text" string, or a string that is the whole document (BabiStories).
LINE_SUFFIXES = (".jsonl", ".json", ".txt")
COMPRESSION_EXPANSION = {"": 1.0, ".gz": 4.0, ".zst": 5.0}  # bytes read per byte on disk, roughly
PARQUET_EXPANSION = 3.0
DOWNLOAD_ATTEMPTS = 5
HUB_CHECK_TIMEOUT_S = 5.0
READ_BLOCK = 1 << 20


def log(message: str) -> None:
    print(message, flush=True)


def expansion(path: Path) -> float | None:
    """Bytes of text per byte on disk expected from a file, or None when it is not an input."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        return PARQUET_EXPANSION
    for compression, factor in COMPRESSION_EXPANSION.items():
        if name.endswith(tuple(suffix + compression for suffix in LINE_SUFFIXES)):
            return factor
    return None


def find_inputs(folder: Path, exclude: Path | None, held_out: tuple[str, ...] = ()) -> list[Path]:
    """Every input file under `folder` in a fixed order. Hidden folders (download caches), `exclude`
    (the output folder, when it lies inside) and files whose names match `held_out` are skipped."""
    folder = folder.resolve()
    exclude = exclude.resolve() if exclude is not None else None
    files = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder).parts
        if any(part.startswith(".") for part in relative) or (exclude is not None and path.is_relative_to(exclude)):
            continue
        if not path.is_file() or expansion(path) is None:
            continue
        if any(fnmatch.fnmatch(path.name.lower(), pattern) for pattern in held_out):
            log(f"leaving out {path}: a released evaluation split")
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def check_readers(files: list[Path]) -> None:
    """Fails at once when a reader module is missing or a parquet file has no text column."""
    if any(p.name.lower().endswith(".zst") for p in files):
        try:
            import zstandard  # noqa: F401
        except ImportError:
            sys.exit("error: .zst inputs need the zstandard module: pip install zstandard")
    parquet = [p for p in files if p.name.lower().endswith(".parquet")]
    if parquet:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            sys.exit("error: .parquet inputs need pyarrow: pip install pyarrow")
        for path in parquet:
            names = pq.ParquetFile(path).schema_arrow.names
            if "text" not in names:
                sys.exit(f"error: {path} has no 'text' column (columns: {', '.join(names)})")


def read_lines(path: Path) -> Iterator[bytes]:
    """The lines of a plain, .gz or .zst file."""
    name = path.name.lower()
    if name.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            yield from f
        return
    if not name.endswith(".zst"):
        with open(path, "rb") as f:
            yield from f
        return
    import zstandard

    with open(path, "rb") as raw:
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        pending = b""
        while block := reader.read(READ_BLOCK):
            lines = (pending + block).split(b"\n")
            pending = lines.pop()
            yield from lines
        if pending:
            yield pending


def read_texts(path: Path) -> Iterator[str]:
    """The documents of one input file, in file order."""
    if path.name.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, columns=["text"]):
            yield from (text for text in batch.column(0).to_pylist() if text is not None)
        return
    for line_no, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            sys.exit(f"error: {path}:{line_no}: not JSON ({e.msg}); expected one JSON value per line")
        if isinstance(value, dict) and isinstance(value.get("text"), str):
            yield value["text"]
        elif isinstance(value, str):
            yield value
        else:
            sys.exit(f'error: {path}:{line_no}: expected an object with a "text" string, or a JSON string')


def raise_open_file_limit(wanted: int) -> int:
    """Raises the soft limit on open files toward `wanted`; returns how many may be open."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return wanted if soft == resource.RLIM_INFINITY else soft


def bucket_count(files: list[Path], memory_gb: float) -> int:
    """Enough buckets that one of them, read into memory as a list of lines, fits --memory-gb."""
    expected = sum(p.stat().st_size * (expansion(p) or 1.0) for p in files)
    per_bucket = memory_gb * 1e9 / 3  # the lines, Python's per-object overhead, and the list
    wanted = max(1, math.ceil(expected / per_bucket))
    allowed = max(1, raise_open_file_limit(wanted + 64) - 64)
    if wanted > allowed:
        log(f"warning: {wanted} buckets would fit --memory-gb but only {allowed} files may be open; "
            f"buckets will hold about {expected / allowed / 1e9:.1f} GB each")
    return min(wanted, allowed)


def scatter(files: list[Path], bucket_dir: Path, n_buckets: int, seed: int) -> tuple[int, int]:
    """Pass 1: sends each document to a random bucket file. Returns (documents, empty ones skipped)."""
    rng = random.Random(seed)
    buckets = [open(bucket_dir / f"bucket.{b:05d}", "wb") for b in range(n_buckets)]
    n_docs = skipped = 0
    try:
        for i, path in enumerate(files):
            for text in read_texts(path):
                if not text.strip():
                    skipped += 1
                    continue
                line = json.dumps({"text": text}, ensure_ascii=False).encode() + b"\n"
                buckets[rng.randrange(n_buckets)].write(line)
                n_docs += 1
            log(f"  read {i + 1}/{len(files)} files, {n_docs} documents")
    finally:
        for f in buckets:
            f.close()
    return n_docs, skipped


def shuffled_lines(bucket_dir: Path, n_buckets: int, seed: int) -> Iterator[bytes]:
    """Pass 2: each bucket shuffled in memory, buckets in order. Independent uniform buckets
    followed by a uniform shuffle inside each give a uniformly random order of all documents."""
    for b in range(n_buckets):
        path = bucket_dir / f"bucket.{b:05d}"
        with open(path, "rb") as f:
            lines = f.readlines()
        random.Random(f"{seed}:{b}").shuffle(lines)
        yield from lines
        path.unlink()


def existing_outputs(fs: fsspec.AbstractFileSystem, folder: str, dataset: str) -> list[str]:
    """The shards a data set's output folder already holds (paths without the protocol)."""
    if not fs.exists(folder):
        return []
    val = f"{folder}/{dataset}.val.jsonl"
    return sorted(fs.glob(f"{folder}/{dataset}.chunk.*.jsonl")) + ([val] if fs.exists(val) else [])


def write_shards(
    lines: Iterator[bytes], data_dir: str, dataset: str, nchunks: int, val_docs: int
) -> tuple[list[str], str]:
    """The first `val_docs` lines go to the validation file, the rest round-robin to the chunks.

    Every file is written under a temporary name and renamed once all are complete; shards of an
    earlier run that the new layout does not have are removed. Returns (chunks, val) spelled as
    `data_dir` is (a path or a URL).
    """
    fs, root = fsspec.core.url_to_fs(data_dir)
    folder = f"{root.rstrip('/')}/{dataset}"
    width = max(2, len(str(nchunks - 1)))
    names = [f"{dataset}.val.jsonl"] + [f"{dataset}.chunk.{i:0{width}d}.jsonl" for i in range(nchunks)]
    targets = [f"{folder}/{name}" for name in names]
    fs.makedirs(folder, exist_ok=True)
    files = [fs.open(f"{path}.tmp", "wb") for path in targets]
    try:
        for j, line in enumerate(lines):
            files[0 if j < val_docs else 1 + (j - val_docs) % nchunks].write(line)
    finally:
        for f in files:
            f.close()
    for stale in set(existing_outputs(fs, folder, dataset)) - set(targets):
        fs.rm(stale)
    for path in targets:
        fs.mv(f"{path}.tmp", path)
    shown = [f"{data_dir.rstrip('/')}/{dataset}/{name}" for name in names]
    return shown[1:], shown[0]


def prepare(
    input_dir: Path,
    data_dir: str,
    dataset: str,
    nchunks: int = 32,
    val_docs: int = 10_000,
    seed: int = 42,
    memory_gb: float = 8.0,
    work_dir: Path | None = None,
    held_out: tuple[str, ...] = (),
) -> tuple[list[str], str]:
    """Converts, shuffles and shards every input file under `input_dir` except those matching
    `held_out`; returns (chunks, val). Shuffle buckets go under `work_dir` (default: `input_dir`)
    and are removed at the end.
    """
    fs, root = fsspec.core.url_to_fs(data_dir)
    local_output = Path(root, dataset) if isinstance(fs, LocalFileSystem) else None
    files = find_inputs(input_dir, exclude=local_output, held_out=held_out)
    if not files:
        sys.exit(f"error: no input files under {input_dir} (parquet with a text column, or .jsonl/.json/.txt "
                 "lines, optionally .gz or .zst compressed)")
    check_readers(files)
    n_buckets = bucket_count(files, memory_gb)
    bucket_dir = (work_dir or input_dir) / f".shuffle-buckets-seed{seed}"
    shutil.rmtree(bucket_dir, ignore_errors=True)
    bucket_dir.mkdir(parents=True)
    start = time.time()
    try:
        log(f"pass 1: {len(files)} files -> {n_buckets} buckets in {bucket_dir}")
        n_docs, skipped = scatter(files, bucket_dir, n_buckets, seed)
        log(f"  {n_docs} documents ({skipped} empty ones skipped) in {time.time() - start:.0f} s")
        if val_docs >= n_docs or n_docs - val_docs < nchunks:
            sys.exit(f"error: {n_docs} documents cannot make {val_docs} validation documents (--val-docs) "
                     f"and {nchunks} non-empty chunks (--nchunks); lower them")
        log(f"pass 2: shuffling the buckets into {nchunks} chunks and {val_docs} validation documents")
        lines = shuffled_lines(bucket_dir, n_buckets, seed)
        chunks, val = write_shards(lines, data_dir, dataset, nchunks, val_docs)
    finally:
        shutil.rmtree(bucket_dir, ignore_errors=True)
    log(f"wrote {chunks[0]} ... {chunks[-1]} and {val} in {time.time() - start:.0f} s")
    return chunks, val


def download(args: argparse.Namespace, local_dir: Path) -> None:
    """snapshot_download with retries; fails at once, with one message, when the hub is unreachable."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    spec = DATASETS[args.dataset]
    repo = args.repo or spec.repo
    if constants.HF_HUB_OFFLINE:
        reason = "HF_HUB_OFFLINE is set"
    else:
        reason = hub_unreachable_reason(constants.ENDPOINT, HUB_CHECK_TIMEOUT_S)
    if reason is not None:
        sys.exit(
            f"error: the Hugging Face hub at {constants.ENDPOINT} cannot be reached ({reason}).\n"
            f"To prepare files you already have (parquet, jsonl, jsonl.zst or BabiStories .txt), run:\n"
            f"  python setup/download_prepare_hf_data.py {args.dataset} --data-dir {args.data_dir} --from-local DIR\n"
            f"For a corpus that needs no download: python setup/make_synthetic_data.py --out {args.data_dir}"
        )
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        log(f"downloading {repo} ({', '.join(spec.patterns)}) to {local_dir}, attempt {attempt}")
        try:
            snapshot_download(
                repo,
                repo_type="dataset",
                local_dir=local_dir,
                allow_patterns=list(spec.patterns),
                token=args.token,
                max_workers=args.workers,
            )
            return
        except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as e:
            sys.exit(f"error: cannot download {repo}: {type(e).__name__}; check --repo and --token, "
                     "or pass --from-local DIR with the files")
        except Exception as e:  # a network failure: the next attempt resumes what was fetched
            if attempt == DOWNLOAD_ATTEMPTS:
                sys.exit(f"error: downloading {repo} failed {DOWNLOAD_ATTEMPTS} times; last error: {e}")
            log(f"  {type(e).__name__}: {e}; retrying in {2**attempt} s")
            time.sleep(2**attempt)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=sorted(DATASETS))
    parser.add_argument("--data-dir", required=True, help="output root: a path or an fsspec URL")
    parser.add_argument("--memory-gb", type=float, default=8.0, help="memory the shuffle may use")
    parser.add_argument("--seed", type=int, default=42, help="seed of the shuffle")
    parser.add_argument("--nchunks", type=int, default=32, help="training chunks: the data-parallel ranks or fewer")
    parser.add_argument("--val-docs", type=int, default=10_000, help="documents held out for validation")
    parser.add_argument("--token", default=None, help="hub token for gated data sets (default: the saved login)")
    parser.add_argument("--repo", default=None, help="hub repository to download instead of the data set's own")
    parser.add_argument("--workers", type=int, default=16, help="parallel downloads")
    parser.add_argument("--from-local", type=Path, default=None, help="prepare the files in this folder, no download")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="local scratch for downloads and shuffle buckets (default: <data-dir>/.work/<dataset>; "
                             "needed when --data-dir is a URL)")
    parser.add_argument("--force", action="store_true", help="replace the shards the data set already has")
    args = parser.parse_args(argv)
    for key in ("memory_gb", "nchunks", "workers"):
        if getattr(args, key) <= 0:
            parser.error(f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}")
    if args.val_docs < 0:
        parser.error(f"--val-docs must be >= 0, got {args.val_docs}")
    if args.from_local is not None and not args.from_local.is_dir():
        parser.error(f"--from-local {args.from_local}: not a folder")
    fs, root = fsspec.core.url_to_fs(args.data_dir)
    if args.work_dir is None:
        if not isinstance(fs, LocalFileSystem):
            parser.error(f"--data-dir {args.data_dir} is not local: pass --work-dir for downloads and shuffle buckets")
        args.work_dir = Path(root) / ".work" / args.dataset
    existing = existing_outputs(fs, f"{root.rstrip('/')}/{args.dataset}", args.dataset)
    if existing and not args.force:
        parser.error(f"{args.data_dir}/{args.dataset} has {len(existing)} shards already; pass --force to replace them")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    input_dir = args.from_local
    if input_dir is None:
        input_dir = args.work_dir / "download"
        download(args, input_dir)
    prepare(
        input_dir,
        args.data_dir,
        args.dataset,
        args.nchunks,
        args.val_docs,
        args.seed,
        args.memory_gb,
        args.work_dir,
        DATASETS[args.dataset].held_out,
    )
    if args.from_local is not None and not any(args.work_dir.iterdir()):
        args.work_dir.rmdir()  # it held only the shuffle buckets


if __name__ == "__main__":
    main()
