"""Activation checkpointing (`model.activation_checkpointing`) against the same model without it,
for our body and a Hugging Face Llama body: equal losses and gradients step by step, each block
recomputed once in backward (never in eval), and less memory kept for backward."""

import pytest
import torch

from conftest import saved_for_backward
from llmtrain.model.language_model import LanguageModel
from llmtrain.recipe import ModelConfig

VOCAB, B, T, D = 100, 2, 32, 64


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """Tiny random Llama folders by layer count (each saved once; both runs load the same weights)."""
    transformers = pytest.importorskip("transformers")
    folders = {}

    def folder(layers: int):
        if layers not in folders:
            cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=128, num_hidden_layers=layers,
                                           num_attention_heads=4, num_key_value_heads=2)
            torch.manual_seed(0)
            folders[layers] = tmp_path_factory.mktemp(f"llama{layers}")
            transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folders[layers])
        return folders[layers]

    return folder


def build(body: str, checkpointing: bool, hf_folders, layers: int = 2) -> LanguageModel:
    if body == "ours":
        cfg = ModelConfig(layers=layers, d_model=D, n_heads=4, seq_len=T, activation_checkpointing=checkpointing)
    else:
        cfg = ModelConfig(hf=str(hf_folders(layers)), seq_len=T, activation_checkpointing=checkpointing)
    torch.manual_seed(0)
    return LanguageModel(cfg, {"type": "softmax"}, vocab_size=VOCAB)  # as the worker builds it


def blocks(model: LanguageModel):
    """The repeated blocks, and inside each a submodule whose forward runs in the recomputation
    (transformers checkpoints a layer's forward, not its __call__, so the layer's own hooks run once)."""
    if hasattr(model.body, "blocks"):
        return [b.ffn for b in model.body.blocks]
    return [layer.mlp for layer in model.body.model.layers]


def batch(step: int):
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, VOCAB, (B, T + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


@pytest.mark.parametrize("body", ["ours", "llama"])
def test_losses_and_gradients_equal_the_run_without_it(body, hf_folders):
    # Exact equality: the recomputation runs the same kernels on the same inputs in this process,
    # so checkpointing changes what is kept, not a single bit of the result.
    models = [build(body, on, hf_folders) for on in (False, True)]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in models]
    for step in range(4):
        losses, grads = [], []
        for model, opt in zip(models, opts):
            opt.zero_grad()
            loss = model(*batch(step)).loss
            loss.backward()
            opt.step()
            losses.append(loss.detach())
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        assert torch.equal(*losses), f"step {step}: {losses[0].item()!r} != {losses[1].item()!r}"
        assert grads[0].keys() == grads[1].keys()
        for name in grads[0]:
            assert torch.equal(grads[0][name], grads[1][name]), f"step {step}: gradient of {name} differs"


@pytest.mark.parametrize("body", ["ours", "llama"])
def test_each_block_runs_twice_in_a_training_step_and_once_otherwise(body, hf_folders):
    for checkpointing in (False, True):
        model = build(body, checkpointing, hf_folders, layers=3)
        calls = {}
        for i, module in enumerate(blocks(model)):
            module.register_forward_pre_hook(lambda m, args, i=i: calls.__setitem__(i, calls.get(i, 0) + 1))
        model(*batch(0)).loss.backward()
        assert calls == {i: 2 if checkpointing else 1 for i in range(3)}, f"checkpointing={checkpointing}"
        calls.clear()
        with torch.no_grad():  # evaluation: nothing to recompute
            model(*batch(0))
        model.eval()
        model(*batch(0)).loss.backward()  # eval mode keeps activations even with gradients on
        assert calls == {i: 2 for i in range(3)}, f"checkpointing={checkpointing}"


def saved_by_step(model: LanguageModel) -> int:
    """Bytes autograd keeps from one training forward (see conftest.saved_for_backward)."""
    losses = []
    saved = saved_for_backward(model, lambda: losses.append(model(*batch(0)).loss))
    losses[0].backward()
    return saved


@pytest.mark.parametrize("body", ["ours", "llama"])
def test_a_checkpointed_block_keeps_only_its_input(body, hf_folders):
    """Without checkpointing each block keeps everything its backward needs (Δ per block); with it,
    only its input hidden state, B·T·D fp32 values (the checkpoint's saved input)."""
    hidden = B * T * D * 4
    kept = {(on, n): saved_by_step(build(body, on, hf_folders, layers=n)) for on in (False, True) for n in (2, 3)}
    per_block = kept[False, 3] - kept[False, 2]
    assert kept[True, 3] - kept[True, 2] == hidden
    assert per_block > 4 * hidden
    if body == "ours":
        # Every block checkpointed, none skipped: exactly (Δ − hidden) less per block. (transformers
        # keeps its shared rotary tables outside the saved tensors, so this equality is ours only.)
        for n in (2, 3):
            assert kept[True, n] == kept[False, n] - n * (per_block - hidden)
    for n in (2, 3):
        assert kept[True, n] < kept[False, n]

