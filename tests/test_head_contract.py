"""The contract of heads/base.py, checked for every registered head (and the TempNet variants):
all-ignored batches, ignored log-probs and entropies, fp16 under a loss scale, the mean
reduction, which tensors get gradients, token entropy and the fused evaluation pass."""

import math

import pytest
import torch

from head_reference import MatmulCounter, relative_error
from llmtrain.heads import HEADS, IGNORE_INDEX, build_head
from llmtrain.heads.temperature import attach_temperature
from llmtrain.heads.zloss import NotADistributionError

V, D, N = 97, 12, 40
SPECS = {
    "softmax": {"type": "softmax", "bias": True, "softcap": 4.0, "label_smoothing": 0.1, "z_loss": 1e-2},
    "cce": {"type": "cce", "bias": True, "softcap": 4.0, "label_smoothing": 0.1, "z_loss": 1e-2, "chunk_size": 7},
    "cce-plain": {"type": "cce", "chunk_size": 7},
    "softmax-bias": {"type": "softmax", "bias": True},
    "hsm": {"type": "hsm", "n_clusters": 9, "shortlist": 4},
    "zloss": {"type": "zloss", "b": 3.0},
}
TEMPNET = {"softmax+tempnet": "softmax-bias", "cce+tempnet": "cce-plain", "hsm+tempnet": "hsm"}


def test_every_registered_head_is_covered():
    assert {s["type"] for s in SPECS.values()} == set(HEADS)


def make_head(name, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    spec = dict(SPECS[TEMPNET.get(name, name)])
    head = build_head(spec, hidden_size=D, vocab_size=V)
    if name in TEMPNET:
        attach_temperature(head, width=8, tau_min=0.5, tau_max=5.0, rho=2.0, dropout=0.0)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.5)
    return head.to(dtype)


def batch(dtype=torch.float32, seed=1, n=N):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, D, generator=g).to(dtype)
    t = torch.randint(0, V, (n,), generator=g)
    t[::5] = IGNORE_INDEX
    return h, t


def grads(head, h, t, scale=1.0, need_hidden=True):
    head.zero_grad(set_to_none=True)
    h = h.detach().clone().requires_grad_(need_hidden)
    out = head(h, t)
    (out.loss * scale).backward()
    return out.loss.detach(), h.grad, {n: p.grad for n, p in head.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", [*SPECS, *TEMPNET])
def test_all_ignored_batch_gives_zero_loss_and_zero_gradients(name, dtype):
    head = make_head(name, dtype)
    h, _ = batch(dtype)
    loss, dh, dparams = grads(head, h, torch.full((N,), IGNORE_INDEX))
    assert loss.item() == 0.0
    assert dh is not None and not dh.any()
    for n, g in dparams.items():
        assert g is None or not g.any(), n


@pytest.mark.parametrize("name", [*SPECS, *TEMPNET])
def test_mean_over_kept_tokens(name):
    """The loss of a batch is the token-weighted mean of its parts' losses: a mean over kept
    tokens, whatever the head computes per token."""
    head = make_head(name)
    h, t = batch()
    with torch.no_grad():
        whole = head(h, t).loss.double()
        parts = [(head(h[s], t[s]).loss.double(), (t[s] != IGNORE_INDEX).sum()) for s in (slice(0, 13), slice(13, N))]
    assert whole.item() == pytest.approx(sum(l * n for l, n in parts).item() / sum(n for _, n in parts).item(), rel=1e-5)


@pytest.mark.parametrize("name", [*SPECS, *TEMPNET])
def test_gradients_reach_hidden_and_every_parameter_and_no_hidden_gradient_is_computed_unasked(name):
    head = make_head(name)
    h, t = batch()
    with MatmulCounter() as full:
        _, dh, with_h = grads(head, h, t)
    with MatmulCounter() as without:
        _, none, without_h = grads(head, h, t, need_hidden=False)
    assert dh is not None and dh.abs().sum() > 0 and none is None
    for n, g in with_h.items():
        assert g is not None and g.abs().sum() > 0, f"{n} got no gradient"
        torch.testing.assert_close(without_h[n], g, rtol=1e-5, atol=1e-7)
    # ∇h is one product of the head's size: skipping it saves about N·(scores touched)·D. With
    # TempNet on cce the loss is of h/τ, τ learned: ∇(h/τ) is needed for τ's gradient anyway.
    if name != "cce+tempnet":
        assert without.macs < full.macs, (without.macs, full.macs)


@pytest.mark.parametrize("name", ["softmax", "hsm", "zloss"])
def test_fp16_exact_under_loss_scale_65536(name):
    """DeepSpeed's fp16 starts at loss scale 2**16: the scaled gradients must stay finite and,
    unscaled, match float64 within fp16 rounding. (TempNet's own parameters have gradients near 1,
    which overflow fp16 at that scale whatever computes them: loss scaling's own business.)"""
    head64, head16 = make_head(name, torch.float64), make_head(name, torch.float16)
    h, t = batch(torch.float64)
    _, dh64, p64 = grads(head64, h, t)
    _, dh16, p16 = grads(head16, h.half(), t, scale=65536.0)
    for what, g16, g64 in [("hidden", dh16, dh64)] + [(n, p16[n], p64[n]) for n in p64]:
        assert torch.isfinite(g16).all(), what
        assert relative_error(g16.double() / 65536, g64) < 2e-2, what


@pytest.mark.parametrize("name", ["cce", "cce+tempnet"])
def test_fp16_refused_by_cce_with_a_clear_error(name):
    head = make_head(name, torch.float16)
    h, t = batch(torch.float16)
    with pytest.raises(ValueError, match="fp16.*use bf16 or fp32"):
        head(h, t)


def reference_log_probs(name, head, h):
    """[N, V] float64 log-probabilities from the definition of each head."""
    head = head.double()
    h = h.double()
    if name.startswith("hsm"):
        top = torch.log_softmax(h @ head.cluster_weight.T, 1)
        out = torch.empty(h.shape[0], V, dtype=torch.float64)
        offsets = head.cluster_offsets.tolist()
        for c in range(head.n_clusters):
            rows = torch.arange(offsets[c], offsets[c + 1])
            out[:, head.row_token[rows]] = top[:, c:c + 1] + torch.log_softmax(h @ head.weight[rows].T, 1)
        return out
    scores = h @ head.weight.T + (head.bias if head.bias is not None else 0)
    cap = head.options.softcap
    return torch.log_softmax(cap * torch.tanh(scores / cap) if cap else scores, 1)


@pytest.mark.parametrize("name", ["softmax", "cce", "cce-plain", "hsm"])
def test_logprobs_entropy_and_topk_against_float64(name):
    head = make_head(name)
    h, t = batch()
    h = h * 3  # peaked distributions: entropies well away from log V
    ref = reference_log_probs(name, head, h)
    ref_logprobs = torch.where(t != IGNORE_INDEX, ref.gather(1, t.clamp(min=0)[:, None]).squeeze(1), 0.0)
    ref_entropy = -(ref.exp() * ref).sum(1)
    head = head.float()
    logprobs, top = head.logprobs_and_topk(h, t, 5)
    assert (logprobs[t == IGNORE_INDEX] == 0).all() and (head.token_logprobs(h, t)[t == IGNORE_INDEX] == 0).all()
    torch.testing.assert_close(logprobs.double(), ref_logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.token_logprobs(h, t).double(), ref_logprobs, rtol=1e-5, atol=1e-5)
    assert torch.equal(top, ref.topk(5, 1).indices) and torch.equal(head.topk(h, 5), top)
    entropy = head.token_entropy(h)
    assert entropy.dtype == torch.float32 and entropy.shape == (N,)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=1e-5, atol=1e-5)
    assert ref_entropy.max() - ref_entropy.min() > 0.3 and ref_entropy.max() < math.log(V) - 0.5  # not all flat
    # generation's candidates: several tokens per row, each row's best and some others
    candidates = torch.cat([top, torch.randint(0, V, (N, 3), generator=torch.Generator().manual_seed(2))], 1)
    torch.testing.assert_close(head.candidate_logprobs(h, candidates).double(), ref.gather(1, candidates),
                               rtol=1e-5, atol=1e-5)


def test_entropy_exact_under_a_large_common_score():
    """Adding one vector u to every row of W shifts all scores of a token by u·h: the
    distribution, and so the entropy, is unchanged; shifted first, the computation loses nothing."""
    head = make_head("cce-plain")
    h, _ = batch()
    base = head.token_entropy(h)
    with torch.no_grad():
        head.weight += 100.0 * torch.randn(D)
    torch.testing.assert_close(head.token_entropy(h), base, rtol=0, atol=5e-4)
    assert (h @ head.weight[0]).abs().max() > 300  # the shift dwarfs the scores' spread (a few units)


def test_zloss_is_not_a_distribution_anywhere():
    head = make_head("zloss")
    h, t = batch()
    for call in (lambda: head.token_logprobs(h, t), lambda: head.token_entropy(h)):
        with pytest.raises(NotADistributionError):
            call()
    logprobs, top = head.logprobs_and_topk(h, t, 5)
    assert logprobs is None and torch.equal(top, head.topk(h, 5))
