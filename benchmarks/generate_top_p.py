"""`generate --top-p` per token: candidates scored row by row (Head.candidate_logprobs, softmax and
cce) against each candidate scored as its own row (the base default, what generate did before).

usage: python benchmarks/generate_top_p.py [--vocab 32768] [--hidden 128] [--repeats 3]

An untrained model is near-uniform, so the nucleus grows to the whole vocabulary: the worst case.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llmtrain.generate import next_tokens
from llmtrain.heads.base import Head
from llmtrain.model.language_model import LanguageModel
from llmtrain.recipe import ModelConfig


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    ids = torch.randint(0, args.vocab, (1, 16))
    for head in ("softmax", "cce"):
        model = LanguageModel(ModelConfig(layers=2, d_model=args.hidden, n_heads=4, seq_len=64), {"type": head},
                              args.vocab).eval()
        times = {}
        for name, scorer in (("per row", type(model.head).candidate_logprobs),
                             ("per candidate", Head.candidate_logprobs)):
            model.head.candidate_logprobs = scorer.__get__(model.head)
            runs = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                next_tokens(model, ids, 1.0, None, torch.Generator().manual_seed(0), top_p=0.9)
                runs.append(time.perf_counter() - start)
            times[name] = statistics.median(runs)
        print(f"{head}: per row {times['per row'] * 1e3:,.0f} ms, per candidate {times['per candidate'] * 1e3:,.0f} ms "
              f"a token (× {times['per candidate'] / times['per row']:,.0f})")


if __name__ == "__main__":
    main()
