"""The Head interface: what the body hands hidden states to, and what eval/generate ask.

A head owns its output weights and decides how (or whether) to form scores. Every method takes
hidden states ``[N, D]`` (the body's output, flattened over batch and time) and, where a target is
involved, int64 targets ``[N]`` with ``IGNORE_INDEX`` marking tokens that do not count.

The contract every head keeps (tests/test_head_contract.py checks it for each registered head):

- ``forward(hidden, targets).loss`` is the mean over non-ignored tokens of the head's per-token
  loss (the head's own functional form offers "sum" and "none" too: "sum" the plain sum, "none"
  the per-token losses [N] with 0 at ignored tokens). A batch whose targets are all ignored (a
  fine-tuning batch of prompt tokens only, or one data-parallel rank's share of one) gives loss 0
  and zero gradients, never NaN.
- Gradients reach the hidden states and the head's own parameters only, each exactly (within its
  dtype's rounding, measured against float64); none flow into the targets, and ∇hidden is not
  computed at all when the hidden states do not require it.
- ``token_logprobs`` is 0 at ignored positions, so a sum over positions is the sequence's
  log-likelihood; ``token_entropy`` is exact at every position; both are float32.
- fp16: the heads whose backward runs through autograd take the upstream gradient as it comes,
  so they are exact under a loss scale of 65,536 (DeepSpeed's initial one); a head that computes
  its gradients before the scale is known (cce) refuses fp16 with a ValueError saying so.
"""

from __future__ import annotations

import abc
import contextlib
import sys
from typing import ClassVar, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

IGNORE_INDEX = -100
# sample(temperature="auto"): each token at the temperature its network predicts.
AUTO = "auto"
NO_NETWORK = "temperature='auto' needs the temperature network (recipe temperature.enabled)"


class HeadOptions(BaseModel):
    """Options shared by every head; each head subclasses this with its own fields."""

    model_config = ConfigDict(extra="forbid")


class HeadOutput(NamedTuple):
    """A NamedTuple, not a dataclass: ZeRO-3's backward hooks find tensors only in tuples, lists
    and dicts, and a module output they cannot see breaks the re-gathering of its weights."""

    loss: torch.Tensor  # scalar: mean over non-ignored tokens
    metrics: dict[str, float] = {}  # for logging only; never mutated


class Head(nn.Module, abc.ABC):
    """Base class for output heads. Subclasses set ``name`` and ``Options``."""

    name: ClassVar[str]
    Options: ClassVar[type[HeadOptions]] = HeadOptions
    # What the head can do. Everyone else (recipe validation, the trainer, eval, profile, export)
    # reads these, so a new head is taught to its own file and the registry line only.
    # False for heads whose scores are not a normalized distribution (Z-loss): eval then skips
    # perplexity and reports top-k accuracy only.
    is_distribution: ClassVar[bool] = True
    # True when the head has one [V, D] `weight` that the embedding may share (tie_embeddings).
    supports_tying: ClassVar[bool] = False
    # True when the scores are `weight`·h (+ `bias`) over the whole vocabulary, as a Hugging Face
    # lm_head's: the head can start from an lm_head's weight and be exported as one.
    linear_lm_head: ClassVar[bool] = False
    # True when the head standardizes its scores, so o/τ scores the same as o (Z-loss).
    scale_invariant: ClassVar[bool] = False
    # True when the head can train with the TempNet add-on (heads/temperature.py); the options
    # that cannot be combined with it, each with the reason.
    supports_temperature: ClassVar[bool] = False
    temperature_conflicts: ClassVar[dict[str, str]] = {}

    def __init__(self, options: HeadOptions, hidden_size: int, vocab_size: int):
        super().__init__()
        self.options = options
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        # The TempNet submodule, set by heads.temperature.attach_temperature; None: plain head.
        self.temperature: nn.Module | None = None

    @property
    def temperature_features(self) -> int:
        """Width of the scores the temperature network reads (the full vocabulary by default)."""
        return self.vocab_size

    @abc.abstractmethod
    def forward(self, hidden: torch.Tensor, targets: torch.Tensor) -> HeadOutput:
        """Training loss (mean over non-ignored targets) and metrics."""

    @abc.abstractmethod
    def token_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """[N] exact log p(target | hidden), float32. Heads that are not distributions raise."""

    @abc.abstractmethod
    def topk(self, hidden: torch.Tensor, k: int) -> torch.Tensor:
        """[N, k] int64 token ids, best first, exact over the whole vocabulary."""

    def token_entropy(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N] float32 entropy (nats) of the head's distribution at each position, exact, for
        reinforcement learning beside ``token_logprobs``. Heads that are not distributions raise."""
        raise NotImplementedError(f"the {self.name} head does not compute token entropies")

    def candidate_logprobs(self, hidden: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """[N, k] float32 log p(candidate | hidden) for ``candidates`` [N, k] (generation's top-k and
        top-p). By default each candidate is its own target row; heads that score the whole
        vocabulary per row override it to score each row once for all its candidates."""
        k = candidates.shape[1]
        return self.token_logprobs(hidden.repeat_interleave(k, 0), candidates.flatten()).view(-1, k)

    def logprobs_and_topk(self, hidden: torch.Tensor, targets: torch.Tensor, k: int):
        """(``token_logprobs`` or None where the head is not a distribution, ``topk``) for
        evaluation; heads override it to form their scores once for both."""
        logprobs = self.token_logprobs(hidden, targets) if self.is_distribution else None
        return logprobs, self.topk(hidden, k)

    @abc.abstractmethod
    def sample(
        self, hidden: torch.Tensor, temperature: float | str = 1.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """[N] int64 token ids drawn from the head's distribution at ``temperature``: a number > 0,
        or "auto" for each token's temperature predicted by the temperature network (heads
        without one raise ValueError)."""

    def predict_temperature(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N] float32 temperatures from the head's temperature network (dropout off)."""
        raise ValueError(NO_NETWORK)

    def sampling_temperature(self, hidden: torch.Tensor, temperature: float | str) -> float | torch.Tensor:
        """``temperature`` checked: a float, or for "auto" the predicted [N] temperatures."""
        if check_temperature(temperature) != AUTO:
            return float(temperature)
        if self.temperature is None:
            raise ValueError(NO_NETWORK)
        return self.predict_temperature(hidden)

    @torch.no_grad()
    def tempered_token_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """[N] log p_τ(target) under the tempered distribution the DRO loss trains: the head's
        distribution of h/τ, which is softmax(o/τ) where the scores are linear without bias.
        Heads with a bias or softcap override it."""
        return self.token_logprobs(hidden / tau.to(hidden.dtype)[:, None], targets)

    @classmethod
    @abc.abstractmethod
    def transient_bytes(
        cls, options: HeadOptions, n_tokens: int, hidden_size: int, vocab_size: int, dtype: torch.dtype
    ) -> int:
        """The head's memory model for ``llmtrain profile``: its peak during one forward + backward
        over ``n_tokens`` tokens (``dtype`` = the hidden states' and weights' dtype), above its
        inputs and weights, minus the bytes of its weight gradients, which the profiler adds back
        (head_total). The gradient of the hidden states is included. A head whose peak comes before
        any weight gradient exists returns that peak minus the gradients' bytes. Calibrate it with
        ``llmtrain profile --tokens N --vocab V --hidden D``: the measurement is within ±10%."""

    def train_flops(self, n_tokens: int) -> float:
        """FLOPs of one forward + backward over ``n_tokens`` tokens, as the head's math needs them
        (matmuls; recomputation not counted), for MFU. The default is a full linear +
        cross-entropy: scores, ∂h and ∂W, three N×V×D products (6·N·V·D). Heads that compute less
        (hsm, zloss) override it; tests check each against torch's FLOP counter."""
        return 6.0 * n_tokens * self.vocab_size * self.hidden_size

    def prepare(self, token_counts: torch.Tensor | None) -> None:
        """Called once before training with unigram counts [V] of the training data.
        Heads that derive structure from the data (hsm clusters) override this."""

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, vocab_size={self.vocab_size}"


def check_temperature(temperature: float | str) -> float | str:
    """A positive number or 'auto'; ValueError naming the argument otherwise."""
    if isinstance(temperature, str):
        if temperature != AUTO:
            raise ValueError(f"temperature must be a number > 0 or 'auto', got {temperature!r}")
        return temperature
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return float(temperature)


def check_head_inputs(hidden: torch.Tensor, targets: torch.Tensor | None, hidden_size: int) -> None:
    """Shape checks every head shares; raise ValueError naming the argument."""
    if hidden.dim() != 2 or hidden.shape[1] != hidden_size:
        raise ValueError(f"hidden must be [N, {hidden_size}], got {list(hidden.shape)}")
    if targets is not None and (targets.dim() != 1 or targets.shape[0] != hidden.shape[0]):
        raise ValueError(f"targets must be [{hidden.shape[0]}], got {list(targets.shape)}")


def check_k(k: int, vocab_size: int) -> None:
    if not 1 <= k <= vocab_size:
        raise ValueError(f"k must be in [1, {vocab_size}], got {k}")


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def entropy_of_scores(scores: torch.Tensor) -> torch.Tensor:
    """[n] float32 entropy of softmax over the rows of ``scores`` [n, V] (overwritten): with
    x = s − max and Z = Σ exp(x), H = log Z − Σ exp(x)·x / Z; shifting first keeps a large common
    score from cancelling, the sums are float64."""
    x = scores.sub_(scores.amax(1, keepdim=True))
    e = x.exp()
    total = e.sum(1, dtype=torch.float64)
    return (total.log() - e.mul_(x).sum(1, dtype=torch.float64) / total).float()


@contextlib.contextmanager
def weight_available(weight: torch.Tensor):
    """Under ZeRO-3 a partitioned parameter outside its module's forward holds a 0-element
    stand-in; gather it for the duration. Heads import no DeepSpeed: a parameter with a ds_id was
    made by DeepSpeed, which is therefore loaded, and its gathering context is taken from there."""
    if weight.numel() == 0 and hasattr(weight, "ds_id"):
        with sys.modules["deepspeed"].zero.GatheredParameters([weight]):
            yield
    else:
        yield
