"""Cut cross-entropy: linear layer + cross-entropy whose tokens × vocab logits never exist at once.

Tokens are processed in chunks of ``chunk_size``. In fp32 each chunk's logit tile (all V scores
of the chunk's tokens) is formed by one matmul and turned in place into exp(s − max), which gives
the log-sum-exp and the loss and — when gradients are wanted and the loss is reduced to a scalar —
feeds the two gradient matmuls right away (Liger Kernel's order: the gradients are final during
the forward because the loss ends the graph; backward only scales them by the upstream scalar).
So each of the three N·V·D products is done once and extra memory is one tile. In bf16/fp16 the
weight gradient must be summed over chunks in fp32: rather than keep a V × D fp32 accumulator
(twice the 16-bit gradient), a second pass goes over the vocabulary in blocks with the
log-sum-exps known, recomputing the scores (Apple's CCE order), and sums each block of dW over
all tokens in fp32. Either way the backward needs neither the weight nor the inputs — which is
also what makes it correct under ZeRO-3, where the weight is gathered only around the head's
forward. ``reduction="none"`` cannot fold an arbitrary per-token upstream gradient into
gradients computed earlier, so it keeps the inputs and recomputes in backward (gathering a ZeRO-3
weight there if it is partitioned).

The gradient of one token's loss with respect to its (soft-capped) scores s, before the softcap's
derivative 1 − tanh²: w·[(1 + 2·z_loss·lse)·p − (1 − ε)·onehot(target) − ε/V], w the token's
upstream weight. Without softcap the row scale and the two constant terms are applied to the
small [chunk, D] operands instead of the [chunk, V] tile.
"""

from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn.functional as F
from pydantic import Field

from llmtrain.heads.base import IGNORE_INDEX, HeadOutput, check_head_inputs, check_k, dtype_bytes
from llmtrain.heads.softmax import SoftmaxHead, SoftmaxOptions
from llmtrain.heads.temperature import dro_shift, tau_metrics

# Bytes of the logit tile per chunk when chunk_size is automatic: big enough for full-speed
# matmuls (at V = 65,536: 256 tokens in fp32, within 3% of 384 and 512 on this CPU, BENCHMARKS;
# 512 in bf16), small next to eager's N × V logits.
TILE_BUDGET = 64 * 2**20
MIN_CHUNK = 16
# 16-bit inputs: rows of the tile taken through the fp32 softmax at a time (cache-sized).
ROW_BLOCK_BYTES = 16 * 2**20
# 16-bit gradients: vocabulary rows per block of dW summed over all tokens in fp32.
ACCUMULATE_BLOCK = 8192
# Vocabulary block that gradient filtering (filter_eps) keeps or skips as a whole.
FILTER_BLOCK = 1024
REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _low_precision(dtype: torch.dtype) -> bool:
    return dtype in (torch.bfloat16, torch.float16)


def _tile_bytes_per_token(vocab: int, dtype: torch.dtype, softcap: float | None) -> int:
    if _low_precision(dtype):
        return vocab * dtype_bytes(dtype)  # the fp32 work is done on cache-sized row blocks
    return vocab * dtype_bytes(dtype) * (2 if softcap else 1)


def auto_chunk_size(vocab: int, dtype: torch.dtype, softcap: float | None) -> int:
    rows = TILE_BUDGET // _tile_bytes_per_token(vocab, dtype, softcap)
    return max(MIN_CHUNK, rows // MIN_CHUNK * MIN_CHUNK)


def _buffer_view(buffer: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return buffer[: rows * cols].view(rows, cols)  # contiguous whatever the row count


def _softcap_(scores: torch.Tensor, tanh: torch.Tensor, cap: float) -> None:
    """scores ← cap·tanh(scores/cap), keeping tanh(scores/cap) for the derivative."""
    torch.div(scores, cap, out=tanh).tanh_()
    torch.mul(tanh, cap, out=scores)


def _token_loss(s_target, lse, s_mean, label_smoothing, z_loss):
    """Per-token loss, float64, from the target's score, the log-sum-exp and the mean score over
    the vocabulary (needed with label smoothing only)."""
    loss = (1 - label_smoothing) * (lse - s_target)
    if label_smoothing:
        loss = loss + label_smoothing * (lse - s_mean)
    if z_loss:
        loss = loss + z_loss * lse.square()
    return loss


def _grad_scales(token_weight, lse, label_smoothing, z_loss, vocab, dtype):
    """The gradient of token_weight·loss with respect to the scores is
    row·p − onehot·onehot(target) − smooth·1 (before the softcap's derivative)."""
    wt = token_weight.double()
    row = wt * (1 + 2 * z_loss * lse)
    onehot = wt * (1 - label_smoothing)
    smooth = wt * (label_smoothing / vocab)
    return row.to(dtype), onehot.to(dtype), smooth.to(dtype)


def _kept_spans(block_max: list[float], target_blocks: set[int], eps: float, vocab: int) -> list[tuple[int, int]]:
    """Contiguous vocabulary ranges of the FILTER_BLOCK-wide blocks that gradient filtering keeps:
    those with a probability ≥ eps or a target of the chunk."""
    spans: list[tuple[int, int]] = []
    for b, peak in enumerate(block_max):
        if peak < eps and b not in target_blocks:
            continue
        lo, hi = b * FILTER_BLOCK, min(vocab, (b + 1) * FILTER_BLOCK)
        if spans and spans[-1][1] == lo:
            spans[-1] = (spans[-1][0], hi)
        else:
            spans.append((lo, hi))
    return spans


def _chunked_loss_and_grads(h, weight, bias, targets, *, chunk_size, token_weight, **kw):
    """Per-token losses [n] (fp32) and log-sum-exps [n] of kept tokens ``h`` [n, D], ``targets`` [n].

    With ``token_weight`` [n] (d total / d loss_n) also the gradients (dh, dW, db) of
    Σ token_weight·loss, in the dtypes of h, weight and bias (None where not needed)."""
    n = h.shape[0]
    out = (torch.empty(n, dtype=torch.float32, device=h.device), torch.empty(n, dtype=torch.float32, device=h.device))
    pass_ = _low_precision_pass if _low_precision(h.dtype) else _full_precision_pass
    grads = pass_(h, weight, bias, targets, max(1, min(n, chunk_size)), token_weight, *out, **kw)
    if grads is not None:  # 16-bit: cast the fp32 dh now that the pass's tiles are freed
        dh, dw, db = grads
        grads = (dh.to(h.dtype), dw, db)
    return (*out, grads)


def _full_precision_pass(h, weight, bias, targets, rows, token_weight, losses, lses, *, softcap, label_smoothing,
                         z_loss, filter_eps, need_weight_grad=True, need_bias_grad=True):
    """fp32/fp64: vocabulary-major [V, chunk] tiles, because W @ hᵀ runs faster than h @ Wᵀ on CPU
    BLAS; the one-hot and label-smoothing terms of the gradient are applied to the small operands
    instead of the tile."""
    vocab, dtype, dev = weight.shape[0], h.dtype, h.device
    scores_buf = torch.empty(vocab * rows, dtype=dtype, device=dev)
    tanh_buf = torch.empty(vocab * rows, dtype=dtype, device=dev) if softcap else None
    grads = token_weight is not None
    if grads:
        dh = torch.empty_like(h)
        # unfiltered, the first chunk's product initializes dW: no zero-fill pass over V × D
        first_chunk_sets_dw = filter_eps is None and len(h) > 0
        dw = (torch.empty_like if first_chunk_sets_dw else torch.zeros_like)(weight) if need_weight_grad else None
        db = torch.zeros_like(bias) if bias is not None and need_bias_grad else None
        smooth_sum = torch.zeros(h.shape[1], dtype=dtype, device=dev)  # Σ_n smooth_n·h_n
        w_colsum = weight.sum(0) if label_smoothing else None
    for start in range(0, h.shape[0], rows):
        hc, tc = h[start:start + rows], targets[start:start + rows]
        m, idx = hc.shape[0], tc.unsqueeze(0)
        scores = _buffer_view(scores_buf, vocab, m)
        if bias is None:
            torch.mm(weight, hc.T, out=scores)
        else:
            torch.addmm(bias.unsqueeze(1), weight, hc.T, out=scores)
        if softcap:
            _softcap_(scores, _buffer_view(tanh_buf, vocab, m), softcap)
        s_target = scores.gather(0, idx).squeeze(0).double()
        s_mean = scores.sum(0, dtype=torch.float64) / vocab if label_smoothing else None
        # The softmax down the columns as three passes along contiguous rows (max, exp in place,
        # sum), not log_softmax + softmax over dim 0, which CPU kernels run strided: a step at
        # 4,096 × 65,536 × 512 went from 8.2 s to 6.9 s (BENCHMARKS). The tile keeps
        # exp(s − max), p times the column's total; the 1/total goes to the small operands.
        peak = scores.amax(0)
        tile = scores.sub_(peak).exp_()
        total = tile.sum(0)
        lse = peak.double() + total.double().log()
        losses[start:start + m] = _token_loss(s_target, lse, s_mean, label_smoothing, z_loss)
        lses[start:start + m] = lse
        if not grads:
            continue

        row, onehot, smooth = _grad_scales(token_weight[start:start + m], lse, label_smoothing, z_loss, vocab, dtype)
        row = row / total  # tile · row = p · the token's row scale
        spans = [(0, vocab)]
        if filter_eps is not None:  # on the probabilities themselves: max over a block's entries of tile / total
            block_max = [(tile[lo:lo + FILTER_BLOCK].amax(0) / total).amax() for lo in range(0, vocab, FILTER_BLOCK)]
            spans = _kept_spans(torch.stack(block_max).tolist(), set((tc // FILTER_BLOCK).tolist()), filter_eps, vocab)
        if softcap:  # the derivative varies per entry: build the exact gradient tile
            deriv = _buffer_view(tanh_buf, vocab, m).square_().neg_().add_(1)
            tile.mul_(row)
            if label_smoothing:
                tile.sub_(smooth)
            tile.mul_(deriv).scatter_add_(0, idx, -(onehot * deriv.gather(0, idx).squeeze(0)).unsqueeze(0))
            row = None
        scaled_h = hc if row is None else row.unsqueeze(1) * hc
        dh_c = torch.zeros_like(hc)
        for lo, hi in spans:
            part = tile[lo:hi]
            dh_c.addmm_(part.T, weight[lo:hi])
            if dw is not None and start == 0 and first_chunk_sets_dw:
                torch.mm(part, scaled_h, out=dw[lo:hi])
            elif dw is not None:
                dw[lo:hi].addmm_(part, scaled_h)
            if db is not None:
                db[lo:hi] += part @ (torch.ones_like(lse, dtype=dtype) if row is None else row)
        if row is not None:  # the row scale, one-hot and smoothing terms, outside the tile
            dh_c.mul_(row.unsqueeze(1)).sub_(onehot.unsqueeze(1) * weight[tc])
            if label_smoothing:
                dh_c.sub_(smooth.unsqueeze(1) * w_colsum)
                smooth_sum += smooth @ hc
            if dw is not None:
                dw.index_put_((tc,), (onehot.unsqueeze(1) * hc).neg_(), accumulate=True)
            if db is not None:
                db.index_put_((tc,), onehot.neg(), accumulate=True)
                db.sub_(smooth.sum())
        dh[start:start + m] = dh_c
    if not grads:
        return None
    if dw is not None and label_smoothing and not softcap:
        dw.sub_(smooth_sum)
    return dh, dw, db


def _low_precision_pass(h, weight, bias, targets, rows, token_weight, losses, lses, *, softcap, label_smoothing,
                        z_loss, filter_eps, need_weight_grad=True, need_bias_grad=True):
    """bf16/fp16 in two passes, as Apple's CCE kernels: the losses and log-sum-exps first, then,
    with the log-sum-exps known, the gradients one vocabulary block at a time. Going over the
    vocabulary in the outer loop lets each block of dW be summed over all tokens in fp32 and cast
    once, so the fp32 accumulation costs one block, not a V × D buffer beside the 16-bit gradient
    (which would double the gradient's memory); the price is a fourth N·V·D product, recomputing
    the scores."""
    _low_precision_losses(h, weight, bias, targets, rows, losses, lses, softcap=softcap,
                          label_smoothing=label_smoothing, z_loss=z_loss)
    if token_weight is None:
        return None
    return _low_precision_grads(h, weight, bias, targets, rows, token_weight, lses, softcap=softcap,
                                label_smoothing=label_smoothing, z_loss=z_loss, filter_eps=filter_eps,
                                need_weight_grad=need_weight_grad, need_bias_grad=need_bias_grad)


def _low_precision_losses(h, weight, bias, targets, rows, losses, lses, *, softcap, label_smoothing, z_loss):
    """Pass 1: a token-major [chunk, V] tile in the input dtype, as eager's logits; the
    log-softmax in fp32 over a cache-sized block of rows at a time."""
    vocab, dtype, dev = weight.shape[0], h.dtype, h.device
    tile_buf = torch.empty(rows * vocab, dtype=dtype, device=dev)
    block_rows = max(1, min(rows, ROW_BLOCK_BYTES // (4 * vocab)))
    work_buf = torch.empty(block_rows * vocab, dtype=torch.float32, device=dev)
    tanh_buf = torch.empty(block_rows * vocab, dtype=torch.float32, device=dev) if softcap else None
    for start in range(0, h.shape[0], rows):
        hc, tc = h[start:start + rows], targets[start:start + rows]
        tile = _buffer_view(tile_buf, hc.shape[0], vocab)
        if bias is None:
            torch.mm(hc, weight.T, out=tile)
        else:
            torch.addmm(bias, hc, weight.T, out=tile)
        for r in range(0, hc.shape[0], block_rows):
            q = min(block_rows, hc.shape[0] - r)
            f = _buffer_view(work_buf, q, vocab).copy_(tile[r:r + q])
            idx = tc[r:r + q].unsqueeze(1)
            if softcap:
                _softcap_(f, _buffer_view(tanh_buf, q, vocab), softcap)
            s_target = f.gather(1, idx).squeeze(1).double()
            s_mean = f.sum(1, dtype=torch.float64) / vocab if label_smoothing else None
            torch.log_softmax(f, 1, out=f)
            lse = s_target - f.gather(1, idx).squeeze(1).double()
            loss = _token_loss(s_target, lse, s_mean, label_smoothing, z_loss)
            losses[start + r:start + r + q], lses[start + r:start + r + q] = loss, lse


def _low_precision_grads(h, weight, bias, targets, rows, token_weight, lses, *, softcap, label_smoothing, z_loss,
                         filter_eps, need_weight_grad, need_bias_grad):
    """Pass 2: for each block of ACCUMULATE_BLOCK vocabulary rows and each chunk of ``rows`` tokens, the
    scores are recomputed (16-bit matmul), turned into exact gradient rows in fp32
    (row·exp(s − lse) − smooth − onehot, times 1 − tanh² under softcap) and cast to 16 bits
    for the two gradient matmuls, whose products are summed in fp32: dh over the vocabulary blocks,
    the block of dW (and db) over the token chunks."""
    n, dim = h.shape
    vocab, dtype, dev = weight.shape[0], h.dtype, h.device
    f32 = {"dtype": torch.float32, "device": dev}
    row, onehot, smooth = _grad_scales(token_weight, lses.double(), label_smoothing, z_loss, vocab, torch.float32)
    block = min(vocab, ACCUMULATE_BLOCK)
    s_buf = torch.empty(rows * block, dtype=dtype, device=dev)
    g_buf = torch.empty(rows * block, **f32)
    tanh_buf = torch.empty(rows * block, **f32) if softcap else None
    dh = torch.zeros(n, dim, **f32)
    dw = torch.empty_like(weight) if need_weight_grad else None  # the 16-bit gradient, written block by block
    dw_acc = torch.empty(block, dim, **f32) if need_weight_grad else None
    db = torch.empty_like(bias) if bias is not None and need_bias_grad else None
    for lo in range(0, vocab, block):
        width = min(block, vocab - lo)
        wb = weight[lo:lo + width]
        acc = None if dw_acc is None else dw_acc[:width].zero_()
        db_acc = None if db is None else torch.zeros(width, **f32)
        for start in range(0, n, rows):
            hc, tc = h[start:start + rows], targets[start:start + rows]
            m = hc.shape[0]
            s = _buffer_view(s_buf, m, width)
            if bias is None:
                torch.mm(hc, wb.T, out=s)
            else:
                torch.addmm(bias[lo:lo + width], hc, wb.T, out=s)
            g = _buffer_view(g_buf, m, width).copy_(s)
            if softcap:
                _softcap_(g, _buffer_view(tanh_buf, m, width), softcap)
            g.sub_(lses[start:start + m].unsqueeze(1)).exp_()  # the probabilities
            local = tc - lo
            inside = ((local >= 0) & (local < width)).nonzero().squeeze(1)
            spans = [(0, width)] if filter_eps is None else _filtered_spans(g, local[inside], filter_eps)
            g.mul_(row[start:start + m].unsqueeze(1))
            if label_smoothing:
                g.sub_(smooth[start:start + m].unsqueeze(1))
            g.index_put_((inside, local[inside]), -onehot[start:start + m][inside], accumulate=True)
            if softcap:
                g.mul_(_buffer_view(tanh_buf, m, width).square_().neg_().add_(1))
            if db_acc is not None:
                db_acc += g.sum(0)
            gl = s.copy_(g)  # the 16-bit operand of the gradient matmuls
            for a, b in spans:
                dh[start:start + m] += gl[:, a:b] @ wb[a:b]
                if acc is not None:
                    acc[a:b] += gl[:, a:b].T @ hc
        if dw is not None:
            dw[lo:lo + width].copy_(acc)
        if db is not None:
            db[lo:lo + width].copy_(db_acc)
    return dh, dw, db  # fp32 dh: the caller casts it once these buffers are gone


def _filtered_spans(g: torch.Tensor, local_targets: torch.Tensor, eps: float) -> list[tuple[int, int]]:
    """Column ranges of a [m, width] tile of probabilities that gradient filtering keeps:
    FILTER_BLOCK-wide blocks with an entry ≥ eps or a target of the chunk."""
    width = g.shape[1]
    n_blocks = -(-width // FILTER_BLOCK)
    padded = F.pad(g, (0, n_blocks * FILTER_BLOCK - width))
    block_max = padded.view(g.shape[0], n_blocks, FILTER_BLOCK).amax(dim=(0, 2))
    return _kept_spans(block_max.tolist(), set((local_targets // FILTER_BLOCK).tolist()), eps, width)


def _eval_scores(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None):
    """[m, V] fp32 soft-capped scores of a chunk of tokens (evaluation and generation)."""
    scores = F.linear(h, weight, bias).float()
    return softcap * torch.tanh(scores / softcap) if softcap else scores


@contextlib.contextmanager
def _weight_available(weight: torch.Tensor):
    """Under ZeRO-3 a partitioned parameter outside its module's forward holds a 0-element
    stand-in; gather it for the duration. Heads import no DeepSpeed: a parameter with a ds_id was
    made by DeepSpeed, which is therefore loaded, and its gathering context is taken from there."""
    if weight.numel() == 0 and hasattr(weight, "ds_id"):
        with sys.modules["deepspeed"].zero.GatheredParameters([weight]):
            yield
    else:
        yield


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, opts, want_grads):
        """(per-token or reduced loss, per-token lse of kept tokens [non-differentiable])."""
        n_total = targets.shape[0]
        keep = targets != opts["ignore_index"]
        all_kept = bool(keep.all())
        kept = None if all_kept else keep.nonzero().squeeze(1)
        h = hidden if all_kept else hidden.index_select(0, kept)
        t = targets if all_kept else targets.index_select(0, kept)
        n = t.shape[0]
        reduction = opts["reduction"]
        scalar = reduction != "none"
        kwargs = {k: opts[k] for k in ("softcap", "label_smoothing", "z_loss", "chunk_size", "filter_eps")}
        token_weight = None
        if want_grads and scalar:
            scale = 1.0 / max(n, 1) if reduction == "mean" else 1.0  # all ignored: nan mean, zero gradients, as eager
            token_weight = torch.full((n,), scale, dtype=torch.float32, device=h.device)
        need = ctx.needs_input_grad
        losses, lses, grads = _chunked_loss_and_grads(h, weight, bias, t, token_weight=token_weight,
                                                      need_weight_grad=need[1], need_bias_grad=need[2], **kwargs)
        ctx.opts, ctx.kept, ctx.n_total, ctx.scalar = opts, kept, n_total, scalar
        if scalar:
            ctx.grads = grads
            loss = losses.sum() if reduction == "sum" else losses.sum() / n
        else:
            ctx.save_for_backward(hidden, weight, bias, targets)
            loss = losses if all_kept else losses.new_zeros(n_total).index_copy_(0, kept, losses)
        ctx.mark_non_differentiable(lses)
        return loss, lses

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse):
        if ctx.scalar:
            if ctx.grads is None:
                raise RuntimeError("linear_cross_entropy: backward through the same loss twice is not supported "
                                   "(its gradients are computed in the forward and handed over once)")
            (dh, dw, db), ctx.grads = ctx.grads, None
            if not bool(grad_loss == 1):
                dh, dw = dh.mul_(grad_loss.to(dh.dtype)), None if dw is None else dw.mul_(grad_loss.to(dw.dtype))
                db = None if db is None else db.mul_(grad_loss.to(db.dtype))
        else:
            hidden, weight, bias, targets = ctx.saved_tensors
            kept = ctx.kept
            h = hidden if kept is None else hidden.index_select(0, kept)
            t = targets if kept is None else targets.index_select(0, kept)
            g = grad_loss if kept is None else grad_loss.index_select(0, kept)
            kwargs = {k: ctx.opts[k] for k in ("softcap", "label_smoothing", "z_loss", "chunk_size", "filter_eps")}
            with _weight_available(weight):
                _, _, (dh, dw, db) = _chunked_loss_and_grads(
                    h, weight, bias, t, token_weight=g.float(), need_weight_grad=ctx.needs_input_grad[1],
                    need_bias_grad=ctx.needs_input_grad[2], **kwargs)
        if ctx.kept is not None:
            dh = dh.new_zeros(ctx.n_total, dh.shape[1]).index_copy_(0, ctx.kept, dh)
        return dh, dw, db, None, None, None


def _check_inputs(hidden, weight, targets, bias, ignore_index, reduction, softcap, label_smoothing, z_loss,
                  chunk_size, filter_eps):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1 or hidden.dtype not in FLOAT_DTYPES:
        raise ValueError(f"hidden must be a [..., D] float tensor, got {getattr(hidden, 'dtype', type(hidden))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, {hidden.shape[-1]}] to match hidden, got {list(getattr(weight, 'shape', []))}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != hidden.dtype):
        raise ValueError(f"bias must be [{weight.shape[0]}] of dtype {hidden.dtype}, got {list(bias.shape)} {bias.dtype}")
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be an int64 tensor, got {getattr(targets, 'dtype', type(targets))}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets must have shape {list(hidden.shape[:-1])} (hidden without its last dim), "
                         f"got {list(targets.shape)}")
    devices = {hidden.device, weight.device, targets.device} | ({bias.device} if bias is not None else set())
    if len(devices) > 1:
        raise ValueError(f"hidden, weight, targets and bias must be on one device, got {sorted(map(str, devices))}")
    vocab = weight.shape[0]
    bad = ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)
    if bool(bad.any()):
        raise ValueError(f"targets must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
                         f"got {targets[bad][0].item()}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or > 0, got {softcap}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if not z_loss >= 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    if filter_eps is not None and not 0 < filter_eps < 1:
        raise ValueError(f"filter_eps must be None or in (0, 1), got {filter_eps}")


def linear_cross_entropy_with_lse(hidden, weight, targets, *, bias=None, ignore_index=IGNORE_INDEX,
                                  reduction="mean", softcap=None, label_smoothing=0.0, z_loss=0.0,
                                  chunk_size=None, filter_eps=None):
    """``linear_cross_entropy`` plus the log-sum-exp [n_kept] of every non-ignored token (fp32,
    no gradient), for logging."""
    _check_inputs(hidden, weight, targets, bias, ignore_index, reduction, softcap, label_smoothing, z_loss,
                  chunk_size, filter_eps)
    lead = targets.shape
    hidden2, targets1 = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).long()
    if chunk_size is None:
        chunk_size = auto_chunk_size(weight.shape[0], hidden.dtype, softcap)
    opts = {"ignore_index": ignore_index, "reduction": reduction, "softcap": softcap,
            "label_smoothing": float(label_smoothing), "z_loss": float(z_loss), "chunk_size": chunk_size,
            "filter_eps": filter_eps}
    inputs = (hidden2, weight) if bias is None else (hidden2, weight, bias)
    want_grads = torch.is_grad_enabled() and any(x.requires_grad for x in inputs)
    loss, lse = _LinearCrossEntropy.apply(hidden2, weight, bias, targets1, opts, want_grads)
    return (loss.reshape(lead) if reduction == "none" else loss), lse


def linear_cross_entropy(hidden, weight, targets, *, bias=None, ignore_index=IGNORE_INDEX, reduction="mean",
                         softcap=None, label_smoothing=0.0, z_loss=0.0, chunk_size=None, filter_eps=None):
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``targets`` without forming the logits.

    Equals ``F.cross_entropy(logits, targets, ignore_index=, reduction=, label_smoothing=)`` in value
    and gradients (hidden, weight, bias), where ``softcap`` first maps logits to c·tanh(logits/c)
    and ``z_loss`` adds z_loss·logsumexp(logits)² per token (PaLM's auxiliary loss).

    hidden [..., D] and weight [V, D] (and bias [V]) share one float dtype; 16-bit inputs get
    16-bit matmuls as in eager, with the softmax and the weight-gradient accumulation in fp32.
    targets [...] int64, ``ignore_index`` marks tokens that do not count (dropped before any
    matmul). ``reduction`` is "mean" over non-ignored tokens, "sum", or "none" (per token, 0 where
    ignored). ``chunk_size`` tokens per tile (default: a ~64 MiB tile). ``filter_eps`` (opt-in,
    inexact) skips vocabulary blocks of the gradient whose probabilities are all below it.
    """
    return linear_cross_entropy_with_lse(
        hidden, weight, targets, bias=bias, ignore_index=ignore_index, reduction=reduction, softcap=softcap,
        label_smoothing=label_smoothing, z_loss=z_loss, chunk_size=chunk_size, filter_eps=filter_eps)[0]


class _WeightedLinearCrossEntropy(torch.autograd.Function):
    """Σ_n w_n·CE_n over kept tokens, gradients computed during the forward as in the scalar
    reductions above (the per-token weights go where the uniform 1/n goes there); the gradient
    in w_n is CE_n itself."""

    @staticmethod
    def forward(ctx, hidden, weight, token_weight, targets, ignore_index, chunk_size, want_grads):
        keep = targets != ignore_index
        kept = keep.nonzero().squeeze(1)
        h, t, w = hidden.index_select(0, kept), targets.index_select(0, kept), token_weight.index_select(0, kept)
        need = ctx.needs_input_grad
        losses, _, grads = _chunked_loss_and_grads(
            h, weight, None, t, chunk_size=chunk_size, token_weight=w.detach().float() if want_grads else None,
            softcap=None, label_smoothing=0.0, z_loss=0.0, filter_eps=None,
            need_weight_grad=need[1], need_bias_grad=False)
        per_token = losses.new_zeros(targets.shape[0]).index_copy_(0, kept, losses)
        ctx.kept, ctx.grads, ctx.n_total = kept, grads, targets.shape[0]
        ctx.save_for_backward(per_token)
        ctx.mark_non_differentiable(per_token)
        total = (w.double() * losses.double()).sum().to(token_weight.dtype)
        return total, per_token

    @staticmethod
    def backward(ctx, grad_total, _grad_per_token):
        if ctx.grads is None:
            raise RuntimeError("weighted_linear_cross_entropy: backward through the same loss twice is not "
                               "supported (its gradients are computed in the forward and handed over once)")
        (dh, dw, _), ctx.grads = ctx.grads, None
        (per_token,) = ctx.saved_tensors
        dh = dh.mul_(grad_total.to(dh.dtype))
        dh = dh.new_zeros(ctx.n_total, dh.shape[1]).index_copy_(0, ctx.kept, dh)
        dw = None if dw is None else dw.mul_(grad_total.to(dw.dtype))
        return dh, dw, per_token * grad_total, None, None, None, None


def weighted_linear_cross_entropy(hidden, weight, targets, token_weight, *, ignore_index=IGNORE_INDEX,
                                  chunk_size=None):
    """(Σ_n token_weight_n·CE_n, per-token CE [N] (0 where ignored; no gradient)), CE_n the
    cross-entropy of ``hidden @ weight.T`` at token n, without forming the logits. Differentiable
    in hidden [N, D], weight [V, D] and token_weight [N] (float32); no bias, softcap or smoothing.
    The temperature network's DRO loss is this with hidden/τ and weights τ/n."""
    _check_inputs(hidden, weight, targets, None, ignore_index, "sum", None, 0.0, 0.0, chunk_size, None)
    if token_weight.shape != targets.shape:
        raise ValueError(f"token_weight must have shape {list(targets.shape)}, got {list(token_weight.shape)}")
    if chunk_size is None:
        chunk_size = auto_chunk_size(weight.shape[0], hidden.dtype, None)
    want_grads = torch.is_grad_enabled() and any(x.requires_grad for x in (hidden, weight, token_weight))
    return _WeightedLinearCrossEntropy.apply(hidden, weight, token_weight, targets.long(), ignore_index,
                                             chunk_size, want_grads)


class CCEOptions(SoftmaxOptions):
    chunk_size: int | None = Field(None, ge=1, description="tokens per logit tile (default: a ~64 MiB tile)")
    filter_eps: float | None = Field(
        None, gt=0, lt=1, description="skip gradient blocks whose probabilities are all below this (inexact)")


class CCEHead(SoftmaxHead):
    """The softmax head's model, parameters and options, trained without materializing the
    logits; evaluation and sampling go chunk by chunk too. Checkpoints move between the two."""

    name = "cce"
    Options = CCEOptions
    temperature_conflicts = {
        **SoftmaxHead.temperature_conflicts,
        "bias": "CE(o/τ) is the cce loss of h/τ only when o = W·h (with a bias, o/τ = W·h/τ + b/τ)",
        "softcap": "a soft-capped score is not linear in h, so neither CE(o/τ) nor the network's "
                   "input can be computed without the N × V scores",
    }

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor) -> HeadOutput:
        check_head_inputs(hidden, targets, self.hidden_size)
        o = self.options
        if self.temperature is not None:
            return self._dro_forward(hidden, targets)
        loss, lse = linear_cross_entropy_with_lse(
            hidden, self.weight, targets, bias=self.bias, softcap=o.softcap, label_smoothing=o.label_smoothing,
            z_loss=o.z_loss, chunk_size=o.chunk_size, filter_eps=o.filter_eps)
        n_keep = max(lse.numel(), 1)
        metrics = {"lse_mean": float(lse.sum()) / n_keep}
        if o.z_loss:
            metrics["z_loss_aux"] = float(lse.double().square().sum()) / n_keep
        return HeadOutput(loss=loss, metrics=metrics)

    def _dro_forward(self, hidden: torch.Tensor, targets: torch.Tensor) -> HeadOutput:
        """τ·CE(o/τ) + τ·(ρ − log V): with o = W·h, CE(o/τ) is the cce loss of h/τ, so neither the
        loss nor the network's input forms the logits."""
        tau = self.temperature(hidden=hidden, weight=self.weight)
        keep = targets != IGNORE_INDEX
        n_keep = keep.sum().clamp(min=1)
        total, ce = weighted_linear_cross_entropy(hidden / tau.to(hidden.dtype)[:, None], self.weight, targets,
                                                  tau / n_keep, chunk_size=self.options.chunk_size)
        loss = total + dro_shift(tau, keep, self.temperature.rho, self.vocab_size)
        return HeadOutput(loss=loss, metrics=tau_metrics(tau, keep, ce))

    def predict_temperature(self, hidden: torch.Tensor) -> torch.Tensor:
        check_head_inputs(hidden, None, self.hidden_size)
        if self.temperature is None:
            return super().predict_temperature(hidden)
        return self.temperature.predict(hidden=hidden, weight=self.weight, bias=self.bias)

    def _score_chunks(self, hidden: torch.Tensor):
        """(start, [chunk, V] fp32 soft-capped scores): evaluation never holds N × V scores."""
        rows = auto_chunk_size(self.vocab_size, torch.float32, None)  # fp32 [rows, V] scores: ~64 MiB
        for start in range(0, hidden.shape[0], rows):
            yield start, _eval_scores(hidden[start:start + rows], self.weight, self.bias, self.options.softcap)

    @torch.no_grad()
    def token_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        check_head_inputs(hidden, targets, self.hidden_size)
        out = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start, scores in self._score_chunks(hidden):
            t = targets[start:start + scores.shape[0]].clamp(min=0).unsqueeze(1)
            out[start:start + scores.shape[0]] = torch.log_softmax(scores, 1, out=scores).gather(1, t).squeeze(1)
        return out

    @torch.no_grad()
    def topk(self, hidden: torch.Tensor, k: int) -> torch.Tensor:
        check_head_inputs(hidden, None, self.hidden_size)
        check_k(k, self.vocab_size)
        out = torch.empty(hidden.shape[0], k, dtype=torch.long, device=hidden.device)
        for start, scores in self._score_chunks(hidden):
            out[start:start + scores.shape[0]] = scores.topk(k, dim=1).indices
        return out

    @torch.no_grad()
    def sample(self, hidden, temperature=1.0, generator=None):
        check_head_inputs(hidden, None, self.hidden_size)
        temperature = self.sampling_temperature(hidden, temperature)
        per_token = isinstance(temperature, torch.Tensor)
        out = torch.empty(hidden.shape[0], dtype=torch.long, device=hidden.device)
        for start, scores in self._score_chunks(hidden):
            scale = temperature[start:start + scores.shape[0], None] if per_token else temperature
            probs = torch.softmax(scores.div_(scale), 1, out=scores)
            out[start:start + scores.shape[0]] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        return out

    @classmethod
    def transient_bytes(cls, options, n_tokens, hidden_size, vocab_size, dtype):
        # Batches with ignored tokens add a copy of the kept hidden states (n·D in the input
        # dtype); packed training data has none, and neither has the profiler's measurement.
        rows = min(n_tokens, options.chunk_size or auto_chunk_size(vocab_size, dtype, options.softcap))
        tile = rows * _tile_bytes_per_token(vocab_size, dtype, options.softcap)
        hidden_grad = n_tokens * hidden_size * dtype_bytes(dtype)
        if not _low_precision(dtype):
            # one pass: a tile beside the final gradients, and per chunk four [rows, D]
            # temporaries (its dh, the row-scaled hidden states, the target rows of W and their product)
            return tile + hidden_grad + 4 * rows * hidden_size * dtype_bytes(dtype)
        # pass 1 (losses) runs before any gradient exists; pass 2 sums dh in fp32 beside one
        # [rows, block] tile in 16 and 32 bits, one fp32 block of dW and the 16-bit product added
        # to it; then dh is cast.
        work = (2 if options.softcap else 1) * max(ROW_BLOCK_BYTES, 4 * vocab_size)
        pass1 = tile + work - vocab_size * hidden_size * dtype_bytes(dtype)
        block = min(vocab_size, ACCUMULATE_BLOCK)
        pass2 = rows * block * (dtype_bytes(dtype) + 4 * (2 if options.softcap else 1)) + block * hidden_size * (4 + dtype_bytes(dtype))
        dh32 = n_tokens * hidden_size * 4
        return max(pass1, pass2 + dh32, dh32 + hidden_grad)
