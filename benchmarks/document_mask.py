"""Document masking on and off (issue 14): tokens/s and validation bits per byte of a recipe
(default recipes/tiny.yaml) trained twice at equal steps, `data.document_mask` false then true.

usage: python benchmarks/document_mask.py [--recipe recipes/tiny.yaml] [--work /tmp/llmtrain-docmask]
                                          [overrides ...]

tokens/s is the median of the runs' logged windows after the first (warm-up); val_bpb and
val_loss are the last evaluation's. Both runs share one data cache, prepared before either starts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}


def run(recipe: str, out: Path, overrides: list[str]) -> dict:
    subprocess.run([sys.executable, "-m", "llmtrain.cli", "run", recipe, *overrides, "--out", str(out)],
                   check=True, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "tokens_per_s" in r]
    evals = [r for r in records if "val_bpb" in r]
    return {"steps": train[-1]["step"], "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train[1:]),
            "loss": train[-1]["loss"], "val_loss": evals[-1]["val_loss"], "val_bpb": evals[-1]["val_bpb"],
            "train_s": train[-1]["train_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/tiny.yaml")
    ap.add_argument("--work", type=Path, default=Path("/tmp/llmtrain-docmask"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    base = [f"data.cache_dir={args.work / 'cache'}", *args.overrides]
    subprocess.run([sys.executable, "-m", "llmtrain.cli", "run", args.recipe, *base, "--prepare-only", "--out",
                    str(args.work / "prepare")], check=True, env=ENV, cwd=ROOT, capture_output=True)
    results = {}
    for mask in (False, True):
        results[mask] = run(args.recipe, args.work / f"mask-{mask}", [*base, f"data.document_mask={str(mask).lower()}"])
    print("| data.document_mask | steps | tokens/s (median window) | train s | final loss | val_loss | val_bpb |")
    print("|---|---|---|---|---|---|---|")
    for mask, r in results.items():
        print(f"| {str(mask).lower()} | {r['steps']} | {r['tokens_per_s']:,.0f} | {r['train_s']:.1f} | {r['loss']:.3f} | "
              f"{r['val_loss']:.3f} | {r['val_bpb']:.3f} |")
    print(f"tokens/s on / off: {results[True]['tokens_per_s'] / results[False]['tokens_per_s']:.2f}")
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
