"""`llmtrain generate`: continue a prompt with a run's model, sampling through its head.

The head owns sampling (`head.sample(hidden, temperature=..., generator=...)`): the zloss head
samples from its calibrated softmax(β·z), hsm draws a cluster then a token. `--temperature auto`
is handed to the head as the string "auto", for heads with a temperature network.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmtrain.errors import UserError
from llmtrain.export import load_run
from llmtrain.model.language_model import LanguageModel

Temperature = float | str


def parse_temperature(text: str) -> Temperature:
    if text == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise UserError(f"--temperature {text!r}: a number ≥ 0 (0 = greedy) or 'auto'")
    return value


# --top-p: candidates first scored, then grown by this factor until they hold p of the probability
NUCLEUS_START, NUCLEUS_GROWTH = 64, 8


@torch.no_grad()
def next_tokens(model: LanguageModel, ids: torch.Tensor, temperature: Temperature, top_k: int | None,
                generator: torch.Generator, top_p: float | None = None) -> torch.Tensor:
    """[B] next token ids after `ids` [B, T] (the last seq_len tokens are the context)."""
    hidden = model.body(ids[:, -model.seq_len:])[:, -1]
    head = model.head
    if temperature == 0:
        return model.topk(hidden, 1)[:, 0]
    if top_k is None and top_p is None:
        try:
            return model.sample(hidden, temperature=temperature, generator=generator)
        except ValueError as e:  # heads refuse "auto" without a temperature network
            if temperature == "auto":
                raise UserError(f"--temperature auto: the {head.name} head says: {e}; pass a number") from None
            raise
    if temperature == "auto":
        raise UserError("--top-k/--top-p with --temperature auto: the head's temperature network samples over the "
                        "whole vocabulary; drop --top-k/--top-p or pass a numeric temperature")
    # The head's exact best tokens, re-drawn by their own (log-)probabilities.
    vocab = model.predictable_vocab
    k = min(top_k or NUCLEUS_START, vocab)
    candidates, logprobs = _candidates(model, hidden, k)
    if top_p is not None:
        while top_k is None and k < vocab and (logprobs.exp().sum(1) < top_p).any():
            k = min(k * NUCLEUS_GROWTH, vocab)  # the nucleus is not inside the candidates yet
            candidates, logprobs = _candidates(model, hidden, k)
        probs = logprobs.exp()
        # keep the best tokens until they reach p: a token stays if those ranked before it hold less
        logprobs = logprobs.masked_fill(probs.cumsum(1) - probs >= top_p, float("-inf"))
    pick = torch.multinomial(torch.softmax(logprobs.double() / temperature, 1), 1, generator=generator)
    return candidates.gather(1, pick).squeeze(1)


def _candidates(model: LanguageModel, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best tokens [B, k], best first, and their exact log-probabilities."""
    candidates, head = model.topk(hidden, k), model.head
    if head.is_distribution:
        return candidates, head.candidate_logprobs(hidden, candidates)
    calibrated = getattr(head, "calibrated_token_logprobs", None)
    if calibrated is None:
        raise UserError(f"--top-k: the {head.name} head gives no token scores to re-draw the top k by")
    return candidates, calibrated(hidden.repeat_interleave(k, 0), candidates.flatten()).view(-1, k)


def generate_text(target: Path, prompt: str, *, max_new_tokens: int, temperature: Temperature = 1.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int = 0) -> str:
    from llmtrain.data.tokenizer import load_tokenizer

    run = load_run(target)
    tok = load_tokenizer(run.tokenizer_path)
    ids = tok.encode(prompt).ids
    if not ids:
        raise UserError("--prompt: encodes to no tokens; give some text")
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.tensor([ids], dtype=torch.long)
    for _ in range(max_new_tokens):
        tokens = torch.cat([tokens, next_tokens(run.model, tokens, temperature, top_k, generator, top_p)[:, None]], 1)
    return tok.decode(tokens[0].tolist())
