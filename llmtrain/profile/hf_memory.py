"""The memory model of a Hugging Face body (`model.hf`), for profile/estimate.py.

Parameters are counted on the transformers model of the folder's config.json built on the meta
device (`model.hf.empty_causal_lm`): exact, grouped-query attention, biases and extra norms
included, and nothing allocated. The bytes the body saves for backward follow a formula per
family (`hf_activation_bytes`), read from what autograd keeps in transformers' decoder layers and
checked against measurements of tiny Llama, Qwen2 and Gemma 2 models (tests/test_profile_hf.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

# How a family's decoder layer saves for backward, where it differs from Llama's:
#   gemma_norm    Gemma's RMSNorm multiplies by (1 + w) in fp32, so it keeps the normalized
#                 input in fp32 where Llama's keeps it in the working dtype
#   norms         RMSNorms per layer: 2 (before attention, before the MLP) or 4 (Gemma 2 also
#                 normalizes each branch's output before adding it to the residual stream)
# Families not listed are modelled as Llama's, with a note in the report (Mistral's layers are
# Llama's, but its sliding window needs a mask, and SDPA with a mask may form the scores).
FAMILIES = {
    "llama": {"gemma_norm": False, "norms": 2},
    "qwen2": {"gemma_norm": False, "norms": 2},
    "gemma2": {"gemma_norm": True, "norms": 4},
}
# Attention implementations that never form the [T, T] score matrix (FlashAttention-style kernels:
# PyTorch's SDPA on CPU and CUDA without a mask, flash_attention_2/3).
FUSED_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


@dataclass(frozen=True)
class HFBodyShape:
    """What the memory model needs of a Hugging Face body, read once per config.json."""

    model_type: str
    params: int  # the base model's unique parameters (the embedding included, lm_head not)
    largest_module: int  # the most parameters one module owns directly: what ZeRO-3 gathers at once
    embedding: int  # vocab × hidden: what a tied lm_head shares with the body
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    attention: str  # transformers' attention implementation for this config ("sdpa", "eager", ...)
    attn_softcap: float | None  # Gemma 2's tanh cap on the attention scores
    mask_kinds: int  # attention masks the model builds per forward (Gemma 2: full and sliding window)
    final_softcap: float | None  # Gemma 2's cap on the logits, which the head applies

    @property
    def calibrated(self) -> bool:
        return self.model_type in FAMILIES


def hf_body_shape(path: str) -> HFBodyShape:
    """The shape of the body of the model folder at `path` (config.json alone is enough)."""
    config = Path(path).expanduser() / "config.json"
    mtime = config.stat().st_mtime_ns if config.is_file() else 0
    return _shape(str(Path(path).expanduser().resolve()), mtime)


@functools.lru_cache(maxsize=16)
def _shape(path: str, mtime: int) -> HFBodyShape:
    # Building a 70B model on the meta device takes a second or two; every head, stage and
    # candidate fix of one profile shares it (mtime: a rewritten config.json is read again).
    from llmtrain.errors import UserError
    from llmtrain.model.hf import empty_causal_lm, read_hf_folder

    c = read_hf_folder(path).config
    missing = [a for a in ("hidden_size", "num_attention_heads", "num_hidden_layers") if getattr(c, a, None) is None]
    if missing:
        raise UserError(f"model.hf: {path}/config.json ({c.model_type}) has no {', '.join(missing)}: llmtrain's memory "
                        "model covers attention decoders (Llama, Qwen2, Gemma 2 and their kin); measure this one "
                        "with a training run instead")
    lm = empty_causal_lm(c)
    body = getattr(lm, lm.base_model_prefix)  # the base model, as LanguageModel takes it
    params = sum({id(p): p.numel() for p in body.parameters()}.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in body.modules())
    heads, hidden = int(c.num_attention_heads), int(c.hidden_size)
    # GPT-2-style configs name the MLP width n_inner (None: 4 × hidden)
    intermediate = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * hidden
    return HFBodyShape(
        model_type=str(c.model_type), params=params, largest_module=largest,
        embedding=body.get_input_embeddings().weight.numel(), hidden=hidden,
        intermediate=int(intermediate), heads=heads,
        kv_heads=int(getattr(c, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(c, "head_dim", None) or hidden // heads), layers=int(c.num_hidden_layers),
        attention=str(lm.config._attn_implementation or "eager"),
        attn_softcap=getattr(c, "attn_logit_softcapping", None),
        mask_kinds=len(set(getattr(c, "layer_types", None) or ["full_attention"])),
        final_softcap=getattr(c, "final_logit_softcapping", None))


def hf_final_softcap(path: str) -> float | None:
    cap = hf_body_shape(path).final_softcap
    return float(cap) if cap else None


def hf_activation_bytes(s: HFBodyShape, micro_batch: int, seq_len: int, a: int,
                        checkpointing: bool) -> tuple[int, int, int]:
    """What the body holds for backward over one micro-batch (a = bytes of the working dtype):
    (saved, recomputed, backward) as estimate.BodyActivations names them.

    Saved per token and layer (D hidden, F intermediate, H query heads, K key/value heads, d
    head_dim, T the sequence length):
      each RMSNorm: its fp32 input copy (4D), 1/rms (4), the normalized input (aD; 4D for Gemma's
        norm, which scales in fp32); the two norms that feed a linear also its output (aD)
      attention, fused kernels (SDPA, FlashAttention): the rotated q (aHd), k and v (2aKd: GQA is
        not repeated when there is no mask), the output (aHd; the o_proj input is the same
        storage), the log-sum-exp (4H)
      attention, eager: q and the repeated k (2aHd), per key position the tanh of a softcap
        (aH·T), the fp32 softmax (4H·T) and its cast to the working dtype (aH·T, not in fp32),
        the repeated v (aHd) and the output made contiguous (aHd)
      the gated MLP: gate, its activation, up and their product (4aF)
    Per token: the int64 ids the embedding keeps (8) and the final norm (its output is the
    head's input). Per micro-batch: RoPE's cos and sin tables (2·T·d·a).
    With activation checkpointing each layer keeps only its input (aD per token); one layer's
    saved tensors are recomputed and live during its backward.
    Eager attention's [T, T] masks (B·T²·a each, one per kind of layer: Gemma 2 has full and
    sliding-window ones) are freed after the forward, except with checkpointing: every layer's
    recomputation needs them, so they are kept too.
    A layer's backward needs, beyond what it saved: in the MLP, the gradients of the activation
    and of up (2aF) beside the incoming gradient (aD); in eager attention, the gradient of the
    scores and of the fp32 softmax ((a + 4)H·T), by when the MLP half's saved tensors are freed.
    Fused attention's gradients (q, k, v sized) stay below the MLP's. The final norm's saved
    tensors are freed before any layer's backward starts.
    Measured within a few percent on tiny models (tests/test_profile_hf.py).
    Not counted: per-norm fp32 weight copies (Gemma, D each), attention dropout (these configs
    disable it), and sliding-window masks of SDPA models (Mistral, Qwen2 with use_sliding_window),
    which make SDPA fall back to kernels that form the scores.
    """
    family = FAMILIES.get(s.model_type, FAMILIES["llama"])
    D, F, H, K, d, T = s.hidden, s.intermediate, s.heads, s.kv_heads, s.head_dim, seq_len
    norm = 4 * D + 4 + (4 if family["gemma_norm"] else a) * D
    into_linear = a * D
    if s.attention in FUSED_ATTENTION:
        attention, attention_backward = a * (2 * H * d + 2 * K * d) + 4 * H, 0
    else:
        per_key = (a if s.attn_softcap else 0) + 4 + (a if a != 4 else 0)
        attention = 4 * a * H * d + H * T * per_key
        attention_backward = H * T * (a + 4)
    mlp_half = (family["norms"] // 2) * norm + into_linear + 4 * a * F  # freed before attention's backward
    layer = family["norms"] * norm + 2 * into_linear + attention + 4 * a * F
    kept = s.layers * a * D if checkpointing else s.layers * layer
    tokens = micro_batch * seq_len
    final = norm + into_linear  # freed by the final norm's backward, before any layer's
    backward = max(2 * a * F + a * D, attention_backward - mlp_half) - final
    masks = s.mask_kinds * micro_batch * T * T * a if checkpointing and s.attention not in FUSED_ATTENTION else 0
    return (tokens * (kept + final + 8) + 2 * T * d * a + masks, tokens * layer if checkpointing else 0,
            tokens * max(0, backward))
