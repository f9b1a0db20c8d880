"""Full softmax cross-entropy: the reference head. Materializes tokens × vocab logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from llmtrain.heads.base import IGNORE_INDEX, Head, HeadOptions, HeadOutput, check_head_inputs, check_k, dtype_bytes
from llmtrain.heads.temperature import dro_loss_from_logits

# Rows per chunk when eval/generation asks for scores: bounds eval memory at chunk × V.
EVAL_CHUNK = 1024


class SoftmaxOptions(HeadOptions):
    bias: bool = Field(False, description="add a learned bias to the logits")
    softcap: float | None = Field(None, gt=0, description="cap logits as c·tanh(logits/c) (Gemma 2 uses 30)")
    z_loss: float = Field(0.0, ge=0, description="PaLM auxiliary penalty z_loss·logsumexp(logits)² per token")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the cross-entropy")


class SoftmaxHead(Head):
    name = "softmax"
    Options = SoftmaxOptions
    supports_tying = True
    linear_lm_head = True
    supports_temperature = True
    temperature_conflicts = {
        "z_loss": "the PaLM z-loss penalty is defined on the untempered logits",
        "label_smoothing": "the DRO loss replaces the (smoothed) cross-entropy",
    }

    def __init__(self, options: SoftmaxOptions, hidden_size: int, vocab_size: int):
        super().__init__(options, hidden_size, vocab_size)
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))
        self.bias = nn.Parameter(torch.zeros(vocab_size)) if options.bias else None
        # Small logits at init so the first loss is ≈ ln V (GPT-2 uses the same 0.02).
        nn.init.normal_(self.weight, std=0.02)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, V] float32 scores, softcap applied."""
        logits = F.linear(hidden, self.weight, self.bias).float()
        cap = self.options.softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor) -> HeadOutput:
        check_head_inputs(hidden, targets, self.hidden_size)
        logits = self.logits(hidden)
        if self.temperature is not None:
            return HeadOutput(*dro_loss_from_logits(logits, targets, self._tau(hidden, logits), self.temperature.rho))
        keep = targets != IGNORE_INDEX
        n_keep = keep.sum().clamp(min=1)
        loss = F.cross_entropy(
            logits, targets, ignore_index=IGNORE_INDEX, label_smoothing=self.options.label_smoothing
        )
        lse = torch.logsumexp(logits, dim=-1)
        aux = (lse.square() * keep).sum() / n_keep
        metrics = {"lse_mean": float(((lse * keep).sum() / n_keep).detach())}
        if self.options.z_loss:
            loss = loss + self.options.z_loss * aux
            metrics["z_loss_aux"] = float(aux.detach())
        return HeadOutput(loss=loss, metrics=metrics)

    def _tau(self, hidden: torch.Tensor, logits: torch.Tensor | None = None, predict: bool = False) -> torch.Tensor:
        """The network's τ: from the factored linear scores, or from the logits under softcap."""
        net = self.temperature.predict if predict else self.temperature
        if self.options.softcap:
            return net(self.logits(hidden) if logits is None else logits)
        return net(hidden=hidden, weight=self.weight, bias=self.bias)

    def predict_temperature(self, hidden: torch.Tensor) -> torch.Tensor:
        check_head_inputs(hidden, None, self.hidden_size)
        if self.temperature is None:
            return super().predict_temperature(hidden)
        parts = [self._tau(h, predict=True) for h in hidden.split(EVAL_CHUNK)]
        return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)

    @torch.no_grad()
    def tempered_token_logprobs(self, hidden, targets, tau):
        out = []
        for h, t, s in zip(hidden.split(EVAL_CHUNK), targets.split(EVAL_CHUNK), tau.split(EVAL_CHUNK)):
            logp = torch.log_softmax(self.logits(h) / s[:, None], dim=-1)
            out.append(logp.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1))
        return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)

    @torch.no_grad()
    def token_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        check_head_inputs(hidden, targets, self.hidden_size)
        out = []
        for h, t in zip(hidden.split(EVAL_CHUNK), targets.split(EVAL_CHUNK)):
            logp = torch.log_softmax(self.logits(h), dim=-1)
            out.append(logp.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1))
        return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)

    @torch.no_grad()
    def topk(self, hidden: torch.Tensor, k: int) -> torch.Tensor:
        check_head_inputs(hidden, None, self.hidden_size)
        check_k(k, self.vocab_size)
        parts = [self.logits(h).topk(k, dim=-1).indices for h in hidden.split(EVAL_CHUNK)]
        return torch.cat(parts) if parts else hidden.new_zeros(0, k, dtype=torch.long)

    @torch.no_grad()
    def sample(self, hidden, temperature=1.0, generator=None):
        check_head_inputs(hidden, None, self.hidden_size)
        temperature = self.sampling_temperature(hidden, temperature)
        if isinstance(temperature, torch.Tensor):
            temperature = temperature[:, None]
        probs = torch.softmax(self.logits(hidden) / temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    @classmethod
    def transient_bytes(cls, options, n_tokens, hidden_size, vocab_size, dtype):
        # Two phases, calibrated by `llmtrain profile` on CPU (peak RSS and MemTracker agree).
        # The loss: three fp32 [N, V] buffers live at once, whatever the input dtype (the fp32
        # logits, the saved log-softmax, logsumexp's shifted copy; in its backward the gradient
        # of the log-softmax and of its input), one more for the saved tanh of a softcap, two
        # more when the z-loss term is differentiated. No weight gradient exists yet.
        # The linear's backward: ∂logits in the input dtype, ∂hidden and the weight gradients.
        # Returned net of the weight gradients, which the profiler adds back.
        b = dtype_bytes(dtype)
        n_logits = n_tokens * vocab_size
        grads = (vocab_size * hidden_size + (vocab_size if options.bias else 0)) * b
        fp32_buffers = 3 + (1 if options.softcap else 0) + (2 if options.z_loss else 0)
        loss_phase = 4 * fp32_buffers * n_logits
        linear_phase = b * n_logits + n_tokens * hidden_size * b + grads
        return max(loss_phase, linear_phase) - grads
