"""`LanguageModel`: a body (ours, or a Hugging Face base model) that returns hidden states, and
the head they are handed to with the targets. The body never forms logits."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.heads import Head, HeadOutput, build_head, head_class
from llmtrain.model.decoder import Body
from llmtrain.recipe import ModelConfig

# Sampling: how often a row that drew a padding id draws again before it falls back to greedy.
REDRAWS = 32
# Tokens per [chunk, V] score tile when ranking real tokens past a padded vocabulary.
TOPK_CHUNK = 256


class LanguageModel(nn.Module):
    """``vocab_size`` is the tokenizer's: every id the data holds. A Hugging Face model keeps its
    config's vocabulary (Qwen pads its embedding past the tokenizer); ids from ``vocab_size`` on
    are padding and never predicted (`topk`, `sample`). ``load_weights=False`` skips a Hugging
    Face folder's weights (a checkpoint's replace them)."""

    def __init__(self, cfg: ModelConfig, head_spec: dict, vocab_size: int, *, load_weights: bool = True):
        super().__init__()
        self.seq_len = cfg.seq_len
        self.predictable_vocab = vocab_size
        if cfg.hf:
            self.body, self.head = _hf_body_and_head(cfg, head_spec, vocab_size, load_weights)
            return
        self.body = Body(cfg, vocab_size)
        self.head: Head = build_head(head_spec, hidden_size=cfg.d_model, vocab_size=vocab_size)
        self._init_weights(cfg.init_std, cfg.layers)
        if cfg.tie_embeddings:
            # The same Parameter registered in both modules: ZeRO-3 gathers it for each one's forward.
            self.body.embed.weight = self.head.weight

    def _init_weights(self, std: float, layers: int):
        for name, p in self.body.named_parameters():
            if p.dim() == 2:
                # GPT-2 style: residual output projections scaled down with depth.
                scale = 1 / math.sqrt(2 * layers) if name.endswith(("out.weight", "down.weight")) else 1.0
                nn.init.normal_(p, std=std * scale)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> HeadOutput:
        hidden = self.body(ids)
        return self.head(hidden.flatten(0, 1), targets.flatten())

    @property
    def padding(self) -> int:
        """Rows of the head past the tokenizer's vocabulary."""
        return self.head.vocab_size - self.predictable_vocab

    @torch.no_grad()
    def topk(self, hidden: torch.Tensor, k: int) -> torch.Tensor:
        """The head's exact top k among real tokens. Only heads whose scores grow with weight·h
        (+ bias) carry padding rows (softmax and cce, whose softcap is monotone; zloss sharing a
        padded embedding, whose standardization is), so the real rows' own products rank them."""
        if not self.padding:
            return self.head.topk(hidden, k)
        n = self.predictable_vocab
        weight, bias = self.head.weight[:n].float(), getattr(self.head, "bias", None)  # fp32 scores, as the heads rank
        bias = None if bias is None else bias[:n].float()
        parts = [F.linear(h.float(), weight, bias).topk(k, dim=-1).indices for h in hidden.split(TOPK_CHUNK)]
        return torch.cat(parts) if parts else hidden.new_zeros(0, k, dtype=torch.long)

    @torch.no_grad()
    def logprobs_and_topk(self, hidden: torch.Tensor, targets: torch.Tensor, k: int):
        """(the head's token log-probabilities or None, top k among real tokens): one pass over
        the scores where no padding rows need ranking apart."""
        if not self.padding:
            return self.head.logprobs_and_topk(hidden, targets, k)
        return (self.head.token_logprobs(hidden, targets) if self.head.is_distribution else None), self.topk(hidden, k)

    @torch.no_grad()
    def sample(self, hidden: torch.Tensor, temperature: float | str = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """A draw from the head's distribution restricted to real tokens: padding draws are drawn
        again, which is exact for that conditional distribution. Padding rows hold little mass; a
        row still drawing padding after REDRAWS tries gets its most likely real token."""
        ids = self.head.sample(hidden, temperature=temperature, generator=generator)
        for _ in range(REDRAWS):
            bad = ids >= self.predictable_vocab
            if not bad.any():
                return ids
            ids[bad] = self.head.sample(hidden[bad], temperature=temperature, generator=generator)
        bad = ids >= self.predictable_vocab
        ids[bad] = self.topk(hidden[bad], 1)[:, 0]
        return ids


def _hf_body_and_head(cfg: ModelConfig, head_spec: dict, vocab_size: int, load_weights: bool) -> tuple[nn.Module, Head]:
    """The base model of `cfg.hf` as the body; the head takes the lm_head's weight (and bias) when
    it is a linear lm_head, else starts fresh at the body's hidden size: over the tokenizer's
    `vocab_size` (no padding rows; hsm clusters the data's counts of exactly those ids), or over
    the embedding's rows when it shares them."""
    from llmtrain.model.hf import HFBody, build_causal_lm, read_hf_folder

    hf = read_hf_folder(cfg.hf)
    lm = build_causal_lm(hf, load_weights)
    # from_pretrained returns the model in eval mode; a body starts in training mode like ours, or
    # dropout and activation checkpointing stay off until the first evaluation calls train().
    body = HFBody(getattr(lm, lm.base_model_prefix)).train()
    if cfg.activation_checkpointing:
        # transformers' own per-layer checkpointing (the base model's decoder layers), active only
        # in training mode with gradients on, like ours. Non-reentrant: see decoder.Body.forward.
        # (gradient_checkpointing_enable is the deprecated alias in transformers 5.)
        body.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    lm_head = lm.get_output_embeddings()
    hidden, vocab = int(hf.config.hidden_size), hf.vocab_size
    if not head_class(head_spec.get("type", "softmax")).linear_lm_head:
        head = build_head(head_spec, hidden_size=hidden, vocab_size=vocab if cfg.tie_embeddings else vocab_size)
        if cfg.tie_embeddings:  # the head shares the trained embedding, not the other way round
            head.weight = body.embed.weight
        return body, head
    with torch.device("meta"):  # its weight is the lm_head's: never allocate one of its own
        head = build_head(head_spec, hidden_size=hidden, vocab_size=vocab)
    head.weight = lm_head.weight  # the same Parameter: tied to the embedding when the config ties them
    if head.bias is not None:
        head.bias = lm_head.bias if lm_head.bias is not None else nn.Parameter(torch.zeros(vocab))
    return body, head


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (a tied weight counts once); reads ZeRO-3's ds_numel when partitioned."""
    seen = {id(p): getattr(p, "ds_numel", p.numel()) for p in model.parameters()}
    return sum(seen.values())
