"""Write the offline story corpus (lingua/synthetic/) in the layout the data loader reads.

    python setup/make_synthetic_data.py --out data --source stories --n-train 20000 --n-val 500 --chunks 4

Without --force a source that already has shards is left as it is.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lingua.synthetic import ensure_corpus, existing_shards, write_corpus


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data"), help="data root: shards go to <out>/<source>/")
    parser.add_argument("--source", default="stories", help="source name: the folder and the file prefix")
    parser.add_argument("--n-train", type=int, default=20_000, help="training stories")
    parser.add_argument("--n-val", type=int, default=500, help="validation stories")
    parser.add_argument("--chunks", type=int, default=4, help="training chunk files")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed: the same seed writes the same bytes")
    parser.add_argument("--force", action="store_true", help="rewrite the shards even if the source has some")
    args = parser.parse_args(argv)
    if args.chunks < 1 or args.n_train < args.chunks:
        parser.error(f"--chunks {args.chunks} --n-train {args.n_train}: need 1 <= chunks <= n-train")
    if args.n_val < 1:
        parser.error(f"--n-val {args.n_val}: need at least one validation story")

    existing = existing_shards(args.out, args.source)
    if existing and not args.force:
        for path in existing:
            print(path)
        print(f"kept the {len(existing)} existing shards of '{args.source}' (pass --force to rewrite them)")
        return
    start = time.time()
    write = write_corpus if args.force else ensure_corpus
    paths = write(args.out, args.source, args.n_train, args.n_val, args.chunks, args.seed)
    seconds = time.time() - start
    for path in paths:
        print(f"{path}  {path.stat().st_size / 1e6:.2f} MB")
    total_mb = sum(p.stat().st_size for p in paths) / 1e6
    print(f"wrote {args.n_train} train + {args.n_val} val stories, {total_mb:.1f} MB, in {seconds:.1f} s")


if __name__ == "__main__":
    main()
