"""Model FLOPs utilization: the FLOPs a step's model math needs (recomputation not counted, as in
PaLM's definition) over what the ranks' matmul units could do in that time.

FLOPs per trained token = the body's 6·(non-embedding parameters) + 12·layers·d_model·seq_len
(attention scores and values, forward and backward; Chowdhery et al. 2022, appendix B) + the
head's own `train_flops` per token: 6·V·D for a full softmax, far less for hsm and zloss. The
temperature network's FLOPs are not counted.

The peak: on CUDA a data-sheet figure where the device is known; otherwise the matmul rate
measured at start, at the training dtype, on every rank at once (ranks sharing a CPU share it).
"""

from __future__ import annotations

import time

import torch
from torch import nn

# Dense peak FLOP/s per device from NVIDIA's data sheets (SXM parts; no sparsity, no TF32 for fp32:
# torch leaves TF32 matmuls off by default).
DATASHEET_PEAK = {
    "H200": {"bf16": 989e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MEASURE_SECONDS = 0.25  # how long the start-up measurement may take


def matmul_rate(device: torch.device, precision: str, seconds: float = MEASURE_SECONDS) -> float:
    """FLOP/s of the best of repeated square matmuls at `precision` on `device`, timed for about
    `seconds` after one warm-up."""
    n = 4096 if device.type == "cuda" else 1024
    # a generator of its own: drawing from the global one would shift a resumed run's dropout masks
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=generator).to(DTYPES[precision])
    b = torch.randn(n, n, device=device, generator=generator).to(DTYPES[precision])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds or best == float("inf"):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops(device: torch.device, precision: str) -> tuple[float, str]:
    """(FLOP/s this rank can do, where the figure comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for part, peaks in DATASHEET_PEAK.items():
            if part in name:
                return peaks[precision], f"{name}: data sheet"
    return matmul_rate(device, precision), "measured"


def _unique_numel(params) -> int:
    return sum({id(p): getattr(p, "ds_numel", p.numel()) for p in params}.values())


def body_flops_per_token(model: nn.Module, layers: int, d_model: int, seq_len: int) -> float:
    """6·(the body's parameters outside embeddings and the head) + 12·layers·d_model·seq_len."""
    head = {id(p) for p in model.head.parameters()}
    embeddings = {id(p) for m in model.body.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    dense = [p for p in model.body.parameters() if id(p) not in head | embeddings]
    return 6 * _unique_numel(dense) + 12 * layers * d_model * seq_len


def model_flops_per_token(model: nn.Module, layers: int, d_model: int, seq_len: int, micro_tokens: int) -> float:
    """The body's and the head's FLOPs per trained token, the head's as it computes them over a
    micro-batch of `micro_tokens` tokens (a head may do per-batch work, as zloss's Gram matrix)."""
    return body_flops_per_token(model, layers, d_model, seq_len) + model.head.train_flops(micro_tokens) / micro_tokens
