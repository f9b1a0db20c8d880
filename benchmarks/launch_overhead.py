"""What starting a local run costs before any rank does work, side by side, medians of REPEATS
(fresh processes, the variants interleaved):

- the launcher: starting 2 ranks that exit at once (this file, run as a module, is the rank),
  through DeepSpeed's runner (`deepspeed --num_gpus 2`, what llmtrain ran before), DeepSpeed's
  per-node launcher started directly, and llmtrain.launch.ranks (what it runs now);
- the memory check before a launch: building the heads on the meta device as torch does it
  (the reference) against estimate.head_param_count, which skips the normal fills;
- with --checkouts BEFORE AFTER: a whole `llmtrain run` (recipes/tiny.yaml shrunk to a micro model,
  8 steps, 2 ranks, data cached) from each checkout, with this interpreter.

usage: python benchmarks/launch_overhead.py [--repeats 5] [--checkouts BEFORE AFTER]
"""

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).stem  # this module, as the ranks
WORLD = base64.urlsafe_b64encode(json.dumps({"localhost": [0, 1]}).encode()).decode()
LAUNCHERS = {
    "deepspeed runner (before)": ["-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29531",
                                  "--module", PROBE],
    "deepspeed.launcher.launch": ["-m", "deepspeed.launcher.launch", f"--world_info={WORLD}",
                                  "--master_addr=127.0.0.1", "--master_port=29531", "--module", PROBE],
    "llmtrain.launch.ranks (now)": ["-m", "llmtrain.launch.ranks", "2", "29531", PROBE],
}
HEADS = "for h in ('softmax', 'cce', 'hsm', 'zloss'):\n"
CHECKS = {
    "heads on meta, as torch builds them": "import torch\nfrom llmtrain.heads import build_head\n" + HEADS +
    "    with torch.device('meta'): build_head({'type': h}, hidden_size=2048, vocab_size=128256)\n",
    "estimate.head_param_count (now)": "from llmtrain.profile.estimate import head_param_count\n" + HEADS +
    "    head_param_count({'type': h}, 2048, 128256)\n",
}
MICRO = ["model.layers=2", "model.d_model=32", "model.n_heads=2", "model.seq_len=32", "data.max_bytes=200000",
         "tokenizer.vocab_size=512", "tokenizer.train_bytes=100000", "train.steps=8", "train.warmup_steps=2",
         "train.micro_batch=2", "checkpoint.every=4", "eval.every=4", "eval.batches=2"]


def seconds(args: list[str], root: Path = ROOT) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), str(root)]), "DS_ACCELERATOR": "cpu"}
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=root, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def compare(title: str, variants: dict, repeats: int, timed=lambda args, repeat: seconds(args)) -> None:
    times = {name: [] for name in variants}
    for repeat in range(repeats):
        for name, args in variants.items():
            times[name].append(timed(args, repeat))
    reference = statistics.median(next(iter(times.values())))
    print(f"\n{title} (medians of {repeats})\n| variant | seconds | × the first |\n|---|---:|---:|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} | {statistics.median(values) / reference:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--checkouts", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    compare("Starting 2 ranks that exit at once", LAUNCHERS, args.repeats)
    compare("The memory check's head build, fresh process, imports included",
            {k: ["-c", code] for k, code in CHECKS.items()}, args.repeats)
    if args.checkouts:
        with tempfile.TemporaryDirectory() as tmp:
            def run(root: Path, repeat) -> float:
                out = f"{tmp}/{hash(root)}-{repeat}"
                return seconds(["-m", "llmtrain.cli", "run", "recipes/tiny.yaml", *MICRO, f"data.cache_dir={tmp}/cache",
                                "--out", out], root)

            roots = {str(path): path.resolve() for path in args.checkouts}
            for root in roots.values():
                run(root, "warm")  # the data cache prepared, the DeepSpeed op built: outside the timing
            compare("A whole `llmtrain run`: 8 steps of a micro model, 2 ranks, data cached", roots, args.repeats,
                    timed=run)


if __name__ == "__main__":
    if any(a.startswith("--local_rank") for a in sys.argv[1:]):
        sys.exit(0)  # a rank started by one of the launchers: done
    main()
