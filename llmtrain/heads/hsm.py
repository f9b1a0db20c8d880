"""Two-level hierarchical softmax (class-based factorization, Goodman 2001; Mikolov et al. 2011):

    log p(w | h) = log softmax(U·h)[c(w)] + log softmax(W_c(w)·h)[w's position in c(w)]

With C clusters a training token costs O((C + |c(w)|)·D) instead of O(V·D). The output weight W
is one [V, D] parameter whose rows are ordered by cluster, so each cluster's tokens are one
contiguous slice; training scores each token against its cluster's rows in a few batched
matmuls over fixed windows of W (see `_tiles`; forward and backward in a custom autograd Function
that writes the gradient of W into one dense tensor, never a per-window full-size gradient). The cluster table lives in
buffers and travels with the state dict; loading checks it against the vocabulary.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

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


# Within-cluster scores are batched over fixed windows of L weight rows: window w is rows
# [wL, wL + L) (one more, rows [V − L, V), owns the tail when L does not divide V). A token is
# paired with each window its cluster overlaps; the pairs of one window fill tiles of T slots.
# Every main window's first tile is one bmm against a view of the weight (no copy); the tiles
# that overflow it (windows with more than T pairs, and the tail window) gather their window's
# rows, which costs little because T is chosen so that few do. No Python loop over clusters, and
# one parallel region per bmm (a per-cluster GEMM each pays a thread synchronization).
WINDOW_MIN = 16


class _Tiles(NamedTuple):
    """Where each slot of the batched within-cluster scores comes from."""
    token: torch.Tensor   # [tiles, T] index of the slot's token (0 for padding)
    valid: torch.Tensor   # [tiles, T, L] the column's weight row is in the token's cluster (and owned by the window)
    start: torch.Tensor   # [tiles] first weight row of the tile's window
    target: torch.Tensor  # [n] flat index into [tiles, T, L] of each token's target score
    n_main: int           # tiles 0..n_main-1 are the main windows, in order (a view of the weight)


def _window_size(vocab_size: int, n_clusters: int) -> int:
    """The mean cluster size: a token pairs with one or two windows (one when the clusters are
    equal and aligned, as in the default table), and few rows are gathered per window."""
    return min(vocab_size, max(WINDOW_MIN, math.ceil(vocab_size / n_clusters)))


# What gathering one overflow tile's window costs, in slots of work (copying L·D weights, then
# reading them again, against L·D multiply-adds per slot on memory-bound skinny products).
GATHER_COST = 64


def _tile_size(counts: torch.Tensor, n_main: int) -> int:
    """Slots per tile minimizing the padded work of all tiles plus the gathering of the overflow."""
    most = max(int(counts.max()), 1)
    best, best_cost, t = 1, math.inf, 1
    while True:
        tiles = torch.div(counts + t - 1, t, rounding_mode="floor")
        gathered = ((tiles[:n_main] - 1).clamp(min=0).sum() + tiles[n_main:].sum()).item()
        cost = t * (n_main + gathered) + GATHER_COST * gathered
        if cost < best_cost:
            best, best_cost = t, cost
        if t >= most:
            return best
        t = min(most, max(t + 1, t * 5 // 4))


def _tiles(lo: torch.Tensor, hi: torch.Tensor, target_row: torch.Tensor, window: int, vocab_size: int) -> _Tiles:
    """The batched layout for tokens whose clusters are weight rows [lo, hi)."""
    dev, L = lo.device, window
    if lo.numel() == 0:
        empty = torch.zeros(0, 1, dtype=torch.long, device=dev)
        return _Tiles(empty, torch.zeros(0, 1, L, dtype=torch.bool, device=dev), empty[:, 0], empty[:, 0], 0)
    n_main = vocab_size // L
    n_windows = n_main + (vocab_size % L > 0)
    first, last = lo // L, (hi - 1) // L
    per_token = last - first + 1
    tok = torch.repeat_interleave(torch.arange(lo.numel(), device=dev), per_token)
    pair_start = per_token.cumsum(0) - per_token
    win = first[tok] + torch.arange(tok.numel(), device=dev) - pair_start[tok]
    order = torch.argsort(win, stable=True)
    tok, win = tok[order], win[order]
    counts = torch.bincount(win, minlength=n_windows)
    T = _tile_size(counts, n_main)
    rank = torch.arange(win.numel(), device=dev) - (counts.cumsum(0) - counts)[win]
    is_main = (torch.arange(n_windows, device=dev) < n_main).long()
    extra = (torch.div(counts + T - 1, T, rounding_mode="floor") - is_main).clamp(min=0)  # gathered tiles per window
    extra_base = n_main + extra.cumsum(0) - extra
    k = torch.div(rank, T, rounding_mode="floor")
    tile = torch.where((win < n_main) & (k == 0), win, extra_base[win] + k - is_main[win])
    n_tiles = n_main + int(extra.sum())
    starts = torch.arange(n_windows, device=dev) * L
    starts[n_main:] = vocab_size - L
    start = torch.cat([starts[:n_main], torch.repeat_interleave(starts, extra)])
    slot = tile * T + rank % T
    token = torch.zeros(n_tiles * T, dtype=torch.long, device=dev).index_copy_(0, slot, tok)
    own_lo = torch.arange(n_windows, device=dev) * L
    row_lo = torch.zeros(n_tiles * T, dtype=torch.long, device=dev).index_copy_(0, slot, torch.maximum(lo[tok], own_lo[win]))
    row_hi = torch.zeros_like(row_lo).index_copy_(0, slot, torch.minimum(hi[tok], own_lo[win] + L))
    slot_start = start.repeat_interleave(T)
    col = torch.arange(L, device=dev)
    valid = ((col >= (row_lo - slot_start)[:, None]) & (col < (row_hi - slot_start)[:, None])).view(n_tiles, T, L)
    # The target's pair is the one of the window that owns its row.
    target_win = torch.div(target_row, L, rounding_mode="floor")
    pair_of = torch.empty_like(order)
    pair_of[order] = torch.arange(order.numel(), device=dev)
    target_pair = pair_of[pair_start + target_win - first]
    target = slot[target_pair] * L + target_row - start[tile[target_pair]]
    return _Tiles(token.view(n_tiles, T), valid, start, target, n_main)


def _batched_mm(x: torch.Tensor, weight: torch.Tensor, tiles: _Tiles, transpose: bool) -> torch.Tensor:
    """x [tiles, T, ·] against each tile's window of weight rows: x·Wᵀ (scores) or x·W (∂hidden)."""
    L, m = tiles.valid.shape[2], tiles.n_main
    main = weight[: m * L].view(m, L, weight.shape[1])
    gathered = weight[tiles.start[m:, None] + torch.arange(L, device=weight.device)]
    if transpose:
        main, gathered = main.transpose(1, 2), gathered.transpose(1, 2)
    out = x.new_empty(x.shape[0], x.shape[1], main.shape[2])
    torch.bmm(x[:m], main, out=out[:m])
    torch.bmm(x[m:], gathered, out=out[m:])
    return out


def _within_scores(hidden, weight, tiles: _Tiles):
    """[n] log-sum-exp over each token's cluster, and the masked [tiles, T, L] float32 scores."""
    scores = _batched_mm(hidden[tiles.token], weight, tiles, transpose=True).float()
    scores.masked_fill_(~tiles.valid, -math.inf)
    token = tiles.token.view(-1)
    peak = scores.new_full((hidden.shape[0],), -math.inf).scatter_reduce_(0, token, scores.amax(2).view(-1), "amax")
    scores -= peak[tiles.token][..., None]
    total = torch.zeros_like(peak).index_add_(0, token, scores.exp().sum(2).view(-1))
    return total.log_(), scores  # both relative to peak


def _within_forward(hidden, weight, tiles: _Tiles, keep_probs: bool):
    """-log p(token | its cluster) [n] float32, and (when keep_probs) the within-cluster
    probabilities [tiles, T, L] for the backward pass (0 at padding and outside the cluster)."""
    lse, scores = _within_scores(hidden, weight, tiles)
    nll = lse - scores.view(-1)[tiles.target]
    if not keep_probs:
        return nll, None
    return nll, scores.sub_(lse[tiles.token][..., None]).exp_()


class _WithinClusterNLL(torch.autograd.Function):
    """Per-token within-cluster NLL; backward writes ∂W of the main windows straight into one
    dense tensor and adds the gathered tiles' rows to it."""

    @staticmethod
    def forward(ctx, hidden, weight, tiles):
        nll, probs = _within_forward(hidden, weight, tiles, keep_probs=True)
        ctx.save_for_backward(hidden, weight, probs)
        ctx.tiles = tiles
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        hidden, weight, probs = ctx.saved_tensors
        tiles = ctx.tiles
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        g = grad_nll.float()
        dscores = probs * g[tiles.token][..., None]
        dscores.view(-1).index_add_(0, tiles.target, -g)
        dscores = dscores.to(weight.dtype)
        grad_hidden = grad_weight = None
        if need_hidden:  # a token's slots summed in fp32
            per_slot = _batched_mm(dscores, weight, tiles, transpose=False).float()
            grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device).index_add_(
                0, tiles.token.view(-1), per_slot.flatten(0, 1)).to(hidden.dtype)
            del per_slot  # before the slots' hidden states are gathered again
        if need_weight:
            L, m = tiles.valid.shape[2], tiles.n_main
            slots = hidden[tiles.token]
            grad_weight = torch.empty_like(weight)
            torch.bmm(dscores[:m].transpose(1, 2), slots[:m], out=grad_weight[: m * L].view(m, L, weight.shape[1]))
            grad_weight[m * L:].zero_()
            rows = (tiles.start[m:, None] + torch.arange(L, device=weight.device)).view(-1)
            grad_weight.index_add_(0, rows, torch.bmm(dscores[m:].transpose(1, 2), slots[m:]).flatten(0, 1))
        return grad_hidden, grad_weight, None


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
        self._window = _window_size(self.vocab_size, self.n_clusters)

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

    def _layout(self, clusters: torch.Tensor, target_rows: torch.Tensor) -> _Tiles:
        """The batched layout of tokens in these clusters, with these target weight rows."""
        offsets = self.cluster_offsets
        return _tiles(offsets[clusters], offsets[clusters + 1], target_rows, self._window, self.vocab_size)

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
        within = _WithinClusterNLL.apply(hidden[kept], self.weight,
                                         self._layout(clusters[kept], self.token_row[tokens[kept]]))
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
        scaled = hidden[kept] / tau[kept].to(hidden.dtype)[:, None]
        within = _WithinClusterNLL.apply(scaled, self.weight, self._layout(clusters[kept], self.token_row[tokens[kept]]))
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
        within, _ = _within_forward(hidden, self.weight, self._layout(clusters, self.token_row[tokens]), False)
        out = top.gather(1, clusters[:, None]).squeeze(1) - within
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
        lo = self.cluster_offsets[clusters]
        tiles = self._layout(clusters, lo)
        lse, scores = _within_scores(hidden, self.weight, tiles)
        # Each token's within-cluster probabilities as one dense row of its cluster's size.
        tile, slot, col = tiles.valid.nonzero(as_tuple=True)
        token = tiles.token[tile, slot]
        width = int((self.cluster_offsets[clusters + 1] - lo).max()) if clusters.numel() else 1
        probs = scores.new_zeros(clusters.numel(), width)
        probs[token, tiles.start[tile] + col - lo[token]] = (scores[tile, slot, col] - lse[token]).exp()
        rows = torch.multinomial(probs, 1, generator=generator).squeeze(1) + lo if clusters.numel() else clusters
        return self.row_token[rows]

    @classmethod
    def transient_bytes(cls, options, n_tokens, hidden_size, vocab_size, dtype):
        # Cluster scores as the softmax head's logits (input dtype, fp32 copy, log-softmax, its
        # gradient); the kept hidden states, their gradient (accumulated in fp32) and ∂hidden;
        # per slot of the batched layout its hidden state or its ∂hidden (fp32 copies below fp32);
        # per score cell the kept probabilities, their gradient and the mask. The slots assume
        # targets spread over the vocabulary: a window's pairs are a Poisson count, padded to 3σ.
        n_clusters, _ = _checked_sizes(options, vocab_size)
        b = dtype_bytes(dtype)
        wide = 0 if dtype == torch.float32 else 4
        per_score = 3 * 4 if dtype == torch.float32 else 2 * b + 3 * 4
        window = _window_size(vocab_size, n_clusters)
        n_windows = math.ceil(vocab_size / window)
        # The default table's clusters of the window's size start on a window (one pair per
        # token); the others, and all after a shortlist, straddle two windows.
        aligned = 0.0 if options.shortlist else (vocab_size % n_clusters or n_clusters) / n_clusters
        per_window = n_tokens * (2 - aligned) / n_windows
        slots = n_windows * (math.ceil(per_window + 2 * math.sqrt(per_window)) + 1)
        return (n_tokens * (n_clusters * per_score + hidden_size * (b + 4 + wide))
                + slots * hidden_size * (b + wide) + slots * window * (9 + (2 if wide else 0)))


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
