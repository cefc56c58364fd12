"""Benchmark: what a checkpoint manifest costs (issue 7).

Writes a checkpoint-like folder with one file of ``--mb`` megabytes (random bytes, default 500),
then times, each ``--repeat`` times (best kept):

* hashing the file with each hashlib algorithm in the running Python (MB/s);
* :func:`minillm.checkpoint.write_manifest` (what every save adds);
* :func:`minillm.checkpoint.check_checkpoint` with and without checksums (what a resume adds; the
  size-only check is what a save runs before pruning).

The file is read from the page cache after it is written, as a save's manifest reads it; a resume
on a cold cache adds the disk's read time.

    PYTHONPATH=src python benchmarks/bench_checkpoint.py --mb 500
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path


def _best(fn: object, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    from minillm.checkpoint import check_checkpoint, write_manifest

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=500, help="size of the weights file in MB")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        (folder / "model").mkdir()
        big = folder / "model" / "model.safetensors"
        with open(big, "wb") as fh:
            for _ in range(args.mb):
                fh.write(os.urandom(1 << 20))
        print(f"file: {args.mb} MB")
        for name in ("sha256", "blake2b", "sha1", "md5"):
            def run(name: str = name) -> None:
                h = hashlib.new(name)
                with open(big, "rb") as f:
                    while chunk := f.read(1 << 22):
                        h.update(chunk)
            print(f"  {name:8s} {args.mb / _best(run, args.repeat):7.0f} MB/s")
        print(f"write_manifest            {_best(lambda: write_manifest(folder), args.repeat):6.2f} s")
        print(f"check_checkpoint (sha256) {_best(lambda: check_checkpoint(folder), args.repeat):6.2f} s")
        print(f"check_checkpoint (sizes)  {_best(lambda: check_checkpoint(folder, checksums=False), args.repeat):6.4f} s")


if __name__ == "__main__":
    main()
