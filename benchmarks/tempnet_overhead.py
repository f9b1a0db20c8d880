"""TempNet overhead with the cce head: tokens/s of a training step with and without the temperature
network, side by side in one process (alternating repeats, the same weights and batch): medians,
and the median of the ratios of adjacent pairs, which load drifting on a shared machine spares.

Two levels: the head alone (forward + backward of `head(hidden, targets)` on random hidden states)
and the whole model of a recipe (body + head forward, backward, AdamW step; no DeepSpeed, so the
figure is the network's own cost, not launcher noise).

usage: python benchmarks/tempnet_overhead.py [--tokens 2048] [--vocab 32768] [--hidden 128]
       [--repeats 7] [--recipe recipes/tiny-tempnet.yaml]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from llmtrain.heads import build_head
from llmtrain.heads.temperature import attach_temperature
from llmtrain.model.language_model import LanguageModel
from llmtrain.recipe import load_recipe
from llmtrain.train.engine_config import param_groups


def head_step(head, hidden, targets):
    h = hidden.detach().requires_grad_(True)
    head(h, targets).loss.backward()
    head.zero_grad(set_to_none=True)


def model_step(model, opt, ids, targets):
    model(ids, targets).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def timed(step, repeats_done: list[float], tokens: int):
    start = time.perf_counter()
    step()
    repeats_done.append(tokens / (time.perf_counter() - start))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per step for the head alone (tiny: 8 × 256)")
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--recipe", default="recipes/tiny-tempnet.yaml")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    options = recipe.temperature.network_options()
    torch.manual_seed(0)

    plain = build_head({"type": "cce"}, args.hidden, args.vocab)
    with_net = copy.deepcopy(plain)
    attach_temperature(with_net, **options)
    hidden = torch.randn(args.tokens, args.hidden)
    targets = torch.randint(0, args.vocab, (args.tokens,))
    heads = {"without": [], "with": []}
    for _ in range(2):  # warm-up
        head_step(plain, hidden, targets), head_step(with_net, hidden, targets)
    for _ in range(args.repeats):
        timed(lambda: head_step(plain, hidden, targets), heads["without"], args.tokens)
        timed(lambda: head_step(with_net, hidden, targets), heads["with"], args.tokens)

    models, opts = {}, {}
    for name in ("without", "with"):
        torch.manual_seed(recipe.train.seed)
        model = LanguageModel(recipe.model, {"type": "cce"}, args.vocab)
        if name == "with":
            attach_temperature(model.head, **options)
        models[name] = model
        opts[name] = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4)
    batch = torch.randint(0, args.vocab, (recipe.train.micro_batch, recipe.model.seq_len + 1))
    ids, next_ids = batch[:, :-1], batch[:, 1:]
    n = ids.numel()
    full = {"without": [], "with": []}
    for _ in range(2):
        for name in full:
            model_step(models[name], opts[name], ids, next_ids)
    for _ in range(args.repeats):
        for name in full:
            timed(lambda: model_step(models[name], opts[name], ids, next_ids), full[name], n)

    print(f"cce head, V={args.vocab}, D={args.hidden}, network width {options['width']}, "
          f"{torch.get_num_threads()} threads, {args.repeats} alternating repeats, medians")
    print("| step | tokens | without tok/s | with tok/s | ratio of medians | median of paired ratios |")
    print("|---|---|---|---|---|---|")
    for label, rates, tokens in (("head alone (fwd+bwd)", heads, args.tokens),
                                 (f"model {recipe.model.layers}×{recipe.model.d_model} (fwd+bwd+AdamW)", full, n)):
        a, b = statistics.median(rates["without"]), statistics.median(rates["with"])
        paired = statistics.median(w / wo for wo, w in zip(rates["without"], rates["with"]))
        print(f"| {label} | {tokens} | {a:,.0f} | {b:,.0f} | {b / a:.3f} | {paired:.3f} |")


if __name__ == "__main__":
    main()
