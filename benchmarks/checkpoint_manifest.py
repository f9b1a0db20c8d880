"""What the checkpoint manifest costs at save time: sealing a file (fsync + SHA-256, as
`llmtrain.train.checkpoint.file_entry` does) against writing it with torch.save, side by side in
one run, on the same disk, in fresh files each repeat.

usage: python benchmarks/checkpoint_manifest.py [--mb 256] [--repeats 5] [--dir DIR]

The ratio seal / save is the fraction a save grows by when one rank seals what it wrote (each
rank hashes 1/world of a checkpoint's files). The file is cold for neither: it was just written,
so the hash reads it from the page cache, as it does right after a real save.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from llmtrain.train.checkpoint import file_entry


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=256, help="size of the saved tensor in MB")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    tensor = torch.randn(args.mb * 2**20 // 4)
    saves, seals = [], []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for i in range(args.repeats):
            path = Path(tmp) / f"state{i}.pt"
            t0 = time.perf_counter()
            torch.save({"w": tensor}, path)
            t1 = time.perf_counter()
            file_entry(path)
            t2 = time.perf_counter()
            saves.append(t1 - t0)
            seals.append(t2 - t1)
            path.unlink()
    save, seal = statistics.median(saves), statistics.median(seals)
    print(f"{args.mb} MB, medians of {args.repeats}: torch.save {save:.3f} s ({args.mb / save:.0f} MB/s), "
          f"fsync + SHA-256 {seal:.3f} s ({args.mb / seal:.0f} MB/s), seal / save = {seal / save:.2f}")


if __name__ == "__main__":
    main()
