"""Hugging Face bodies (model.hf), against transformers itself: the loss and every gradient of a
batch equal the causal-LM model's, for Llama, Qwen2, Gemma2 and Mistral; the head takes lm_head
(tied stays tied); padding rows are never predicted; the export loads back with equal logits."""

import json

import pytest
import torch
import transformers

from hf_models import FAMILIES, save_tiny_model
from llmtrain.errors import UserError
from llmtrain.model.hf import check_before_launch, read_hf_folder
from llmtrain.model.hf_export import hf_export_problem, write_hf_export
from llmtrain.model.language_model import LanguageModel
from llmtrain.recipe import validate_recipe

VOCAB = 300


def recipe_for(folder, head="softmax", **head_options):
    return validate_recipe({"model": {"hf": str(folder), "seq_len": 16}, "head": {"type": head, **head_options}})


def ours(recipe, vocab=VOCAB):
    return LanguageModel(recipe.model, recipe.head_spec(), vocab)


def reference(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)


def batch(seed=1, vocab=VOCAB):
    ids = torch.randint(0, vocab, (2, 17), generator=torch.Generator().manual_seed(seed))
    ids[0, 5] = -100  # an ignored target
    return ids


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    return request.param, save_tiny_model(tmp_path_factory.mktemp(request.param), request.param)


@pytest.mark.parametrize("head", ["softmax", "cce"])
def test_loss_and_gradients_equal_transformers(family, head):
    name, folder = family
    model, ref = ours(recipe_for(folder, head)), reference(folder)
    labels = batch()
    ids = labels.clamp(min=0)
    loss = model(ids[:, :-1], labels[:, 1:]).loss
    # transformers shifts the labels itself; the last input token only feeds the logit it drops
    ref_loss = ref(input_ids=ids, labels=labels).loss
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    loss.backward()
    ref_loss.backward()
    ref_params = dict(ref.named_parameters())  # a tied lm_head appears once, as the embedding
    prefix = ref.base_model_prefix
    ours_named = dict(model.named_parameters())
    assert len(ours_named) == len(ref_params)
    for key, p in ours_named.items():
        ref_key = "lm_head.weight" if key == "head.weight" else key.replace("body.model.", f"{prefix}.", 1)
        if key == "head.weight" and ref.config.tie_word_embeddings:
            ref_key = f"{prefix}.embed_tokens.weight"
        torch.testing.assert_close(p.grad, ref_params[ref_key].grad, rtol=1e-4, atol=1e-6, msg=f"{name} {key}")


def test_the_head_takes_lm_head_and_tying_survives(family):
    name, folder = family
    model, ref = ours(recipe_for(folder)), reference(folder)
    assert torch.equal(model.head.weight, ref.lm_head.weight)
    tied = ref.config.tie_word_embeddings
    assert (model.head.weight is model.body.embed.weight) == tied
    recipe = recipe_for(folder)
    assert recipe.model.tie_embeddings == tied and recipe.model.layers == 2 and recipe.model.d_model == 64
    if name == "gemma2":  # its final-logit softcap moves into the head
        assert recipe.head.softcap == 30.0
    if tied:
        with pytest.raises(UserError, match="tie_word_embeddings"):
            recipe_for(folder, "hsm")
        zloss = ours(recipe_for(folder, "zloss"))
        assert zloss.head.weight is zloss.body.embed.weight
        assert torch.equal(zloss.head.weight, ref.get_input_embeddings().weight)  # the trained embedding kept
    else:
        hsm = LanguageModel(recipe_for(folder).model, {"type": "hsm"}, VOCAB - 20)  # a padded embedding
        assert hsm.head.hidden_size == 64 and torch.equal(hsm.body.embed.weight, ref.get_input_embeddings().weight)
        assert hsm.head.vocab_size == VOCAB - 20 and hsm.padding == 0  # the tokenizer's ids, no padding rows
        hsm.head.prepare(torch.arange(VOCAB - 20) + 1)  # clusters from the data's counts of those ids


def test_config_only_folder_initializes_from_the_config(tmp_path):
    folder = save_tiny_model(tmp_path / "cfg", "qwen2", weights=False)
    recipe = recipe_for(folder, "cce")
    torch.manual_seed(3)
    a = ours(recipe)
    torch.manual_seed(3)
    b = ours(recipe)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    std = a.body.model.layers[0].mlp.down_proj.weight.std().item()
    assert std == pytest.approx(0.02, rel=0.2)  # transformers' own init (initializer_range)


def test_padding_rows_are_never_predicted_or_sampled(tmp_path):
    folder = save_tiny_model(tmp_path / "padded", "llama")
    real = VOCAB - 20  # a tokenizer smaller than the embedding, as Qwen's
    model = LanguageModel(recipe_for(folder).model, recipe_for(folder).head_spec(), real)
    with torch.no_grad():  # make the padding rows the most likely tokens
        model.head.weight[real:] = model.head.weight[:real].abs().max() * 50
    hidden = torch.randn(64, 64)
    assert int(model.head.topk(hidden, 1).max()) >= real  # the head alone would predict padding
    top = model.topk(hidden, 10)
    assert top.shape == (64, 10) and int(top.max()) < real
    full = model.head.topk(hidden, 30)
    expected = torch.stack([row[row < real][:10] for row in full])
    assert torch.equal(top, expected)  # the real tokens in the head's own order
    drawn = model.sample(hidden, generator=torch.Generator().manual_seed(0))
    assert int(drawn.max()) < real


def test_export_keeps_the_architecture_and_the_logits(family, tmp_path):
    name, folder = family
    for head in ("softmax", "cce"):
        recipe = recipe_for(folder, head)
        model = ours(recipe)
        with torch.no_grad():  # as if trained: every weight moved
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        assert hf_export_problem(recipe) is None
        tokenizer = tmp_path / f"{head}-tokenizer.json"
        _write_byte_tokenizer(tokenizer)
        out = tmp_path / f"{name}-{head}"
        write_hf_export(model.eval(), recipe, tokenizer, out)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
        assert type(loaded).__name__ == json.loads((folder / "config.json").read_text())["architectures"][0]
        assert loaded.config.tie_word_embeddings == recipe.model.tie_embeddings
        ids = batch(seed=4)[:, :16].clamp(min=0)
        with torch.no_grad():
            theirs = loaded(input_ids=ids).logits
            hidden = model.body(ids).flatten(0, 1)
            mine = torch.cat([model.head.token_logprobs(hidden, torch.full((hidden.shape[0],), t)).unsqueeze(1)
                              for t in range(VOCAB)], 1)
        torch.testing.assert_close(torch.log_softmax(theirs.flatten(0, 1).float(), -1), mine, rtol=1e-5, atol=1e-5)
    assert hf_export_problem(recipe_for(folder, "zloss")) is not None


def _write_byte_tokenizer(path):
    from llmtrain.data.tokenizer import train_tokenizer

    train_tokenizer(["def f(x):\n    return x\n"] * 4, 260).save(str(path))


def test_bad_folders_are_named(tmp_path):
    with pytest.raises(UserError, match="model.hf: .*missing.* is not a folder"):
        validate_recipe({"model": {"hf": str(tmp_path / "missing")}})
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        validate_recipe({"model": {"hf": str(tmp_path / "empty")}})
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "no-such-model", "hidden_size": 8}))
    with pytest.raises(UserError, match="does not know the architecture 'no-such-model'"):
        validate_recipe({"model": {"hf": str(unknown)}})
    t5 = tmp_path / "t5"
    transformers.T5Config(vocab_size=100, d_model=16, num_layers=1, num_heads=2, d_ff=32).save_pretrained(t5)
    with pytest.raises(UserError, match="encoder-decoder"):
        validate_recipe({"model": {"hf": str(t5)}})
    bert = tmp_path / "bert"
    transformers.BertConfig(vocab_size=300, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32).save_pretrained(bert)
    with pytest.raises(UserError, match=r"BertConfig \(bert\) is an encoder"):
        validate_recipe({"model": {"hf": str(bert)}})
    vit = tmp_path / "vit"
    transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32).save_pretrained(vit)
    with pytest.raises(UserError, match="no causal-LM model"):
        validate_recipe({"model": {"hf": str(vit)}})
    folder = save_tiny_model(tmp_path / "llama", "llama")
    with pytest.raises(UserError, match=r"model.layers: 6, but .*config.json has 2"):
        validate_recipe({"model": {"hf": str(folder), "layers": 6}})
    with pytest.raises(UserError, match="tokenizer.vocab_size: 400 exceeds the model's vocabulary"):
        validate_recipe({"model": {"hf": str(folder)}, "tokenizer": {"vocab_size": 400}})


def test_weights_are_checked_before_launch(tmp_path):
    folder = save_tiny_model(tmp_path / "llama", "llama")
    check_before_launch(str(folder), VOCAB, weights=True)
    with pytest.raises(UserError, match="more than the model's vocabulary"):
        check_before_launch(str(folder), VOCAB + 1, weights=False)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # a torn download
    with pytest.raises(UserError, match="model.safetensors is not a readable safetensors file"):
        check_before_launch(str(folder), VOCAB, weights=True)
    other = save_tiny_model(tmp_path / "wide", "llama", hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    (folder / "config.json").write_text((folder / "config.json").read_text())  # config of the 64-wide model
    weights.write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(UserError, match=r"do not match its config.json: .*\[300, 32\].*needs \[300, 64\]"):
        check_before_launch(str(folder), VOCAB, weights=True)
    assert read_hf_folder(folder).weights == (weights,)
