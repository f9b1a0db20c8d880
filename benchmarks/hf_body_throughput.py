"""Training tokens/s of a Hugging Face Llama body against our own body at the same shape, same
head, through `llmtrain run` (DeepSpeed, the recipe's ranks), runs alternated in one invocation.

usage: python benchmarks/hf_body_throughput.py [RECIPE] [--steps 40] [--repeats 2] [overrides...]

The Llama config is written from the recipe's model section (full multi-head attention, SwiGLU
of the same inner size, untied unless the recipe ties): the two bodies do the same arithmetic, so
the ratio is the cost of transformers' implementation against ours. Each run's figure is the
median tokens/s over its logged intervals after the first `--warmup` steps; the result is the
median of per-pair ratios (robust to load drifting between runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from llmtrain.model.decoder import ffn_size
from llmtrain.recipe import load_recipe
from trainer_overhead import llmtrain_run as tokens_per_s  # the same measurement of a run


def llama_folder(recipe, vocab_size: int, folder: Path) -> Path:
    import transformers

    m = recipe.model
    transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=m.d_model, intermediate_size=ffn_size(m), num_hidden_layers=m.layers,
        num_attention_heads=m.n_heads, num_key_value_heads=m.n_heads, max_position_embeddings=m.seq_len,
        rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings,
        initializer_range=m.init_std, architectures=["LlamaForCausalLM"]).save_pretrained(folder)
    return folder


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", nargs="?", default="recipes/tiny.yaml")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    recipe = load_recipe(args.recipe, args.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        folder = llama_folder(recipe, recipe.tokenizer.vocab_size, Path(tmp) / "llama")
        hf_overrides = [*args.overrides, f"model.hf={folder}"]
        ours, theirs = [], []
        for _ in range(args.repeats):
            ours.append(tokens_per_s(args.recipe, args.steps, args.warmup, args.overrides))
            theirs.append(tokens_per_s(args.recipe, args.steps, args.warmup, hf_overrides))
    print(json.dumps({"recipe": args.recipe, "overrides": args.overrides, "steps": args.steps, "head": recipe.head.type,
                      "ours_tokens_per_s": [round(x) for x in ours], "hf_llama_tokens_per_s": [round(x) for x in theirs],
                      "hf_over_ours": round(statistics.median(t / o for t, o in zip(theirs, ours)), 3)}, indent=1))


if __name__ == "__main__":
    main()
