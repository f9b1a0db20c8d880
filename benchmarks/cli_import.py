"""How long `import llmtrain.cli` and `llmtrain --help` take, and whether they import torch or
DeepSpeed. Each measurement is a fresh interpreter; medians of REPEATS, checkouts side by side.

usage: python benchmarks/cli_import.py [CHECKOUT ...]   (default: this checkout)
"""

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPEATS = 7
PROBE = ("import sys, llmtrain.cli; "
         "print(int('torch' in sys.modules), int('deepspeed' in sys.modules), int('transformers' in sys.modules))")


def timed(cmd, root):
    env = {**os.environ, "PYTHONPATH": str(root)}
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=True).stdout
    return time.perf_counter() - start, out


def main(roots):
    for root in roots:
        _, flags = timed([sys.executable, "-c", PROBE], root)
        imports = [time for time, _ in (timed([sys.executable, "-c", "import llmtrain.cli"], root) for _ in range(REPEATS))]
        helps = [time for time, _ in (timed([sys.executable, "-m", "llmtrain.cli", "--help"], root) for _ in range(REPEATS))]
        torch, ds, tf = flags.split()
        print(f"{root}: import llmtrain.cli {statistics.median(imports) * 1000:.0f} ms, "
              f"--help {statistics.median(helps) * 1000:.0f} ms (medians of {REPEATS}); "
              f"imports torch: {torch == '1'}, deepspeed: {ds == '1'}, transformers: {tf == '1'}")


if __name__ == "__main__":
    main([Path(p).resolve() for p in sys.argv[1:]] or [Path(__file__).resolve().parents[1]])
