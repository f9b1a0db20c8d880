"""Two-level hierarchical softmax (class-based factorization, Goodman 2001; Mikolov et al. 2011):

    log p(w | h) = log softmax(U·h)[c(w)] + log softmax(W_c(w)·h)[w's position in c(w)]

With C clusters a training token costs O((C + |c(w)|)·D) instead of O(V·D). The output weight W
is one [V, D] parameter whose rows are ordered by cluster, so each cluster's tokens are one
contiguous slice; training sorts the tokens by their target's cluster and scores each against its
cluster's rows as one flat vector of (token, row) pairs, whatever the clusters' sizes (forward and
backward in a custom autograd Function, each pass a few whole-batch calls; see `_Pairs`). The
cluster table lives in buffers and travels with the state dict; loading checks it against the
vocabulary.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.flop_counter import register_flop_formula

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


# The within-cluster scores of a batch are block-diagonal: token i against every row of its cluster,
# and nothing else. They are kept as one flat vector of (token, row) pairs, token-major (a CSR
# layout: token i's pairs are starts[i]:starts[i + 1]), so that every pass is one call whatever the
# cluster sizes and counts: the scores one sampled matrix product (SDDMM), each token's
# log-sum-exp a segment reduction, ∂h and ∂W weighted sums of rows (embedding_bag), ∂W over the
# same pairs row-major. No Python loop over clusters, and no thread count changed per call.
# Scores the sampled product cannot give (bf16, fp16, under a dispatch mode) come from gathered
# rows, this many elements of each gathered operand at a time.
GATHER_BLOCK = 1 << 18
# Memory model terms (bytes): per pair (the pair indices and probabilities kept for backward, the
# row-major indices it builds; 26–33 measured), per weight row (row-major offsets).
PAIR_BYTES = 30
ROW_BYTES = 24


class _Pairs(NamedTuple):
    """The (token, weight row) pairs of tokens sorted by cluster, token-major."""
    starts: torch.Tensor  # [n + 1] token i's pairs are starts[i]:starts[i + 1]
    token: torch.Tensor   # [P] the pair's token
    row: torch.Tensor     # [P] the pair's weight row
    target: torch.Tensor  # [n] each token's target pair
    first: torch.Tensor   # [C + 1] cluster c's tokens are first[c]:first[c + 1]


def _pairs(clusters: torch.Tensor, positions: torch.Tensor, offsets: torch.Tensor) -> _Pairs:
    """Pairs of tokens whose clusters (sorted ascending) and target positions are given. Rows and
    offsets into the pairs are int32 where they fit (half the index traffic); `token` indexes
    scatter reductions, which take int64."""
    dev, sizes = clusters.device, offsets.diff()[clusters]
    starts = F.pad(sizes.cumsum(0), (1, 0))
    n_pairs = int(starts[-1])
    index = torch.int32 if max(n_pairs, offsets.numel()) < 2**31 else torch.int64
    token = torch.repeat_interleave(torch.arange(clusters.numel(), device=dev), sizes, output_size=n_pairs)
    row = torch.arange(n_pairs, dtype=index, device=dev).add_((offsets[clusters] - starts[:-1]).to(index).index_select(0, token))
    counts = torch.bincount(clusters, minlength=offsets.numel() - 1)
    return _Pairs(starts.to(index), token, row, starts[:-1] + positions, F.pad(counts.cumsum(0), (1, 0)))


def _row_major(pairs: _Pairs, offsets: torch.Tensor, row_cluster: torch.Tensor):
    """(row_starts [V + 1], token [P], order [P]): row r's pairs, in row-major order, are entries
    row_starts[r]:row_starts[r + 1] (its cluster's tokens in turn, none for a cluster absent from
    the batch); token gives each entry's token and order its token-major pair. Each cluster's
    pairs are one n × S block spanning the same entries in both orders, transposed."""
    first, dev, index = pairs.first, row_cluster.device, pairs.row.dtype
    n, size = first.diff(), offsets.diff()
    row_starts = F.pad(n.index_select(0, row_cluster).cumsum(0), (1, 0)).to(index)
    block = n * size
    cluster = torch.repeat_interleave(torch.arange(n.numel(), device=dev), block, output_size=pairs.row.numel())

    def at(per_cluster):  # each entry's value of a per-cluster quantity
        return per_cluster.to(index).index_select(0, cluster)

    e = torch.arange(pairs.row.numel(), dtype=index, device=dev).sub_(at(block.cumsum(0) - block))  # within its block
    n_of = at(n)
    k = e.div(n_of, rounding_mode="floor")  # the entry's row within its cluster
    token = e.sub_(k * n_of).add_(at(first[:-1]))  # its token
    order = k.add_(pairs.starts.index_select(0, token))
    return row_starts, token, order


def _pair_scores(hidden: torch.Tensor, weight: torch.Tensor, pairs: _Pairs) -> torch.Tensor:
    """[P] float32 score of every pair: hidden[token] · weight[row]. The sampled product (fp32,
    fp64) takes a sparse CSR pattern, which Python dispatch modes cannot hold (MemTracker in
    `llmtrain profile`) or count (FlopCounterMode): under one, and for bf16 and fp16, the same
    products run as batched matmuls of gathered rows, a block of pairs at a time."""
    if hidden.dtype in (torch.float32, torch.float64) and _get_current_dispatch_mode() is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            pattern = torch.sparse_csr_tensor(pairs.starts, pairs.row, hidden.new_zeros(pairs.row.numel()),
                                              (hidden.shape[0], weight.shape[0]), check_invariants=False)
            return torch.sparse.sampled_addmm(pattern, hidden, weight.T, beta=0.0).values().float()
    step = max(1, GATHER_BLOCK // hidden.shape[1])
    return torch.cat([torch.bmm(hidden.index_select(0, t).float()[:, None], weight.index_select(0, r).float()[:, :, None])
                      .view(-1) for t, r in zip(pairs.token.split(step), pairs.row.split(step))])


@register_flop_formula([torch.ops.aten._embedding_bag, torch.ops.aten._embedding_bag_forward_only])
def _weighted_bag_flops(weight_shape, indices_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of embedding_bag, for torch's counter (it has none): a multiply-add per element of
    each row summed, as ∂h and ∂W here are products written as weighted sums of rows."""
    return 2 * indices_shape[0] * weight_shape[1]


def _within_forward(hidden, weight, pairs: _Pairs, keep_probs: bool):
    """-log p(token | its cluster) [n] float32 for hidden states sorted by cluster, and (when
    keep_probs) every pair's within-cluster probability [P] for the backward pass."""
    scores = _pair_scores(hidden, weight, pairs)
    n = hidden.shape[0]
    peak = scores.new_full((n,), -math.inf).scatter_reduce_(0, pairs.token, scores, "amax")
    shifted = scores.sub_(peak.index_select(0, pairs.token))
    lse = torch.zeros_like(peak).index_add_(0, pairs.token, shifted.exp()).log_()
    nll = lse - shifted[pairs.target]
    return nll, (shifted.sub_(lse.index_select(0, pairs.token)).exp_() if keep_probs else None)


class _WithinClusterNLL(torch.autograd.Function):
    """Per-token within-cluster NLL; backward gives ∂h and the dense ∂W as weighted sums of rows."""

    @staticmethod
    def forward(ctx, hidden, weight, pairs, table):
        nll, probs = _within_forward(hidden, weight, pairs, keep_probs=True)
        ctx.save_for_backward(hidden, weight, probs)
        ctx.pairs, ctx.table = pairs, table
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        hidden, weight, probs = ctx.saved_tensors
        pairs = ctx.pairs
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        g = grad_nll.float()
        dscores = probs.mul_(g.index_select(0, pairs.token)).index_add_(0, pairs.target, -g)  # probs are not needed again
        grad_hidden = grad_weight = None
        if need_hidden:  # ∂h_i = Σ over i's pairs of dscore · W[row]
            grad_hidden = F.embedding_bag(pairs.row, weight, pairs.starts, mode="sum", include_last_offset=True,
                                          per_sample_weights=dscores.to(weight.dtype)).to(hidden.dtype)
        if need_weight:  # ∂W_r = Σ over r's pairs of dscore · h[token]; zero for rows no token reached
            row_starts, token, order = _row_major(pairs, *ctx.table)
            grad_weight = F.embedding_bag(token, hidden, row_starts, mode="sum", include_last_offset=True,
                                          per_sample_weights=dscores.index_select(0, order).to(hidden.dtype)).to(weight.dtype)
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

    def _group(self, clusters: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, _Pairs]:
        """Order sorting tokens by cluster, and their (token, row) pairs in that order."""
        order = torch.argsort(clusters, stable=True)
        return order, _pairs(clusters[order], positions[order], self.cluster_offsets)

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
        order, pairs = self._group(clusters[kept], self.token_position[tokens[kept]])
        kept = kept[order]
        within = _WithinClusterNLL.apply(hidden[kept], self.weight, pairs, (self.cluster_offsets, self.row_cluster))
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
        order, pairs = self._group(clusters[kept], self.token_position[tokens[kept]])
        kept = kept[order]
        scaled = hidden[kept] / tau[kept].to(hidden.dtype)[:, None]
        within = _WithinClusterNLL.apply(scaled, self.weight, pairs, (self.cluster_offsets, self.row_cluster))
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
        order, pairs = self._group(clusters, self.token_position[tokens])
        within, _ = _within_forward(hidden[order], self.weight, pairs, keep_probs=False)
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
        order, pairs = self._group(clusters, torch.zeros_like(clusters))
        # Gumbel-max within each drawn cluster: the pair of largest score + Gumbel noise.
        noise = torch.rand(pairs.row.numel(), generator=generator, device=hidden.device)
        key = _pair_scores(hidden[order], self.weight, pairs).sub_(noise.log_().neg_().log_())
        best = key.new_full(clusters.shape, -math.inf).scatter_reduce_(0, pairs.token, key, "amax")
        hit = (key == best[pairs.token]).nonzero().squeeze(1)
        drawn = torch.full_like(clusters, pairs.row.numel()).scatter_reduce_(0, pairs.token[hit], hit, "amin")
        rows = torch.empty_like(clusters)
        rows[order] = pairs.row[drawn].long()
        return self.row_token[rows]

    @classmethod
    def transient_bytes(cls, options, n_tokens, hidden_size, vocab_size, dtype):
        # Two phases peak apart. The within-cluster backward: the cluster level's saved
        # log-softmax, the sorted hidden states and their gradient, the per-pair buffers
        # (probabilities, indices and the row-major order ∂W builds) and its per-row offsets. Then,
        # with those freed, the cluster level's backward: its scores as the softmax head's logits
        # (input dtype, fp32 copy, log-softmax, gradient) and three hidden-sized gradients.
        n_clusters, _ = _checked_sizes(options, vocab_size)
        b = dtype_bytes(dtype)
        pairs = n_tokens * _mean_target_cluster(options, vocab_size, n_clusters)
        within = n_tokens * (n_clusters * 4 + 2 * hidden_size * b) + pairs * PAIR_BYTES + vocab_size * ROW_BYTES
        per_score = 3 * 4 if dtype == torch.float32 else 2 * b + 3 * 4
        outer = n_tokens * (n_clusters * per_score + 3 * hidden_size * b)
        return int(max(within, outer))


def _mean_target_cluster(options: HsmOptions, vocab_size: int, n_clusters: int) -> float:
    """The mean size of a target's cluster on natural text (Zipf-distributed tokens, rank r with
    share ∝ 1/r) under the frequency clusters training builds: V/C with unigram binning (each
    cluster an equal share of the targets); with √ binning cluster k holds ~2k·V/C² tokens and
    ~2/(k·ln V) of the targets, ~4·V/(C·ln V) in all (a third of V/C at V = 262,144)."""
    mean_size = vocab_size / n_clusters
    if options.binning == "unigram":
        return mean_size
    return mean_size * min(1.0, 4 / math.log(max(vocab_size, 2)))


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
