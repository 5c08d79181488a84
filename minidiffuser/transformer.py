"""3DDA-style transformer backbone (Table 3's backbone swap): farthest-point-sampled point tokens with
local max-pooled features, self-attention among the tokens of one observation with relative 3D RoPE,
cross-attention to the instruction, and an MLP per layer. Each layer's output is one query level."""

from __future__ import annotations

import torch
from torch import nn

from minidiffuser.layers import GroupedAttention, Mlp, RotaryPositionEncoding3D
from minidiffuser.points.sampling import farthest_point_sample
from minidiffuser.query import QueryLevel


class TokenLayer(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int, mlp_ratio: int, attn_drop: float, proj_drop: float):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = GroupedAttention(dim, dim, heads, attn_drop, proj_drop,
                                          rope=RotaryPositionEncoding3D(dim // heads))
        self.cross_attn = GroupedAttention(dim, context_dim, heads, attn_drop, proj_drop)
        self.mlp = Mlp(dim, dim * mlp_ratio, drop=proj_drop)

    def forward(self, x, xyz, mask, text, text_mask):
        h = self.norm1(x)
        x = x + self.self_attn(h, h, mask, xyz, xyz)
        x = x + self.cross_attn(self.norm2(x), text, text_mask)
        return x + self.mlp(self.norm3(x))


class TransformerBackbone(nn.Module):
    """``forward(points (B,N,3), feats (B,N,C_in), mask (B,N), text, text_mask) -> list of QueryLevel``."""

    def __init__(self, cfg, neighbours: int = 16):
        super().__init__()
        c = cfg.transformer_channels
        self.num_tokens, self.neighbours = cfg.fps_tokens, neighbours
        self.point_mlp = nn.Sequential(nn.Linear(cfg.in_channels, c), nn.GELU(), nn.Linear(c, c))
        self.layers = nn.ModuleList(
            TokenLayer(c, cfg.transformer_heads, cfg.context_channels, cfg.mlp_ratio, cfg.attn_drop, cfg.proj_drop)
            for _ in range(cfg.transformer_layers))

    @property
    def level_channels(self) -> list[int]:
        return [self.point_mlp[-1].out_features] * len(self.layers)

    def forward(self, points, feats, mask, text, text_mask) -> list[QueryLevel]:
        idx = farthest_point_sample(points, self.num_tokens, mask)  # (B, k)
        centres = torch.gather(points, 1, idx[..., None].expand(-1, -1, 3))
        dist = torch.cdist(centres, points).masked_fill(~mask[:, None, :], float("inf"))
        k = min(self.neighbours, points.shape[1])
        knn = dist.topk(k, dim=-1, largest=False).indices  # (B, k_tok, k)
        f = self.point_mlp(feats)
        grouped = torch.gather(f[:, None].expand(-1, knn.shape[1], -1, -1), 2,
                               knn[..., None].expand(-1, -1, -1, f.shape[-1]))
        tokens = grouped.max(dim=2).values
        token_mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        token_mask &= mask.any(dim=1, keepdim=True)
        levels = []
        for layer in self.layers:
            tokens = layer(tokens, centres, token_mask, text, text_mask)
            levels.append(QueryLevel(tokens, centres, token_mask))
        return levels
