"""Two-level hierarchical softmax (class-based factorization, Goodman 2001; Mikolov et al. 2011):

    log p(w | h) = log softmax(U·h)[c(w)] + log softmax(W_c(w)·h)[w's position in c(w)]

With C clusters a training token costs O((C + |c(w)|)·D) instead of O(V·D). The output weight W
is one [V, D] parameter whose rows are ordered by cluster, so each cluster's tokens are one
contiguous slice; training sorts the tokens by their target's cluster and runs one matmul per
cluster present in the batch (forward and backward in a custom autograd Function that writes the
gradient of W slice by slice, never a per-slice full-size gradient). The cluster table lives in
buffers and travels with the state dict; loading checks it against the vocabulary.
"""

from __future__ import annotations

import contextlib
import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from llmtrain.errors import UserError
from llmtrain.heads.base import (IGNORE_INDEX, Head, HeadOptions, HeadOutput, check_head_inputs, check_k, dtype_bytes,
                                 entropy_of_scores)
from llmtrain.heads.temperature import dro_shift, tau_metrics
from llmtrain.heads.hsm_clusters import default_clusters, frequency_clusters, table_from_rows, table_problem

# Elements of one [rows, V] score block when eval/generation scores the whole vocabulary.
EVAL_BLOCK = 1 << 26
TABLE = ("token_cluster", "token_position", "cluster_offsets")


class HsmOptions(HeadOptions):
    n_clusters: int | None = Field(None, ge=1, description="top-level clusters (default ⌈√V⌉)")
    binning: Literal["sqrt", "unigram"] = Field(
        "sqrt", description="cut the frequency-sorted vocabulary at equal shares of cumulative √count or count"
    )
    shortlist: int = Field(0, ge=0, description="the most frequent tokens forming the first cluster (0: none)")


# A segment is one cluster present in a sorted batch: tokens start:end, weight rows lo:hi.
Segment = tuple[int, int, int, int]


@contextlib.contextmanager
def _one_thread(device: torch.device):
    """One intra-op thread around the per-cluster loop on CPU. Its GEMMs are small (the few
    tokens of one cluster against its rows): threads gain little there, and each call pays a
    thread synchronization that costs milliseconds when the cores are shared (512 such GEMMs:
    0.2 s on one thread, 6.6 s on two on this loaded 2-core machine)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _within_forward(hidden, weight, positions, segments, keep_probs):
    """-log p(token | its cluster) [n] float32 for hidden states sorted by cluster, and (when
    keep_probs) each segment's within-cluster probabilities for the backward pass."""
    nll = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    probs = []
    with _one_thread(hidden.device):
        for start, end, lo, hi in segments:
            logp = torch.log_softmax((hidden[start:end] @ weight[lo:hi].T).float(), dim=1)
            nll[start:end] = logp.gather(1, positions[start:end, None]).squeeze(1).neg()
            if keep_probs:
                probs.append(logp.exp_())
    return nll, probs


class _WithinClusterNLL(torch.autograd.Function):
    """Per-token within-cluster NLL; backward writes ∂W slice by slice into one dense tensor."""

    @staticmethod
    def forward(ctx, hidden, weight, positions, segments):
        nll, probs = _within_forward(hidden, weight, positions, segments, keep_probs=True)
        ctx.save_for_backward(hidden, weight, positions)
        ctx.segments, ctx.probs = segments, probs
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        hidden, weight, positions = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.empty_like(weight) if need_weight else None
        done = 0  # rows of grad_weight written so far; rows of absent clusters get zeros
        with _one_thread(hidden.device):
            for (start, end, lo, hi), p in zip(ctx.segments, ctx.probs):
                g = grad_nll[start:end, None]
                dlogits = (p * g).scatter_add_(1, positions[start:end, None], -g).to(weight.dtype)
                if need_hidden:
                    torch.mm(dlogits, weight[lo:hi], out=grad_hidden[start:end])
                if need_weight:
                    grad_weight[done:lo].zero_()
                    torch.mm(dlogits.T, hidden[start:end], out=grad_weight[lo:hi])
                done = hi
        if need_weight:
            grad_weight[done:].zero_()
        return grad_hidden, grad_weight, None, None


class HsmHead(Head):
    name = "hsm"
    Options = HsmOptions
    supports_temperature = True

    def __init__(self, options: HsmOptions, hidden_size: int, vocab_size: int):
        super().__init__(options, hidden_size, vocab_size)
        self.n_clusters, shortlist = _checked_sizes(options, vocab_size)
        self.cluster_weight = nn.Parameter(torch.empty(self.n_clusters, hidden_size))
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))  # rows in cluster order
        # Small scores at init, as the softmax head has: both levels start near uniform, so the
        # first loss is ≈ ln C + ln |c(w)| (ln V with the default equal-size clusters).
        nn.init.normal_(self.cluster_weight, std=0.02)
        nn.init.normal_(self.weight, std=0.02)
        # The table is data, built on the CPU even when the head is built on the meta device (the
        # profiler counts a head's weights that way): the meta device cannot run its indexing.
        with torch.device("cpu"):
            for name, value in table_from_rows(*default_clusters(vocab_size, self.n_clusters, shortlist)).items():
                self.register_buffer(name, value)
            # Derived from the table; rebuilt after every change, not saved.
            for name in ("token_row", "row_token", "row_cluster"):
                self.register_buffer(name, torch.empty(0, dtype=torch.long), persistent=False)
            self._derive()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, n_clusters={self.n_clusters}, shortlist={self.options.shortlist}"

    # --- the cluster table ------------------------------------------------------------------------

    def prepare(self, token_counts: torch.Tensor | None) -> None:
        """Cluster the vocabulary from unigram counts of the training data (None keeps the
        default: contiguous id ranges). Changes buffers only, so it may run after ZeRO-3 init."""
        if token_counts is None:
            return
        counts = torch.as_tensor(token_counts)
        if counts.shape != (self.vocab_size,) or counts.dtype.is_complex or counts.dtype == torch.bool:
            raise ValueError(f"token_counts must be a [{self.vocab_size}] tensor of counts, got "
                             f"{counts.dtype} {list(counts.shape)}")
        counts = counts.detach().double().cpu()
        if not torch.isfinite(counts).all() or (counts < 0).any():
            raise ValueError("token_counts must be finite and non-negative")
        self._token_share = counts / counts.sum() if counts.sum() > 0 else None  # for train_flops
        table = table_from_rows(*frequency_clusters(counts, self.n_clusters, self.options.shortlist,
                                                    self.options.binning))
        for name, value in table.items():
            getattr(self, name).copy_(value)
        self._derive()

    def _derive(self) -> None:
        offsets = self.cluster_offsets
        sizes = offsets.diff()
        self.token_row = offsets[self.token_cluster] + self.token_position
        self.row_token = torch.empty_like(self.token_row)
        self.row_token[self.token_row] = torch.arange(self.vocab_size, device=offsets.device)
        self.row_cluster = torch.repeat_interleave(torch.arange(self.n_clusters, device=offsets.device), sizes)
        self._offsets = offsets.tolist()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        missing = [prefix + n for n in TABLE if prefix + n not in state_dict]
        if missing:
            raise UserError(
                f"the hsm head's cluster table ({', '.join(missing)}) is missing from the state being "
                "loaded: it was not saved by an hsm head. Resume or evaluate with the head it was "
                "trained with, or start a new run."
            )
        problem = table_problem({n: state_dict[prefix + n] for n in TABLE}, self.vocab_size, self.n_clusters)
        if problem:
            raise UserError(
                f"the hsm head's cluster table being loaded does not fit this head (vocab_size="
                f"{self.vocab_size}, n_clusters={self.n_clusters}): {problem}. Use the tokenizer and "
                "head options the checkpoint was trained with."
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._derive()

    # --- training ---------------------------------------------------------------------------------

    def train_flops(self, n_tokens: int) -> float:
        """6·N·D·(C + the mean size of the target's cluster): each token scores the C clusters and
        the tokens of its own cluster, forward and backward. The mean is over the training data's
        unigram distribution once `prepare` has seen it (frequent tokens sit in small clusters),
        over the vocabulary before."""
        sizes = self.cluster_offsets.diff().double().cpu()[self.token_cluster.cpu()]
        share = getattr(self, "_token_share", None)
        mean_size = float((share * sizes).sum()) if share is not None else float(sizes.mean())
        return 6.0 * n_tokens * self.hidden_size * (self.n_clusters + mean_size)

    def _group(self, clusters: torch.Tensor) -> tuple[torch.Tensor, list[Segment]]:
        """Order sorting tokens by cluster, and one segment per cluster present."""
        order = torch.argsort(clusters, stable=True)
        counts = torch.bincount(clusters, minlength=self.n_clusters).tolist()
        segments, start = [], 0
        for c, n in enumerate(counts):
            if n:
                segments.append((start, start + n, self._offsets[c], self._offsets[c + 1]))
                start += n
        return order, segments

    def _checked_targets(self, targets: torch.Tensor) -> torch.Tensor:
        bad = (targets >= self.vocab_size) | ((targets < 0) & (targets != IGNORE_INDEX))
        if bad.any():
            raise ValueError(f"targets must be token ids in [0, {self.vocab_size}) or {IGNORE_INDEX}, "
                             f"got {targets[bad][0].item()}")
        return targets.clamp(min=0)

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor) -> HeadOutput:
        check_head_inputs(hidden, targets, self.hidden_size)
        tokens = self._checked_targets(targets)
        keep = targets != IGNORE_INDEX
        clusters = self.token_cluster[tokens]
        top_logits = F.linear(hidden, self.cluster_weight).float()
        if self.temperature is not None:
            return self._dro_forward(hidden, top_logits, tokens, clusters, keep)
        cluster_nll = F.cross_entropy(top_logits, clusters.masked_fill(~keep, IGNORE_INDEX),
                                      ignore_index=IGNORE_INDEX, reduction="sum")
        kept = keep.nonzero().squeeze(1)
        order, segments = self._group(clusters[kept])
        kept = kept[order]
        within = _WithinClusterNLL.apply(hidden[kept], self.weight, self.token_position[tokens[kept]], segments)
        n_keep = max(kept.numel(), 1)
        within_nll = within.sum()
        metrics = {"cluster_nll": float(cluster_nll.detach()) / n_keep, "within_nll": float(within_nll.detach()) / n_keep}
        return HeadOutput(loss=(cluster_nll + within_nll) / n_keep, metrics=metrics)

    @property
    def temperature_features(self) -> int:
        return self.n_clusters

    def _dro_forward(self, hidden, top_logits, tokens, clusters, keep) -> HeadOutput:
        """τ·ℓ(h/τ) + τ·(ρ − log V), ℓ the two-level NLL: the tempered distribution is the hsm of
        h/τ (both levels' scores divided by τ), the network reads the cluster-level scores. The
        derivative in τ is ρ − (log V − H(clusters) − H(within the target's cluster)): the DRO
        signal with the entropy of the levels the token's loss touches."""
        tau = self.temperature(top_logits)
        cluster_nll = F.cross_entropy(top_logits / tau[:, None], clusters.masked_fill(~keep, IGNORE_INDEX),
                                      ignore_index=IGNORE_INDEX, reduction="none")
        kept = keep.nonzero().squeeze(1)
        order, segments = self._group(clusters[kept])
        kept = kept[order]
        scaled = hidden[kept] / tau[kept].to(hidden.dtype)[:, None]
        within = _WithinClusterNLL.apply(scaled, self.weight, self.token_position[tokens[kept]], segments)
        n_keep = max(kept.numel(), 1)
        loss = ((tau * cluster_nll).sum() + (tau[kept] * within).sum()) / n_keep
        loss = loss + dro_shift(tau, keep, self.temperature.rho, self.vocab_size)
        tempered = cluster_nll.detach().clone().index_add_(0, kept, within.detach().to(cluster_nll.dtype))
        return HeadOutput(loss=loss, metrics=tau_metrics(tau, keep, tempered))

    def predict_temperature(self, hidden: torch.Tensor) -> torch.Tensor:
        check_head_inputs(hidden, None, self.hidden_size)
        if self.temperature is None:
            return super().predict_temperature(hidden)
        return self.temperature.predict(F.linear(hidden, self.cluster_weight).float())

    # --- evaluation and generation ----------------------------------------------------------------

    @torch.no_grad()
    def token_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The target's cluster's rows only: O(N·(C + |c|)·D)."""
        check_head_inputs(hidden, targets, self.hidden_size)
        tokens = self._checked_targets(targets)
        clusters = self.token_cluster[tokens]
        top = torch.log_softmax(F.linear(hidden, self.cluster_weight).float(), dim=1)
        order, segments = self._group(clusters)
        within, _ = _within_forward(hidden[order], self.weight, self.token_position[tokens[order]], segments, False)
        out = top.gather(1, clusters[:, None]).squeeze(1)
        out[order] -= within
        return torch.where(targets != IGNORE_INDEX, out, 0.0)

    @torch.no_grad()
    def logprobs_and_topk(self, hidden, targets, k):
        """Top k needs every token's score; the targets' log-probabilities are read off the same
        block of scores."""
        check_head_inputs(hidden, targets, self.hidden_size)
        check_k(k, self.vocab_size)
        rows = self.token_row[self._checked_targets(targets)]
        logprobs, top = [], []
        for h, r in zip(self._row_blocks(hidden), rows.split(EVAL_BLOCK // self.vocab_size or 1)):
            lp = self._row_logprobs(h)
            top.append(self.row_token[lp.topk(k, dim=1).indices])
            logprobs.append(lp.gather(1, r[:, None]).squeeze(1))
        if not top:
            return hidden.new_zeros(0, dtype=torch.float32), hidden.new_zeros(0, k, dtype=torch.long)
        return torch.where(targets != IGNORE_INDEX, torch.cat(logprobs), 0.0), torch.cat(top)

    @torch.no_grad()
    def token_entropy(self, hidden: torch.Tensor) -> torch.Tensor:
        """H = H(cluster) + Σ_c p(c)·H(token | c), block of positions by block (no N × V)."""
        check_head_inputs(hidden, None, self.hidden_size)
        parts = []
        for h in self._row_blocks(hidden):
            top = F.linear(h, self.cluster_weight).float()
            within = self._cluster_entropies(F.linear(h, self.weight).float())
            p_top = torch.softmax(top, 1).double()
            parts.append((entropy_of_scores(top).double() + (p_top * within).sum(1)).float())
        return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)

    def _cluster_entropies(self, scores: torch.Tensor) -> torch.Tensor:
        """[n, C] float64 entropy of the softmax within each cluster, from [n, V] scores in row
        order (overwritten): segment sums over the clusters' columns, shifted by each cluster's max."""
        n, index = scores.shape[0], self.row_cluster.to(scores.device)
        peak = scores.new_full((n, self.n_clusters), -math.inf).scatter_reduce_(
            1, index.expand(n, -1), scores, "amax")
        x = scores.sub_(peak[:, index])
        e = x.exp()
        total = torch.zeros(n, self.n_clusters, dtype=torch.float64, device=scores.device).index_add_(1, index, e.double())
        expected = torch.zeros_like(total).index_add_(1, index, e.mul_(x).double())
        return total.log() - expected / total

    def _row_logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, V] float32 log-probabilities of every token, columns in weight-row order."""
        top = torch.log_softmax(F.linear(hidden, self.cluster_weight).float(), dim=1)
        scores = F.linear(hidden, self.weight).float()
        lse = torch.stack([scores[:, lo:hi].logsumexp(1) for lo, hi in zip(self._offsets, self._offsets[1:])], 1)
        return scores.add_((top - lse)[:, self.row_cluster])

    def _row_blocks(self, hidden: torch.Tensor):
        return hidden.split(EVAL_BLOCK // self.vocab_size or 1)

    @torch.no_grad()
    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, V] float32 log-probabilities of every token (token-id order); N × V memory."""
        check_head_inputs(hidden, None, self.hidden_size)
        out = hidden.new_empty(hidden.shape[0], self.vocab_size, dtype=torch.float32)
        for rows, h in zip(out.split(EVAL_BLOCK // self.vocab_size or 1), self._row_blocks(hidden)):
            rows[:, self.row_token] = self._row_logprobs(h)
        return out

    @torch.no_grad()
    def topk(self, hidden: torch.Tensor, k: int) -> torch.Tensor:
        check_head_inputs(hidden, None, self.hidden_size)
        check_k(k, self.vocab_size)
        parts = [self.row_token[self._row_logprobs(h).topk(k, dim=1).indices] for h in self._row_blocks(hidden)]
        return torch.cat(parts) if parts else hidden.new_zeros(0, k, dtype=torch.long)

    @torch.no_grad()
    def sample(self, hidden, temperature=1.0, generator=None):
        """Exact draws from p(w | h)^(1/T) / Z. At T = 1 the cluster is drawn first, then the
        token within it, touching only the drawn clusters' rows; other temperatures change the
        clusters' total masses, so they score the whole vocabulary. "auto" draws from the
        distribution the temperature network trained: the hsm of h/τ, one τ per token."""
        check_head_inputs(hidden, None, self.hidden_size)
        temperature = self.sampling_temperature(hidden, temperature)
        if isinstance(temperature, torch.Tensor):  # "auto": the tempered hsm the network trained, of h/τ
            hidden, temperature = hidden / temperature.to(hidden.dtype)[:, None], 1.0
        if temperature != 1.0:
            parts = [torch.multinomial(torch.softmax(self._row_logprobs(h) / temperature, 1), 1, generator=generator)
                     for h in self._row_blocks(hidden)]
            rows = torch.cat(parts).squeeze(1) if parts else hidden.new_zeros(0, dtype=torch.long)
            return self.row_token[rows]
        top = torch.softmax(F.linear(hidden, self.cluster_weight).float(), dim=1)
        clusters = torch.multinomial(top, 1, generator=generator).squeeze(1) if hidden.shape[0] else \
            hidden.new_zeros(0, dtype=torch.long)
        order, segments = self._group(clusters)
        rows = torch.empty_like(clusters)
        with _one_thread(hidden.device):
            for start, end, lo, hi in segments:
                idx = order[start:end]
                probs = torch.softmax((hidden[idx] @ self.weight[lo:hi].T).float(), dim=1)
                rows[idx] = torch.multinomial(probs, 1, generator=generator).squeeze(1) + lo
        return self.row_token[rows]

    @classmethod
    def transient_bytes(cls, options, n_tokens, hidden_size, vocab_size, dtype):
        # Cluster scores as the softmax head's logits (input dtype, fp32 copy, log-softmax, its
        # gradient); the within-cluster probabilities kept for backward, assuming targets spread
        # over clusters of the mean size; the sorted hidden states, their gradient and ∂hidden.
        n_clusters, _ = _checked_sizes(options, vocab_size)
        b = dtype_bytes(dtype)
        per_score = 3 * 4 if dtype == torch.float32 else 2 * b + 3 * 4
        mean_size = math.ceil(vocab_size / n_clusters)
        return n_tokens * (n_clusters * per_score + mean_size * 4 + 3 * hidden_size * b)


def _checked_sizes(options: HsmOptions, vocab_size: int) -> tuple[int, int]:
    """(n_clusters, shortlist) after checking they fit the vocabulary."""
    n_clusters = options.n_clusters or math.ceil(math.sqrt(vocab_size))
    shortlist = options.shortlist
    if n_clusters > vocab_size:
        raise ValueError(f"n_clusters={n_clusters} exceeds the vocabulary size {vocab_size}")
    if shortlist and n_clusters < 2:
        raise ValueError(f"shortlist={shortlist} needs n_clusters ≥ 2 (the shortlist is the first cluster)")
    if shortlist and vocab_size - shortlist < n_clusters - 1:
        raise ValueError(f"shortlist={shortlist} leaves fewer tokens than the other {n_clusters - 1} clusters; "
                         f"allowed: shortlist ≤ {vocab_size - n_clusters + 1}")
    return n_clusters, shortlist
