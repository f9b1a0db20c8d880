"""Quality of heads side by side: train one recipe with several head variants through
`llmtrain run` (2 ranks, as users run it) and tabulate the final validation metrics — at equal
steps and, with --equal-time, at equal training wall-clock (each variant after the first trains
for as many steps as fit in the first variant's training seconds, `train_s` in metrics.jsonl).

usage:
  python benchmarks/head_quality.py recipes/tiny.yaml --variant softmax head.type=softmax \
      --variant hsm head.type=hsm --variant zloss head.type=zloss --equal-time
  python benchmarks/head_quality.py recipes/tiny.yaml --variant a0.3-b30 "head.type=zloss head.a=0.3 head.b=30" ...

The first variant is the reference of --equal-time. Runs go under --out, which must not exist yet.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

METRICS = ("val_loss", "val_ppl", "val_bpb", "val_top1", "val_top5", "val_top10")


def train(recipe: str, overrides: list[str], out: Path) -> dict:
    """Run to completion; the final eval record plus the command's wall time, training seconds,
    steps and tokens/s."""
    cmd = [sys.executable, "-m", "llmtrain.cli", "run", recipe, *overrides, "--out", str(out)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall_s = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if "val_top1" in r][-1]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]  # the first window warms up
    return {**{k: final.get(k) for k in METRICS}, "steps": final["step"], "wall_s": wall_s, "train_s": final["train_s"],
            "tokens_per_s": sorted(rates)[len(rates) // 2] if rates else None}


def row(label: str, r: dict) -> str:
    def f(key, spec):
        return "–" if r.get(key) is None else format(r[key], spec)

    return (f"| {label} | {r['steps']} | {f('wall_s', '.0f')} | {f('train_s', '.0f')} | {f('tokens_per_s', ',.0f')} | {f('val_loss', '.3f')} | "
            f"{f('val_ppl', '.1f')} | {f('val_bpb', '.3f')} | {f('val_top1', '.3f')} | {f('val_top5', '.3f')} | "
            f"{f('val_top10', '.3f')} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("--variant", nargs=2, action="append", metavar=("LABEL", "OVERRIDES"), required=True,
                    help="a label and its recipe overrides (one shell-quoted string)")
    ap.add_argument("--equal-time", action="store_true", help="also train each later variant for the first one's time")
    ap.add_argument("--out", type=Path, default=Path("runs/quality"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    results = []
    for i, (label, overrides) in enumerate(args.variant):
        ov = shlex.split(overrides)
        r = train(args.recipe, ov, args.out / label)
        results.append({"label": label, "overrides": ov, "budget": "equal steps", **r})
        print(row(label, r), flush=True)
        if args.equal_time and i > 0:
            ref = results[0]
            steps = max(1, round(r["steps"] * ref["train_s"] / r["train_s"]))
            r2 = train(args.recipe, ov + [f"train.steps={steps}"], args.out / f"{label}-equal-time")
            results.append({"label": f"{label}, equal time", "overrides": ov + [f"train.steps={steps}"],
                            "budget": "equal time", **r2})
            print(row(f"{label}, equal time", r2), flush=True)

    print("\n| variant | steps | wall s | train s | tokens/s | val loss | val ppl | val bpb | top-1 | top-5 | top-10 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(row(r["label"], r))
    if args.json:
        args.json.write_text(json.dumps({"recipe": args.recipe, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
