"""How close `llmtrain profile`'s estimates are to what this device measures: every registered
head's forward + backward at three shapes (one fresh process per head), and one training step
of a small recipe per precision. Prints a markdown table for BENCHMARKS.md.

usage: python benchmarks/profile_accuracy.py [--heads softmax,cce] [--scale 1]

--scale multiplies the token counts (the default shapes take seconds on 2 CPU cores).
"""

from __future__ import annotations

import argparse

from llmtrain.heads import HEADS
from llmtrain.train.memory import format_bytes
from llmtrain.profile.measure import measure
from llmtrain.profile.estimate import estimate_head, estimate_recipe, parse_heads
from llmtrain.recipe import validate_recipe

SHAPES = [(1024, 16384, 256, "fp32"), (256, 32768, 512, "bf16"), (2048, 8192, 512, "fp32")]
RECIPE = {"model": {"layers": 2, "d_model": 128, "n_heads": 4, "seq_len": 256}, "train": {"micro_batch": 4},
          "tokenizer": {"vocab_size": 8192}, "deepspeed": {"zero_stage": 0}, "launch": {"ranks_per_node": 1}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", default=",".join(HEADS))
    parser.add_argument("--scale", type=int, default=1)
    args = parser.parse_args()
    print("| what | tokens × vocab × hidden, dtype | estimate | measured (live tensors) | peak RSS | estimate / measured |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name in parse_heads(args.heads):
        jobs = [{"kind": "head", "head": {"type": name}, "tokens": n * args.scale, "vocab": v, "hidden": d, "dtype": dt}
                for n, v, d, dt in SHAPES]
        for job, result in zip(jobs, measure(jobs)):
            est = estimate_head(job["head"], job["tokens"], job["hidden"], job["vocab"], job["dtype"]).head_total
            _row(f"{name} forward + backward", f"{job['tokens']} × {job['vocab']} × {job['hidden']}, {job['dtype']}",
                 est, result)
    for precision in ("fp32", "bf16"):
        recipe = validate_recipe(RECIPE, [f"train.precision={precision}", f"train.micro_batch={4 * args.scale}"])
        job = {"kind": "step", "recipe": recipe.model_dump(mode="json"), "vocab": 8192}
        shape = f"{recipe.train.micro_batch * 256} × 8192 × 128, {precision}"
        _row("training step, softmax, 2 layers", shape, estimate_recipe(recipe, 8192, 1).total, measure([job])[0])


def _row(what: str, shape: str, estimate: int, result: dict) -> None:
    if "bytes" not in result:
        print(f"| {what} | {shape} | {format_bytes(estimate)} | {result.get('error', result)} | | |")
        return
    print(f"| {what} | {shape} | {format_bytes(estimate)} | {format_bytes(result['bytes'])} | "
          f"{format_bytes(result['peak_rss_bytes'])} | {estimate / result['bytes']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
