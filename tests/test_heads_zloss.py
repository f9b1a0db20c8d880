"""The spherical Z-loss and its head against float64 naive N × V math, and its invariances."""

import math

import pytest
import torch
import torch.nn.functional as F

from llmtrain.heads import IGNORE_INDEX, build_head
from llmtrain.heads import zloss as zl
from llmtrain.heads.zloss import NotADistributionError, spherical_z_loss


def naive_z(hidden, weight, targets, vocab_size=None):
    """float64 (or the inputs' dtype) z of every token, through all N × V scores."""
    scores = hidden @ weight[:vocab_size].T
    mu = scores.mean(1)
    sigma = (scores.square().mean(1) - mu.square()).sqrt()
    target_scores = scores.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    return (target_scores - mu) / sigma, (scores - mu[:, None]) / sigma[:, None]


def naive_loss(hidden, weight, targets, a, b, reduction="mean", vocab_size=None):
    z, _ = naive_z(hidden, weight, targets, vocab_size)
    keep = targets != IGNORE_INDEX
    per_token = F.softplus(a * (b - z)) / a * keep
    return {"mean": per_token.sum() / keep.sum(), "sum": per_token.sum(), "none": per_token}[reduction]


def random_problem(n=37, v=53, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=g) / math.sqrt(d)).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::4] = IGNORE_INDEX
    return hidden, weight, targets


def loss_and_grads(fn, hidden, weight, upstream):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    loss = fn(hidden, weight)
    (loss * upstream.to(loss.dtype)).sum().backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("a,b,chunk", [(1.0, 0.0, 8192), (0.3, 5.0, 7), (4.0, 2.0, 16)])
def test_loss_and_grads_match_float64(reduction, a, b, chunk, monkeypatch):
    monkeypatch.setattr(zl, "VOCAB_CHUNK", chunk)  # small chunks exercise the chunked Gram and ∇W
    hidden, weight, targets = random_problem()
    upstream = torch.randn(hidden.shape[0]) if reduction == "none" else torch.tensor(1.7)
    ours = loss_and_grads(lambda h, w: spherical_z_loss(h, w, targets, a=a, b=b, reduction=reduction),
                          hidden, weight, upstream)
    ref = loss_and_grads(lambda h, w: naive_loss(h, w, targets, a, b, reduction),
                         hidden.double(), weight.double(), upstream.double())
    for got, want in zip(ours, ref):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


def test_padded_vocabulary_rows_are_left_out():
    hidden, weight, targets = random_problem(v=60)
    upstream = torch.tensor(1.0)
    ours = loss_and_grads(lambda h, w: spherical_z_loss(h, w, targets % 50, a=1.0, b=3.0, vocab_size=50),
                          hidden, weight, upstream)
    ref = loss_and_grads(lambda h, w: naive_loss(h, w, targets % 50, 1.0, 3.0, vocab_size=50),
                         hidden.double(), weight.double(), upstream.double())
    for got, want in zip(ours, ref):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6 * want.abs().max().item())
    assert torch.equal(ours[2][50:], torch.zeros(10, weight.shape[1]))
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 50\)"):
        spherical_z_loss(hidden, weight, torch.full_like(targets, 55), a=1.0, b=0.0, vocab_size=50)


def test_bf16_error_no_worse_than_eager_bf16():
    """Against float64 math on the same bf16-rounded inputs, our error (fp32 inside, bf16 gradients)
    stays within eager bf16's own error for the naive N × V computation."""
    hidden, weight, targets = random_problem(n=64, v=300, d=32, dtype=torch.bfloat16)
    upstream = torch.tensor(1.0)
    ours = loss_and_grads(lambda h, w: spherical_z_loss(h, w, targets, a=1.0, b=2.0), hidden, weight, upstream)
    eager = loss_and_grads(lambda h, w: naive_loss(h, w, targets, 1.0, 2.0), hidden, weight, upstream)
    truth = loss_and_grads(lambda h, w: naive_loss(h, w, targets, 1.0, 2.0), hidden.double(), weight.double(),
                           upstream.double())
    for got, eager_got, want in zip(ours, eager, truth):
        assert got.dtype == (torch.float32 if got.dim() == 0 else torch.bfloat16)
        ours_err = (got.double() - want).abs().max().item()
        eager_err = (eager_got.double() - want).abs().max().item()
        assert ours_err <= eager_err + 1e-3 * want.abs().max().item()


def test_invariant_to_shifting_and_scaling_the_scores():
    hidden, weight, targets = random_problem()
    w = weight.detach()
    base = spherical_z_loss(hidden.detach(), w, targets, a=1.0, b=4.0, reduction="none")
    shift = torch.randn(w.shape[1]) * 20  # adds shift·h to every score of a token: far larger than their spread
    for moved in (w + shift, w * 7.5, w * 0.01, (w + shift) * 3):
        got = spherical_z_loss(hidden.detach(), moved, targets, a=1.0, b=4.0, reduction="none")
        torch.testing.assert_close(got, base, rtol=2e-4, atol=1e-5)
    scaled_hidden = spherical_z_loss(hidden.detach() * 30, w, targets, a=1.0, b=4.0, reduction="none")
    torch.testing.assert_close(scaled_hidden, base, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["equal rows", "zero weight", "zero hidden"])
def test_degenerate_sigma_is_guarded_not_nan(case):
    hidden, weight, targets = random_problem()
    hidden, weight = hidden.detach().clone(), weight.detach().clone()
    if case == "equal rows":
        weight[:] = weight[0]
    elif case == "zero weight":
        weight.zero_()
    else:
        hidden[:5] = 0
    hidden.requires_grad_()
    weight.requires_grad_()
    a, b = 2.0, 1.0
    loss = spherical_z_loss(hidden, weight, targets, a=a, b=b, reduction="none")
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
    # σ = 0 means every score equals the mean: the guard gives z ≈ 0, the loss softplus(a·b)/a.
    degenerate = (targets != IGNORE_INDEX) & (torch.arange(len(targets)) < (5 if case == "zero hidden" else 10**9))
    torch.testing.assert_close(loss[degenerate], torch.full_like(loss[degenerate], F.softplus(torch.tensor(a * b)).item() / a),
                               rtol=1e-3, atol=1e-4)


def test_bad_arguments_name_the_problem():
    hidden, weight, targets = random_problem()
    for a in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="a must be a finite number > 0"):
            spherical_z_loss(hidden, weight, targets, a=a, b=0.0)
    with pytest.raises(ValueError, match="reduction must be one of mean, sum, none"):
        spherical_z_loss(hidden, weight, targets, a=1.0, b=0.0, reduction="avg")
    with pytest.raises(ValueError, match="vocab_size must be between 2"):
        spherical_z_loss(hidden, weight, targets, a=1.0, b=0.0, vocab_size=100)
    with pytest.raises(ValueError, match=r"(?s)head 'zloss'.*\ba\b.*greater than 0"):
        build_head({"type": "zloss", "a": 0}, hidden_size=8, vocab_size=10)
    with pytest.raises(ValueError, match="hidden must be"):
        build_head({"type": "zloss"}, hidden_size=8, vocab_size=10)(torch.randn(3, 5), torch.zeros(3, dtype=torch.long))


def test_all_ignored_mean_is_zero_with_zero_gradient():
    hidden, weight, targets = random_problem()
    loss = spherical_z_loss(hidden, weight, torch.full_like(targets, IGNORE_INDEX), a=1.0, b=1.0)
    loss.backward()
    assert loss.item() == 0.0 and not hidden.grad.any() and not weight.grad.any()


def _zloss_head(v=300, d=16, **opts):
    torch.manual_seed(0)
    return build_head({"type": "zloss", **opts}, hidden_size=d, vocab_size=v)


def test_head_forward_is_the_loss_and_not_a_distribution():
    head = _zloss_head(a=0.5, b=3.0)
    hidden, _, targets = random_problem(v=300)
    out = head(hidden, targets)
    want = naive_loss(hidden.detach().double(), head.weight.detach().double(), targets, 0.5, 3.0)
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-5, atol=1e-6)
    z, _ = naive_z(hidden.detach().double(), head.weight.detach().double(), targets)
    assert abs(out.metrics["z_target_mean"] - z[targets != IGNORE_INDEX].mean().item()) < 1e-4
    assert head.is_distribution is False and head.supports_tying is True
    with pytest.raises(NotADistributionError, match="not a probability model.*calibrated_token_logprobs"):
        head.token_logprobs(hidden, targets)


def test_topk_exact_against_brute_force(monkeypatch):
    monkeypatch.setattr(zl, "VOCAB_CHUNK", 37)
    monkeypatch.setattr(zl, "EVAL_CHUNK", 5)
    head = _zloss_head()
    hidden = torch.randn(23, 16)
    brute = (hidden.double() @ head.weight.detach().double().T).topk(10, dim=1).indices
    assert torch.equal(head.topk(hidden, 10), brute)
    assert torch.equal(head.topk(hidden, 300), (hidden.double() @ head.weight.detach().double().T).argsort(1, descending=True))
    with pytest.raises(ValueError, match=r"k must be in \[1, 300\]"):
        head.topk(hidden, 301)


def test_calibrated_logprobs_normalize_and_match_float64(monkeypatch):
    monkeypatch.setattr(zl, "VOCAB_CHUNK", 32)
    head = _zloss_head(v=100)
    head.calibration_beta.fill_(0.7)
    hidden = torch.randn(9, 16)
    every = torch.stack([head.calibrated_token_logprobs(hidden, torch.full((9,), v)) for v in range(100)], 1)
    torch.testing.assert_close(torch.logsumexp(every.double(), 1), torch.zeros(9, dtype=torch.float64), atol=1e-5, rtol=0)
    _, z_all = naive_z(hidden.double(), head.weight.detach().double(), torch.zeros(9, dtype=torch.long))
    torch.testing.assert_close(every.double(), torch.log_softmax(0.7 * z_all, 1), atol=1e-5, rtol=1e-5)
    targets = torch.arange(9)
    targets[3] = IGNORE_INDEX
    assert head.calibrated_token_logprobs(hidden, targets)[3].item() == 0.0


def test_fit_calibration_minimizes_nll_and_is_saved(monkeypatch):
    monkeypatch.setattr(zl, "VOCAB_CHUNK", 128)
    head = _zloss_head()
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(200, 16, generator=g)
    # Targets that the scores predict, noisily: the best β is finite and positive.
    scores = hidden @ head.weight.detach().T
    targets = torch.distributions.Categorical(logits=1.5 * scores).sample()
    targets[::7] = IGNORE_INDEX
    beta = head.fit_calibration(hidden, targets, across_ranks=False)
    keep = targets != IGNORE_INDEX
    _, z_all = naive_z(hidden[keep].double(), head.weight.detach().double(), targets[keep])

    def nll(bt):
        return -torch.log_softmax(bt * z_all, 1).gather(1, targets[keep][:, None]).mean().item()

    assert 0 < beta < zl.BETA_MAX
    assert nll(beta) <= min(nll(beta * 0.98), nll(beta * 1.02))
    assert head.state_dict()["calibration_beta"].item() == pytest.approx(beta)
    assert head.state_dict()["calibrated"].item() is True
    mean_logp = head.calibrated_token_logprobs(hidden, targets)[keep].double().mean().item()
    assert mean_logp == pytest.approx(-nll(beta), abs=1e-5)


def test_sample_follows_calibrated_distribution():
    head = _zloss_head(v=5, d=3)
    head.calibration_beta.fill_(1.3)
    h = torch.randn(1, 3).expand(20000, 3)
    g = torch.Generator().manual_seed(0)
    freq = torch.bincount(head.sample(h, temperature=0.8, generator=g), minlength=5).double() / 20000
    _, z_all = naive_z(h[:1].double(), head.weight.detach().double(), torch.zeros(1, dtype=torch.long))
    assert (freq - torch.softmax(1.3 * z_all[0] / 0.8, -1)).abs().max() < 0.02
    with pytest.raises(ValueError, match="temperature must be > 0"):
        head.sample(h, temperature=0.0)


@pytest.mark.parametrize("n,v,d,dtype", [(2048, 20000, 64, torch.float32), (4096, 3000, 128, torch.bfloat16),
                                         (1024, 9000, 256, torch.float32)])
def test_transient_bytes_bounds_measured_peak(n, v, d, dtype):
    """The memory model against torch's MemTracker: an upper bound, and a close one."""
    from torch.distributed._tools.mem_tracker import MemTracker

    head = _zloss_head(v=v, d=d).to(dtype)
    hidden = torch.randn(n, d, dtype=dtype, requires_grad=True)
    tracker = MemTracker()
    tracker.track_external(head, hidden)
    with tracker:
        head(hidden, torch.randint(0, v, (n,))).loss.backward()
    peak = sum(dev["Total"] for dev in tracker.get_tracker_snapshot("peak").values())
    weight_and_grad, hidden_bytes = 2 * head.weight.numel() * head.weight.element_size(), hidden.numel() * hidden.element_size()
    measured = peak - weight_and_grad - hidden_bytes
    model = type(head).transient_bytes(head.options, n, d, v, dtype)
    assert measured <= model <= 1.3 * measured


@pytest.mark.parametrize("d", [32, 512])
@pytest.mark.parametrize("shift", [50.0, 100.0, 1000.0])
def test_large_common_shift_matches_float64(d, shift):
    """A mean row far larger than the rows' spread (tied embeddings and Adam get there): the
    loss, ∇h and ∇W of fp32 inputs against float64 from the same rounded inputs. A guard that
    froze σ's gradient gave ∇W errors of 12% (D = 512, 50×) up to 91% (D = 32)."""
    g = torch.Generator().manual_seed(d)
    n, v = 48, 700
    spread = torch.randn(v, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    mean_row = torch.randn(d, generator=g, dtype=torch.float64)
    mean_row *= shift * spread.norm(dim=1).mean() / mean_row.norm()
    weight = (spread + mean_row).float()
    hidden = torch.randn(n, d, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::5] = IGNORE_INDEX
    upstream = torch.tensor(1.0)
    ours = loss_and_grads(lambda h, w: spherical_z_loss(h, w, targets, a=1.0, b=3.0), hidden, weight, upstream)
    ref = loss_and_grads(lambda h, w: naive_loss(h, w, targets, 1.0, 3.0), hidden.double(), weight.double(),
                         upstream.double())
    for name, got, want in zip(["loss", "∇h", "∇W"], ours, ref):
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err < 1e-4, f"{name}: relative error {err:.3g}"


def test_gram_once_per_optimizer_step(monkeypatch):
    """Micro-steps and sampling calls between two optimizer steps reuse one Gram matrix; any
    change of the weight's values brings a fresh one, also one written through .data (as
    DeepSpeed writes, unseen by autograd's version counter)."""
    calls = []
    real = zl.centered_gram
    monkeypatch.setattr(zl, "centered_gram", lambda *a: calls.append(1) or real(*a))
    head = _zloss_head()
    hidden, _, _ = random_problem(d=16)
    targets = torch.randint(0, 300, (hidden.shape[0],))
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    for _ in range(3):  # three micro-steps of one accumulation, then sampling
        head(hidden.detach(), targets).loss.backward()
    head.sample(hidden.detach())
    head.topk(hidden.detach(), 3)
    assert len(calls) == 1
    opt.step()  # in place: the weight's version moves
    fresh = _zloss_head()
    fresh.load_state_dict(head.state_dict())
    torch.testing.assert_close(head(hidden.detach(), targets).loss, fresh(hidden.detach(), targets).loss)
    assert len(calls) == 3  # one for the stepped head, one for the fresh head
    head.weight.data[5:9] += 1e-3  # a small change of a few rows, through .data
    fresh.load_state_dict(head.state_dict())
    torch.testing.assert_close(head(hidden.detach(), targets).loss, fresh(hidden.detach(), targets).loss)
    assert len(calls) == 5
