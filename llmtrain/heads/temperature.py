"""TempNet (Qiu et al., ICML 2024, "To Cool or not to Cool?"): a small network that predicts one
temperature τ per token from the head's (detached) scores, trained with the KL-constrained DRO loss

    L = τ·CE(o/τ, y) + τ·(ρ − log V)

whose derivative in τ is ρ − KL(softmax(o/τ) ‖ uniform): the learned τ drives the tempered
distribution's entropy towards log V − ρ. The network follows the authors' code:
u = o/‖o‖₂, p = Linear(w → w)(Dropout(sigmoid(Linear(F → w)(u)))), g = aᵀ((softmax(p/e^γ) − 1/w) ⊙ p) + b,
τ = τ_min + (τ_max − τ_min)·sigmoid(g), with a = 1, b = 0, γ = 0 at init.

Input, and the one choice kept everywhere (training, evaluation, generation): the raw scores o,
never shifted by their maximum. The authors' inference wrapper subtracts the max logit before
predicting τ while their training does not; the L2-normalised input is not shift-invariant, so
mixing the two would evaluate the network on inputs it was never trained on.

Where the scores are linear in the hidden state (o = W·h + b: the softmax head without softcap, the
cce head), the first layer never forms o: A·o = (A·W)·h + A·b and ‖o‖² = hᵀ(WᵀW)h + 2(Wᵀb)·h + ‖b‖²,
so it costs O(w·V·D + V·D²) per step plus O(N·D·(w + D)) — no N × V tensor, and no V × D copy:
the weight is read VOCAB_CHUNK rows at a time. The hsm head feeds
its cluster-level scores (C = ⌈√V⌉ of them): they are what it computes for every token anyway,
and its full scores exist only in evaluation.

Heads own the network as their submodule ``temperature`` and call it inside their own forward, so
ZeRO-3 gathers its weights there like any other module's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.heads import HEADS, head_class
from llmtrain.heads.base import IGNORE_INDEX, Head, weight_available

# Rows of the head's weight the first layer takes at a time (bounds its cast copy at VOCAB_CHUNK × D).
VOCAB_CHUNK = 8192
# ‖o‖ floor, as F.normalize's eps: an all-zero score vector maps to u = 0, not NaN.
NORM_EPS = 1e-12


class TemperatureNet(nn.Module):
    """[N] per-token temperatures in [tau_min, tau_max] from scores [N, in_features], or from the
    hidden states and weight of a linear head without ever forming its scores."""

    def __init__(self, in_features: int, width: int = 256, tau_min: float = 0.5, tau_max: float = 5.0,
                 rho: float = 8.0, dropout: float = 0.5, init_tau: float | None = None):
        super().__init__()
        if not 0 < tau_min < tau_max:
            raise ValueError(f"need 0 < tau_min < tau_max, got tau_min={tau_min}, tau_max={tau_max}")
        if init_tau is not None and not tau_min < init_tau < tau_max:
            raise ValueError(f"init_tau ({init_tau}) must lie strictly between tau_min ({tau_min}) and tau_max ({tau_max})")
        self.in_features, self.width = in_features, width
        self.tau_min, self.tau_max, self.rho = float(tau_min), float(tau_max), float(rho)
        self.first = nn.Linear(in_features, width)
        self.dropout = nn.Dropout(dropout)
        self.second = nn.Linear(width, width)
        # γ: the pooling softmax's log-temperature; shape [1], not 0-d, for ZeRO's flat buffers
        self.log_scale = nn.Parameter(torch.zeros(1))
        self.pool = nn.Linear(width, 1)
        nn.init.ones_(self.pool.weight)  # a = 1, b = 0 as the authors: τ starts mid-range
        nn.init.zeros_(self.pool.bias)
        if init_tau is not None:  # b = logit of init_tau's place in the range: τ starts near init_tau
            nn.init.constant_(self.pool.bias, math.log((init_tau - tau_min) / (tau_max - init_tau)))

    def extra_repr(self) -> str:
        return f"tau=[{self.tau_min}, {self.tau_max}], rho={self.rho}"

    def forward(self, scores: torch.Tensor | None = None, *, hidden: torch.Tensor | None = None,
                weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
        """τ [N] (float32, or float64 for a float64 network). Give either ``scores`` [N, F], or ``hidden`` [N, D] with the head's
        ``weight`` [F, D] (and ``bias`` [F]) whose product are the scores. Inputs are detached:
        the network learns τ, it does not push the scores."""
        dtype = self.first.weight.dtype
        if scores is not None:
            z = self.first(F.normalize(scores.detach().to(dtype), dim=1, eps=NORM_EPS))
        else:
            z = self._first_layer_of_linear(hidden.detach(), weight.detach(), None if bias is None else bias.detach())
        p = self.second(self.dropout(torch.sigmoid(z)))
        attention = torch.softmax(p / self.log_scale.exp(), dim=1)
        g = self.pool((attention - 1.0 / self.width) * p).squeeze(1)
        tau = self.tau_min + (self.tau_max - self.tau_min) * torch.sigmoid(g)
        return tau.to(torch.promote_types(tau.dtype, torch.float32))  # 16-bit nets: τ in fp32

    def _first_layer_of_linear(self, hidden, weight, bias):
        """first(o/‖o‖) for o = weight·h + bias, from [w, D] and [D, D] products only, going over
        the weight's rows VOCAB_CHUNK at a time: no V × D copy in another dtype."""
        dtype = self.first.weight.dtype
        h, h32 = hidden.to(dtype), hidden.float()
        projected = _Projection.apply(self.first.weight, weight)  # A·W [width, D]
        pre = h @ projected.T
        # ‖o‖² in fp32 whatever the training dtype: the norm is the one place where rounding bites
        gram = torch.zeros(weight.shape[1], weight.shape[1], dtype=torch.float32, device=weight.device)
        for chunk in weight.split(VOCAB_CHUNK):
            chunk32 = chunk.float()
            gram.addmm_(chunk32.T, chunk32)
        squared = ((h32 @ gram) * h32).sum(1)
        if bias is not None:
            pre = pre + self.first.weight @ bias.to(dtype)
            b32 = bias.float()
            w_b = torch.zeros(weight.shape[1], dtype=torch.float32, device=weight.device)
            for chunk, b_chunk in zip(weight.split(VOCAB_CHUNK), b32.split(VOCAB_CHUNK)):
                w_b += chunk.float().T @ b_chunk
            squared = squared + 2 * (h32 @ w_b) + b32.square().sum()
        norm = squared.clamp(min=0).sqrt().clamp(min=NORM_EPS)
        return pre / norm.to(dtype)[:, None] + self.first.bias

    @torch.no_grad()
    def predict(self, scores=None, **linear) -> torch.Tensor:
        """τ with dropout off, whatever the module's mode (evaluation, generation)."""
        was_training = self.training
        self.eval()
        try:
            return self(scores, **linear)
        finally:
            self.train(was_training)


class _Projection(torch.autograd.Function):
    """A·W [width, D] for the first layer's weight A [width, V] and a head's weight W [V, D]
    (constant here: the network does not push the scores), summed over blocks of VOCAB_CHUNK rows
    cast to A's dtype one at a time; backward ∂A = ∂(A·W)·Wᵀ the same way. Autograd would keep a
    whole cast copy of W for the backward (4 GiB at V = 256k, D = 4,096 in bf16 training)."""

    @staticmethod
    def forward(ctx, a, weight):
        out = torch.zeros(a.shape[0], weight.shape[1], dtype=a.dtype, device=a.device)
        for lo in range(0, weight.shape[0], VOCAB_CHUNK):
            out.addmm_(a[:, lo:lo + VOCAB_CHUNK], weight[lo:lo + VOCAB_CHUNK].to(a.dtype))
        ctx.save_for_backward(weight)
        return out

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        grad_a = grad.new_empty(grad.shape[0], weight.shape[0])
        with weight_available(weight):  # ZeRO-3: gathered again if partitioned by now
            for lo in range(0, weight.shape[0], VOCAB_CHUNK):
                grad_a[:, lo:lo + VOCAB_CHUNK] = grad @ weight[lo:lo + VOCAB_CHUNK].to(grad.dtype).T
        return grad_a, None


# --------------------------------------------------------------------------- the DRO loss pieces


def dro_shift(tau: torch.Tensor, keep: torch.Tensor, rho: float, vocab_size: int) -> torch.Tensor:
    """Mean over kept tokens of τ·(ρ − log V): the KL budget's term of the DRO loss."""
    n_keep = keep.sum().clamp(min=1)
    return (tau * keep).sum() / n_keep * (rho - math.log(vocab_size))


def tau_metrics(tau: torch.Tensor, keep: torch.Tensor, tempered_ce: torch.Tensor) -> dict[str, float]:
    """τ's mean, min and max and the mean tempered cross-entropy CE(o/τ) over kept tokens."""
    kept = tau.detach()[keep]
    if kept.numel() == 0:
        return {}
    n = kept.numel()
    return {"tau_mean": float(kept.mean()), "tau_min": float(kept.min()), "tau_max": float(kept.max()),
            "tempered_ce": float(tempered_ce.detach().sum()) / n}


def dro_loss_from_logits(logits: torch.Tensor, targets: torch.Tensor, tau: torch.Tensor, rho: float):
    """(loss, metrics): mean over kept tokens of τ·CE(o/τ, y) + τ·(ρ − log V), from logits [N, V]."""
    keep = targets != IGNORE_INDEX
    ce = F.cross_entropy(logits / tau[:, None], targets, ignore_index=IGNORE_INDEX, reduction="none")
    n_keep = keep.sum().clamp(min=1)
    loss = (tau * ce).sum() / n_keep + dro_shift(tau, keep, rho, logits.shape[1])
    return loss, tau_metrics(tau, keep, ce)


# --------------------------------------------------------------------------- what each head can serve

def temperature_problems(cls: type[Head], options: dict) -> list[str]:
    """Why the head ``cls`` with these options cannot train with the temperature network (empty: it
    can), from what the head declares: support, scale invariance, conflicting options."""
    if not cls.supports_temperature:
        others = ", ".join(n for n in HEADS if head_class(n).supports_temperature)
        why = (f"the {cls.name} head is scale-invariant (it standardizes its scores, so o/τ scores the same "
               "as o and τ would only rescale the loss)" if cls.scale_invariant
               else f"the {cls.name} head has no temperature network")
        return [f"temperature.enabled: {why}: use {others}"]
    return [f"temperature.enabled: head.{key}={options[key]!r} cannot be used with the temperature network: {why}; "
            f"unset head.{key} or disable temperature"
            for key, why in cls.temperature_conflicts.items() if options.get(key)]


def attach_temperature(head: nn.Module, *, width: int, tau_min: float, tau_max: float, rho: float,
                       dropout: float, init_tau: float | None = None) -> TemperatureNet:
    """Give ``head`` its temperature network (its submodule ``temperature``); it must serve one."""
    problems = temperature_problems(type(head), head.options.model_dump())
    if problems:
        raise ValueError("; ".join(problems))
    head.temperature = TemperatureNet(head.temperature_features, width, tau_min, tau_max, rho, dropout, init_tau)
    return head.temperature
