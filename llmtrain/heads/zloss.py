"""Spherical Z-loss (de Brébisson & Vincent, 2016): a head trained without tokens × vocab scores.

For scores o = W·h over the vocabulary, μ = mean(o), σ² = mean(o²) − μ², z_c = (o_c − μ)/σ for the
target c, and loss = softplus(a·(b − z_c))/a. The loss sees o_c, Σo and Σo² only, and with m the
mean row of W and Q = (W − 1mᵀ)ᵀ(W − 1mᵀ) (D × D): μ = h·m, o_c − μ = h·(w_c − m), σ² = hᵀQh/V.
So training costs O(V·D² + N·D²) and never forms an N × V tensor. Centring W before the Gram
matrix keeps σ² free of the cancellation mean(o²) − μ² suffers when the scores share a large mean.

The loss is unchanged by shifting or scaling the scores, so the head is not a probability model:
eval reports top-k accuracy; `calibrated_token_logprobs` gives log softmax(β·z) with β fitted on
held-out data, clearly a calibrated stand-in for log-probabilities.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from llmtrain.heads.base import IGNORE_INDEX, Head, HeadOptions, HeadOutput, check_head_inputs, check_k, dtype_bytes

# Rows of W per pass when accumulating Q and writing ∇W; bounds the fp32 working copy at
# VOCAB_CHUNK × D. Eval chunks scores at EVAL_CHUNK tokens × VOCAB_CHUNK vocabulary.
VOCAB_CHUNK = 8192
EVAL_CHUNK = 1024

# The σ guard, for degenerate scores only: σ² is raised to at least VAR_REL_FLOOR·(σ² + ‖h‖²‖m‖²)
# + VAR_ABS_FLOOR (m the mean row), and while it is active σ is held constant (the gradient flows
# through o_c − μ only). Centring W before the Gram matrix keeps σ² accurate however large the
# common mean row is: with the floor at 1e-12 it triggers only where the rows' spread is below
# 1e-6 of their mean, beyond what fp32 rows can represent (their rounding, 6e-8·|m|, is then a
# tenth of the spread), so it changes no gradient in a reachable regime. (At 1e-6 it froze σ's
# gradient once the mean row was ~1000/√D times the spread: ∇W off by 12% at D = 512, 50×.)
# The absolute floor covers all-zero scores. The guard scales with h and W: the loss stays scale
# invariant.
VAR_REL_FLOOR = 1e-12
VAR_ABS_FLOOR = 1e-12
# fit_calibration's bracket: β beyond this is an argmax in all but name (targets always ranked first).
BETA_MAX = 1e4

REDUCTIONS = ("mean", "sum", "none")


class NotADistributionError(RuntimeError):
    """Asked a head that is not a probability model for probabilities."""


# ---------------------------------------------------------------------------------------------
# The loss function


def centered_gram(weight: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, Q) in fp32 over the first ``vocab_size`` rows: m the mean row [D], Q = Σ_k (w_k − m)(w_k − m)ᵀ [D, D]."""
    rows = weight[:vocab_size]
    mean = torch.zeros(weight.shape[1], dtype=torch.float32, device=weight.device)
    for chunk in rows.split(VOCAB_CHUNK):
        mean += chunk.sum(0, dtype=torch.float32)
    mean /= vocab_size
    # The rounded mean leaves each centred row off by the same small vector; one more pass adds
    # back the centred rows' own mean, so that they sum to zero to second order (equal rows then
    # centre to exact zeros, and σ = 0 is seen as such).
    centred = _chunk_buffer(weight, vocab_size)
    residual = torch.zeros_like(mean)
    for chunk in rows.split(VOCAB_CHUNK):
        residual += torch.sub(chunk, mean, out=centred[:chunk.shape[0]]).sum(0)
    mean += residual / vocab_size
    gram = torch.zeros(weight.shape[1], weight.shape[1], dtype=torch.float32, device=weight.device)
    for chunk in rows.split(VOCAB_CHUNK):
        block = torch.sub(chunk, mean, out=centred[:chunk.shape[0]])
        gram.addmm_(block.T, block)
    return mean, gram


def _centred_target_rows(weight: torch.Tensor, targets: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """[N, D] fp32 rows w_t − m."""
    return weight.index_select(0, targets).float().sub_(mean)


def _chunk_buffer(weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """One fp32 VOCAB_CHUNK × D block reused by every chunk (fresh blocks cost page faults)."""
    return torch.empty(min(VOCAB_CHUNK, vocab_size), weight.shape[1], dtype=torch.float32, device=weight.device)


def token_standardization(hidden: torch.Tensor, mean: torch.Tensor, gram: torch.Tensor, vocab_size: int):
    """Per token (μ, σ, guarded) in fp32 from the centred statistics; ``hidden`` is fp32 [N, D].
    σ is guarded away from 0 (see VAR_REL_FLOOR); ``guarded`` marks the tokens where it was."""
    mu = hidden @ mean
    var = (hidden @ gram).mul_(hidden).sum(1) / vocab_size
    floor = VAR_REL_FLOOR * (var.clamp_min(0) + hidden.norm(dim=1).square() * mean.square().sum()) + VAR_ABS_FLOOR
    return mu, torch.maximum(var, floor).sqrt(), var < floor


class _SphericalZLoss(torch.autograd.Function):
    """Returns (loss, z): z [N] are the targets' standardized scores, without gradient (metrics)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, a, b, ignore_index, reduction, vocab_size, statistics):
        keep = targets != ignore_index
        safe_targets = torch.where(keep, targets, torch.zeros_like(targets))
        mean, gram = centered_gram(weight, vocab_size) if statistics is None else statistics
        h = hidden.float()
        mu, sigma, guarded = token_standardization(h, mean, gram, vocab_size)
        z = _centred_target_rows(weight, safe_targets, mean).mul_(h).sum(1) / sigma
        x = a * (b - z)
        token_loss = torch.where(keep, F.softplus(x) / a, 0.0)
        dloss_dz = torch.where(keep, -torch.sigmoid(x), 0.0)
        n_keep = int(keep.sum())
        if reduction == "mean":
            loss = token_loss.sum() / max(n_keep, 1)
        elif reduction == "sum":
            loss = token_loss.sum()
        else:
            loss = token_loss
        ctx.reduction, ctx.scale, ctx.vocab_size = reduction, 1.0 / max(n_keep, 1) if reduction == "mean" else 1.0, vocab_size
        ctx.save_for_backward(hidden, weight, safe_targets, keep, mean, gram, sigma, z, dloss_dz, guarded)
        target_z = torch.where(keep, z, 0.0)
        ctx.mark_non_differentiable(target_z)
        return loss, target_z

    @staticmethod
    def backward(ctx, grad_loss, grad_z_unused):
        hidden, weight, targets, keep, mean, gram, sigma, z, dloss_dz, guarded = ctx.saved_tensors
        V = ctx.vocab_size
        g = dloss_dz * (grad_loss.float() if ctx.reduction == "none" else grad_loss.float() * ctx.scale)
        # z = d/σ with d = o_c − μ and σ² = q/V, q = hᵀQh: ∂z/∂d = 1/σ, ∂z/∂q = −z/(2Vσ²).
        alpha = g / sigma
        beta = torch.where(guarded, 0.0, -g * z / (2 * V * sigma * sigma))
        h = hidden.float()
        grad_hidden = grad_weight = None
        # ∇W first, ∇h second, in-place where possible: at most three N × D fp32 blocks live at once.
        if ctx.needs_input_grad[1]:
            # ∂L/∂W = (I − 11ᵀ/V)·[scatter_c(α h) + 2(W − 1mᵀ)M] with M = Σ β h hᵀ; the centred term
            # already has zero column sums, so only the scatter loses its mean Σ α h / V.
            twice_m = 2 * (h.T * beta) @ h
            neg_scatter_mean = -(alpha @ h) / V
            grad_weight = torch.zeros_like(weight) if V < weight.shape[0] else torch.empty_like(weight)
            centred = _chunk_buffer(weight, V)
            out32 = None if weight.dtype == torch.float32 else torch.empty_like(centred)
            for start in range(0, V, VOCAB_CHUNK):
                stop = min(start + VOCAB_CHUNK, V)
                block = torch.sub(weight[start:stop], mean, out=centred[:stop - start])
                dense = grad_weight[start:stop] if out32 is None else out32[:stop - start]
                torch.addmm(neg_scatter_mean, block, twice_m, out=dense)
                if out32 is not None:
                    grad_weight[start:stop] = dense
            del centred, out32, block, dense
            # The target rows' term, duplicates summed in fp32 first: one index_add_ over all tokens
            # (many small ones stall under thread contention on CPU).
            rows, slot = torch.unique(targets[keep], return_inverse=True)
            summed = torch.zeros(rows.shape[0], h.shape[1], device=h.device)
            summed.index_add_(0, slot, h[keep].mul_(alpha[keep, None]))
            summed += grad_weight[rows]
            grad_weight[rows] = summed.to(weight.dtype)
            del summed
        if ctx.needs_input_grad[0]:
            grad_hidden = (h @ gram).mul_((2 * beta)[:, None])
            grad_hidden += _centred_target_rows(weight, targets, mean).mul_(alpha[:, None])
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def _check_loss_args(hidden, weight, targets, a, b, ignore_index, reduction, vocab_size) -> int:
    if not (isinstance(a, (int, float)) and math.isfinite(a) and a > 0):
        raise ValueError(f"a must be a finite number > 0 (the softplus sharpness), got {a!r}")
    if not (isinstance(b, (int, float)) and math.isfinite(b)):
        raise ValueError(f"b must be a finite number (the target margin in standard deviations), got {b!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, D], got {list(weight.shape)}")
    if hidden.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [N, {weight.shape[1]}], got {list(hidden.shape)}")
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        raise ValueError(f"hidden and weight must be floating point, got {hidden.dtype} and {weight.dtype}")
    if targets.dim() != 1 or targets.shape[0] != hidden.shape[0] or targets.is_floating_point():
        raise ValueError(f"targets must be integer [{hidden.shape[0]}], got {targets.dtype} {list(targets.shape)}")
    rows = weight.shape[0]
    vocab = rows if vocab_size is None else vocab_size
    if not 2 <= vocab <= rows:
        raise ValueError(f"vocab_size must be between 2 and weight's {rows} rows, got {vocab}")
    real = targets[targets != ignore_index]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= vocab):
        raise ValueError(f"targets must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
                         f"got values in [{int(real.min())}, {int(real.max())}]")
    return vocab


def spherical_z_loss_with_z(hidden, weight, targets, *, a, b, ignore_index=IGNORE_INDEX, reduction="mean",
                            vocab_size=None, statistics=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`spherical_z_loss` and the targets' standardized scores z [N] (0 where ignored; no gradient).
    ``statistics``: ``centered_gram(weight, vocab_size)`` when the caller has it already."""
    vocab = _check_loss_args(hidden, weight, targets, a, b, ignore_index, reduction, vocab_size)
    return _SphericalZLoss.apply(hidden, weight, targets.long(), float(a), float(b), ignore_index, reduction, vocab,
                                 statistics)


def spherical_z_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, a: float, b: float,
                     ignore_index: int = IGNORE_INDEX, reduction: str = "mean",
                     vocab_size: int | None = None) -> torch.Tensor:
    """Spherical Z-loss of scores ``hidden @ weight.T``: softplus(a·(b − z_target))/a per token.

    hidden [N, D], weight [V_rows, D] (any float dtype; Q and every sum are accumulated in fp32),
    targets [N] int with ``ignore_index`` for tokens that do not count. ``reduction``: "mean" over
    non-ignored tokens (0 when there are none), "sum", or "none" ([N], 0 at ignored tokens).
    ``vocab_size`` < V_rows marks the trailing rows as padding: they are left out of μ and σ and
    get zero gradient. Exact gradients for hidden and weight; no N × V tensor; σ is guarded away
    from 0 (see VAR_REL_FLOOR). The loss is float32.
    """
    return spherical_z_loss_with_z(hidden, weight, targets, a=a, b=b, ignore_index=ignore_index,
                                   reduction=reduction, vocab_size=vocab_size)[0]


# ---------------------------------------------------------------------------------------------
# The head


class ZLossOptions(HeadOptions):
    # Defaults from a sweep on recipes/tiny.yaml (vocabulary 32,768; BENCHMARKS.md, "The zloss head's
    # a and b"): a = 1, b = 30 had the best top-1 and top-5 of the four settings tried.
    a: float = Field(1.0, gt=0, description="softplus sharpness of the Z-loss: softplus(a·(b − z))/a")
    b: float = Field(30.0, description="target margin: the loss stays active until the target's score "
                                       "is b standard deviations above the mean score (at most √(V−1))")


class ZLossHead(Head):
    """Spherical Z-loss head. Not a distribution: eval reports top-k accuracy; `fit_calibration`
    and `calibrated_token_logprobs` give a labelled calibrated stand-in for log-probabilities."""

    name = "zloss"
    Options = ZLossOptions
    is_distribution = False
    supports_tying = True
    scale_invariant = True

    def __init__(self, options: ZLossOptions, hidden_size: int, vocab_size: int):
        super().__init__(options, hidden_size, vocab_size)
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(hidden_size))
        # (key, (m, Q)): the centred Gram of the weight as it is now; see _statistics.
        self._gram_cache: tuple | None = None
        # β of the calibrated distribution softmax(β·z); a buffer so checkpoints keep it.
        self.register_buffer("calibration_beta", torch.tensor(1.0))
        self.register_buffer("calibrated", torch.tensor(False))

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor) -> HeadOutput:
        check_head_inputs(hidden, targets, self.hidden_size)
        loss, z = spherical_z_loss_with_z(hidden, self.weight, targets, a=self.options.a, b=self.options.b,
                                          vocab_size=self.vocab_size, statistics=self._statistics())
        n_keep = max(int((targets != IGNORE_INDEX).sum()), 1)
        return HeadOutput(loss=loss, metrics={"z_target_mean": float(z.sum()) / n_keep})

    def train_flops(self, n_tokens: int) -> float:
        """4·V·D² for the Gram matrix and its share of ∇W (= 2(W − 1mᵀ)·M), plus per token 6·D²
        (hᵀQh, M's Σ β h hᵀ, ∇h's Q·h) and O(D) for the target rows: no N×V×D product. (The Gram
        is computed once per optimizer step; counted here once per micro-batch.)"""
        v, d = self.vocab_size, self.hidden_size
        return 4.0 * v * d * d + n_tokens * (6.0 * d * d + 8.0 * d)

    def _statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(m, Q) of the weight, computed once per weight state (its V·D² work is the head's
        largest): micro-steps of one accumulation, evaluation and every sampling call between two
        optimizer steps share it. The key is a fingerprint of the values, Σw and ‖w‖ of each chunk
        of rows (2·V·D reads, 2/D of the Gram's work), not autograd's version counter: DeepSpeed writes
        updated weights through ``.data``, which the counter does not see, and ZeRO-3 gathers a
        new tensor for every forward. An update leaving both unchanged to the last bit would
        have to be built for it; row permutations leave (m, Q) unchanged anyway."""
        w = self.weight
        with torch.no_grad():
            # per VOCAB_CHUNK rows in the weight's dtype: a float64 reduction of the whole weight
            # would first copy it to float64 (V·D·8 bytes)
            fingerprint = [(float(c.sum()), float(torch.linalg.vector_norm(c))) for c in w.split(VOCAB_CHUNK)]
            key = (tuple(fingerprint), tuple(w.shape), w.dtype, w.device)
            if self._gram_cache is None or self._gram_cache[0] != key:
                self._gram_cache = (key, centered_gram(w, self.vocab_size))
        return self._gram_cache[1]

    def token_entropy(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotADistributionError(
            "the zloss head is not a probability model, so its scores have no entropy; the calibrated "
            "softmax(β·z) of calibrated_token_logprobs is a stand-in, not the model's distribution")

    @torch.no_grad()
    def logprobs_and_topk(self, hidden, targets, k):
        return None, self.topk(hidden, k)

    def token_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotADistributionError(
            "the zloss head is not a probability model: its loss is unchanged by shifting or scaling the "
            "scores, so they define no normalized distribution and no perplexity. Use top-k accuracy, or "
            "fit_calibration() on validation data and then calibrated_token_logprobs(), reported as calibrated.")

    # -------------------------------------------------------------- standardized scores, chunked

    def _z_chunks(self, hidden: torch.Tensor):
        """Yields (token slice, vocab start, z [n, v]) for fp32 standardized scores, chunk by chunk."""
        mean, gram = self._statistics()
        for t0 in range(0, hidden.shape[0], EVAL_CHUNK):
            h = hidden[t0:t0 + EVAL_CHUNK].float()
            mu, sigma, _ = token_standardization(h, mean, gram, self.vocab_size)
            for v0 in range(0, self.vocab_size, VOCAB_CHUNK):
                w = self.weight[v0:min(v0 + VOCAB_CHUNK, self.vocab_size)].float()
                yield slice(t0, t0 + h.shape[0]), v0, (h @ w.T - mu[:, None]) / sigma[:, None]

    @torch.no_grad()
    def topk(self, hidden: torch.Tensor, k: int) -> torch.Tensor:
        """Exact top-k of the fp32 scores (their order is z's: μ and σ are per token)."""
        check_head_inputs(hidden, None, self.hidden_size)
        check_k(k, self.vocab_size)
        best_val = torch.full((hidden.shape[0], k), -math.inf, device=hidden.device)
        best_idx = torch.zeros(hidden.shape[0], k, dtype=torch.long, device=hidden.device)
        for t0 in range(0, hidden.shape[0], EVAL_CHUNK):
            h = hidden[t0:t0 + EVAL_CHUNK].float()
            vals, idx = best_val[t0:t0 + EVAL_CHUNK], best_idx[t0:t0 + EVAL_CHUNK]
            for v0 in range(0, self.vocab_size, VOCAB_CHUNK):
                scores = h @ self.weight[v0:min(v0 + VOCAB_CHUNK, self.vocab_size)].float().T
                top = scores.topk(min(k, scores.shape[1]), dim=1)
                merged_val = torch.cat([vals, top.values], 1)
                merged_idx = torch.cat([idx, top.indices + v0], 1)
                keep = merged_val.topk(k, dim=1).indices
                vals, idx = merged_val.gather(1, keep), merged_idx.gather(1, keep)
            best_val[t0:t0 + EVAL_CHUNK], best_idx[t0:t0 + EVAL_CHUNK] = vals, idx
        return best_idx

    @torch.no_grad()
    def sample(self, hidden, temperature=1.0, generator=None):
        """Draws from softmax(β·z / temperature), β = `calibration_beta` (1 until `fit_calibration`),
        by the Gumbel-max trick chunk by chunk, so no N × V tensor is formed."""
        check_head_inputs(hidden, None, self.hidden_size)
        temperature = self.sampling_temperature(hidden, temperature)  # "auto": no network here, ValueError
        scale = float(self.calibration_beta) / temperature
        best = torch.full((hidden.shape[0],), -math.inf, device=hidden.device)
        choice = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
        for rows, v0, z in self._z_chunks(hidden):
            uniform = torch.rand(z.shape, generator=generator, device=z.device)
            perturbed = scale * z - torch.log(-torch.log(uniform))
            val, idx = perturbed.max(1)
            better = val > best[rows]
            best[rows] = torch.where(better, val, best[rows])
            choice[rows] = torch.where(better, idx + v0, choice[rows])
        return choice

    # -------------------------------------------------------------- calibration

    def _calibration_sums(self, hidden, targets, beta: float) -> torch.Tensor:
        """float64 [4]: Σ over tokens of NLL(β), its first and second derivatives in β, and the count.
        NLL = logsumexp_k(β z_k) − β z_t; d/dβ = E_p[z] − z_t; d²/dβ² = Var_p[z] ≥ 0 (convex)."""
        n = hidden.shape[0]
        run_max = torch.full((n,), -math.inf, dtype=torch.float64, device=hidden.device)
        s0, s1, s2 = (torch.zeros(n, dtype=torch.float64, device=hidden.device) for _ in range(3))
        z_target = torch.zeros(n, dtype=torch.float64, device=hidden.device)
        for rows, v0, z in self._z_chunks(hidden):
            bz = beta * z.double()
            new_max = torch.maximum(run_max[rows], bz.max(1).values)
            rescale = torch.exp(run_max[rows] - new_max)
            e = torch.exp(bz - new_max[:, None])
            zd = z.double()
            s0[rows] = s0[rows] * rescale + e.sum(1)
            s1[rows] = s1[rows] * rescale + (e * zd).sum(1)
            s2[rows] = s2[rows] * rescale + (e * zd * zd).sum(1)
            run_max[rows] = new_max
            t = targets[rows] - v0
            inside = (t >= 0) & (t < z.shape[1])
            z_target[rows] += torch.where(inside, zd.gather(1, t.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1), 0.0)
        mean_z = s1 / s0
        nll = run_max + s0.log() - beta * z_target
        return torch.stack([nll.sum(), (mean_z - z_target).sum(), (s2 / s0 - mean_z * mean_z).sum(),
                            torch.tensor(float(n), dtype=torch.float64, device=hidden.device)])

    @torch.no_grad()
    def fit_calibration(self, hidden: torch.Tensor, targets: torch.Tensor, *, across_ranks: bool | None = None,
                        max_iter: int = 50, tol: float = 1e-6) -> float:
        """Fit β ≥ 0 minimizing the mean NLL of softmax(β·z) on held-out (hidden, targets); store it
        in the `calibration_beta` buffer and return it. The NLL is convex in β: safeguarded Newton
        inside a bracket. ``across_ranks`` (default: when torch.distributed is initialized) sums the
        statistics over ranks so all agree on β; every rank must then call this together."""
        check_head_inputs(hidden, targets, self.hidden_size)
        keep = targets != IGNORE_INDEX
        hidden, targets = hidden[keep], targets[keep]
        if across_ranks is None:
            across_ranks = dist.is_available() and dist.is_initialized()

        def sums(beta: float) -> torch.Tensor:
            out = self._calibration_sums(hidden, targets, beta) if hidden.shape[0] \
                else torch.zeros(4, dtype=torch.float64, device=hidden.device)
            if across_ranks:
                dist.all_reduce(out)
            return out

        lo, hi, beta = 0.0, BETA_MAX, 1.0
        if sums(0.0)[1] >= 0:  # the targets score no better than average: the uniform distribution fits best
            beta = 0.0
        else:
            for _ in range(max_iter):
                _, d1, d2, _ = sums(beta).tolist()
                if d1 > 0:
                    hi = beta
                else:
                    lo = beta
                step = d1 / d2 if d2 > 0 else -math.inf
                proposal = beta - step
                if not lo < proposal < hi:
                    proposal = min(2 * beta, BETA_MAX) if hi == BETA_MAX and d1 < 0 else 0.5 * (lo + hi)
                if abs(proposal - beta) <= tol * max(beta, 1.0):
                    beta = proposal
                    break
                beta = proposal
        self.calibration_beta.fill_(beta)
        self.calibrated.fill_(True)
        return beta

    @torch.no_grad()
    def calibrated_token_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """[N] float32 log softmax(β·z)[target], β from `fit_calibration` (1 before it). A calibrated
        stand-in, not the model's own probability: label it so. Ignored targets give 0."""
        check_head_inputs(hidden, targets, self.hidden_size)
        beta = float(self.calibration_beta)
        n = hidden.shape[0]
        run_max = torch.full((n,), -math.inf, device=hidden.device)
        total = torch.zeros(n, device=hidden.device)
        target_term = torch.zeros(n, device=hidden.device)
        for rows, v0, z in self._z_chunks(hidden):
            bz = beta * z
            new_max = torch.maximum(run_max[rows], bz.max(1).values)
            total[rows] = total[rows] * torch.exp(run_max[rows] - new_max) + torch.exp(bz - new_max[:, None]).sum(1)
            run_max[rows] = new_max
            t = targets[rows] - v0
            inside = (t >= 0) & (t < z.shape[1])
            target_term[rows] += torch.where(inside, bz.gather(1, t.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1), 0.0)
        logp = target_term - run_max - total.log()
        return torch.where(targets != IGNORE_INDEX, logp, 0.0)

    # -------------------------------------------------------------- memory model

    @classmethod
    def transient_bytes(cls, options, n_tokens, hidden_size, vocab_size, dtype):
        # The largest of the phases of `_SphericalZLoss`, beside an fp32 copy of the hidden states
        # when they are not fp32: ∇W's dense pass (fp32 VOCAB_CHUNK × D blocks: the centred rows,
        # and for non-fp32 weights the fp32 result), its target-row pass (α·h, the per-row sums
        # and the gathered rows of ∇W), and ∇h (h·Q, the centred target rows, their fetch in the
        # weight dtype). Plus m, Q, M (D × D) and per-token vectors. Checked against MemTracker.
        b = dtype_bytes(dtype)
        n, d = n_tokens, hidden_size
        chunk = min(VOCAB_CHUNK, vocab_size) * d * 4
        unique_rows = min(n, vocab_size)
        dense_pass = chunk * (1 if dtype == torch.float32 else 2)
        target_row_pass = n * d * 4 + unique_rows * d * (4 + b)
        hidden_pass = n * d * (8 + (0 if dtype == torch.float32 else b))
        hidden_copy = 0 if dtype == torch.float32 else n * d * 4
        return hidden_copy + max(dense_pass, target_row_pass, hidden_pass) + 3 * d * d * 4 + 16 * n * 4
