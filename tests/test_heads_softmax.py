"""The softmax head against float64 eager math, and the registry."""

import math

import pytest
import torch
import torch.nn.functional as F

from llmtrain.heads import IGNORE_INDEX, build_head


def _head(V=50, D=16, **opts):
    torch.manual_seed(0)
    return build_head({"type": "softmax", **opts}, hidden_size=D, vocab_size=V)


@pytest.mark.parametrize("opts", [{}, {"bias": True}, {"softcap": 3.0}, {"z_loss": 1e-2}, {"label_smoothing": 0.1}])
def test_loss_and_grads_match_float64(opts):
    head = _head(**opts)
    h = torch.randn(33, 16, requires_grad=True)
    t = torch.randint(0, 50, (33,))
    t[::5] = IGNORE_INDEX
    out = head(h, t)
    out.loss.backward()

    h64 = h.detach().double().requires_grad_()
    w64 = head.weight.detach().double().requires_grad_()
    logits = h64 @ w64.T
    if head.bias is not None:
        logits = logits + head.bias.detach().double()
    if opts.get("softcap"):
        logits = opts["softcap"] * torch.tanh(logits / opts["softcap"])
    ref = F.cross_entropy(logits, t, ignore_index=IGNORE_INDEX, label_smoothing=opts.get("label_smoothing", 0.0))
    keep = t != IGNORE_INDEX
    ref = ref + opts.get("z_loss", 0.0) * torch.logsumexp(logits, -1)[keep].square().mean()
    ref.backward()
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head.weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)


def test_logprobs_normalized_and_topk_exact():
    head = _head(V=300)
    h = torch.randn(7, 16)
    all_lp = torch.stack([head.token_logprobs(h, torch.full((7,), v)) for v in range(300)], dim=1)
    torch.testing.assert_close(torch.logsumexp(all_lp.double(), 1), torch.zeros(7, dtype=torch.float64), atol=1e-5, rtol=0)
    assert torch.equal(head.topk(h, 5), all_lp.topk(5, dim=1).indices)


def test_sample_follows_distribution():
    head = _head(V=4, D=2)
    h = torch.randn(1, 2).expand(20000, 2)
    g = torch.Generator().manual_seed(0)
    freq = torch.bincount(head.sample(h, generator=g), minlength=4).double() / 20000
    probs = torch.softmax((h[:1] @ head.weight.T).double(), -1)[0]
    assert (freq - probs).abs().max() < 0.02


def test_loss_near_log_vocab_at_init():
    head = _head(V=1000, D=64)
    loss = head(torch.randn(256, 64) * 0.02, torch.randint(0, 1000, (256,))).loss
    assert abs(loss.item() - math.log(1000)) < 0.05


def test_registry_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown head type 'sofmax'"):
        build_head({"type": "sofmax"}, 8, 10)
    with pytest.raises(ValueError, match="softcap"):
        build_head({"type": "softmax", "softcap": -1}, 8, 10)
    with pytest.raises(ValueError, match="hidden must be"):
        _head()(torch.randn(3, 5), torch.zeros(3, dtype=torch.long))
