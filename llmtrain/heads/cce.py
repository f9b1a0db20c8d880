"""Cut cross-entropy: linear layer + cross-entropy whose tokens × vocab logits never exist at once.

Tokens are processed in chunks of ``chunk_size``. In fp32 each chunk's logit tile (all V scores
of the chunk's tokens) is formed by one matmul and turned in place into exp(s − max), which gives
the log-sum-exp and the loss and — when gradients are wanted and the loss is reduced to a scalar —
feeds the two gradient matmuls right away (Liger Kernel's order: the gradients are final during
the forward because the loss ends the graph; backward only scales them by the upstream scalar).
So each of the three N·V·D products is done once and extra memory is one tile. In bf16 the same
one pass runs over token-major 16-bit tiles (eager's logits, a chunk at a time): each block of
rows goes through fp32 once (max, exp, sum, then the exact gradient row written back over the
scores), and the weight gradient is summed over chunks in a V × D fp32 accumulator, within
FP32_ACCUMULATOR_BUDGET; past it, a second pass goes over the vocabulary in blocks with the
log-sum-exps known, recomputing the scores (Apple's CCE order: a fourth product), and sums each
block of dW over all tokens in fp32. fp16 is refused: the gradients exist before the loss
scale that fp16 training multiplies them by. Either way the backward needs neither the weight
nor the inputs — which is also what makes it correct under ZeRO-3, where the weight is gathered
only around the head's forward. ``reduction="none"`` cannot fold an arbitrary per-token upstream
gradient into gradients computed earlier, so it keeps the inputs and recomputes in backward
(gathering a ZeRO-3 weight there if it is partitioned).

The gradient of one token's loss with respect to its (soft-capped) scores s, before the softcap's
derivative 1 − tanh²: w·[(1 + 2·z_loss·lse)·p − (1 − ε)·onehot(target) − ε/V], w the token's
upstream weight. Without softcap, in fp32, the row scale and the two constant terms are applied
to the small [chunk, D] operands instead of the [chunk, V] tile (in 16 bits the one-hot must be
subtracted before rounding: p − 1 near p = 1 would cancel).

``filter_eps`` (opt-in, inexact; Apple's gradient filtering) means the same on every path: for
each chunk of kept tokens and each FILTER_BLOCK-wide block of the vocabulary whose probabilities
are all below eps and which holds none of the chunk's targets, the block's whole share of the
gradients — probability, z-loss, label-smoothing and softcap terms, and the bias's — is left out.
The loss is exact.

How the passes cut their work (tile, fp32 row blocks, dW blocks) depends on the device: see
Blocking.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field

from llmtrain.heads.base import IGNORE_INDEX, HeadOutput, check_head_inputs, dtype_bytes, weight_available
from llmtrain.heads.softmax import SoftmaxHead, SoftmaxOptions
from llmtrain.heads.temperature import dro_shift, tau_metrics


@dataclass(frozen=True)
class Blocking:
    """How the chunked passes cut their work. A CPU wants cache-sized blocks; a GPU pays a few
    microseconds for each kernel launch, so it wants few large ones (on an H200 at Gemma 2 2B's
    shape, bf16: 158 ms a step with CUDA_BLOCKING against 1,070 ms with CPU_BLOCKING; BENCHMARKS)."""

    tile_bytes: int  # the logit tile per chunk when chunk_size is automatic
    row_block_bytes: int  # 16-bit inputs: rows of the tile taken through the fp32 softmax at a time
    accumulate_rows: int  # 16-bit gradients: vocabulary rows per block of dW summed in fp32


# CPU: a 64 MiB tile is big enough for full-speed matmuls (at V = 65,536: 256 tokens in fp32,
# within 3% of 384 and 512 on a 2-core CPU, BENCHMARKS) and small next to eager's N × V logits;
# fp32 row blocks of 16 MiB stay in cache.
CPU_BLOCKING = Blocking(tile_bytes=64 * 2**20, row_block_bytes=16 * 2**20, accumulate_rows=8192)
CUDA_BLOCKING = Blocking(tile_bytes=256 * 2**20, row_block_bytes=256 * 2**20, accumulate_rows=32768)
MIN_CHUNK = 16
# 16-bit inputs: the largest V × D fp32 dW accumulator the one-pass order may hold (three N·V·D
# products); above it, a second pass recomputes the scores instead (four products, one block).
# 512 MiB: V·D up to 2**27, e.g. 151,936 × 768 or 65,536 × 2,048.
FP32_ACCUMULATOR_BUDGET = 512 * 2**20
# Vocabulary block that gradient filtering (filter_eps) keeps or skips as a whole.
FILTER_BLOCK = 1024
REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def blocking(device: torch.device | str | None = None) -> Blocking:
    """The blocking for tensors on ``device``; None: this machine's training device (what
    ``llmtrain profile`` estimates for)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return CPU_BLOCKING if torch.device(device).type == "cpu" else CUDA_BLOCKING


def _low_precision(dtype: torch.dtype) -> bool:
    return dtype in (torch.bfloat16, torch.float16)


def _tile_bytes_per_token(vocab: int, dtype: torch.dtype, softcap: float | None) -> int:
    if _low_precision(dtype):
        return vocab * dtype_bytes(dtype)  # the fp32 work is done on cache-sized row blocks
    return vocab * dtype_bytes(dtype) * (2 if softcap else 1)


def auto_chunk_size(vocab: int, dtype: torch.dtype, softcap: float | None,
                    device: torch.device | str | None = None) -> int:
    rows = blocking(device).tile_bytes // _tile_bytes_per_token(vocab, dtype, softcap)
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
    Σ token_weight·loss, in the dtypes of h, weight and bias (None where not needed: ``need``
    says which of the three are wanted)."""
    n = h.shape[0]
    out = (torch.empty(n, dtype=torch.float32, device=h.device), torch.empty(n, dtype=torch.float32, device=h.device))
    rows = max(1, min(n, chunk_size))
    if not _low_precision(h.dtype):
        pass_ = _full_precision_pass
    elif kw["need"][1] and fp32_accumulator_fits(*weight.shape):
        pass_ = _low_precision_one_pass
    else:
        pass_ = _low_precision_two_passes
    grads = pass_(h, weight, bias, targets, rows, token_weight, *out, **kw)
    if grads is not None and grads[0] is not None:  # 16-bit: cast an fp32 dh once the pass's tiles are freed
        grads = (grads[0].to(h.dtype), *grads[1:])
    return (*out, grads)


def fp32_accumulator_fits(vocab: int, dim: int) -> bool:
    """Whether a 16-bit pass may sum dW in a V × D fp32 buffer (three N·V·D products) rather than
    in blocks over a second pass that recomputes the scores (four)."""
    return 4 * vocab * dim <= FP32_ACCUMULATOR_BUDGET


def _full_precision_pass(h, weight, bias, targets, rows, token_weight, losses, lses, *, softcap, label_smoothing,
                         z_loss, filter_eps, need=(True, True, True)):
    """fp32/fp64: vocabulary-major [V, chunk] tiles, because W @ hᵀ runs faster than h @ Wᵀ on CPU
    BLAS; the one-hot and label-smoothing terms of the gradient are applied to the small operands
    instead of the tile."""
    vocab, dtype, dev = weight.shape[0], h.dtype, h.device
    scores_buf = torch.empty(vocab * rows, dtype=dtype, device=dev)
    tanh_buf = torch.empty(vocab * rows, dtype=dtype, device=dev) if softcap else None
    grads = token_weight is not None
    if grads:
        dh = torch.empty_like(h) if need[0] else None
        # unfiltered, the first chunk's product initializes dW: no zero-fill pass over V × D
        first_chunk_sets_dw = filter_eps is None and len(h) > 0
        dw = (torch.empty_like if first_chunk_sets_dw else torch.zeros_like)(weight) if need[1] else None
        db = torch.zeros_like(bias) if bias is not None and need[2] else None
        smooth_sum = torch.zeros(h.shape[1], dtype=dtype, device=dev)  # Σ_n smooth_n·h_n
        w_colsum = weight.sum(0) if label_smoothing and need[0] else None
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
        dh_c = torch.zeros_like(hc) if dh is not None else None
        for lo, hi in spans:
            part = tile[lo:hi]
            if dh_c is not None:
                dh_c.addmm_(part.T, weight[lo:hi])
            if dw is not None and start == 0 and first_chunk_sets_dw:
                torch.mm(part, scaled_h, out=dw[lo:hi])
            elif dw is not None:
                dw[lo:hi].addmm_(part, scaled_h)
            if db is not None:
                db[lo:hi] += part @ (torch.ones_like(lse, dtype=dtype) if row is None else row)
        if row is not None:  # the row scale, one-hot and smoothing terms, outside the tile
            if dh_c is not None:
                dh_c.mul_(row.unsqueeze(1)).sub_(onehot.unsqueeze(1) * weight[tc])
            if dw is not None:
                dw.index_put_((tc,), (onehot.unsqueeze(1) * hc).neg_(), accumulate=True)
            if db is not None:
                db.index_put_((tc,), onehot.neg(), accumulate=True)
            if label_smoothing:
                _smoothing_outside_tile(None if filter_eps is None else spans, smooth, hc, weight, w_colsum, dh_c, dw,
                                        db, smooth_sum)
        if dh is not None:
            dh[start:start + m] = dh_c
    if not grads:
        return None
    if dw is not None and label_smoothing and not softcap and filter_eps is None:
        dw.sub_(smooth_sum)
    return dh, dw, db


def _smoothing_outside_tile(spans, smooth, hc, weight, w_colsum, dh_c, dw, db, smooth_sum):
    """The label-smoothing term −smooth_n of every kept score's gradient, applied to the small
    operands: unfiltered (``spans`` None), over the whole vocabulary, dW's share summed over all
    chunks and subtracted once at the end (``smooth_sum``); filtered, over the chunk's kept spans."""
    if spans is None:
        if dh_c is not None:
            dh_c.sub_(smooth.unsqueeze(1) * w_colsum)
        smooth_sum += smooth @ hc
        if db is not None:
            db.sub_(smooth.sum())
        return
    chunk_sum = smooth @ hc
    colsum = 0
    for lo, hi in spans:
        if dh_c is not None:
            colsum = colsum + weight[lo:hi].sum(0)
        if dw is not None:
            dw[lo:hi] -= chunk_sum
        if db is not None:
            db[lo:hi] -= smooth.sum()
    if dh_c is not None and spans:
        dh_c.sub_(smooth.unsqueeze(1) * colsum)


def _low_precision_one_pass(h, weight, bias, targets, rows, token_weight, losses, lses, *, softcap, label_smoothing,
                            z_loss, filter_eps, need=(True, True, True)):
    """bf16 in one pass over token chunks, three N·V·D products in all (as eager and Liger):
    the chunk's [chunk, V] scores in the input dtype (as eager's logits), turned block of rows by
    block of rows into exact fp32 gradient rows (row·exp(s − lse) − smooth − onehot, times
    1 − tanh² under softcap; one max, one exp and one sum pass, then one fused update) and written
    back into the same 16-bit tile, which is the operand of the two gradient matmuls. dW is summed
    over chunks in a V × D fp32 accumulator (when FP32_ACCUMULATOR_BUDGET allows it)."""
    vocab, dtype, dev = weight.shape[0], h.dtype, h.device
    f32 = {"dtype": torch.float32, "device": dev}
    tile_buf = torch.empty(rows * vocab, dtype=dtype, device=dev)
    sizes = blocking(dev)
    block_rows = max(1, min(rows, sizes.row_block_bytes // (4 * vocab)))
    work_buf = torch.empty(block_rows * vocab, **f32)
    tanh_buf = torch.empty(block_rows * vocab, **f32) if softcap else None
    grads = token_weight is not None
    if grads:
        dh = torch.empty_like(h) if need[0] else None
        dw_acc = torch.zeros(weight.shape, **f32) if need[1] else None
        db_acc = torch.zeros(vocab, **f32) if bias is not None and need[2] else None
        db_chunk = torch.empty(vocab, **f32) if db_acc is not None else None
        block = min(vocab, sizes.accumulate_rows)
        product_buf = torch.empty(block, h.shape[1], dtype=dtype, device=dev) if dw_acc is not None else None
        n_blocks = -(-vocab // FILTER_BLOCK)
        block_max = torch.empty(n_blocks, **f32) if filter_eps is not None else None
    for start in range(0, h.shape[0], rows):
        hc, tc = h[start:start + rows], targets[start:start + rows]
        m = hc.shape[0]
        tile = _buffer_view(tile_buf, m, vocab)
        if bias is None:
            torch.mm(hc, weight.T, out=tile)
        else:
            torch.addmm(bias, hc, weight.T, out=tile)
        if grads:
            if db_chunk is not None:
                db_chunk.zero_()
            if block_max is not None:
                block_max.zero_()
        for r in range(0, m, block_rows):
            q = min(block_rows, m - r)
            f = _buffer_view(work_buf, q, vocab).copy_(tile[r:r + q])
            idx = tc[r:r + q].unsqueeze(1)
            if softcap:
                _softcap_(f, _buffer_view(tanh_buf, q, vocab), softcap)
            s_target = f.gather(1, idx).squeeze(1).double()
            s_mean = f.sum(1, dtype=torch.float64) / vocab if label_smoothing else None
            peak = f.amax(1)
            f.sub_(peak.unsqueeze(1)).exp_()
            total = f.sum(1, dtype=torch.float64)
            lse = peak.double() + total.log()
            rows_out = slice(start + r, start + r + q)
            losses[rows_out] = _token_loss(s_target, lse, s_mean, label_smoothing, z_loss)
            lses[rows_out] = lse
            if not grads:
                continue
            row, onehot, smooth = _grad_scales(token_weight[rows_out], lse, label_smoothing, z_loss, vocab,
                                               torch.float64)
            if block_max is not None:  # the largest probability of each FILTER_BLOCK, over the chunk
                peaks = F.pad(f, (0, n_blocks * FILTER_BLOCK - vocab)).view(q, n_blocks, FILTER_BLOCK).amax(2)
                torch.maximum(block_max, (peaks / total.float().unsqueeze(1)).amax(0), out=block_max)
            f.mul_((row / total).float().unsqueeze(1))  # row · p
            if label_smoothing:
                f.sub_(smooth.float().unsqueeze(1))
            f.scatter_add_(1, idx, -onehot.float().unsqueeze(1))
            if softcap:
                f.mul_(_buffer_view(tanh_buf, q, vocab).square_().neg_().add_(1))
            if db_chunk is not None:
                db_chunk += f.sum(0)
            tile[r:r + q].copy_(f)  # the 16-bit operand of the gradient matmuls
        if not grads:
            continue
        spans = [(0, vocab)]
        if block_max is not None:
            spans = _kept_spans(block_max.tolist(), set((tc // FILTER_BLOCK).tolist()), filter_eps, vocab)
        if dh is not None:
            if spans == [(0, vocab)]:
                torch.mm(tile, weight, out=dh[start:start + m])
            else:
                dh_c = torch.zeros(m, h.shape[1], **f32)
                for lo, hi in spans:
                    dh_c += tile[:, lo:hi] @ weight[lo:hi]
                dh[start:start + m] = dh_c
        for lo, hi in spans:
            if db_acc is not None:
                db_acc[lo:hi] += db_chunk[lo:hi]
            if dw_acc is not None:  # 16-bit products of accumulate_rows rows, each added to fp32
                for a in range(lo, hi, block):
                    b = min(a + block, hi)
                    dw_acc[a:b] += torch.mm(tile[:, a:b].T, hc, out=product_buf[:b - a])
    if not grads:
        return None
    dw = None
    if dw_acc is not None:  # cast block by block into the 16-bit gradient
        dw = torch.empty_like(weight)
        for a in range(0, vocab, block):
            dw[a:a + block] = dw_acc[a:a + block]
        del dw_acc
    db = None if db_acc is None else db_acc.to(bias.dtype)
    return dh, dw, db


def _low_precision_two_passes(h, weight, bias, targets, rows, token_weight, losses, lses, *, softcap,
                              label_smoothing, z_loss, filter_eps, need=(True, True, True)):
    """bf16 where a V × D fp32 accumulator would exceed FP32_ACCUMULATOR_BUDGET: two passes, as
    Apple's CCE kernels: the losses and log-sum-exps first (the one-pass function without
    gradients), then, with the log-sum-exps known, the gradients one vocabulary block at a time.
    Going over the vocabulary in the outer loop lets each block of dW be summed over all tokens in
    fp32 and cast once, so the fp32 accumulation costs one block; the price is a fourth N·V·D
    product, recomputing the scores."""
    _low_precision_one_pass(h, weight, bias, targets, rows, None, losses, lses, softcap=softcap,
                            label_smoothing=label_smoothing, z_loss=z_loss, filter_eps=None)
    if token_weight is None:
        return None
    return _low_precision_grads(h, weight, bias, targets, rows, token_weight, lses, softcap=softcap,
                                label_smoothing=label_smoothing, z_loss=z_loss, filter_eps=filter_eps, need=need)


def _low_precision_grads(h, weight, bias, targets, rows, token_weight, lses, *, softcap, label_smoothing, z_loss,
                         filter_eps, need):
    """Pass 2: for each block of `accumulate_rows` vocabulary rows and each chunk of ``rows`` tokens, the
    scores are recomputed (16-bit matmul), turned into exact gradient rows in fp32
    (row·exp(s − lse) − smooth − onehot, times 1 − tanh² under softcap) and cast to 16 bits
    for the two gradient matmuls, whose products are summed in fp32: dh over the vocabulary blocks,
    the block of dW (and db) over the token chunks."""
    n, dim = h.shape
    vocab, dtype, dev = weight.shape[0], h.dtype, h.device
    f32 = {"dtype": torch.float32, "device": dev}
    row, onehot, smooth = _grad_scales(token_weight, lses.double(), label_smoothing, z_loss, vocab, torch.float32)
    block = min(vocab, blocking(dev).accumulate_rows)
    s_buf = torch.empty(rows * block, dtype=dtype, device=dev)
    g_buf = torch.empty(rows * block, **f32)
    tanh_buf = torch.empty(rows * block, **f32) if softcap else None
    dh = torch.zeros(n, dim, **f32) if need[0] else None
    dw = torch.empty_like(weight) if need[1] else None  # the 16-bit gradient, written block by block
    dw_acc = torch.empty(block, dim, **f32) if need[1] else None
    db = torch.empty_like(bias) if bias is not None and need[2] else None
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
            inside = (local >= 0) & (local < width)
            spans = [(0, width)] if filter_eps is None else _filtered_spans(g, local[inside], filter_eps)
            g.mul_(row[start:start + m].unsqueeze(1))
            if label_smoothing:
                g.sub_(smooth[start:start + m].unsqueeze(1))
            # without a host sync (a GPU would wait on each): a token whose target lies outside
            # the block adds 0 at column 0
            g.scatter_add_(1, torch.where(inside, local, 0).unsqueeze(1),
                           torch.where(inside, -onehot[start:start + m], 0).unsqueeze(1).to(g.dtype))
            if softcap:
                g.mul_(_buffer_view(tanh_buf, m, width).square_().neg_().add_(1))
            gl = s.copy_(g)  # the 16-bit operand of the gradient matmuls
            for a, b in spans:
                if db_acc is not None:
                    db_acc[a:b] += g[:, a:b].sum(0)
                if dh is not None:
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
            scale = 1.0 / max(n, 1) if reduction == "mean" else 1.0
            token_weight = torch.full((n,), scale, dtype=torch.float32, device=h.device)
        losses, lses, grads = _chunked_loss_and_grads(h, weight, bias, t, token_weight=token_weight,
                                                      need=ctx.needs_input_grad[:3], **kwargs)
        ctx.opts, ctx.kept, ctx.n_total, ctx.scalar = opts, kept, n_total, scalar
        if scalar:
            ctx.grads = grads
            loss = losses.sum() if reduction == "sum" else losses.sum() / max(n, 1)  # all ignored: 0
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
                dh, dw, db = (None if x is None else x.mul_(grad_loss.to(x.dtype)) for x in (dh, dw, db))
        else:
            hidden, weight, bias, targets = ctx.saved_tensors
            kept = ctx.kept
            h = hidden if kept is None else hidden.index_select(0, kept)
            t = targets if kept is None else targets.index_select(0, kept)
            g = grad_loss if kept is None else grad_loss.index_select(0, kept)
            kwargs = {k: ctx.opts[k] for k in ("softcap", "label_smoothing", "z_loss", "chunk_size", "filter_eps")}
            with weight_available(weight):
                _, _, (dh, dw, db) = _chunked_loss_and_grads(
                    h, weight, bias, t, token_weight=g.float(), need=ctx.needs_input_grad[:3], **kwargs)
        if ctx.kept is not None and dh is not None:
            dh = dh.new_zeros(ctx.n_total, dh.shape[1]).index_copy_(0, ctx.kept, dh)
        return dh, dw, db, None, None, None


def _check_inputs(hidden, weight, targets, bias, ignore_index, reduction, softcap, label_smoothing, z_loss,
                  chunk_size, filter_eps):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1 or hidden.dtype not in FLOAT_DTYPES:
        raise ValueError(f"hidden must be a [..., D] float tensor, got {getattr(hidden, 'dtype', type(hidden))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, {hidden.shape[-1]}] to match hidden, got {list(getattr(weight, 'shape', []))}")
    if hidden.dtype == torch.float16:
        raise ValueError("cce does not take fp16: it computes its gradients during the forward, before the "
                         "loss scale fp16 training multiplies them by is known, so small gradients would "
                         "underflow and a scale of 65,536 overflow; use bf16 or fp32")
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
        chunk_size = auto_chunk_size(weight.shape[0], hidden.dtype, softcap, hidden.device)
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
    ignored). ``chunk_size`` tokens per tile (default: a ~64 MiB tile on CPU, 256 MiB on a GPU).
    ``filter_eps`` (opt-in, inexact) skips vocabulary blocks of the gradient whose probabilities are
    all below it.
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
            need=(need[0], need[1], False))
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
        if dh is not None:
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
        chunk_size = auto_chunk_size(weight.shape[0], hidden.dtype, None, hidden.device)
    want_grads = torch.is_grad_enabled() and any(x.requires_grad for x in (hidden, weight, token_weight))
    return _WeightedLinearCrossEntropy.apply(hidden, weight, token_weight, targets.long(), ignore_index,
                                             chunk_size, want_grads)


class CCEOptions(SoftmaxOptions):
    chunk_size: int | None = Field(
        None, ge=1, description="tokens per logit tile (default: a ~64 MiB tile on CPU, 256 MiB on a GPU)")
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
        rows = auto_chunk_size(self.vocab_size, torch.float32, None, hidden.device)  # fp32 [rows, V] scores: one tile
        for start in range(0, hidden.shape[0], rows):
            yield start, _eval_scores(hidden[start:start + rows], self.weight, self.bias, self.options.softcap)

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
        sizes = blocking()
        rows = min(n_tokens, options.chunk_size or auto_chunk_size(vocab_size, dtype, options.softcap))
        tile = rows * _tile_bytes_per_token(vocab_size, dtype, options.softcap)
        hidden_grad = n_tokens * hidden_size * dtype_bytes(dtype)
        if not _low_precision(dtype):
            # one pass: a tile beside the final gradients, and per chunk four [rows, D]
            # temporaries (its dh, the row-scaled hidden states, the target rows of W and their product)
            return tile + hidden_grad + 4 * rows * hidden_size * dtype_bytes(dtype)
        b = dtype_bytes(dtype)
        block_rows = max(1, min(rows, sizes.row_block_bytes // (4 * vocab_size)))
        work = (2 if options.softcap else 1) * block_rows * 4 * vocab_size  # fp32 row blocks
        if fp32_accumulator_fits(vocab_size, hidden_size):
            # one pass: the 16-bit tile, its fp32 row blocks, the fp32 dW accumulator and a block
            # of 16-bit products beside dh; at the end the accumulator and the 16-bit dW coexist
            # (the dW the profiler adds back).
            return tile + work + 4 * vocab_size * hidden_size + min(vocab_size, sizes.accumulate_rows) * hidden_size * b \
                + hidden_grad
        # pass 1 (losses) runs before any gradient exists; pass 2 sums dh in fp32 beside one
        # [rows, block] tile in 16 and 32 bits, one fp32 block of dW and the 16-bit product added
        # to it; then dh is cast.
        pass1 = tile + work - vocab_size * hidden_size * b
        block = min(vocab_size, sizes.accumulate_rows)
        pass2 = rows * block * (b + 4 * (2 if options.softcap else 1)) + block * hidden_size * (4 + b)
        dh32 = n_tokens * hidden_size * 4
        return max(pass1, pass2 + dh32, dh32 + hidden_grad)
