"""Instruction conditioning: token projection for the points' cross-attention and the attention-pooled
sentence vector for the query stream's FiLM (reference §1.4, §1.9)."""

from __future__ import annotations

import torch
from torch import nn


class TextEncoder(nn.Module):
    """``forward(tokens (B, L, D_text), mask (B, L)) -> (projected tokens (B, L, C), pooled (B, C))``.

    pooled = sum over valid tokens of softmax(Linear(raw token)) * projected token.
    """

    def __init__(self, text_dim: int, channels: int):
        super().__init__()
        self.proj = nn.Linear(text_dim, channels)
        self.attn = nn.Linear(text_dim, 1)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor):
        proj = self.proj(tokens)
        logits = self.attn(tokens).squeeze(-1).masked_fill(~mask, float("-inf"))
        weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        return proj, torch.einsum("bl,blc->bc", weights, proj)
