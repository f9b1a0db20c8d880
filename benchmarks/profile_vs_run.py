"""`llmtrain profile RECIPE` against the per-rank peak of that recipe's own `llmtrain run`, at
several ZeRO stages, side by side in one invocation.

usage: python benchmarks/profile_vs_run.py [RECIPE] [--stages 0,2,3] [--steps 4] [overrides...]

For each stage: the profile's estimate (`total / rank`, the GPU view, and on a machine without
CUDA `on this CPU`), then the run's `peak_mem_bytes` with glibc's defaults and with
MALLOC_MMAP_THRESHOLD_=65536 (freed blocks go back to the system, as `llmtrain profile` measures).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from llmtrain.recipe import load_recipe

ALLOCATORS = {"glibc_default": {}, "mmap_threshold_64k": {"MALLOC_MMAP_THRESHOLD_": "65536"}}


def cli(*args: str, env: dict | None = None) -> None:
    subprocess.run([sys.executable, "-m", "llmtrain.cli", *args], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, **(env or {})})


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", nargs="?", default="recipes/tiny.yaml")
    ap.add_argument("--stages", default="0,2,3")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in map(int, args.stages.split(",")):
            overrides = [*args.overrides, f"deepspeed.zero_stage={stage}", f"train.steps={args.steps}",
                         "train.log_every=1", "train.warmup_steps=1", f"checkpoint.every={args.steps * 10}", f"eval.every={args.steps * 10}"]
            report = Path(tmp) / f"profile-{stage}.json"
            head_type = load_recipe(args.recipe, overrides).head.type
            cli("profile", args.recipe, *overrides, "--heads", head_type, "--no-measure", "--json", str(report))
            head = json.loads(report.read_text())["heads"][head_type]
            row = {"zero_stage": stage, "estimate": head["estimate"]["total"],
                   "estimate_on_this_cpu": head["estimate"].get("total_on_this_cpu")}
            for name, env in ALLOCATORS.items():
                out = Path(tmp) / f"run-{stage}-{name}"
                cli("run", args.recipe, *overrides, "--out", str(out), env=env)
                recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                row[name] = max(r["peak_mem_bytes"] for r in recs if "peak_mem_bytes" in r)
            rows.append(row)
    for row in rows:
        base = row["estimate_on_this_cpu"] or row["estimate"]
        row.update({f"{name}_over_estimate": round(row[name] / base, 3) for name in ALLOCATORS})
    print(json.dumps({"recipe": args.recipe, "overrides": args.overrides, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
