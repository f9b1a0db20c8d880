"""Full softmax cross-entropy: the reference head. Materializes tokens × vocab logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from llmtrain.heads.base import (IGNORE_INDEX, Head, HeadOptions, HeadOutput, check_head_inputs, check_k, dtype_bytes,
                                 entropy_of_scores)
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
        n_keep = keep.sum().clamp(min=1)  # all ignored: loss 0 and zero gradients, not 0/0
        # One log-softmax serves the loss, the smoothing term and the log-sum-exp the metric and
        # the z-loss need: lse = s_target − log p_target, no second pass over the N × V logits.
        logp = torch.log_softmax(logits, dim=-1)
        safe = targets.clamp(min=0).unsqueeze(1)
        nll = logp.gather(1, safe).squeeze(1).neg()
        per_token = nll
        if self.options.label_smoothing:
            eps = self.options.label_smoothing
            per_token = (1 - eps) * nll - eps * logp.mean(1)
        lse = logits.gather(1, safe).squeeze(1) + nll
        loss = (per_token * keep).sum() / n_keep
        metrics = {"lse_mean": float(((lse * keep).sum() / n_keep).detach())}
        if self.options.z_loss:
            aux = (lse.square() * keep).sum() / n_keep
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
            out.append(torch.where(t != IGNORE_INDEX, logp.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1), 0.0))
        return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)

    @torch.no_grad()
    def token_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.logprobs_and_topk(hidden, targets, None)[0]

    @torch.no_grad()
    def topk(self, hidden: torch.Tensor, k: int) -> torch.Tensor:
        check_k(k, self.vocab_size)
        return self.logprobs_and_topk(hidden, None, k)[1]

    @torch.no_grad()
    def logprobs_and_topk(self, hidden, targets, k):
        """One pass over each chunk's scores for both (either may be skipped: None)."""
        check_head_inputs(hidden, targets, self.hidden_size)
        if k is not None:
            check_k(k, self.vocab_size)
        n = hidden.shape[0]
        logprobs = None if targets is None else hidden.new_zeros(n, dtype=torch.float32)
        top = None if k is None else hidden.new_zeros(n, k, dtype=torch.long)
        for start, scores in self._score_chunks(hidden):
            rows = slice(start, start + scores.shape[0])
            if top is not None:  # the order of the scores is the order of the log-probabilities
                top[rows] = scores.topk(k, dim=1).indices
            if logprobs is not None:
                t = targets[rows]
                logp = torch.log_softmax(scores, 1, out=scores).gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1)
                logprobs[rows] = torch.where(t != IGNORE_INDEX, logp, 0.0)
        return logprobs, top

    @torch.no_grad()
    def candidate_logprobs(self, hidden: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Each row's scores formed once for all its candidates (not once per candidate)."""
        out = hidden.new_zeros(candidates.shape, dtype=torch.float32)
        for start, scores in self._score_chunks(hidden):
            rows = slice(start, start + scores.shape[0])
            out[rows] = torch.log_softmax(scores, 1, out=scores).gather(1, candidates[rows])
        return out

    @torch.no_grad()
    def token_entropy(self, hidden: torch.Tensor) -> torch.Tensor:
        """H = lse − Σ p·s per position, chunk by chunk (fp32 scores, float64 sums)."""
        check_head_inputs(hidden, None, self.hidden_size)
        out = hidden.new_zeros(hidden.shape[0], dtype=torch.float32)
        for start, scores in self._score_chunks(hidden):
            out[start:start + scores.shape[0]] = entropy_of_scores(scores)
        return out

    def _score_chunks(self, hidden: torch.Tensor):
        """(start, [chunk, V] fp32 soft-capped scores): evaluation holds EVAL_CHUNK × V at most."""
        for start in range(0, hidden.shape[0], EVAL_CHUNK):
            yield start, self.logits(hidden[start:start + EVAL_CHUNK])

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
