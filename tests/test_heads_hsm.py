"""The hsm head against a float64 token-by-token computation of the same factorization, its
cluster binning against the class RNNLM's sequential rule, and its cluster table through state
dicts."""

import io
import math

import pytest
import torch

from llmtrain.errors import UserError
from llmtrain.heads import IGNORE_INDEX, build_head
from llmtrain.heads.hsm_clusters import frequency_clusters, sizes_by_mass, table_problem


def _zipf_counts(V, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = (1e6 / torch.arange(1, V + 1, dtype=torch.float64)).round().long()
    return counts[torch.randperm(V, generator=g)]  # frequency unrelated to token id


def _head(V=97, D=12, counts=None, **opts):
    torch.manual_seed(0)
    head = build_head({"type": "hsm", **opts}, hidden_size=D, vocab_size=V)
    with torch.no_grad():  # scores of order one, so that every term of the loss matters
        head.weight.normal_(0, 1 / math.sqrt(D))
        head.cluster_weight.normal_(0, 1 / math.sqrt(D))
    head.prepare(counts)
    return head


def _reference_logprob(U, W, head, h, targets):
    """log softmax(U h)[c(t)] + log softmax(W_c h)[pos(t)], token by token, in U's dtype."""
    offsets = head.cluster_offsets.tolist()
    out = []
    for n, t in enumerate(targets.tolist()):
        c, pos = int(head.token_cluster[t]), int(head.token_position[t])
        top = torch.log_softmax(U @ h[n], 0)[c]
        within = torch.log_softmax(W[offsets[c]:offsets[c + 1]] @ h[n], 0)[pos]
        out.append(top + within)
    return torch.stack(out)


SETUPS = {
    "default table": {},
    "sqrt binning": {"counts": _zipf_counts(97)},
    "unigram binning, shortlist": {"counts": _zipf_counts(97), "binning": "unigram", "shortlist": 5},
    "default table, shortlist, 7 clusters": {"shortlist": 9, "n_clusters": 7},
    "one cluster": {"n_clusters": 1},
}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_loss_and_grads_match_float64(setup):
    head = _head(**SETUPS[setup])
    h = torch.randn(41, 12, requires_grad=True)
    t = torch.randint(0, 97, (41,))
    t[::6] = IGNORE_INDEX
    out = head(h, t)
    out.loss.backward()

    keep = t != IGNORE_INDEX
    h64, U64, W64 = (x.detach().double().requires_grad_() for x in (h, head.cluster_weight, head.weight))
    ref = -_reference_logprob(U64, W64, head, h64[keep], t[keep]).mean()
    ref.backward()
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head.cluster_weight.grad.double(), U64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head.weight.grad.double(), W64.grad, rtol=1e-4, atol=1e-6)
    assert out.metrics["cluster_nll"] + out.metrics["within_nll"] == pytest.approx(out.loss.item(), rel=1e-5)


def test_logprobs_exact_normalized_and_topk_exact():
    head = _head(V=300, counts=_zipf_counts(300), shortlist=4)
    h = torch.randn(7, 12)
    all_lp = torch.stack([head.token_logprobs(h, torch.full((7,), v)) for v in range(300)], dim=1)
    ref = torch.stack([_reference_logprob(head.cluster_weight.double(), head.weight.double(), head, h.double(),
                                          torch.full((7,), v)) for v in range(300)], dim=1)
    torch.testing.assert_close(all_lp.double(), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.logsumexp(all_lp.double(), 1), torch.zeros(7, dtype=torch.float64),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(head.log_probs(h), all_lp, rtol=0, atol=1e-5)
    assert torch.equal(head.topk(h, 300), ref.topk(300, dim=1).indices)  # the whole order, not one cluster's


def test_sample_follows_distribution_at_each_temperature():
    head = _head(V=12, D=4, counts=_zipf_counts(12), n_clusters=3)
    h = torch.randn(1, 4)
    p = head.log_probs(h)[0].double().exp()
    for temperature in (1.0, 0.5):
        g = torch.Generator().manual_seed(0)
        draws = head.sample(h.expand(40000, 4), temperature=temperature, generator=g)
        freq = torch.bincount(draws, minlength=12).double() / 40000
        expected = p ** (1 / temperature) / (p ** (1 / temperature)).sum()
        assert (freq - expected).abs().max() < 0.01, temperature


def test_init_is_near_uniform_at_both_levels_and_finite_in_bf16():
    torch.manual_seed(0)
    head = build_head({"type": "hsm"}, hidden_size=64, vocab_size=1000)
    h, t = torch.randn(256, 64), torch.randint(0, 1000, (256,))
    loss = head(h, t).loss
    assert abs(loss.item() - math.log(1000)) < 0.05  # default table: 32 clusters of 31-32 tokens
    head.prepare(_zipf_counts(1000))
    loss = head(h, t).loss  # unequal clusters: -log p(t) ≈ log C + log |c(t)|
    sizes = head.cluster_offsets.diff()[head.token_cluster[t]].double()
    assert abs(loss.item() - (math.log(head.n_clusters) + sizes.log().mean().item())) < 0.05
    assert abs(head.bfloat16()(h.bfloat16(), t).loss.item() - loss.item()) < 0.05


def test_all_targets_ignored_gives_zero_loss_and_zero_grads():
    head = _head()
    out = head(torch.randn(5, 12), torch.full((5,), IGNORE_INDEX))
    out.loss.backward()
    assert out.loss.item() == 0 and not head.weight.grad.any() and not head.cluster_weight.grad.any()


# --- cluster binning -------------------------------------------------------------------------------


def _class_rnnlm_sizes(mass, n_clusters):
    """Mikolov et al.'s rnnlm loop: walking the sorted vocabulary, move to the next class once
    the cumulative share exceeds (class + 1) / n_clusters, at most one class per word."""
    total, share, cls, classes = mass.sum().item(), 0.0, 0, []
    for m in mass.tolist():
        share += m / total
        classes.append(cls)
        if share > (cls + 1) / n_clusters and cls < n_clusters - 1:
            cls += 1
    return torch.bincount(torch.tensor(classes), minlength=n_clusters)


@pytest.mark.parametrize("n_clusters", [1, 7, 40])
def test_binning_follows_the_class_rnnlm_rule(n_clusters):
    counts = _zipf_counts(500)
    for transform in (torch.sqrt, lambda x: x):
        mass = transform(counts.sort(descending=True).values.double())
        assert torch.equal(sizes_by_mass(mass, n_clusters), _class_rnnlm_sizes(mass, n_clusters))


def test_every_token_in_one_cluster_and_frequent_tokens_in_small_clusters():
    V = 2000
    counts = _zipf_counts(V)
    head = _head(V=V, counts=counts)
    assert table_problem({n: getattr(head, n) for n in ("token_cluster", "token_position", "cluster_offsets")},
                         V, head.n_clusters) is None
    rows = head.cluster_offsets[head.token_cluster] + head.token_position
    assert torch.equal(rows.sort().values, torch.arange(V))  # each token has one row, each row one token
    size_of = head.cluster_offsets.diff()[head.token_cluster]
    by_freq = size_of[counts.argsort(descending=True)]
    assert by_freq[:20].max() < by_freq[-500:].min()
    # sqrt mass gives the frequent tokens more clusters than a plain split of ids would
    assert (by_freq[:200] < math.ceil(V / head.n_clusters)).all()


def test_shortlist_is_the_most_frequent_tokens_and_clusters_stay_non_empty():
    counts = _zipf_counts(50)
    head = _head(V=50, counts=counts, shortlist=6, n_clusters=10)
    first = (head.token_cluster == 0).nonzero().squeeze(1)
    assert set(first.tolist()) == set(counts.topk(6).indices.tolist())
    counts[7] = 10**12  # heavier than all shares together: it sits alone, the rest still spread
    head = _head(V=50, counts=counts, n_clusters=10)
    assert (head.token_cluster == head.token_cluster[7]).sum() == 1
    assert (head.cluster_offsets.diff() >= 1).all()
    _, sizes = frequency_clusters(torch.zeros(50), 10, 0, "sqrt")  # no counts at all: near-even runs
    assert sizes.sum() == 50 and sizes.max() - sizes.min() <= 2 and (sizes >= 1).all()
    _, sizes = frequency_clusters(torch.ones(50), 50, 0, "unigram")  # as many clusters as tokens
    assert torch.equal(sizes, torch.ones(50, dtype=torch.long))


def test_default_table_is_contiguous_id_ranges():
    head = _head(V=100, shortlist=10, n_clusters=4)
    assert head.cluster_offsets.tolist() == [0, 10, 40, 70, 100]
    assert torch.equal(head.token_cluster[:11], torch.tensor([0] * 10 + [1]))
    assert torch.equal(head.row_token, torch.arange(100))


# --- the table in state dicts ----------------------------------------------------------------------


def test_table_survives_save_and_load_and_replaces_the_default():
    trained = _head(V=200, counts=_zipf_counts(200))
    buf = io.BytesIO()
    torch.save(trained.state_dict(), buf)
    fresh = _head(V=200)  # default table, other weights
    assert not torch.equal(fresh.token_cluster, trained.token_cluster)
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    h, t = torch.randn(9, 12), torch.randint(0, 200, (9,))
    for name in ("token_cluster", "token_position", "cluster_offsets", "token_row", "row_token", "row_cluster"):
        assert torch.equal(getattr(fresh, name), getattr(trained, name)), name
    assert torch.equal(fresh.token_logprobs(h, t), trained.token_logprobs(h, t))
    assert torch.equal(fresh.topk(h, 5), trained.topk(h, 5))


def test_missing_or_mismatched_table_is_a_clear_error():
    state = _head(V=200, counts=_zipf_counts(200)).state_dict()
    no_table = {k: v for k, v in state.items() if k != "token_position"}
    with pytest.raises(UserError, match="cluster table .*token_position.* is missing"):
        _head(V=200).load_state_dict(no_table)
    with pytest.raises(UserError, match="vocab_size=300.*token_cluster has shape \\[200\\], expected \\[300\\]"):
        _head(V=300).load_state_dict(state, strict=False)
    with pytest.raises(UserError, match="n_clusters=20.*cluster_offsets has shape \\[16\\], expected \\[21\\]"):
        _head(V=200, n_clusters=20).load_state_dict(state, strict=False)
    clash = dict(state, token_position=state["token_position"].clone())
    a, b = (head_token for head_token in (state["token_cluster"] == state["token_cluster"][0]).nonzero()[:2, 0])
    clash["token_position"][a] = clash["token_position"][b]
    with pytest.raises(UserError, match="share a position"):
        _head(V=200).load_state_dict(clash)
    moved = dict(state, cluster_offsets=state["cluster_offsets"].clone())
    moved["cluster_offsets"][1] += 1
    with pytest.raises(UserError, match="does not match the cluster sizes"):
        _head(V=200).load_state_dict(moved)


# --- bad input -------------------------------------------------------------------------------------


def test_bad_options_and_inputs_name_the_problem():
    with pytest.raises(ValueError, match="n_clusters=11 exceeds the vocabulary size 10"):
        build_head({"type": "hsm", "n_clusters": 11}, 8, 10)
    with pytest.raises(ValueError, match="shortlist=8 leaves fewer tokens .* shortlist ≤ 7"):
        build_head({"type": "hsm", "n_clusters": 4, "shortlist": 8}, 8, 10)
    with pytest.raises(ValueError, match="shortlist=3 needs n_clusters ≥ 2"):
        build_head({"type": "hsm", "n_clusters": 1, "shortlist": 3}, 8, 10)
    with pytest.raises(ValueError, match="binning"):
        build_head({"type": "hsm", "binning": "log"}, 8, 10)
    head = _head()
    with pytest.raises(ValueError, match="targets must be token ids in \\[0, 97\\) or -100, got 97"):
        head(torch.randn(3, 12), torch.tensor([0, 97, 1]))
    with pytest.raises(ValueError, match="token_counts must be a \\[97\\] tensor"):
        head.prepare(torch.ones(96))
    with pytest.raises(ValueError, match="non-negative"):
        head.prepare(-torch.ones(97))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        head.sample(torch.randn(2, 12), temperature=0)
    with pytest.raises(ValueError, match="k must be in \\[1, 97\\]"):
        head.topk(torch.randn(2, 12), 98)


# --- every cluster's contribution, the memory model ---------------------------------------------------------------


def _rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype, allowance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_every_cluster_reaches_loss_and_gradients(dtype, allowance):
    """Zipf-drawn targets pile onto the frequent clusters and leave some absent, over clusters
    of unequal sizes. Loss, ∇h, ∇U and ∇W against float64 per tensor (relative norm): a cluster
    whose contribution is dropped moves its tensor by far more than rounding does."""
    head = _head(V=300, counts=_zipf_counts(300), shortlist=4).to(dtype)
    g = torch.Generator().manual_seed(1)
    t = torch.multinomial(_zipf_counts(300).double(), 257, replacement=True, generator=g)
    t[::9] = IGNORE_INDEX
    t[head.token_cluster[t.clamp(min=0)] == 5] = IGNORE_INDEX  # a cluster absent from the batch
    keep = t != IGNORE_INDEX
    per_cluster = torch.bincount(head.token_cluster[t[keep]], minlength=head.n_clusters)
    assert per_cluster.max() > 4 * per_cluster.float().mean() and per_cluster[5] == 0
    h = torch.randn(257, 12, generator=g).to(dtype).requires_grad_()
    out = head(h, t)
    out.loss.backward()
    h64, U64, W64 = (x.detach().double().requires_grad_() for x in (h, head.cluster_weight, head.weight))
    ref = -_reference_logprob(U64, W64, head, h64[keep], t[keep]).mean()
    ref.backward()
    assert abs(out.loss.item() - ref.item()) / ref.item() < allowance
    for name, x, r in (("h", h.grad, h64.grad), ("U", head.cluster_weight.grad, U64.grad), ("W", head.weight.grad, W64.grad)):
        assert _rel_err(x, r) < allowance, name


# Where the per-pair buffers peak (few clusters, small D), where the cluster level's backward
# does (the default ⌈√V⌉ clusters), in bf16, and with unigram binning.
@pytest.mark.parametrize("n,v,d,dtype,options", [
    (1024, 65536, 64, torch.float32, {"n_clusters": 16}), (2048, 65536, 32, torch.float32, {"n_clusters": 32}),
    (4096, 16384, 128, torch.float32, {}), (512, 65536, 64, torch.bfloat16, {"n_clusters": 16}),
    (2048, 65536, 128, torch.float32, {"binning": "unigram"})])
def test_transient_bytes_matches_measured_peak_on_zipf_text(n, v, d, dtype, options):
    """The memory model against torch's MemTracker, with the frequency clusters and Zipf-distributed
    targets it assumes (natural text), within 10%."""
    from torch.distributed._tools.mem_tracker import MemTracker

    torch.manual_seed(0)
    counts = _zipf_counts(v)
    head = build_head({"type": "hsm", **options}, hidden_size=d, vocab_size=v)
    head.prepare(counts)
    head.to(dtype)
    hidden = torch.randn(n, d, dtype=dtype, requires_grad=True)
    targets = torch.multinomial(counts.double(), n, replacement=True)
    tracker = MemTracker()
    tracker.track_external(head, hidden)
    with tracker:
        head(hidden, targets).loss.backward()
    peak = sum(dev["Total"] for dev in tracker.get_tracker_snapshot("peak").values())
    weights_and_grads = 2 * sum(p.numel() * p.element_size() for p in head.parameters())
    buffers = sum(b.numel() * b.element_size() for b in head.buffers())
    measured = peak - weights_and_grads - buffers - hidden.numel() * hidden.element_size()
    model = type(head).transient_bytes(head.options, n, d, v, dtype)
    assert abs(model / measured - 1) <= 0.10, (measured, model)
