"""Framework overhead: tokens/s of `llmtrain run` (DeepSpeed, N ranks) against a plain
single-process PyTorch loop over the same model, data and global batch, measured in one run.

usage: python benchmarks/trainer_overhead.py [RECIPE] [--steps 60] [overrides...]

Both sides skip the first `--warmup` steps; the figure is the median tokens/s over the logged
intervals after it (llmtrain) and over single steps after it (plain loop).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from llmtrain.data.packing import load_split
from llmtrain.data.prepare import prepare_data
from llmtrain.data.sampler import ResumableSampler
from llmtrain.model.language_model import LanguageModel
from llmtrain.recipe import load_recipe
from llmtrain.train.engine_config import param_groups
from llmtrain.train.schedule import lr_at


def plain_loop(recipe, prep, steps: int, warmup: int) -> float:
    torch.manual_seed(recipe.train.seed)
    model = LanguageModel(recipe.model, recipe.head_spec(), prep.vocab_size)
    model.head.prepare(torch.from_numpy(np.load(prep.counts_path)))
    t = recipe.train
    opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=t.betas, eps=1e-8)
    blocks = load_split(prep.train_path, prep.seq_len + 1)
    global_batch = t.micro_batch * t.grad_accum * recipe.world_size
    sampler = ResumableSampler(len(blocks), global_batch, 0, 1, t.seed)
    rates = []
    for step in range(steps):
        start = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, t)
        block = blocks[sampler.next_indices()]
        model(block[:, :-1], block[:, 1:]).loss.backward()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            rates.append(block[:, :-1].numel() / (time.perf_counter() - start))
    return statistics.median(rates)


def llmtrain_run(recipe_path: str, steps: int, warmup: int, overrides: list[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "llmtrain.cli", "run", recipe_path, "--out", str(out), f"train.steps={steps}",
               "train.log_every=5", f"eval.every={steps * 10}", f"checkpoint.every={steps * 10}", *overrides]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        return statistics.median(r["tokens_per_s"] for r in recs if "loss" in r and r["step"] > warmup)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", nargs="?", default="recipes/tiny.yaml")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    recipe = load_recipe(args.recipe, args.overrides)
    prep = prepare_data(recipe.data, recipe.tokenizer, recipe.model.seq_len)
    ours = llmtrain_run(args.recipe, args.steps, args.warmup, args.overrides)
    plain = plain_loop(recipe, prep, args.steps, args.warmup)
    print(json.dumps({"recipe": args.recipe, "overrides": args.overrides, "steps": args.steps,
                      "llmtrain_tokens_per_s": round(ours), "plain_loop_tokens_per_s": round(plain),
                      "ratio": round(ours / plain, 3), "ranks": recipe.world_size,
                      "torch_threads_plain": torch.get_num_threads()}, indent=1))


if __name__ == "__main__":
    main()
