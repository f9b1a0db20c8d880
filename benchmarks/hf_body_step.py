"""One training step's forward + backward in one process: a Hugging Face Llama body against our
body at the tiny recipe's shape, alternated, medians (no DeepSpeed, no optimizer: the bodies'
own cost, with and without the softmax head).

usage: python benchmarks/hf_body_step.py [--repeats 12] [--threads 1]
"""

import argparse
import statistics
import tempfile
import time

import torch

from hf_body_throughput import llama_folder
from llmtrain.model.language_model import LanguageModel
from llmtrain.recipe import load_recipe


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the trainer gives each rank cores/ranks)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    recipe = load_recipe("recipes/tiny.yaml")
    vocab = recipe.tokenizer.vocab_size
    with tempfile.TemporaryDirectory() as tmp:
        hf_recipe = load_recipe("recipes/tiny.yaml", [f"model.hf={llama_folder(recipe, vocab, f'{tmp}/llama')}"])
        models = {"ours": LanguageModel(recipe.model, recipe.head_spec(), vocab),
                  "hf": LanguageModel(hf_recipe.model, hf_recipe.head_spec(), vocab)}
    ids = torch.randint(0, vocab, (recipe.train.micro_batch, recipe.model.seq_len + 1))
    steps = {"body": lambda m: m.body(ids[:, :-1]).square().mean().backward(),
             "body + head": lambda m: m(ids[:, :-1], ids[:, 1:]).loss.backward()}
    for what, step in steps.items():
        times = {name: [] for name in models}
        for _ in range(args.repeats):
            for name, model in models.items():
                start = time.perf_counter()
                step(model)
                times[name].append(time.perf_counter() - start)
        ours, hf = (statistics.median(times[n][2:]) for n in ("ours", "hf"))
        print(f"{what}: ours {ours * 1e3:.1f} ms, HF Llama {hf * 1e3:.1f} ms, HF/ours time {hf / ours:.2f} "
              f"(medians of {args.repeats - 2} after 2 warm-up)")


if __name__ == "__main__":
    main()
