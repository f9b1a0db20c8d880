"""The body + a softmax/cce head as a Hugging Face `LlamaForCausalLM` folder.

The body is Llama's layout already: pre-norm RMSNorm (normalized in fp32, scaled by the weight
after casting back), rotary embeddings on (first half, second half) pairs as Llama's
`rotate_half`, SwiGLU, no biases, causal SDPA. Only the packing differs: llmtrain keeps one
fused `qkv` [3D, D] and one fused `gate_up` [2F, D]; Llama has q/k/v_proj and gate/up_proj.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llmtrain.data.tokenizer import KNOWN_EOS_TOKENS
from llmtrain.heads import HEADS, head_class
from llmtrain.model.decoder import ffn_size
from llmtrain.model.language_model import LanguageModel
from llmtrain.recipe import Recipe

def hf_incompatibility(recipe: Recipe) -> str | None:
    """Why this recipe's model has no Llama equivalent, or None when it has one."""
    head = recipe.head_spec()
    if not head_class(head["type"]).linear_lm_head:
        linear = ", ".join(n for n in HEADS if head_class(n).linear_lm_head)
        return f"the {head['type']} head is not a Llama lm_head (only {linear} are)"
    if head.get("bias"):
        return "head.bias: Llama's lm_head has no bias"
    if head.get("softcap"):
        return "head.softcap: Llama has no final logit softcapping"
    m = recipe.model
    if (m.d_model // m.n_heads) % 2:
        return f"model.d_model / model.n_heads = {m.d_model // m.n_heads} is odd; rotary embeddings need an even head size"
    return None


def llama_config(recipe: Recipe, vocab_size: int, eos_id: int | None) -> dict:
    m = recipe.model
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": ffn_size(m),
        "num_hidden_layers": m.layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_heads,
        "head_dim": m.d_model // m.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": m.seq_len,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": m.tie_embeddings,
        "initializer_range": m.init_std,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def llama_state_dict(model: LanguageModel) -> dict[str, torch.Tensor]:
    """llmtrain parameter names and packing → Llama's."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": sd["body.embed.weight"], "model.norm.weight": sd["body.norm.weight"]}
    for i in range(len(model.body.blocks)):
        b, o = f"body.blocks.{i}.", f"model.layers.{i}."
        q, k, v = sd[b + "attn.qkv.weight"].chunk(3, dim=0)  # rows: [q; k; v], heads contiguous in each
        gate, up = sd[b + "ffn.gate_up.weight"].chunk(2, dim=0)
        out.update({
            o + "input_layernorm.weight": sd[b + "attn_norm.weight"],
            o + "self_attn.q_proj.weight": q, o + "self_attn.k_proj.weight": k, o + "self_attn.v_proj.weight": v,
            o + "self_attn.o_proj.weight": sd[b + "attn.out.weight"],
            o + "post_attention_layernorm.weight": sd[b + "ffn_norm.weight"],
            o + "mlp.gate_proj.weight": gate, o + "mlp.up_proj.weight": up,
            o + "mlp.down_proj.weight": sd[b + "ffn.down.weight"],
        })
    if model.body.embed.weight is not model.head.weight:
        out["lm_head.weight"] = sd["head.weight"]
    return {k: v.clone().contiguous().float() for k, v in out.items()}


def write_hf_folder(model: LanguageModel, recipe: Recipe, tokenizer_path: Path, folder: Path) -> None:
    from safetensors.torch import save_file
    from tokenizers import Tokenizer

    from llmtrain.model.hf_export import write_tokenizer_files

    folder.mkdir(parents=True)
    tok = Tokenizer.from_file(str(tokenizer_path))
    eos_token = next((t for t in KNOWN_EOS_TOKENS if tok.token_to_id(t) is not None), None)
    eos_id = tok.token_to_id(eos_token) if eos_token else None
    config = llama_config(recipe, model.head.vocab_size, eos_id)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": eos_id, "eos_token_id": eos_id}, indent=1))
    save_file(llama_state_dict(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer_files(tokenizer_path, folder, recipe.model.seq_len)
