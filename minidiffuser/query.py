"""The sample-query stream (reference §1.4-1.8): B x M noisy actions become query tokens that read the
encoded condition and never each other.

Per level (coarsest first) each query (a) adds the local 3x3x3 ConvBlock feature of the voxel it falls in
at that level's grid, recomputed per level (``local_query``), and (b) passes a ``NeckBlock``:
cross-attention to the points of its OWN observation at that level (3D RoPE on queries and keys), with
FiLM LayerNorms conditioned on its own timestep embedding plus its own observation's pooled instruction.
Queries are laid out (B, M, C): attention groups are observations, so no dense B*M x sum(N) mask exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minidiffuser.layers import (
    Dropout,
    FiLMNorm,
    GroupedAttention,
    Mlp,
    RotaryPositionEncoding3D,
    sinusoidal_embedding,
)
from minidiffuser.points.sparse_conv import lookup


@dataclass
class QueryLevel:
    """What the query stream reads at one level: padded point features (B, N, C), coords (B, N, 3), mask
    (B, N); for the local query, the level's flat voxel grid (N, 3), batch (N,), ConvBlock feature
    (N, Cq), grid size and per-observation origin (B, 3)."""

    feat: torch.Tensor
    coord: torch.Tensor
    mask: torch.Tensor
    grid: torch.Tensor | None = None
    batch: torch.Tensor | None = None
    conv_feat: torch.Tensor | None = None
    grid_size: float = 0.0
    origin: torch.Tensor | None = None


@dataclass
class Condition:
    """The encoded observation, computed once and shared by all M samples.

    levels: one ``QueryLevel`` per neck; pooled_text (B, context) attention-pooled instruction;
    global_feat (B, C) max-pooled final point features for the rotation/gripper head; offset (B, 3) the
    centring offset, kept when the policy diffuses positions in a normalised world frame.
    """

    levels: list[QueryLevel]
    pooled_text: torch.Tensor
    global_feat: torch.Tensor
    offset: torch.Tensor | None = None  # (B, 3) the batch's centring offset (normalised position spaces)

    @property
    def batch_size(self) -> int:
        return int(self.pooled_text.shape[0])


class NeckBlock(nn.Module):
    """q <- q + Attn(FiLM1(q), level points); q <- q + MLP(FiLM2(q))."""

    def __init__(self, dim: int, kv_dim: int, heads: int, context_dim: int, mlp_ratio: int, attn_drop: float,
                 proj_drop: float, rope: bool, rope_keys: bool, rope_before_norm: bool = False):
        super().__init__()
        self.norm1 = FiLMNorm(dim, context_dim)
        self.norm2 = FiLMNorm(dim, context_dim)
        rope_mod = RotaryPositionEncoding3D(dim // heads) if rope else None
        self.attn = GroupedAttention(dim, kv_dim, heads, attn_drop, proj_drop, rope=rope_mod, rope_keys=rope_keys,
                                     rope_before_norm=rope_before_norm)
        self.mlp = Mlp(dim, dim * mlp_ratio, drop=proj_drop)

    def forward(self, q: torch.Tensor, context: torch.Tensor, level: QueryLevel, q_xyz: torch.Tensor,
                activated: bool = False):
        """``activated``: ``context`` is SiLU(context) already (see ``FiLMNorm``)."""
        q = q + self.attn(self.norm1(q, context, activated), level.feat, level.mask, q_xyz, level.coord)
        return q + self.mlp(self.norm2(q, context, activated))


def voxel_of(xyz: torch.Tensor, origin: torch.Tensor, grid_size: float, truncate: bool = False) -> torch.Tensor:
    """(B, M, 3) positions -> (B, M, 3) long voxel indices of a grid anchored at ``origin`` (B, 3).

    ``truncate``: round toward zero as the official code's integer cast does, so a point less than one
    voxel below the origin reads voxel 0 (the default floors it to -1, outside the grid)."""
    rel = (xyz - origin[:, None, :]) / grid_size
    return (torch.trunc(rel) if truncate else torch.floor(rel)).long()


def official_anchor_origin(level) -> torch.Tensor:
    """The released code's origin of the anchors' voxel index (official_quirks): the minimum, over the WHOLE
    batch, of the bottleneck level's mean-pooled point coordinates, for every observation (B, 3). The
    level's own grid is anchored at each observation's minimum raw coordinate, so the two can be a voxel
    apart, and one observation's anchors depend on the other observations' clouds."""
    coord = level.coord.masked_fill(~level.mask[..., None], float("inf"))
    return coord.flatten(0, 1).min(0).values.expand(coord.shape[0], 3)


class QueryStream(nn.Module):
    """Denoiser of the M samples: ``forward(x_t (B, M, D), t (B, M), condition) -> eps_hat (B, M, D)``."""

    def __init__(self, cfg, level_channels: list[int]):
        super().__init__()
        d, ctx = cfg.query_channels, cfg.context_channels
        self.action_dim, self.context_dim = cfg.action_dim, ctx
        self.local_query, self.quirks = cfg.local_query, cfg.official_quirks
        self.anchor_proj = nn.Sequential(nn.Linear(cfg.action_dim, 12), nn.GELU(), nn.Linear(12, d))
        self.necks = nn.ModuleList(
            NeckBlock(d, c, cfg.query_heads, ctx, cfg.mlp_ratio, cfg.attn_drop, cfg.proj_drop, cfg.rope3d,
                      rope_keys=not cfg.official_quirks, rope_before_norm=cfg.official_quirks)
            for c in level_channels)
        self.denoise_mlp = nn.Sequential(nn.Linear(d, d), nn.LeakyReLU(0.02), Dropout(cfg.head_dropout),
                                         nn.Linear(d, cfg.action_dim))

    def context(self, t: torch.Tensor, pooled_text: torch.Tensor) -> torch.Tensor:
        """(B, M) timesteps + (B, ctx) pooled text -> (B, M, ctx) FiLM context of each sample."""
        B, M = t.shape
        if self.quirks:
            # official bug: the pooled text is tiled while samples are interleaved, so sample (b, m) gets
            # the text of observation (b * M + m) mod B
            text = pooled_text[torch.arange(B * M, device=t.device) % B].view(B, M, -1)
        else:
            text = pooled_text[:, None, :].expand(B, M, -1)
        return sinusoidal_embedding(t, self.context_dim) + text

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        if x_t.ndim != 3 or x_t.shape[-1] != self.action_dim or t.shape != x_t.shape[:2]:
            raise ValueError(f"expected x_t (B, M, {self.action_dim}) and t (B, M); got {tuple(x_t.shape)} "
                             f"and {tuple(t.shape)}")
        if x_t.shape[0] != cond.batch_size:
            raise ValueError(f"x_t has B={x_t.shape[0]} but the condition holds {cond.batch_size} observations")
        B, M, _ = x_t.shape
        xyz = x_t[..., :3]
        q = self.anchor_proj(x_t)
        # every FiLM layer reads SiLU(context): computed once here, not in each of the 2 x levels layers
        context = F.silu(self.context(t, cond.pooled_text))
        quirk_voxels = None
        for i, (level, neck) in enumerate(zip(cond.levels, self.necks)):
            if self.local_query:
                if self.quirks:
                    # official bug: the voxel index is computed once at the coarsest level and re-used
                    if quirk_voxels is None:  # ... from the batch-wide pooled minimum, truncated toward zero
                        quirk_voxels = voxel_of(xyz, official_anchor_origin(level), level.grid_size, truncate=True)
                    vox = quirk_voxels
                else:
                    vox = voxel_of(xyz, level.origin, level.grid_size)
                qb = torch.arange(B, device=x_t.device)[:, None].expand(B, M)
                local = lookup(vox.reshape(B * M, 3), qb.reshape(B * M), level.grid, level.batch, level.conv_feat)
                q = q + local.view(B, M, -1)
            q = neck(q, context, level, xyz, activated=True)
        return self.denoise_mlp(q)
