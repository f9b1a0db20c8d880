"""Data preparation time: `prepare_data` from an empty cache, and again from a warm one, for
several `data.max_bytes` / `tokenizer.train_bytes` caps.

usage: python benchmarks/data_prepare.py [--source stdlib] [--vocab 32768] [--seq-len 256] [--repeats 3]
                                         [--caps none:none 12e6:4e6 ...]

Each fresh run is its own Python process with its own empty cache dir, so the "process" column
includes interpreter start and imports, as on a fresh machine. Figures are medians over repeats.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ONE_RUN = """
import json, sys, time
t0 = time.perf_counter()
from llmtrain.data.prepare import prepare_data
from llmtrain.recipe import DataConfig, TokenizerConfig
a = json.loads(sys.argv[1])
lines = []
dcfg = DataConfig(source=a["source"], max_bytes=a["max_bytes"], cache_dir=a["cache"])
tcfg = TokenizerConfig(vocab_size=a["vocab"], train_bytes=a["train_bytes"])
t1 = time.perf_counter()
prep = prepare_data(dcfg, tcfg, a["seq_len"], log=lines.append)
t2 = time.perf_counter()
again = prepare_data(dcfg, tcfg, a["seq_len"], log=lambda m: None)
t3 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "fresh": t2 - t1, "cached": t3 - t2, "log": lines,
                  "vocab": prep.vocab_size, "train_tokens": prep.n_train_tokens,
                  "train_blocks": prep.n_train_blocks, "val_blocks": prep.n_val_blocks}))
"""


def parse_cap(text: str) -> int | None:
    return None if text == "none" else int(float(text))


def phase_seconds(log: list[str], word: str) -> float:
    line = next(line for line in log if word in line)
    return float(re.search(r"in ([0-9.]+)s$", line).group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="stdlib")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--caps", nargs="+", default=["none:none", "none:8e6", "12e6:none", "12e6:8e6", "12e6:4e6", "8e6:4e6"],
                    help="max_bytes:train_bytes pairs, 'none' for no cap")
    args = ap.parse_args()
    root = Path(__file__).resolve().parent.parent
    print("| data.max_bytes | tokenizer.train_bytes | fresh process s | prepare_data s | tokenizer s | "
          "tokenize+pack s | cached s | vocab | train tokens | train / val blocks |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for cap in args.caps:
        max_bytes, train_bytes = (parse_cap(x) for x in cap.split(":"))
        runs = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as cache:
                spec = {"source": args.source, "max_bytes": max_bytes, "train_bytes": train_bytes, "cache": cache,
                        "vocab": args.vocab, "seq_len": args.seq_len}
                t0 = time.perf_counter()
                out = subprocess.run([sys.executable, "-c", ONE_RUN, json.dumps(spec)], cwd=root, check=True,
                                     capture_output=True, text=True).stdout
                run = json.loads(out.strip().splitlines()[-1])
                run["process"] = time.perf_counter() - t0
                runs.append(run)
        med = lambda f: statistics.median(f(r) for r in runs)  # noqa: E731
        r = runs[0]
        fmt = lambda b: "all" if b is None else f"{b / 1e6:g} MB"  # noqa: E731
        print(f"| {fmt(max_bytes)} | {fmt(train_bytes)} | {med(lambda r: r['process']):.1f} | "
              f"{med(lambda r: r['fresh']):.1f} | {med(lambda r: phase_seconds(r['log'], 'tokenizer trained')):.1f} | "
              f"{med(lambda r: phase_seconds(r['log'], 'blocks of')):.1f} | {med(lambda r: r['cached']):.2f} | "
              f"{r['vocab']:,} | {r['train_tokens']:,} | {r['train_blocks']:,} / {r['val_blocks']:,} |", flush=True)


if __name__ == "__main__":
    main()
