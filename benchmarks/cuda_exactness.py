"""The cce head's exactness on a CUDA device, beside Apple's and Liger's kernels (a device check:
CI has no GPU; tests/test_heads_cce.py holds the same criterion on CPU).

usage: python benchmarks/cuda_exactness.py [--shapes 1000x50000x256 4096x131072x1024]

For each shape and dtype, the loss and the gradients of hidden states and weight against float64
eager math on the same device, in the style of Apple's tests: a contender passes where its error
exceeds eager's own error in the same dtype by at most tol (1e-5 forward and 5e-4 backward in
fp32, 1e-2 in bf16), scaled by the size of the values where they exceed 1. Every fourth target is
ignored. Errors are max-abs; peers are printed for comparison, our `cce` decides the exit code.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

import torch
import torch.nn.functional as F

from llmtrain.heads.cce import linear_cross_entropy

TOL = {(torch.float32, 0): 1e-5, (torch.float32, 1): 5e-4, (torch.bfloat16, 0): 1e-2, (torch.bfloat16, 1): 1e-2}


def eager(h, w, t):
    logits = F.linear(h, w)
    return F.cross_entropy(logits if logits.dtype == torch.float64 else logits.float(), t, ignore_index=-100)


def contenders(device: str) -> dict:
    out = {"eager": eager, "cce": lambda h, w, t: linear_cross_entropy(h, w, t)}
    if importlib.util.find_spec("cut_cross_entropy"):
        from cut_cross_entropy import linear_cross_entropy as apple

        out["apple-cce"] = lambda h, w, t: apple(h, w, t, impl="cce" if device == "cuda" else "torch_compile")
    if importlib.util.find_spec("liger_kernel") and device == "cuda":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        out["liger"] = lambda h, w, t: liger(w, h, t)
    return out


def loss_and_grads(fn, h, w, t, dtype):
    hp, wp = (x.detach().to(dtype).requires_grad_() for x in (h, w))
    loss = fn(hp, wp, t)
    dh, dw = torch.autograd.grad(loss, (hp, wp))
    return [loss.detach().double(), dh.double(), dw.double()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["1000x50000x256", "4096x131072x1024"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    failures = 0
    fns = contenders(args.device)
    print(f"device {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}, torch {torch.__version__}")
    print("| shape N×V×D | dtype | contender | loss err | ∂h err | ∂W err | within eager + tol |")
    print("|---|---|---|---:|---:|---:|---|")
    for shape in args.shapes:
        n, vocab, dim = (int(x) for x in shape.split("x"))
        g = torch.Generator(device=args.device).manual_seed(0)
        h = torch.randn(n, dim, generator=g, device=args.device, dtype=torch.float64)
        w = torch.randn(vocab, dim, generator=g, device=args.device, dtype=torch.float64) / dim**0.5 * 2
        t = torch.randint(0, vocab, (n,), generator=g, device=args.device)
        t[1::4] = -100
        truth = loss_and_grads(eager, h, w, t, torch.float64)
        for dtype in (torch.float32, torch.bfloat16):
            errors = {}
            for name, fn in fns.items():
                try:
                    got = loss_and_grads(fn, h, w, t, dtype)
                    errors[name] = [(a - b).abs().max().item() for a, b in zip(got, truth)]
                except Exception as e:  # a peer that cannot take these inputs is reported, not fatal
                    errors[name] = e
            scale = [max(1.0, x.abs().max().item()) for x in truth]
            label = str(dtype).removeprefix("torch.")
            for name, err in errors.items():
                if isinstance(err, Exception):
                    print(f"| {shape} | {label} | {name} | {type(err).__name__}: {str(err)[:80]} | | | |")
                    failures += name == "cce"
                    continue
                ok = all(e <= errors["eager"][i] + TOL[dtype, min(i, 1)] * scale[i] for i, e in enumerate(err))
                print(f"| {shape} | {label} | {name} | {err[0]:.2e} | {err[1]:.2e} | {err[2]:.2e} | "
                      f"{'yes' if ok else 'NO'} |")
                failures += name == "cce" and not ok
            del errors
            torch.cuda.empty_cache() if args.device == "cuda" else None
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
