"""Export and generate without DeepSpeed: the Llama mapping against transformers' own model,
state-dict round trips for every head, sampling through the head, and the errors."""

import json

import pytest
import torch

from llmtrain.train.checkpoint import write_meta
from llmtrain.errors import UserError
from llmtrain.export import find_checkpoint
from llmtrain.generate import next_tokens, parse_temperature
from llmtrain.model.hf_llama import hf_incompatibility, llama_config, llama_state_dict
from llmtrain.model.language_model import LanguageModel
from llmtrain.recipe import validate_recipe

VOCAB = 300


def tiny(head: dict, **model) -> tuple:
    recipe = validate_recipe({"model": {"layers": 2, "d_model": 32, "n_heads": 4, "seq_len": 16, **model}, "head": head})
    torch.manual_seed(0)
    m = LanguageModel(recipe.model, recipe.head_spec(), VOCAB)
    with torch.no_grad():  # non-trivial norms, so a mix-up of the two norms of a block shows
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.rand_like(p))
    return recipe, m.eval()


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("head", ["softmax", "cce"])
def test_llama_folder_gives_the_same_logits(tmp_path, head, tie):
    transformers = pytest.importorskip("transformers")
    recipe, model = tiny({"type": head}, tie_embeddings=tie)
    assert hf_incompatibility(recipe) is None
    config = transformers.LlamaConfig(**{k: v for k, v in llama_config(recipe, VOCAB, 0).items() if k != "architectures"})
    hf = transformers.LlamaForCausalLM(config).eval()
    missing, unexpected = hf.load_state_dict(llama_state_dict(model), strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if tie else set())
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = torch.log_softmax(model.head.logits(model.body(ids).flatten(0, 1)), -1) if head == "softmax" else \
            model.head.token_logprobs(model.body(ids).flatten(0, 1).repeat_interleave(VOCAB, 0),
                                      torch.arange(VOCAB).repeat(32)).view(32, VOCAB)
        theirs = torch.log_softmax(hf(ids).logits.flatten(0, 1).float(), -1)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("head, reason", [({"type": "hsm"}, "hsm head"), ({"type": "zloss"}, "zloss head"),
                                          ({"type": "softmax", "bias": True}, "head.bias"),
                                          ({"type": "cce", "softcap": 30.0}, "head.softcap")])
def test_heads_without_a_llama_equivalent_say_why(head, reason):
    recipe, _ = tiny(head)
    assert reason in hf_incompatibility(recipe)


@pytest.mark.parametrize("head", [{"type": "softmax"}, {"type": "cce"}, {"type": "hsm"}, {"type": "zloss"}])
def test_export_round_trip_keeps_every_parameter_and_buffer_of_every_head(head, tmp_path):
    """Every parameter and persistent buffer (hsm's cluster table from the data, zloss's fitted
    calibration) moved off the value a freshly built model has, written as export writes it
    (safetensors), read back by load_exported into a model built from another seed: all equal,
    and so is what the head computes from them."""
    from safetensors.torch import save_file

    from llmtrain.export import load_exported

    recipe, model = tiny(head)
    fresh = LanguageModel(recipe.model, recipe.head_spec(), VOCAB)
    counts = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(3)) ** 2  # not in id order
    model.head.prepare(counts)
    hidden = model.body(torch.randint(0, VOCAB, (2, 16))).flatten(0, 1).detach()
    targets = torch.randint(0, VOCAB, (32,))
    if head["type"] == "zloss":
        model.head.fit_calibration(hidden, targets)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    moved = [k for k, v in fresh.state_dict().items() if not torch.equal(v, state[k])]
    buffers = [k for k, _ in model.named_buffers() if k in state]
    assert set(buffers) <= set(moved), "a buffer left at its default proves nothing"
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "recipe.yaml").write_text(recipe.to_yaml())
    (tmp_path / "llmtrain.json").write_text(json.dumps({"vocab_size": VOCAB}))
    torch.manual_seed(99)
    again = load_exported(tmp_path)
    ours, theirs = dict(model.named_buffers()), dict(again.named_buffers())
    assert ours.keys() == theirs.keys()
    for name in ours:  # persistent or derived from what is (hsm's row maps, RoPE tables)
        assert torch.equal(ours[name], theirs[name]), name
    for (name, p), q in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(p, q), name
    with torch.no_grad():
        assert torch.equal(again.head.topk(hidden, 5), model.head.topk(hidden, 5))
        score = "calibrated_token_logprobs" if head["type"] == "zloss" else "token_logprobs"
        assert torch.equal(getattr(again.head, score)(hidden, targets), getattr(model.head, score)(hidden, targets))


def test_greedy_and_top_k_sampling_follow_the_heads_distribution():
    _, model = tiny({"type": "softmax"})
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        probs = torch.softmax(model.head.logits(model.body(ids)[:, -1]).double() / 0.5, -1)[0]
    g = torch.Generator().manual_seed(0)
    assert next_tokens(model, ids, 0.0, None, g).item() == probs.argmax().item()
    top = probs.topk(3)
    draws = next_tokens(model, ids.expand(4000, -1), 0.5, 3, g)  # 4000 independent draws in one batch
    assert set(draws.tolist()) <= set(top.indices.tolist())
    expected = top.values / top.values.sum()
    observed = torch.stack([(draws == i).double().mean() for i in top.indices])
    assert torch.allclose(observed, expected, atol=0.03)


def test_auto_temperature_on_a_head_without_a_temperature_network_is_a_user_error():
    _, model = tiny({"type": "softmax"})
    with pytest.raises(UserError, match="needs the temperature network"):
        next_tokens(model, torch.zeros(1, 4, dtype=torch.long), "auto", None, torch.Generator())
    assert parse_temperature("auto") == "auto" and parse_temperature("0.7") == 0.7
    for bad in ("-1", "hot", "nan"):
        with pytest.raises(UserError, match="--temperature"):
            parse_temperature(bad)


def test_find_checkpoint_names_what_is_missing(tmp_path):
    with pytest.raises(UserError, match="no such run folder"):
        find_checkpoint(tmp_path / "nope")
    run = tmp_path / "run"
    (run / "checkpoints" / "step00000004").mkdir(parents=True)
    with pytest.raises(UserError, match="no checkpoint there yet"):
        find_checkpoint(run)
    (run / "checkpoints" / "step00000004" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    with pytest.raises(UserError, match="step00000004 has no llmtrain.json"):
        find_checkpoint(run)
    done = run / "checkpoints" / "step00000008"
    done.mkdir()
    write_meta(done, {"step": 8})
    assert find_checkpoint(run) == done and find_checkpoint(done) == done
