"""MFU's FLOP counts against torch's own FLOP counter (a dispatch mode counting every matmul and
attention call actually executed), and the matmul-rate measurement against a timed matmul."""

import time

import pytest
import torch
import torch.nn.attention
from torch.utils.flop_counter import FlopCounterMode

from llmtrain.heads import build_head
from llmtrain.model.language_model import LanguageModel
from llmtrain.recipe import ModelConfig
from llmtrain.train.mfu import body_flops_per_token, matmul_rate, model_flops_per_token


def _addmm_inplace(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs):
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def counted_flops(run) -> int:
    """FLOPs torch's counter sees while `run()` runs; in-place addmm_ (which the counter leaves
    out, and the cce and zloss heads use) is counted like addmm."""
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: _addmm_inplace}) as counter:
        run()
    return counter.get_total_flops()


@pytest.mark.parametrize("spec", [{"type": "softmax"}, {"type": "cce"}, {"type": "hsm"}, {"type": "zloss"},
                                  {"type": "hsm", "n_clusters": 16, "shortlist": 100}])
def test_each_heads_train_flops_match_what_it_computes(spec):
    n, d, v = 2048, 64, 4096  # enough tokens that hsm's sampled cluster sizes meet their mean
    torch.manual_seed(0)
    head = build_head(spec, hidden_size=d, vocab_size=v)
    skewed = torch.randint(1, 1000, (v,)).double() ** 2  # as real unigram counts are
    targets = torch.multinomial(skewed / skewed.sum(), n, replacement=True)
    # the "training data" is these targets: hsm's mean cluster size is then theirs exactly
    head.prepare(torch.bincount(targets, minlength=v).double())
    hidden = torch.randn(n, d, requires_grad=True)
    seen = counted_flops(lambda: head(hidden, targets).loss.backward())
    assert head.train_flops(n) == pytest.approx(seen, rel=0.01)
    if spec["type"] in ("hsm", "zloss"):
        assert head.train_flops(n) < 0.25 * 6 * n * v * d  # far below a full softmax's (4D/6N for zloss, 0.02 here)


def test_model_flops_per_token_match_a_training_step():
    cfg = ModelConfig(layers=2, d_model=64, n_heads=4, seq_len=128)
    model = LanguageModel(cfg, {"type": "softmax"}, vocab_size=1024)
    ids = torch.randint(0, 1024, (2, cfg.seq_len + 1))
    # attention through SDPA's math path: plain batched matmuls, which the counter counts on CPU
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        seen = counted_flops(lambda: model(ids[:, :-1], ids[:, 1:]).loss.backward())
    tokens = 2 * cfg.seq_len
    expected = model_flops_per_token(model, cfg.layers, cfg.d_model, cfg.seq_len, tokens) * tokens
    assert expected == pytest.approx(seen, rel=0.02)
    # the embedding lookup is no matmul: a tied model's body FLOPs leave the shared weight out
    tied = LanguageModel(ModelConfig(**{**cfg.model_dump(), "tie_embeddings": True}), {"type": "softmax"}, 1024)
    assert body_flops_per_token(tied, 2, 64, 128) == body_flops_per_token(model, 2, 64, 128)


def test_matmul_rate_is_the_rate_of_a_timed_matmul():
    rate = matmul_rate(torch.device("cpu"), "fp32", seconds=0.2)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best = min(_timed(lambda: a @ b) for _ in range(10))
    # both best-of rates; other processes share this machine, hence the margin (but not a factor 2)
    assert 0.6 < rate / (2 * 1024**3 / best) < 1.7


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
