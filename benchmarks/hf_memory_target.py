"""A Qwen2 body with Qwen2.5's 151,936-token vocabulary on this machine: `llmtrain profile` says
per head whether a rank fits before launch; then the heads that fit train for a few steps through
`llmtrain run` (2 ranks) and the measured per-rank peak is set beside the estimate.

usage: python benchmarks/hf_memory_target.py [--heads cce,hsm] [--steps 3] [--tokens 8192] [--budget 12GiB]

Each head is run twice: with glibc's defaults, and with MALLOC_MMAP_THRESHOLD_=65536 (freed blocks
above 64 KiB go back to the system, so the resident set follows the live tensors, as a GPU
allocator's max_memory_allocated does; the same setting `llmtrain profile` measures under).

The body is small (4 layers × 256, random init from a config-only folder) so that the output layer
dominates, as it does at these vocabularies; tokens per rank per micro-step = micro_batch × seq_len.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

VOCAB = 151_936  # Qwen2.5's embedding rows (its tokenizer has fewer: the rest is padding)
SEQ_LEN = 1024


def write_model(folder: Path) -> Path:
    import transformers

    transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ_LEN,
                             tie_word_embeddings=False, architectures=["Qwen2ForCausalLM"]).save_pretrained(folder)
    return folder


def write_recipe(path: Path, model: Path, tokens: int, steps: int) -> Path:
    path.write_text(yaml.safe_dump({
        "name": "qwen-vocab", "model": {"hf": str(model), "seq_len": SEQ_LEN},
        "head": {"type": "cce"}, "data": {"source": "stdlib", "max_bytes": 12_000_000},
        "train": {"steps": steps, "micro_batch": tokens // SEQ_LEN, "warmup_steps": 1, "log_every": 1},
        "checkpoint": {"every": 1000}, "eval": {"every": 1000, "batches": 1}, "launch": {"ranks_per_node": 2}}))
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", default="cce,hsm")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--budget", default="12GiB", help="per rank: half of this machine's 24 GiB by default")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        recipe = write_recipe(tmp / "recipe.yaml", write_model(tmp / "qwen"), args.tokens, args.steps)
        report = tmp / "profile.json"
        subprocess.run([sys.executable, "-m", "llmtrain.cli", "profile", str(recipe), "--heads", "softmax,cce,hsm",
                        "--budget", args.budget, "--no-measure", "--json", str(report)], check=True,
                       stdout=subprocess.DEVNULL)
        estimates = json.loads(report.read_text())["heads"]
        rows = {name: {"estimate_bytes": h["estimate"]["total"], "estimate_on_this_cpu_bytes": h["estimate"]["total_on_this_cpu"],
                       "fits": h["fits"]} for name, h in estimates.items()}
        for head in args.heads.split(","):
            for allocator, env in (("glibc_default", {}), ("mmap_threshold_64k", {"MALLOC_MMAP_THRESHOLD_": "65536"})):
                out = tmp / f"run-{head}-{allocator}"
                subprocess.run([sys.executable, "-m", "llmtrain.cli", "run", str(recipe), f"head.type={head}",
                                "--out", str(out)], check=True, env={**os.environ, **env})
                recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                peak = max(r["peak_mem_bytes"] for r in recs if "peak_mem_bytes" in r)
                rows[head][allocator] = {"measured_peak_bytes": peak,
                                         "over_estimate": round(peak / rows[head]["estimate_bytes"], 3),
                                         "over_estimate_on_this_cpu": round(peak / rows[head]["estimate_on_this_cpu_bytes"], 3)}
    print(json.dumps({"vocab": VOCAB, "tokens_per_rank": args.tokens, "budget": args.budget, "heads": rows}, indent=1))


if __name__ == "__main__":
    main()
