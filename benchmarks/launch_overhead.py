"""What starting a local run costs before any rank does work, side by side, medians of REPEATS
(fresh processes, the variants interleaved):

- the launcher: starting 2 ranks that exit at once (this file, run as a module, is the rank),
  through DeepSpeed's runner (`deepspeed --num_gpus 2`, what llmtrain ran before), DeepSpeed's
  per-node launcher started directly, and llmtrain.launch.ranks (what it runs now);
- the memory check before a launch: building the heads on the meta device as torch does it
  (the reference) against estimate.head_param_count, which skips the normal fills.

usage: python benchmarks/launch_overhead.py [--repeats 5]
"""

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
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


def seconds(args: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT)]), "DS_ACCELERATOR": "cpu"}
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=ROOT, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def compare(title: str, variants: dict[str, list[str]], repeats: int) -> None:
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, args in variants.items():
            times[name].append(seconds(args))
    reference = statistics.median(next(iter(times.values())))
    print(f"\n{title} (medians of {repeats})\n| variant | seconds | × the first |\n|---|---:|---:|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} | {statistics.median(values) / reference:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    repeats = parser.parse_args().repeats
    compare("Starting 2 ranks that exit at once", LAUNCHERS, repeats)
    compare("The memory check's head build, fresh process, imports included",
            {k: ["-c", code] for k, code in CHECKS.items()}, repeats)


if __name__ == "__main__":
    if any(a.startswith("--local_rank") for a in sys.argv[1:]):
        sys.exit(0)  # a rank started by one of the launchers: done
    main()
