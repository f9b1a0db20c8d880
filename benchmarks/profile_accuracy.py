"""How close `llmtrain profile`'s estimates are to what this device measures: every registered
head's forward + backward at three shapes (one fresh process per head), one training step of a
small recipe per precision, and with --hf training steps of tiny random Hugging Face models
(Llama, Qwen2, Gemma 2; config only, no download) with and without activation checkpointing.
Prints a markdown table for BENCHMARKS.md.

usage: python benchmarks/profile_accuracy.py [--heads softmax,cce] [--scale 1] [--hf]

--scale multiplies the token counts (the default shapes take seconds on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import tempfile

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
    parser.add_argument("--hf", action="store_true", help="only the tiny Hugging Face models' training steps")
    args = parser.parse_args()
    if args.hf:
        return hf_steps()
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


def hf_steps() -> None:
    """Each family with an hsm head (small: the body's backward is the peak) and a softmax head
    (its logits are the peak), bf16 and fp32, with and without activation checkpointing."""
    import transformers

    families = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                "gemma2": lambda **kw: transformers.Gemma2Config(head_dim=16, **kw)}
    print("| what | tokens × vocab × hidden, dtype | estimate | measured (live tensors) | peak RSS | estimate / measured |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for family, config in families.items():
            config(vocab_size=512, hidden_size=64, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=False).save_pretrained(f"{tmp}/{family}")
            cases = [(head, precision, ckpt) for head in ("hsm", "softmax") for precision in ("bf16", "fp32")
                     for ckpt in (False, True)]
            recipes = [validate_recipe({"model": {"hf": f"{tmp}/{family}", "seq_len": 256, "activation_checkpointing": ckpt},
                                        "head": {"type": head}, "train": {"micro_batch": 4, "precision": precision},
                                        "deepspeed": {"zero_stage": 0}, "launch": {"ranks_per_node": 1}})
                       for head, precision, ckpt in cases]
            jobs = [{"kind": "step", "recipe": r.model_dump(mode="json"), "vocab": 512} for r in recipes]
            for (head, precision, ckpt), recipe, result in zip(cases, recipes, measure(jobs)):
                what = f"training step, {family} (HF), {head}" + (", checkpointing" if ckpt else "")
                _row(what, f"1024 × 512 × 64, {precision}", estimate_recipe(recipe, 512, 1).total, result)


def _row(what: str, shape: str, estimate: int, result: dict) -> None:
    if "bytes" not in result:
        print(f"| {what} | {shape} | {format_bytes(estimate)} | {result.get('error', result)} | | |")
        return
    print(f"| {what} | {shape} | {format_bytes(estimate)} | {format_bytes(result['bytes'])} | "
          f"{format_bytes(result['peak_rss_bytes'])} | {estimate / result['bytes']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
