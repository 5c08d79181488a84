"""Attention blocks of 3D Diffuser Actor (spec §2.6, §2.9-2.11), written from the spec in plain torch.

- ``rotary_3d``: relative 3D rotary encoding, C/3 channels per axis in adjacent pairs sharing a frequency,
  layout [x | y | z]; ``apply_rotary`` rotates q or k: v cos + rot(v) sin with rot(v0, v1) = (-v1, v0).
- ``RotaryAttention``: multi-head attention with a packed in-projection; q is scaled by 1/sqrt(head width)
  and rotated with the keys (values never), across all C channels before the head split (``split="full"``,
  the original: pairs straddle heads when the head width is odd) or per head (``split="per_head"``).
  ``attend_self_and_context`` is the non-invasive form used by the ``shared`` Level-2 strategy: each query
  attends to the context and to itself only.
- ``AdaLN``: SiLU -> Linear(C, 2C), zero-initialised, x (1 + scale) + shift.
- ``CrossAttentionLayer`` / ``FeedForwardLayer`` (post-norm, hidden width C, optional AdaLN on the query
  side) and ``LanguageAttention`` (DETR-style post-norm cross-attention, dropout, FFN 4C).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def rotary_3d(xyz: torch.Tensor, channels: int) -> torch.Tensor:
    """(..., 3) normalised positions -> (..., channels, 2) [cos, sin]; no gradient flows through it."""
    d = channels // 3
    freqs = torch.exp(torch.arange(0, d, 2, device=xyz.device, dtype=torch.float32) * (-math.log(10000.0) / d))
    angles = xyz.detach().float()[..., None] * freqs  # (..., 3, d/2)
    angles = angles.repeat_interleave(2, dim=-1).flatten(-2)  # (..., 3 * d) = [x | y | z], pairs duplicated
    return torch.stack([angles.cos(), angles.sin()], dim=-1).to(xyz.dtype)


def rope_width(channels: int, heads: int, split: str) -> int:
    """Channels a rotary table needs: all C ("full", rotated before the head split) or one head's width."""
    return channels if split == "full" else channels // heads


def rotate_pairs(v: torch.Tensor) -> torch.Tensor:
    v0, v1 = v[..., 0::2], v[..., 1::2]
    return torch.stack([-v1, v0], dim=-1).flatten(-2)


def apply_rotary(v: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """v (..., C) and rope (..., C, 2) -> v cos + rot(v) sin."""
    return v * rope[..., 0] + rotate_pairs(v) * rope[..., 1]


class RotaryAttention(nn.Module):
    def __init__(self, channels: int, heads: int, dropout: float = 0.0, split: str = "full"):
        super().__init__()
        self.channels, self.heads, self.split = channels, heads, split
        self.head_dim = channels // heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * channels, channels))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * channels))
        self.out_proj = nn.Linear(channels, channels)
        self.dropout = dropout
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def _project(self, x: torch.Tensor, which: int) -> torch.Tensor:
        C = self.channels
        return F.linear(x, self.in_proj_weight[which * C:(which + 1) * C], self.in_proj_bias[which * C:(which + 1) * C])

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (R, N, C) -> (R, h, N, d)
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(-3, -2)

    def _rotate(self, x: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
        """Projected q or k (R, N, C) -> rotated, split into heads (R, h, N, d)."""
        if rope is None:
            return self._heads(x)
        if self.split == "full":
            return self._heads(apply_rotary(x, rope))
        return apply_rotary(self._heads(x), rope[:, None])  # rope of head width (rope_width), every head

    def forward(self, query, key, value, q_rope=None, k_rope=None, key_padding_mask=None) -> torch.Tensor:
        """query (R, Nq, C), key/value (R, Nk, C), ropes (R, N, rope_width, 2) or None;
        ``key_padding_mask`` (R, Nk) True = ignore."""
        q = self._rotate(self._project(query, 0) / math.sqrt(self.head_dim), q_rope)
        k = self._rotate(self._project(key, 1), k_rope)
        v = self._heads(self._project(value, 2))
        scores = q @ k.transpose(-1, -2)
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        weights = F.dropout(scores.softmax(-1), self.dropout, self.training)
        return self.out_proj((weights @ v).transpose(-3, -2).flatten(-2))

    def attend_self_and_context(self, query, context, q_rope, c_rope, key_value_query=None) -> torch.Tensor:
        """Non-invasive attention: query (B, M, C) attends to the context (B, K, C) and to its own token only,
        never to another query. ``key_value_query``: the unmodulated query tokens that serve as the self key
        and value (default ``query``)."""
        own = query if key_value_query is None else key_value_query
        q = self._rotate(self._project(query, 0) / math.sqrt(self.head_dim), q_rope)     # (B, h, M, d)
        k_ctx = self._rotate(self._project(context, 1), c_rope)                          # (B, h, K, d)
        v_ctx = self._heads(self._project(context, 2))
        k_own = self._rotate(self._project(own, 1), q_rope)                              # (B, h, M, d)
        v_own = self._heads(self._project(own, 2))
        scores = torch.cat([q @ k_ctx.transpose(-1, -2), (q * k_own).sum(-1, keepdim=True)], dim=-1)
        weights = F.dropout(scores.softmax(-1), self.dropout, self.training)
        out = weights[..., :-1] @ v_ctx + weights[..., -1:] * v_own
        return self.out_proj(out.transpose(-3, -2).flatten(-2))


class AdaLN(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 2 * channels))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
        """x (R, N, C), signal (R, N or 1, C)."""
        scale, shift = self.modulation(signal).chunk(2, dim=-1)
        return x * (1 + scale) + shift


class CrossAttentionLayer(nn.Module):
    """LayerNorm(query + attention(AdaLN(query), context)); post-norm, dropout 0."""

    def __init__(self, channels: int, heads: int, adaln: bool, split: str = "full"):
        super().__init__()
        self.attention = RotaryAttention(channels, heads, split=split)
        self.norm = nn.LayerNorm(channels)
        self.adaln = AdaLN(channels) if adaln else None

    def _modulate(self, x, signal):
        return self.adaln(x, signal) if self.adaln is not None else x

    def forward(self, query, context, q_rope=None, c_rope=None, signal=None, value=None) -> torch.Tensor:
        q = self._modulate(query, signal)
        return self.norm(query + self.attention(q, context, context if value is None else value, q_rope, c_rope))

    def forward_non_invasive(self, query, context, q_rope, c_rope, signal) -> torch.Tensor:
        q = self._modulate(query, signal)
        return self.norm(query + self.attention.attend_self_and_context(q, context, q_rope, c_rope,
                                                                         key_value_query=query))


class FeedForwardLayer(nn.Module):
    """LayerNorm(x' + W2 relu(W1 x')) with x' = AdaLN(x); hidden width C (not 4C), as the original."""

    def __init__(self, channels: int, adaln: bool):
        super().__init__()
        self.linear1 = nn.Linear(channels, channels)
        self.linear2 = nn.Linear(channels, channels)
        self.norm = nn.LayerNorm(channels)
        self.adaln = AdaLN(channels) if adaln else None
        for lin in (self.linear1, self.linear2):
            nn.init.xavier_uniform_(lin.weight)

    def forward(self, x: torch.Tensor, signal: torch.Tensor | None = None) -> torch.Tensor:
        if self.adaln is not None:
            x = self.adaln(x, signal)
        return self.norm(x + self.linear2(F.relu(self.linear1(x))))


class AttentionStack(nn.Module):
    """n x [attention (cross, or self when ``context`` is the query set itself) -> feed-forward], one AdaLN
    signal for all layers."""

    def __init__(self, channels: int, heads: int, layers: int, adaln: bool, split: str = "full"):
        super().__init__()
        self.attn_layers = nn.ModuleList(CrossAttentionLayer(channels, heads, adaln, split) for _ in range(layers))
        self.ffw_layers = nn.ModuleList(FeedForwardLayer(channels, adaln) for _ in range(layers))

    def cross(self, query, context, q_rope=None, c_rope=None, signal=None) -> torch.Tensor:
        for attn, ffw in zip(self.attn_layers, self.ffw_layers):
            query = ffw(attn(query, context, q_rope, c_rope, signal), signal)
        return query

    def self_attend(self, tokens, rope, signal) -> torch.Tensor:
        """Invasive self-attention over every token (queries and scene tokens update each other); keys and
        values are the unmodulated tokens."""
        for attn, ffw in zip(self.attn_layers, self.ffw_layers):
            tokens = ffw(attn(tokens, tokens, rope, rope, signal), signal)
        return tokens

    def non_invasive(self, query, scene, q_rope, s_rope, signal) -> torch.Tensor:
        """Queries attend to the (fixed) scene tokens and to themselves; the scene is never updated."""
        for attn, ffw in zip(self.attn_layers, self.ffw_layers):
            query = ffw(attn.forward_non_invasive(query, scene, q_rope, s_rope, signal), signal)
        return query


class LanguageAttention(nn.Module):
    """Post-norm cross-attention of a token set to the language tokens (dropout, no rotary), then an FFN
    C -> 4C -> C (``use_ffn``; the head's single layer keeps the FFN's weights but does not run them)."""

    def __init__(self, channels: int, heads: int, dropout: float, use_ffn: bool = True):
        super().__init__()
        self.attention = RotaryAttention(channels, heads)
        self.dropout = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(channels)
        self.ffn = nn.Sequential(nn.Linear(channels, 4 * channels), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(4 * channels, channels))
        self.ffn_dropout = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(channels)
        self.use_ffn = use_ffn

    def forward(self, x, language, query_pos=None, key_padding_mask=None) -> torch.Tensor:
        q = x if query_pos is None else x + query_pos
        x = self.norm1(x + self.dropout(self.attention(q, language, language, key_padding_mask=key_padding_mask)))
        if self.use_ffn:
            x = self.norm2(x + self.ffn_dropout(self.ffn(x)))
        return x


def sinusoidal_embedding(x: torch.Tensor, channels: int) -> torch.Tensor:
    """(...,) -> (..., channels): [sin | cos] with log(10000) / (half - 1) frequency spacing."""
    half = channels // 2
    freqs = torch.exp(torch.arange(half, device=x.device, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    angles = x.float()[..., None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)
