"""One decoder-only Transformer, GPT-2 style or Llama style, in plain PyTorch.

GPT-2 style: learned positions, LayerNorm, GELU MLP, biases, tied embeddings (Radford et al., 2019).
Llama style: rotary positions (RoPE, Su et al., 2021), RMSNorm, SwiGLU MLP, grouped-query attention
(Ainslie et al., 2023) through `n_kv_head`, no biases (Touvron et al., 2023).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from chatforge.model.moe import MoE, MoEConfig


@dataclass
class ModelConfig:
    style: str = "gpt2"  # gpt2 | llama
    vocab_size: int = 0  # 0: taken from the tokenizer/data
    context: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int = 0  # 0: same as n_head (plain multi-head attention); fewer: grouped-query attention
    d_model: int = 384
    d_ff: int = 0  # 0: 4*d_model (gpt2) or the SwiGLU size 8/3*d_model rounded up to 64 (llama)
    dropout: float = 0.0
    bias: bool = True
    qkv_bias: bool = False  # biases on q, k and v only (Qwen2), when `bias` is off
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    rope_scaling: str = ""  # "" (none) | linear | llama3: stretch RoPE to contexts longer than trained on
    rope_factor: float = 1.0  # linear, llama3: how many times longer
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_original_context: int = 8192  # llama3: the context the model was first trained at
    norm_eps: float = 1e-5
    moe: MoEConfig = field(default_factory=MoEConfig)  # sparse feed-forward blocks (model/moe.py)

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):  # as read back from model.json
            self.moe = MoEConfig(**self.moe)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ffn_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.style == "gpt2":
            return 4 * self.d_model
        return 64 * math.ceil(8 * self.d_model / 3 / 64)

    def validate(self) -> None:
        from chatforge.errors import ChatforgeError

        if self.vocab_size <= 0:
            raise ChatforgeError("model.vocab_size must be set (a positive number of token ids)")
        if self.style not in ("gpt2", "llama"):
            raise ChatforgeError(f"model.style must be 'gpt2' or 'llama', got '{self.style}'")
        if self.d_model % self.n_head:
            raise ChatforgeError(f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})")
        if self.n_head % self.kv_heads:
            raise ChatforgeError(
                f"model.n_head ({self.n_head}) must be a multiple of model.n_kv_head ({self.kv_heads})"
            )
        if self.rope_scaling not in ("", "linear", "llama3"):
            raise ChatforgeError(f"model.rope_scaling must be '', 'linear' or 'llama3', got '{self.rope_scaling}'")
        if self.style == "llama" and (self.d_model // self.n_head) % 2:
            raise ChatforgeError("RoPE needs an even head size: change model.d_model or model.n_head")
        self.moe.validate()


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich, 2019)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.style == "llama":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def rope_frequencies(head_dim: int, cfg: ModelConfig) -> torch.Tensor:
    """theta^(-2i/d), rescaled for a longer context if asked: linear divides every frequency by the factor
    (position interpolation, Chen et al., 2023); llama3 divides only the low frequencies, keeps the high
    ones, and blends in between (Llama 3.1)."""
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if cfg.rope_scaling == "linear":
        return inv_freq / cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        wavelength = 2 * math.pi / inv_freq
        original, lo, hi = cfg.rope_original_context, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        blend = (original / wavelength - lo) / (hi - lo)  # 0 at the long-wavelength edge, 1 at the short one
        blended = (1 - blend) * inv_freq / cfg.rope_factor + blend * inv_freq
        scaled = torch.where(wavelength < original / hi, inv_freq, blended)
        return torch.where(wavelength > original / lo, inv_freq / cfg.rope_factor, scaled)
    return inv_freq


def rope_tables(head_dim: int, length: int, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position × frequency, laid out for the rotate-half convention (as in HF Llama)."""
    angles = torch.outer(torch.arange(length, dtype=torch.float32), rope_frequencies(head_dim, cfg))
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) by the position's angle: x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


class KVCache:
    """Keys and values of past positions, per layer, so each new token costs one position of compute."""

    def __init__(self, n_layer: int):
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class StaticKVCache:
    """A KV cache with room for the whole context allocated up front, and the next position as a tensor.
    Every decode step then has the same shapes and no Python-side state changes, so `torch.compile` traces
    it once and replays it (the compiled decode of `generate_ids(compile=True)`). Unwritten slots are
    masked out; `position` advances at the end of each forward pass."""

    def __init__(self, cfg: ModelConfig, batch: int, device: torch.device, dtype: torch.dtype = torch.float32):
        shape = (batch, cfg.kv_heads, cfg.context, cfg.d_model // cfg.n_head)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.position = torch.zeros((), dtype=torch.long, device=device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        slots = self.position + torch.arange(k.shape[2], device=k.device)
        self.keys[layer].index_copy_(2, slots, k)
        self.values[layer].index_copy_(2, slots, v)
        return self.keys[layer], self.values[layer]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_head, self.n_kv_head = layer, cfg.n_head, cfg.kv_heads
        self.head_dim = cfg.d_model // cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, (self.n_head + 2 * self.n_kv_head) * self.head_dim,
                             bias=cfg.bias or cfg.qkv_bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.proj.residual = True  # scaled at init, see Transformer._init_weights
        self.dropout = cfg.dropout
        self.use_rope = cfg.style == "llama"

    def forward(self, x: torch.Tensor, rope: tuple | None, cache: KVCache | StaticKVCache | None,
                mask: torch.Tensor | None = None, past: int = 0) -> torch.Tensor:
        """`past`: how many positions the cache held before this call (Transformer.forward reads it once,
        before layer 0 writes); a StaticKVCache always comes with its `mask`."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1
        )
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.use_rope:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        causal = T > 1 and mask is None
        if mask is None and past and T > 1:  # new tokens see every cached position and the earlier new ones
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """GPT-2: down(gelu(up(x))). Llama: down(silu(gate(x)) * up(x)), the SwiGLU of Shazeer (2020)."""

    def __init__(self, cfg: ModelConfig, hidden: int = 0):
        super().__init__()
        hidden = hidden or cfg.ffn_dim
        self.swiglu = cfg.style == "llama"
        self.up = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.gate = nn.Linear(cfg.d_model, hidden, bias=cfg.bias) if self.swiglu else None
        self.down = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)
        self.down.residual = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)); the mlp is a mixture of experts
    in the blocks `model.moe` makes sparse."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.norm1, self.attn = make_norm(cfg), Attention(cfg, layer)
        self.norm2 = make_norm(cfg)
        self.mlp = (MoE(cfg.d_model, cfg.moe, lambda: MLP(cfg, cfg.moe.d_expert)) if cfg.moe.sparse(layer)
                    else MLP(cfg))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: tuple | None, cache: KVCache | StaticKVCache | None,
                mask: torch.Tensor | None = None, past: int = 0) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), rope, cache, mask, past))
        return x + self.drop(self.mlp(self.norm2(x)))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.context, cfg.d_model) if cfg.style == "gpt2" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.style == "llama":
            cos, sin = rope_tables(cfg.d_model // cfg.n_head, cfg.context, cfg)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2 init: N(0, 0.02); residual projections scaled by 1/sqrt(2 * n_layer) so the
        # residual stream's variance does not grow with depth.
        if isinstance(module, nn.Linear):
            std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if getattr(module, "residual", False) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | StaticKVCache | None = None, real: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab); with `targets`, the mean cross-entropy over targets != -100 instead.
        `cache` and `real` as in `hidden`."""
        logits = self.lm_head(self.hidden(idx, cache, real))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)

    def hidden(self, idx: torch.Tensor, cache: KVCache | StaticKVCache | None = None,
               real: torch.Tensor | None = None) -> torch.Tensor:
        """The last layer's normalised hidden states (B, T, d_model), which the LM head (or a classifier's
        head) reads. `cache`: past keys and values, extended in place. `real` (B, cached + T), for
        left-padded batches: True at real tokens. Positions then count real tokens only and no token attends
        to a pad, so a row's numbers do not depend on its padding."""
        B, T = idx.shape
        static = isinstance(cache, StaticKVCache)
        start = cache.length if cache is not None and not static else 0
        if start + T > self.cfg.context:
            raise ValueError(f"sequence of {start + T} tokens is longer than the context ({self.cfg.context})")
        x = self.tok_emb(idx)
        positions = torch.arange(start, start + T, device=idx.device)
        mask = None
        if static:  # positions from the cache's tensor; attend to written slots up to one's own position
            positions = cache.position + positions
            mask = (torch.arange(self.cfg.context, device=idx.device) <= positions[:, None])[None, None]
        if real is not None:
            positions = (real.long().cumsum(-1) - 1).clamp(min=0)[:, start:]  # (B, T)
            keys = torch.arange(start + T, device=idx.device)
            query = (keys[start:])[:, None]
            # causal, real keys only; and every token sees itself, so a pad's row is never empty (no NaN)
            mask = (((keys <= query) & real[:, None, :]) | (keys == query))[:, None]  # (B, 1, T, cached + T)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        elif real is None and not static:
            rope = (self.rope_cos[start : start + T], self.rope_sin[start : start + T])
        elif real is None:
            rope = (self.rope_cos[positions], self.rope_sin[positions])
        else:
            rope = (self.rope_cos[positions][:, None], self.rope_sin[positions][:, None])
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope, cache, mask, start)
        if static:
            cache.position += T  # after every layer has written its keys and values at the old position
        return self.norm(x)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # a tied weight is counted once

    def active_params(self) -> int:
        """The parameters one token computes with: an MoE block's router, shared expert and top_k of its
        experts, not all of them."""
        idle = 0
        for block in self.blocks:
            if isinstance(block.mlp, MoE):
                per_expert = sum(p.numel() for p in block.mlp.experts[0].parameters())
                idle += per_expert * (len(block.mlp.experts) - block.mlp.cfg.top_k)
        return self.num_params() - idle

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 per matmul weight (forward + backward) plus attention scores,
        6N + 12 * n_layer * d_model * context (Kaplan et al., 2020; PaLM appendix B); N counts the active
        parameters of an MoE model."""
        n = self.active_params() - (self.pos_emb.weight.numel() if self.pos_emb is not None else 0)
        if not self.cfg.tie_embeddings:
            n -= self.tok_emb.weight.numel()  # a lookup, not a matmul
        return 6 * n + 12 * self.cfg.n_layer * self.cfg.d_model * self.cfg.context
