"""The body against independent references: shapes, causality, RoPE, tying."""

import torch

from llmtrain.model.decoder import RMSNorm, apply_rope, rope_tables
from llmtrain.model.language_model import LanguageModel, count_parameters
from llmtrain.recipe import ModelConfig

CFG = ModelConfig(layers=2, d_model=32, n_heads=4, seq_len=16)


def _model(**kw):
    torch.manual_seed(0)
    return LanguageModel(CFG.model_copy(update=kw), {"type": "softmax"}, vocab_size=100)


def test_shapes_and_loss_near_log_vocab():
    model = _model()
    ids = torch.randint(0, 100, (3, 16))
    hidden = model.body(ids)
    assert hidden.shape == (3, 16, 32)
    loss = model(ids, torch.randint(0, 100, (3, 16))).loss
    assert abs(loss.item() - torch.log(torch.tensor(100.0)).item()) < 0.3


def test_causal_future_tokens_do_not_change_the_past():
    model = _model()
    ids = torch.randint(0, 100, (1, 16))
    other = ids.clone()
    other[0, 10:] = (other[0, 10:] + 1) % 100
    a, b = model.body(ids), model.body(other)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_rope_preserves_norm_and_encodes_relative_position():
    cos, sin = rope_tables(16, 8, 10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    rot = lambda x, p: apply_rope(x, cos[p : p + 1], sin[p : p + 1])
    torch.testing.assert_close(rot(q, 5).norm(), q.norm())
    # <R_m q, R_n k> depends only on m - n.
    d1 = (rot(q, 7) * rot(k, 3)).sum()
    d2 = (rot(q, 10) * rot(k, 6)).sum()
    torch.testing.assert_close(d1, d2, rtol=1e-5, atol=1e-5)


def test_rmsnorm_matches_formula_in_float64():
    norm = RMSNorm(8, 1e-5)
    x = torch.randn(4, 8, dtype=torch.float64)
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(norm.double()(x), ref)


def test_tied_embeddings_share_one_parameter():
    untied, tied = _model(), _model(tie_embeddings=True)
    assert tied.body.embed.weight is tied.head.weight
    assert count_parameters(untied) - count_parameters(tied) == 100 * 32
