"""Quality of heads side by side, as BENCHMARKS.md's earlier sections ran it: now a thin call of
`llmtrain study` (one run folder per variant under --out, resumable, then the compare report in
--out/report). Kept so that those sections' commands still run; new figures use `llmtrain study`.

usage (the old syntax: a label and its overrides as one shell-quoted string):
  python benchmarks/head_quality.py recipes/tiny.yaml --variant softmax head.type=softmax \
      --variant hsm head.type=hsm --variant zloss head.type=zloss --equal-time
which runs
  llmtrain study recipes/tiny.yaml --variant softmax head.type=softmax --variant hsm head.type=hsm \
      --variant zloss head.type=zloss --equal-time --out runs/quality
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from llmtrain.cli import main as llmtrain


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("--variant", nargs=2, action="append", metavar=("LABEL", "OVERRIDES"), required=True,
                    help="a label and its recipe overrides (one shell-quoted string)")
    ap.add_argument("--equal-time", action="store_true", help="also train each later variant for the first one's time")
    ap.add_argument("--out", type=Path, default=Path("runs/quality"))
    args = ap.parse_args()
    argv = ["study", args.recipe]
    for label, overrides in args.variant:
        argv += ["--variant", label, *shlex.split(overrides)]
    argv += ["--out", str(args.out)] + (["--equal-time"] if args.equal_time else [])
    sys.argv = ["llmtrain", *argv]
    llmtrain()


if __name__ == "__main__":
    main()
