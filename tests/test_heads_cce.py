"""linear_cross_entropy and the cce head against float64 PyTorch eager math.

Tolerance in the style of Apple's cut-cross-entropy tests: our error against the float64 truth
may exceed eager's own error in the same dtype by at most `tol`, scaled by the size of the
values where they exceed 1 (a sum over tokens of fp32 losses carries fp32's relative rounding)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from head_reference import MatmulCounter, assert_within_eager
from llmtrain.heads import IGNORE_INDEX, build_head
from llmtrain.heads import cce
from llmtrain.heads.cce import linear_cross_entropy

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOL = {("fp32", "forward"): 1e-5, ("fp32", "backward"): 5e-4, ("bf16", "forward"): 1e-2, ("bf16", "backward"): 1e-2}
OPTION_SETS = [
    {},
    {"bias": True},
    {"softcap": 2.0},
    {"z_loss": 1e-2},
    {"label_smoothing": 0.1},
    {"bias": True, "softcap": 2.0, "z_loss": 1e-2, "label_smoothing": 0.1},
]


def eager_loss(h, w, t, bias=None, reduction="mean", softcap=None, label_smoothing=0.0, z_loss=0.0):
    """The definition, in whatever dtype the inputs have (logits upcast to fp32 at least)."""
    logits = F.linear(h, w, bias)
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    per_token = F.cross_entropy(logits, t, ignore_index=IGNORE_INDEX, reduction="none", label_smoothing=label_smoothing)
    keep = t != IGNORE_INDEX
    per_token = per_token + z_loss * torch.logsumexp(logits, -1).square() * keep
    if reduction == "none":
        return per_token
    return per_token.sum() if reduction == "sum" else per_token.sum() / keep.sum()


def make_inputs(n, vocab, dim, seed, ignore_every=4, bias=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, dim, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, dim, generator=g, dtype=torch.float64) / dim**0.5 * 2
    b = torch.randn(vocab, generator=g, dtype=torch.float64) if bias else None
    t = torch.randint(0, vocab, (n,), generator=g)
    if ignore_every:
        t[1::ignore_every] = IGNORE_INDEX
    return h, w, b, t


def loss_and_grads(fn, h, w, b, t, upstream, dtype, **kw):
    params = [x.detach().to(dtype).requires_grad_() for x in (h, w) + ((b,) if b is not None else ())]
    loss = fn(params[0], params[1], t, bias=params[2] if b is not None else None, **kw)
    grads = torch.autograd.grad((loss.double() * upstream).sum(), params)
    return loss.detach().double(), [g.double() for g in grads]


def assert_like_eager(ours, eager, truth, dtype_name, what):
    tol = TOL[(dtype_name, what)] * max(1.0, truth.abs().max().item())
    err, eager_err = (ours - truth).abs().max().item(), (eager - truth).abs().max().item()
    assert err <= eager_err + tol, f"{what}: ours {err:.3g} vs eager {eager_err:.3g} + {tol}"


def check_against_float64(n, vocab, dim, dtype_name, reduction, opts, chunk_size, seed=0, ignore_every=4, **extra):
    opts = dict(opts)
    h, w, b, t = make_inputs(n, vocab, dim, seed, ignore_every, bias=opts.pop("bias", False))
    g = torch.Generator().manual_seed(seed + 1)
    upstream = torch.randn(n, generator=g, dtype=torch.float64) if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
    kw = {"reduction": reduction, **opts}
    truth = loss_and_grads(eager_loss, h, w, b, t, upstream, torch.float64, **kw)
    eager = loss_and_grads(eager_loss, h, w, b, t, upstream, DTYPES[dtype_name], **kw)
    ours = loss_and_grads(linear_cross_entropy, h, w, b, t, upstream, DTYPES[dtype_name], chunk_size=chunk_size, **kw, **extra)
    assert_like_eager(ours[0], eager[0], truth[0], dtype_name, "forward")
    for o, e, tr in zip(ours[1], eager[1], truth[1]):
        assert_like_eager(o, e, tr, dtype_name, "backward")


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: "-".join(o) or "plain")
def test_loss_and_grads_match_float64(dtype_name, reduction, opts):
    # 37 tokens in chunks of 8: the last chunk is partial; 1/4 of the tokens ignored
    check_against_float64(37, 203, 16, dtype_name, reduction, opts, chunk_size=8)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("opts", [{}, OPTION_SETS[-1]], ids=["plain", "all-options"])
@pytest.mark.parametrize("budget", [None, 0], ids=["one-pass", "two-passes"])
def test_bf16_gradients_summed_over_vocabulary_blocks(monkeypatch, reduction, opts, budget):
    """16-bit dW is summed block by block (and, in the second pass, dh across blocks, each block
    holding the targets of only some tokens): several blocks, the last one partial
    (203 = 3 × 64 + 11), with chunked tokens."""
    monkeypatch.setattr(cce, "CPU_BLOCKING", dataclasses.replace(cce.CPU_BLOCKING, accumulate_rows=64))
    if budget is not None:
        monkeypatch.setattr(cce, "FP32_ACCUMULATOR_BUDGET", budget)
    check_against_float64(37, 203, 16, "bf16", reduction, opts, chunk_size=8)


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("budget", [None, 0], ids=["one-pass", "two-passes"])
def test_gpu_blocking_is_exact_too(monkeypatch, dtype_name, budget):
    """A GPU's blocking (whole chunks through fp32 at once, one dW block for the whole vocabulary
    here) is the same math: run on this CPU with CUDA_BLOCKING in place of CPU_BLOCKING."""
    assert cce.blocking("cuda") is cce.CUDA_BLOCKING and cce.blocking("cpu") is cce.CPU_BLOCKING
    monkeypatch.setattr(cce, "CPU_BLOCKING", cce.CUDA_BLOCKING)
    if budget is not None:
        monkeypatch.setattr(cce, "FP32_ACCUMULATOR_BUDGET", budget)
    check_against_float64(37, 203, 16, dtype_name, "mean", OPTION_SETS[-1], chunk_size=None)


@pytest.mark.parametrize("n,vocab,chunk", [(1, 2, None), (8, 64, 8), (50, 333, 7), (64, 1000, None), (5, 50, 100)])
def test_shapes_and_chunkings(n, vocab, chunk):
    check_against_float64(n, vocab, 24, "fp32", "mean", {"z_loss": 1e-3}, chunk_size=chunk, ignore_every=3)
    check_against_float64(n, vocab, 24, "bf16", "sum", {"softcap": 5.0}, chunk_size=chunk, ignore_every=3)


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_tokens_ignored_gives_zero_loss_and_zero_gradients(dtype_name, reduction):
    """The heads' contract, not eager's (whose mean is 0/0 = NaN): a batch of prompt tokens only,
    or one rank's share of one, must not put NaN into an all-reduce."""
    h, w, _, _ = make_inputs(6, 30, 8, seed=3)
    t = torch.full((6,), IGNORE_INDEX)
    hs, ws = (x.to(DTYPES[dtype_name]).requires_grad_() for x in (h, w))
    ours = linear_cross_entropy(hs, ws, t, reduction=reduction)
    ours.sum().backward()
    assert not ours.any() and ours.shape == ((6,) if reduction == "none" else ())
    assert not hs.grad.any() and not ws.grad.any()


def test_leading_dims_and_other_ignore_index():
    h, w, _, t = make_inputs(24, 40, 8, seed=4, ignore_every=0)
    t[::5] = 7
    h3, t2 = h.float().reshape(2, 12, 8), t.reshape(2, 12)
    ours = linear_cross_entropy(h3, w.float(), t2, ignore_index=7, reduction="none")
    keep = t != 7
    ref = F.cross_entropy(h @ w.T, t.masked_fill(~keep, 0), reduction="none") * keep
    assert ours.shape == (2, 12)
    torch.testing.assert_close(ours.double().reshape(-1), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_filter_eps_tiny_is_exact_and_large_skips_whole_blocks(monkeypatch, dtype_name):
    monkeypatch.setattr(cce, "FILTER_BLOCK", 32)  # V = 203: six full blocks and a partial one
    check_against_float64(37, 203, 16, dtype_name, "sum", {}, chunk_size=8, filter_eps=1e-30)

    h, w, _, t = make_inputs(37, 203, 16, seed=5)
    h = h * 0.5  # flat distributions, so that whole blocks fall below eps
    eps, chunk, dt = 0.05, 8, DTYPES[dtype_name]
    h, w = h.to(dt).double(), w.to(dt).double()  # the reference starts from the same rounded inputs
    grads = {}
    for name, filter_eps in (("exact", None), ("filtered", eps)):
        hs, ws = h.to(dt).requires_grad_(), w.to(dt).requires_grad_()
        loss = linear_cross_entropy(hs, ws, t, reduction="sum", chunk_size=chunk, filter_eps=filter_eps)
        loss.backward()
        grads[name] = (hs.grad.double(), ws.grad.double())
    # reference: float64 gradient of the logits with the probability term zeroed in every
    # (chunk of kept tokens) × (vocabulary block) whose probabilities are all below eps and
    # that holds none of the chunk's targets
    keep = t != IGNORE_INDEX
    hk, tk = h[keep], t[keep]
    logits = hk @ w.T
    p = torch.softmax(logits, -1)
    mask = torch.ones_like(p)
    skipped = 0
    for r in range(0, len(tk), chunk):
        for c in range(0, 203, 32):
            if p[r:r + chunk, c:c + 32].max() < eps and not ((tk[r:r + chunk] >= c) & (tk[r:r + chunk] < c + 32)).any():
                mask[r:r + chunk, c:c + 32] = 0
                skipped += 1
    assert skipped > 0
    dropped = p * (1 - mask)  # what filtering leaves out of the exact gradient of the logits
    dh_dropped = torch.zeros_like(h)
    dh_dropped[keep] = dropped @ w
    torch.testing.assert_close(loss.double(), F.cross_entropy(logits, tk, reduction="sum"),
                               rtol=TOL[(dtype_name, "forward")], atol=TOL[(dtype_name, "forward")])
    tol = {"fp32": 1e-5, "bf16": 1e-2}[dtype_name]
    for ours_exact, ours_filtered, ref_dropped in zip(grads["exact"], grads["filtered"], (dh_dropped, dropped.T @ hk)):
        assert ref_dropped.abs().max() > 5 * tol  # filtering changed something measurable
        torch.testing.assert_close(ours_exact - ours_filtered, ref_dropped, rtol=0, atol=tol)


@pytest.mark.parametrize("dtype_name,softcap", [("fp32", None), ("fp32", 2.0), ("bf16", None)])
def test_filter_eps_keeps_the_same_blocks_whatever_the_reduction(monkeypatch, dtype_name, softcap):
    """The filter looks at probabilities, not at gradient entries scaled by 1/n: the mean's
    gradients are the sum's divided by the number of kept tokens."""
    monkeypatch.setattr(cce, "FILTER_BLOCK", 32)
    h, w, _, t = make_inputs(37, 203, 16, seed=5)
    n_kept = int((t != IGNORE_INDEX).sum())
    kw = {"softcap": softcap, "chunk_size": 8, "filter_eps": 0.005}
    _, mean_grads = loss_and_grads(linear_cross_entropy, h * 0.5, w, None, t, 1.0, DTYPES[dtype_name],
                                   reduction="mean", **kw)
    _, sum_grads = loss_and_grads(linear_cross_entropy, h * 0.5, w, None, t, 1.0, DTYPES[dtype_name],
                                  reduction="sum", **kw)
    tol = {"fp32": 1e-5, "bf16": 1e-2}[dtype_name]
    for mean_grad, sum_grad in zip(mean_grads, sum_grads):
        torch.testing.assert_close(mean_grad * n_kept, sum_grad, rtol=tol, atol=tol)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operation creates."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_logits_never_materialized(dtype_name):
    n, vocab, dim, chunk = 256, 2048, 16, 32
    h, w, b, t = make_inputs(n, vocab, dim, seed=6, bias=True)
    dt = DTYPES[dtype_name]
    hs, ws, bs = (x.to(dt).requires_grad_() for x in (h, w, b))
    with LargestTensor() as mode:
        linear_cross_entropy(hs, ws, t, bias=bs, chunk_size=chunk, softcap=4.0, label_smoothing=0.1).backward()
    assert mode.largest <= max(chunk * vocab, vocab * dim)  # one tile, or the weight gradient
    assert mode.largest < n * vocab


def test_no_grad_forward_and_double_backward_refused():
    h, w, _, t = make_inputs(10, 30, 8, seed=7)
    with torch.no_grad():
        loss = linear_cross_entropy(h.float(), w.float().requires_grad_(), t)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss.double(), eager_loss(h, w, t), rtol=1e-5, atol=1e-6)
    ws = w.float().requires_grad_()
    loss = linear_cross_entropy(h.float(), ws, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward through the same loss twice"):
        loss.backward()


@pytest.mark.parametrize("kwargs,argument", [
    ({"hidden": torch.randn(4, 9)}, "weight"),
    ({"hidden": torch.randn(4, 8, dtype=torch.float64).to(torch.int32)}, "hidden"),
    ({"weight": torch.randn(30, 8, dtype=torch.bfloat16)}, "weight dtype"),
    ({"bias": torch.randn(29)}, "bias"),
    ({"targets": torch.zeros(4)}, "targets"),
    ({"targets": torch.zeros(5, dtype=torch.long)}, "targets"),
    ({"targets": torch.tensor([0, 1, 30, 2])}, "targets"),
    ({"targets": torch.tensor([0, -1, 3, 2])}, "targets"),
    ({"reduction": "avg"}, "reduction"),
    ({"softcap": 0.0}, "softcap"),
    ({"label_smoothing": 1.0}, "label_smoothing"),
    ({"z_loss": -1.0}, "z_loss"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"filter_eps": 2.0}, "filter_eps"),
])
def test_bad_input_names_the_argument(kwargs, argument):
    args = {"hidden": torch.randn(4, 8), "weight": torch.randn(30, 8), "targets": torch.tensor([0, 1, -100, 2]), **kwargs}
    with pytest.raises(ValueError, match=argument):
        linear_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("targets"), **args)


# --- the head -------------------------------------------------------------------------------------


def twin_heads(vocab=211, dim=16, **opts):
    """A cce head and a softmax head with the same weights."""
    torch.manual_seed(0)
    ours = build_head({"type": "cce", "chunk_size": 8, **opts}, hidden_size=dim, vocab_size=vocab)
    ref = build_head({"type": "softmax", **opts}, hidden_size=dim, vocab_size=vocab)
    ref.load_state_dict(ours.state_dict())
    if ours.bias is not None:
        with torch.no_grad():
            ours.bias.normal_()
            ref.bias.copy_(ours.bias)
    return ours, ref


@pytest.mark.parametrize("opts", [o for o in OPTION_SETS if o], ids=lambda o: "-".join(o))
def test_head_matches_softmax_head(opts):
    ours, ref = twin_heads(**opts)
    h, _, _, t = make_inputs(29, 211, 16, seed=8)
    h = h.float()
    out, ref_out = ours(h, t), ref(h, t)
    out.loss.backward()
    ref_out.loss.backward()
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=1e-5, atol=1e-6)
    assert out.metrics.keys() == ref_out.metrics.keys()
    for k in out.metrics:
        assert abs(out.metrics[k] - ref_out.metrics[k]) <= 1e-5 * max(1.0, abs(ref_out.metrics[k]))
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, dict(ref.named_parameters())[name].grad, rtol=1e-4, atol=1e-6)


def test_head_logprobs_topk_exact_and_sample_follows_distribution():
    ours, ref = twin_heads(vocab=300, softcap=3.0, bias=True)
    h = torch.randn(21, 16)
    every = torch.arange(300)
    all_lp = torch.stack([ours.token_logprobs(h, every[v].expand(21)) for v in range(300)], dim=1)
    torch.testing.assert_close(torch.logsumexp(all_lp.double(), 1), torch.zeros(21, dtype=torch.float64), atol=1e-5, rtol=0)
    ref_lp = torch.log_softmax(ref.logits(h).double(), -1)
    torch.testing.assert_close(all_lp.double(), ref_lp, atol=1e-5, rtol=0)
    assert torch.equal(ours.topk(h, 7), ref_lp.topk(7, dim=1).indices)

    small, small_ref = twin_heads(vocab=5, dim=3)
    hs = torch.randn(1, 3).expand(20000, 3)
    freq = torch.bincount(small.sample(hs, temperature=0.7, generator=torch.Generator().manual_seed(0)), minlength=5)
    probs = torch.softmax(small_ref.logits(hs[:1]).double() / 0.7, -1)[0]
    assert (freq.double() / 20000 - probs).abs().max() < 0.02


def test_head_options_mirror_softmax_and_memory_model_is_small():
    from llmtrain.heads.softmax import SoftmaxHead
    from llmtrain.heads.cce import CCEHead

    assert set(SoftmaxHead.Options.model_fields) <= set(CCEHead.Options.model_fields)
    assert CCEHead.supports_tying and CCEHead.is_distribution
    for dtype in (torch.float32, torch.bfloat16):
        opts = CCEHead.Options()
        ours = CCEHead.transient_bytes(opts, 8192, 2304, 256000, dtype)
        eager = SoftmaxHead.transient_bytes(SoftmaxHead.Options(), 8192, 2304, 256000, dtype)
        assert 8192 * 2304 * 2 < ours < eager / 12
    with pytest.raises(ValueError, match="chunk_size"):
        build_head({"type": "cce", "chunk_size": 0}, 8, 10)
    with pytest.raises(ValueError, match="filter_eps"):
        build_head({"type": "cce", "filter_eps": 1.5}, 8, 10)


# --- every gradient term, on norms -----------------------------------------------------------------


def shifted_inputs(n, vocab, dim, seed, bias):
    """make_inputs with a common vector added to every row of W: the label-smoothing term of ∇h
    (−ε·mean row) and the mean-row parts of every gradient are then as large as the rest."""
    h, w, b, t = make_inputs(n, vocab, dim, seed, bias=bias)
    w = w + torch.randn(dim, generator=torch.Generator().manual_seed(seed + 7), dtype=torch.float64)
    return h, w, b, t


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: "-".join(o) or "plain")
def test_every_gradient_term_within_eager_error_on_norms(dtype_name, reduction, opts):
    """Loss, ∇h, ∇W and ∇b each within twice eager's same-dtype relative error (against float64)
    plus a floor far below any term's share: a dropped term fails here."""
    opts = dict(opts)
    h, w, b, t = shifted_inputs(37, 203, 16, 11, opts.pop("bias", False))
    upstream = torch.randn(37, generator=torch.Generator().manual_seed(12), dtype=torch.float64) \
        if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
    dt, kw = DTYPES[dtype_name], {"reduction": reduction, **opts}
    truth = loss_and_grads(eager_loss, h, w, b, t, upstream, torch.float64, **kw)
    eager = loss_and_grads(eager_loss, h, w, b, t, upstream, dt, **kw)
    ours = loss_and_grads(linear_cross_entropy, h, w, b, t, upstream, dt, chunk_size=8, **kw)
    names = ["loss", "∇h", "∇W", "∇b"]
    floor = {"fp32": 1e-6, "bf16": 1e-3}[dtype_name]
    assert_within_eager([ours[0], *ours[1]], [eager[0], *eager[1]], [truth[0], *truth[1]], names, floor)


@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.1}, {"bias": True}], ids=["plain", "smoothing", "bias"])
def test_torch_linear_cross_entropy_as_second_reference(opts):
    """torch's own fused F.linear_cross_entropy (chunked) on the cases it shares with ours."""
    opts = dict(opts)
    h, w, b, t = shifted_inputs(37, 203, 16, 13, opts.pop("bias", False))
    one = torch.tensor(1.0, dtype=torch.float64)

    def peer(hs, ws, ts, bias=None, reduction="mean", label_smoothing=0.0):
        return F.linear_cross_entropy(hs, ws, ts, linear_bias=bias, reduction=reduction, ignore_index=IGNORE_INDEX,
                                      label_smoothing=label_smoothing, options=torch.nn.LinearCrossEntropyOptions())
    truth = loss_and_grads(eager_loss, h, w, b, t, one, torch.float64, **opts)
    theirs = loss_and_grads(peer, h, w, b, t, one, torch.float32, **opts)
    ours = loss_and_grads(linear_cross_entropy, h, w, b, t, one, torch.float32, chunk_size=8, **opts)
    names = ["loss", "∇h", "∇W", "∇b"]
    assert_within_eager([ours[0], *ours[1]], [theirs[0], *theirs[1]], [truth[0], *truth[1]], names, 1e-6)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_apple_cut_cross_entropy_as_second_reference(softcap):
    """Apple's cut-cross-entropy (its torch_compile path: the one that runs on CPU)."""
    apple = pytest.importorskip("cut_cross_entropy")
    h, w, _, t = shifted_inputs(37, 203, 16, 14, False)
    one = torch.tensor(1.0, dtype=torch.float64)

    def peer(hs, ws, ts, bias=None, reduction="mean", softcap=None):
        return apple.linear_cross_entropy(hs, ws, ts, softcap=softcap, reduction=reduction, impl="torch_compile")
    truth = loss_and_grads(eager_loss, h, w, None, t, one, torch.float64, softcap=softcap)
    theirs = loss_and_grads(peer, h, w, None, t, one, torch.float32, softcap=softcap)
    ours = loss_and_grads(linear_cross_entropy, h, w, None, t, one, torch.float32, chunk_size=8, softcap=softcap)
    assert_within_eager([ours[0], *ours[1]], [theirs[0], *theirs[1]], [truth[0], *truth[1]], ["loss", "∇h", "∇W"], 1e-6)


@pytest.mark.parametrize("need_hidden", [True, False], ids=["with-dh", "without-dh"])
@pytest.mark.parametrize("dtype_name,budget", [("fp32", None), ("bf16", None), ("bf16", 0)],
                         ids=["fp32", "bf16-one-pass", "bf16-two-passes"])
def test_three_products_per_step(monkeypatch, dtype_name, budget, need_hidden):
    """Forward + backward does the three N·V·D products a linear + cross-entropy needs (scores,
    ∇h, ∇W), two when the hidden states need no gradient; only a 16-bit dW past
    FP32_ACCUMULATOR_BUDGET recomputes the scores (one more)."""
    if budget is not None:
        monkeypatch.setattr(cce, "FP32_ACCUMULATOR_BUDGET", budget)
    n, vocab, dim = 64, 1000, 16
    h, w, _, t = make_inputs(n, vocab, dim, seed=15, ignore_every=0)
    hs, ws = h.to(DTYPES[dtype_name]).requires_grad_(need_hidden), w.to(DTYPES[dtype_name]).requires_grad_()
    with MatmulCounter() as count:
        linear_cross_entropy(hs, ws, t, chunk_size=16).backward()
    expected = (3 if budget is None else 4) - (0 if need_hidden else 1)
    assert count.macs / (n * vocab * dim) == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize("dtype_name,path", [("fp32", "plain"), ("fp32", "softcap"), ("bf16", "plain"),
                                             ("bf16", "softcap"), ("bf16", "two-passes")])
def test_filter_eps_drops_every_term_of_a_skipped_block_on_every_path(monkeypatch, dtype_name, path):
    """filter_eps means one thing everywhere: for each chunk of kept tokens and each FILTER_BLOCK of
    the vocabulary whose probabilities are all below eps and which holds none of the chunk's
    targets, the block's whole gradient (probability, z-loss, label-smoothing and softcap terms,
    and the bias's share) is left out; the loss stays exact. Checked against that definition in
    float64, with label smoothing, z-loss and a bias on."""
    monkeypatch.setattr(cce, "FILTER_BLOCK", 8)
    monkeypatch.setattr(cce, "CPU_BLOCKING", dataclasses.replace(cce.CPU_BLOCKING, accumulate_rows=16))
    if path == "two-passes":
        monkeypatch.setattr(cce, "FP32_ACCUMULATOR_BUDGET", 0)
    n, vocab, dim, chunk, eps, smoothing, z = 30, 64, 8, 6, 1e-3, 0.3, 1e-2
    softcap = 20.0 if path == "softcap" else None
    g = torch.Generator().manual_seed(16)
    h = torch.randn(n, dim, generator=g, dtype=torch.float64)
    h[:, 0] = 1.0
    w = torch.randn(vocab, dim, generator=g, dtype=torch.float64) / 2
    cold = (torch.arange(vocab) // 8) % 2 == 1  # every other block scores ~e^-12 below the rest
    w[cold, 0] = -12.0
    w[~cold, 0] = 0.0
    b = torch.randn(vocab, generator=g, dtype=torch.float64) / 10
    t = torch.randint(0, vocab, (n,), generator=g)
    t[::5] = IGNORE_INDEX
    t[1::7] = torch.nonzero(cold).squeeze(1)[:len(t[1::7])]  # some targets in cold blocks
    t[1:5] = torch.tensor([8, 24, 40, 56])  # the first chunk of kept tokens has a target in every block
    dt = DTYPES[dtype_name]
    h, w, b = (x.to(dt).double() for x in (h, w, b))  # the reference starts from the rounded inputs

    keep = t != IGNORE_INDEX
    hk, tk = h[keep], t[keep]
    s = hk @ w.T + b
    tanh = torch.tanh(s / softcap) if softcap else None
    s = softcap * tanh if softcap else s
    lse = torch.logsumexp(s, 1)
    p = torch.softmax(s, 1)
    grad_s = (1 + 2 * z * lse)[:, None] * p - smoothing / vocab
    grad_s[torch.arange(len(tk)), tk] -= 1 - smoothing
    if softcap:
        grad_s = grad_s * (1 - tanh.square())
    mask = torch.ones_like(p)
    for r in range(0, len(tk), chunk):
        for c in range(0, vocab, 8):
            if p[r:r + chunk, c:c + 8].max() < eps and not ((tk[r:r + chunk] >= c) & (tk[r:r + chunk] < c + 8)).any():
                mask[r:r + chunk, c:c + 8] = 0
    assert 0 < mask.mean() < 1 and mask[:chunk].all()  # chunks filtered and a chunk kept whole
    kept = grad_s * mask
    dh_ref = torch.zeros_like(h)
    dh_ref[keep] = kept @ w
    truth = [dh_ref, kept.T @ hk, kept.sum(0)]
    unfiltered = [torch.zeros_like(h).index_put_((keep.nonzero().squeeze(1),), grad_s @ w), grad_s.T @ hk, grad_s.sum(0)]

    params = [x.to(dt).requires_grad_() for x in (h, w, b)]
    loss = linear_cross_entropy(params[0], params[1], t, bias=params[2], reduction="sum", chunk_size=chunk,
                                filter_eps=eps, label_smoothing=smoothing, z_loss=z, softcap=softcap)
    loss.backward()
    tol = {"fp32": 1e-5, "bf16": 6e-3}[dtype_name]  # bf16 measured 3–4e-3
    exact_loss = ((1 - smoothing) * (lse - s[torch.arange(len(tk)), tk]) + smoothing * (lse - s.mean(1))
                  + z * lse.square()).sum()
    assert loss.double().item() == pytest.approx(exact_loss.item(), rel=tol)
    for name, ours, ref, full in zip(["∇h", "∇W", "∇b"], [x.grad for x in params], truth, unfiltered):
        err = ((ours.double() - ref).norm() / ref.norm()).item()
        assert err < tol, f"{name}: relative error {err:.3g}"
        assert ((full - ref).norm() / ref.norm()).item() > 3 * tol  # the skipped blocks mattered (2–11%)
