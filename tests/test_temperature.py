"""The temperature network (TempNet) add-on: τ's range, the DRO loss and its gradients against a
float64 direct computation, the CE special case, cce == softmax, generation at τ = 'auto', the
recipe's refusals, and end to end under 2-rank ZeRO-2 (joint, then frozen_body on top of it)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_head_distributed
import torch.nn.functional as F
import yaml
from torch import nn

from llmtrain.errors import UserError
from llmtrain.heads import build_head
from llmtrain.heads.base import NO_NETWORK
from llmtrain.heads.temperature import TemperatureNet, attach_temperature
from llmtrain.recipe import validate_recipe
from llmtrain.train.engine_config import param_groups

ROOT = Path(__file__).parent.parent
V, D, N = 97, 12, 30
SPECS = {"softmax": {"type": "softmax"}, "softmax_bias": {"type": "softmax", "bias": True},
         "softmax_softcap": {"type": "softmax", "softcap": 3.0}, "cce": {"type": "cce", "chunk_size": 7},
         "hsm": {"type": "hsm", "n_clusters": 9, "shortlist": 5}}


def make_head(spec, dtype=torch.float64, seed=0, rho=3.0, width=16, tau=(0.5, 5.0)):
    torch.manual_seed(seed)
    head = build_head(spec, D, V)
    if spec["type"] == "hsm":  # a frequency clustering, so clusters have unequal sizes
        head.prepare(torch.arange(V, 0, -1).double() ** 1.5)
    attach_temperature(head, width=width, tau_min=tau[0], tau_max=tau[1], rho=rho, dropout=0.0)
    with torch.no_grad():  # bigger weights: a spread of τ and scores, not all near init values
        for p in head.parameters():
            p.mul_(3.0)
        if getattr(head, "bias", None) is not None:  # a bias starts at 0: give it values to test
            head.bias.normal_()
        head.temperature.log_scale.fill_(-0.5)
    return head.to(dtype)


def batch(dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, dtype=dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::7] = -100
    return hidden, targets


class FixedTau(nn.Module):
    """Stands in for the network: returns the given τ (a leaf, so its gradient can be read)."""

    def __init__(self, tau, rho):
        super().__init__()
        self.tau, self.rho = tau, rho

    def forward(self, scores=None, **linear):
        return self.tau

    predict = forward


# ------------------------------------------------------------------------------------- references


def head_scores(head, hidden):
    """[N, V] float64 scores o of a softmax/cce head, direct."""
    o = hidden @ head.weight.T + (head.bias if getattr(head, "bias", None) is not None else 0)
    cap = getattr(head.options, "softcap", None)
    return cap * torch.tanh(o / cap) if cap else o


def hsm_tempered_logp(head, hidden, tau):
    """[N, V] log p_τ(w) of the hsm head: the two-level distribution of h/τ, token-id order."""
    x = hidden / tau[:, None]
    top = torch.log_softmax(x @ head.cluster_weight.T, 1)
    rows = x @ head.weight.T  # columns in weight-row (cluster) order
    offsets = head.cluster_offsets.tolist()
    within = torch.cat([torch.log_softmax(rows[:, lo:hi], 1) for lo, hi in zip(offsets, offsets[1:])], 1)
    by_row = within + top[:, head.row_cluster]
    return by_row[:, head.token_row]


def reference_dro(head, hidden, targets, tau, rho):
    """Mean over kept tokens of τ·(−log p_τ(y)) + τ·(ρ − log V), float64, by the definition."""
    keep = targets != -100
    t = targets.clamp(min=0)
    if head.name == "hsm":
        nll = -hsm_tempered_logp(head, hidden, tau).gather(1, t[:, None]).squeeze(1)
    else:
        o = head_scores(head, hidden)
        nll = torch.logsumexp(o / tau[:, None], 1) - o.gather(1, t[:, None]).squeeze(1) / tau
    per_token = tau * nll + tau * (rho - math.log(V))
    return (per_token * keep).sum() / keep.sum()


def reference_tau(head, hidden):
    """The network's τ from the scores it reads, formed directly (not factored)."""
    if head.name == "hsm":
        return head.temperature(hidden @ head.cluster_weight.T)
    return head.temperature(head_scores(head, hidden))


# ------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", SPECS)
def test_tau_stays_within_its_bounds_even_when_saturated(name):
    head = make_head(SPECS[name], tau=(0.7, 2.5))
    hidden, _ = batch()
    hidden = torch.cat([hidden * 1e3, torch.zeros(2, D), hidden * 1e-6])
    for bias in (-1e4, 0.0, 1e4):
        head.temperature.pool.bias.data.fill_(bias)
        tau = head.predict_temperature(hidden)
        assert tau.shape == (hidden.shape[0],) and torch.isfinite(tau).all()
        assert tau.min() >= 0.7 and tau.max() <= 2.5, (bias, tau.min(), tau.max())
    assert (tau == 2.5).all()  # saturated high: exactly the bound, not beyond


@pytest.mark.parametrize("name", SPECS)
def test_dro_loss_and_gradients_match_float64_direct_computation(name):
    """The head's loss and the gradients of the hidden states, its weights and every network
    weight equal autograd through the definition (scores formed directly, τ from them)."""
    head = make_head(SPECS[name])
    hidden, targets = batch()
    hidden.requires_grad_(True)
    loss = head(hidden, targets).loss
    ours = torch.autograd.grad(loss, [hidden, *head.parameters()])
    ref_loss = reference_dro(head, hidden, targets, reference_tau(head, hidden), rho=3.0)
    ref = torch.autograd.grad(ref_loss, [hidden, *head.parameters()])
    # the heads keep per-token losses (softmax: its logits) in fp32, so agreement is to fp32 rounding
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    names = ["hidden"] + [n for n, _ in head.named_parameters()]
    for n, a, b in zip(names, ours, ref):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8), (n, (a - b).abs().max())
    assert any(g.abs().sum() > 0 for n, g in zip(names, ours) if n.startswith("temperature.first"))


@pytest.mark.parametrize("name", ["softmax", "softmax_bias", "cce", "hsm"])
def test_gradient_in_tau_is_rho_minus_kl_from_uniform(name):
    """∂L/∂τ_n = (ρ − KL(p_τ ‖ uniform))/n_kept; for hsm the entropy is that of the two levels the
    token's loss touches (clusters, and within the target's cluster)."""
    head = make_head(SPECS[name])
    hidden, targets = batch()
    tau = torch.empty(N, dtype=torch.float64).uniform_(0.6, 3.0).requires_grad_(True)
    head.temperature = FixedTau(tau, rho=3.0)
    head(hidden, targets).loss.backward()
    keep = targets != -100
    with torch.no_grad():
        if name == "hsm":
            x = hidden / tau[:, None]
            top = torch.softmax(x @ head.cluster_weight.T, 1)
            entropy = -(top * top.log()).sum(1)
            c = head.token_cluster[targets.clamp(min=0)]
            offsets = head.cluster_offsets
            for n in range(N):
                p = torch.softmax(x[n] @ head.weight[offsets[c[n]]:offsets[c[n] + 1]].T, 0)
                entropy[n] += -(p * p.log()).sum()
        else:
            p = torch.softmax(head_scores(head, hidden) / tau[:, None], 1)
            entropy = -(p * p.log()).sum(1)
        expected = (3.0 - (math.log(V) - entropy)) * keep / keep.sum()
    assert torch.allclose(tau.grad, expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", SPECS)
def test_tau_one_and_rho_log_v_give_cross_entropy(name):
    head = make_head(SPECS[name])
    hidden, targets = batch()
    plain = build_head(SPECS[name], D, V).to(torch.float64)
    plain.load_state_dict({k: v for k, v in head.state_dict().items() if not k.startswith("temperature.")})
    head.temperature = FixedTau(torch.ones(N, dtype=torch.float64), rho=math.log(V))
    assert head(hidden, targets).loss.item() == pytest.approx(plain(hidden, targets).loss.item(), rel=1e-6)
    if name != "hsm":
        ce = F.cross_entropy(head_scores(head, hidden), targets, ignore_index=-100)
        assert head(hidden, targets).loss.item() == pytest.approx(ce.item(), rel=1e-6)


def test_cce_path_equals_softmax_path_in_float32():
    """Same weights: the factored cce path (no N × V) matches the softmax head's direct one."""
    soft, cce = make_head(SPECS["softmax"], torch.float32), make_head(SPECS["cce"], torch.float32)
    cce.load_state_dict(soft.state_dict())
    hidden, targets = batch(torch.float32)
    results = []
    for head in (soft, cce):
        h = hidden.clone().requires_grad_(True)
        out = head(h, targets)
        results.append((out.loss, out.metrics, torch.autograd.grad(out.loss, [h, *head.parameters()])))
    (l1, m1, g1), (l2, m2, g2) = results
    assert l1.item() == pytest.approx(l2.item(), rel=1e-5)
    for key in ("tau_mean", "tau_min", "tau_max", "tempered_ce"):
        assert m1[key] == pytest.approx(m2[key], rel=1e-5)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["softmax", "cce", "hsm", "zloss"])
def test_auto_temperature_without_the_network_is_refused(name):
    head = build_head({"type": name}, D, V)
    with pytest.raises(ValueError) as e:
        head.sample(torch.randn(3, D), temperature="auto")
    assert str(e.value) == NO_NETWORK
    with pytest.raises(ValueError, match="'auto'"):
        head.sample(torch.randn(3, D), temperature="hot")


@pytest.mark.parametrize("name", ["softmax_bias", "cce", "hsm"])
def test_auto_temperature_samples_the_tempered_distribution(name):
    """'auto' draws exactly what a sampler at each token's own τ draws (same generator)."""
    head = make_head(SPECS[name], torch.float32)
    hidden, _ = batch(torch.float32)
    tau = head.predict_temperature(hidden)
    assert tau.std() > 0  # per-token temperatures, not one
    ours = head.sample(hidden, "auto", torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    if name == "hsm":  # the network's tempered hsm: the hsm of h/τ
        expected = head.sample(hidden / tau[:, None], 1.0, g)
    else:
        with torch.no_grad():
            probs = torch.softmax(head_scores(head, hidden).float() / tau[:, None], 1)
        expected = torch.multinomial(probs, 1, generator=g).squeeze(1)
    assert torch.equal(ours, expected)
    # and the tempered log-probabilities eval reports are those of the same distribution
    targets = torch.randint(0, V, (N,))
    with torch.no_grad():
        ref = (hsm_tempered_logp(head.double(), hidden.double(), tau.double()) if name == "hsm"
               else torch.log_softmax(head_scores(head.double(), hidden.double()) / tau.double()[:, None], 1))
    got = head.double().tempered_token_logprobs(hidden.double(), targets, tau.double())
    assert torch.allclose(got.double(), ref.gather(1, targets[:, None]).squeeze(1), atol=1e-5)


def test_dropout_is_off_when_predicting():
    net = TemperatureNet(V, width=16, dropout=0.9).train()
    scores = torch.randn(N, V)
    assert torch.equal(net.predict(scores), net.predict(scores))
    assert net.training
    assert not torch.equal(net(scores), net(scores))


def test_param_groups_give_the_network_its_own_lr_and_frozen_weights_none():
    head_spec = SPECS["cce"]
    model = nn.Module()
    model.body = nn.Linear(D, D)
    model.head = make_head(head_spec, torch.float32)
    groups = param_groups(model, 0.1, 0.0)
    net_ids = {id(p) for p in model.head.temperature.parameters()}
    assert {id(p) for g in groups if g["lr_kind"] == "temperature" for p in g["params"]} == net_ids
    assert all(g["weight_decay"] == 0.0 for g in groups if g["lr_kind"] == "temperature")
    for p in model.parameters():
        p.requires_grad_(id(p) in net_ids)
    assert {g["lr_kind"] for g in param_groups(model, 0.1)} == {"temperature"}


def recipe_errors(**sections):
    raw = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    try:
        validate_recipe(raw)
    except UserError as e:
        return str(e)
    return ""


def test_recipe_refuses_what_the_network_cannot_serve():
    on = {"enabled": True}
    assert "scale-invariant" in recipe_errors(head={"type": "zloss"}, temperature=on)
    msg = recipe_errors(head={"type": "cce", "bias": True, "softcap": 30.0}, temperature=on)
    assert "head.bias" in msg and "head.softcap" in msg and "2 problems" in msg
    assert "init_from" in recipe_errors(temperature={**on, "mode": "frozen_body"})
    assert "tau_min" in recipe_errors(temperature={**on, "tau_min": 3.0, "tau_max": 2.0})
    assert recipe_errors(head={"type": "hsm"}, temperature=on) == ""
    assert recipe_errors(head={"type": "zloss"}, temperature={"enabled": False}) == ""
    tiny = validate_recipe(yaml.safe_load((ROOT / "recipes" / "tiny-tempnet.yaml").read_text()))
    assert tiny.identity()["head"]["temperature"]["rho"] == 8.0 and tiny.temperature.lr == 2e-6


# ------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_zero3_matches_zero0_with_the_network_and_tied_embeddings():
    """Under ZeRO-3 the network's first layer multiplies its weight by the head's partitioned
    (here also tied) weight inside the head's forward: the per-step losses, which depend on every
    earlier update of the body, head and network, must follow ZeRO-0's."""
    spec = {"type": "cce", "temperature": {"width": 16, "tau_min": 0.5, "tau_max": 5.0, "rho": 4.0, "dropout": 0.0}}
    base = run_head_distributed(spec, stage=0, steps=4, tie=True)
    z3 = run_head_distributed(spec, stage=3, steps=4, tie=True)
    assert base[-1] < base[0]
    for a, b in zip(base, z3):
        assert abs(a - b) <= 1e-5 * abs(a), (base, z3)



@pytest.mark.slow
def test_zero2_joint_run_then_frozen_body_leaves_body_and_head_unchanged(tmp_path):
    """2 ranks, ZeRO-2: a joint run logs τ within its bounds and evaluates at τ = 1 and at τ;
    frozen_body on top of it trains the network only: every body and head weight is bit-equal
    to the checkpoint it started from, and so is its perplexity at τ = 1."""
    body = yaml.safe_load((ROOT / "recipes" / "tiny-tempnet.yaml").read_text())
    body["model"].update(layers=2, d_model=32, n_heads=2, seq_len=32)
    body["data"].update(max_bytes=200_000, cache_dir=str(tmp_path / "cache"))
    body["tokenizer"].update(vocab_size=512, train_bytes=100_000)
    body["train"].update(steps=4, micro_batch=2, warmup_steps=1, log_every=1, lr=1e-2)
    body["checkpoint"].update(every=4)
    body["eval"].update(every=4, batches=2)
    body["temperature"].update(width=16, lr=2e-3, tau_min=0.6, tau_max=4.0)
    recipe = tmp_path / "micro.yaml"
    recipe.write_text(yaml.safe_dump(body))

    def run(out, *overrides):
        proc = subprocess.run([sys.executable, "-m", "llmtrain.cli", "run", str(recipe), "--out", str(out), *overrides],
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    joint = run(tmp_path / "joint")
    steps = [r for r in joint if "loss" in r]
    assert len(steps) == 4
    for r in steps:
        assert 0.6 <= r["tau_min"] <= r["tau_mean"] <= r["tau_max"] <= 4.0
        assert r["lr_temperature"] == 2e-3 and r["lr"] != 2e-3  # its own constant LR
    (ev,) = [r for r in joint if "val_loss" in r]
    assert ev["val_ppl"] == pytest.approx(math.exp(ev["val_loss"]), rel=1e-6)
    assert ev["val_ppl_tau"] == pytest.approx(math.exp(ev["val_loss_tau"]), rel=1e-6)
    assert 0.6 <= ev["val_tau_min"] <= ev["val_tau_mean"] <= ev["val_tau_max"] <= 4.0

    frozen = run(tmp_path / "frozen", "temperature.mode=frozen_body", f"temperature.init_from={tmp_path / 'joint'}",
                 "train.steps=2", "eval.every=2", "checkpoint.every=2")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    before = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "joint" / "checkpoints"), tag="step00000004")
    after = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "frozen" / "checkpoints"), tag="step00000002")
    model_keys = [k for k in before if not k.startswith("head.temperature.")]
    assert len(model_keys) > 10 and all(torch.equal(before[k], after[k]) for k in model_keys)
    assert any(k.startswith("head.temperature.") for k in after)
    (ev2,) = [r for r in frozen if "val_loss" in r]
    assert ev2["val_loss"] == ev["val_loss"]


def test_init_from_refuses_a_checkpoint_of_another_model(tmp_path):
    from llmtrain.train.checkpoint import write_meta
    from llmtrain.train.init_from import resolve_init_from

    raw = yaml.safe_load((ROOT / "recipes" / "tiny-tempnet.yaml").read_text())
    saved = validate_recipe(raw, ["model.layers=3"])
    tag = tmp_path / "run" / "checkpoints" / "step00000004"
    tag.mkdir(parents=True)
    write_meta(tag, {"step": 4, "identity": saved.identity(), "tokenizer_hash": "h"})
    same = validate_recipe(raw, ["model.layers=3", "temperature.mode=frozen_body",
                                 f"temperature.init_from={tmp_path / 'run'}", "temperature.rho=6.0"])
    assert resolve_init_from(same, "h") == tag  # the network's own settings may differ
    other = validate_recipe(raw, ["temperature.mode=frozen_body", f"temperature.init_from={tmp_path / 'run'}"])
    with pytest.raises(UserError, match="layers=3 where the recipe has 4") as e:
        resolve_init_from(other, "other-hash")
    assert "another tokenizer" in str(e.value)


def test_first_layer_reads_the_weight_in_chunks_without_a_whole_cast_copy(monkeypatch):
    """The factored first layer goes over the head's weight VOCAB_CHUNK rows at a time: τ and the
    network's gradients equal the direct computation from the scores (float64, several chunks,
    one partial), and with a bf16 weight under an fp32 network no fp32 tensor as large as the
    weight appears (autograd used to keep a whole fp32 copy for the backward)."""
    from llmtrain.heads import temperature as tn

    monkeypatch.setattr(tn, "VOCAB_CHUNK", 16)  # 97 rows: six full chunks and a partial one
    head = make_head(SPECS["softmax_bias"])
    hidden, _ = batch()
    factored = head.temperature(hidden=hidden, weight=head.weight, bias=head.bias)
    grads = torch.autograd.grad(factored.sum(), list(head.temperature.parameters()))
    direct = reference_tau(head, hidden)
    torch.testing.assert_close(factored, direct, rtol=1e-6, atol=1e-8)  # ‖o‖² is taken in fp32
    for got, want in zip(grads, torch.autograd.grad(direct.sum(), list(head.temperature.parameters()))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)

    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestFloat32(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for x in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(x, torch.Tensor) and x.dtype == torch.float32:
                    self.largest = max(self.largest, x.numel())
            return out

    vocab, dim = 400, 24
    net = TemperatureNet(vocab, width=8)
    weight = torch.randn(vocab, dim).bfloat16()
    with LargestFloat32() as mode:
        net(hidden=torch.randn(5, dim).bfloat16(), weight=weight).sum().backward()
    assert mode.largest < vocab * dim / 2, mode.largest  # the largest: the network's own 8 × V weight


@pytest.mark.parametrize("init_tau", [None, 1.0, 0.6, 4.0])
def test_init_tau_sets_where_tau_starts(init_tau):
    """The authors' init starts τ near the middle of [tau_min, tau_max] (≈2.75 for [0.5, 5]);
    temperature.init_tau moves the pooling bias so that τ starts at the value asked for, whatever the
    scores (the pooled term is small at init)."""
    torch.manual_seed(0)
    net = TemperatureNet(512, init_tau=init_tau).eval()
    tau = net(torch.randn(64, 512) * 3)
    expected = 0.5 + 4.5 / 2 if init_tau is None else init_tau
    assert (tau - expected).abs().max() < 0.05 * expected, (tau.min(), tau.max())


def test_init_tau_outside_the_range_is_refused_and_not_part_of_resume_identity():
    with pytest.raises(UserError, match="init_tau"):
        validate_recipe({"temperature": {"enabled": True, "init_tau": 6.0}})
    with pytest.raises(ValueError, match="init_tau"):
        TemperatureNet(16, init_tau=0.5)
    started_at_1 = validate_recipe({"temperature": {"enabled": True, "init_tau": 1.0}})
    default = validate_recipe({"temperature": {"enabled": True}})
    # a resumed network's bias comes from its checkpoint: init_tau does not make it another model
    assert started_at_1.temperature.identity() == default.temperature.identity()
