"""Our body: a Llama-style decoder (RMSNorm, RoPE, SwiGLU, SDPA) that returns hidden states.
The body never forms logits: `LanguageModel` (language_model.py) hands them to the head."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llmtrain.recipe import ModelConfig


def ffn_size(cfg: ModelConfig) -> int:
    return cfg.ffn_hidden or 64 * math.ceil(8 * cfg.d_model / 3 / 64)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 for stability under bf16, then return to the input dtype.
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, hd]; rotate pairs (first half, second half) as Llama's rotate_half does."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def document_layout(ids: torch.Tensor, eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For packed blocks [B, T] of documents each ending with `eos`: every token's position inside
    its document [B, T], and the block-diagonal causal mask [B, 1, T, T] (True = may attend) that
    keeps attention inside each document. A block's first token counts as a document start."""
    T = ids.shape[1]
    t = torch.arange(T, device=ids.device)
    is_end = ids == eos
    doc = is_end.cumsum(1) - is_end.long()  # eos closes its own document
    starts_here = torch.ones_like(is_end)
    starts_here[:, 1:] = is_end[:, :-1]
    start = torch.where(starts_here, t, 0).cummax(1).values
    mask = (doc[:, :, None] == doc[:, None, :]) & (t[:, None] >= t[None, :])
    return t - start, mask.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, mask=None):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = ffn_size(cfg)
        self.gate_up = nn.Linear(cfg.d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg)

    def forward(self, x, cos, sin, mask=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        return x + self.ffn(self.ffn_norm(x))


class Body(nn.Module):
    """Token ids [B, T] → hidden states [B, T, D] (after the final norm)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        cos, sin = rope_tables(cfg.seq_len, cfg.d_model // cfg.n_heads // 2 * 2, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.activation_checkpointing = cfg.activation_checkpointing
        # data.document_mask: the end-of-document id; attention and positions then stay per document.
        self.document_eos: int | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        x = self.embed(ids)
        mask = None
        if self.document_eos is None:
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        else:
            positions, mask = document_layout(ids, self.document_eos)
            cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)  # [B, 1, T, hd/2]
        # Only when a backward will follow: eval and no_grad runs keep nothing to recompute.
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            # Non-reentrant: it reruns block(...) as a module call, so ZeRO-3's forward hooks gather
            # the block's partitioned weights again for the recomputation inside backward.
            x = checkpoint(block, x, cos, sin, mask, use_reentrant=False) if recompute else block(x, cos, sin, mask)
        return self.norm(x)
