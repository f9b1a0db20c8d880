"""Where the fp32 cce step spends its time, and why its softmax is not log_softmax/softmax over dim 0.

1. One vocabulary-major [V, chunk] tile, side by side in one process (alternating repeats,
   medians): the column softmax as `log_softmax` + `softmax` over dim 0 (the old path) against
   max, exp in place and sum along contiguous rows (the current path).
2. One forward + backward of `linear_cross_entropy` under `torch.profiler`: the share of the
   matmuls (aten::mm, aten::addmm, aten::addmm_) in the step's CPU time.

usage: python benchmarks/cce_breakdown.py [--tokens 4096] [--vocab 65536] [--hidden 512] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llmtrain.heads.cce import auto_chunk_size, linear_cross_entropy

MATMULS = ("aten::mm", "aten::addmm", "aten::addmm_")


def log_softmax_then_softmax(scores: torch.Tensor) -> None:
    torch.log_softmax(scores, 0, out=scores)
    torch.softmax(scores, 0, out=scores)


def max_exp_sum(scores: torch.Tensor) -> None:
    peak = scores.amax(0)
    scores.sub_(peak).exp_().sum(0)


def tile_times(vocab: int, chunk: int, hidden: int, repeats: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(vocab, hidden, generator=g) / hidden**0.5
    h = torch.randn(chunk, hidden, generator=g)
    fresh = weight @ h.T
    scores = torch.empty_like(fresh)
    variants = {"log_softmax + softmax, dim 0": log_softmax_then_softmax, "max, exp, sum along rows": max_exp_sum}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats + 1):  # the first round warms up
        for name, fn in variants.items():
            scores.copy_(fresh)
            start = time.perf_counter()
            fn(scores)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t[1:]) * 1e3 for name, t in times.items()}


def matmul_share(tokens: int, vocab: int, hidden: int) -> tuple[float, float]:
    """(seconds of the profiled step, fraction of it in matmuls)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    linear_cross_entropy(h, w, targets).backward()  # warm-up
    h.grad = w.grad = None
    with torch.profiler.profile() as prof:
        linear_cross_entropy(h, w, targets).backward()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMULS)
    return total / 1e6, matmul / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    chunk = min(args.tokens, auto_chunk_size(args.vocab, torch.float32, None))
    print(f"one [{args.vocab}, {chunk}] fp32 tile, median of {args.repeats}:")
    for name, ms in tile_times(args.vocab, chunk, args.hidden, args.repeats).items():
        print(f"  {name:32s} {ms:8.1f} ms")
    seconds, share = matmul_share(args.tokens, args.vocab, args.hidden)
    print(f"cce forward + backward, {args.tokens} × {args.vocab} × {args.hidden} fp32 (profiled): "
          f"{seconds:.2f} s of CPU time, {share:.0%} in matmuls")


if __name__ == "__main__":
    main()
