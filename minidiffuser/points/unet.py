"""PTv3-style point U-Net with text cross-attention: the condition stream of Mini-Diffuser (reference §1.3).

Flat point layout: ``feat`` (N, C) with ``batch`` (N,) sorted ascending (points of observation b are
contiguous). Each level serializes its voxels along one space-filling curve (batch index in the high bits,
so patches never straddle observations) and attends inside patches of ``patch_size`` consecutive points;
the last patch of an observation is padded and its padding masked (the official code re-uses real points
instead, counting them twice). Grid coordinates are taken relative to each observation's own minimum, so
an observation's features never depend on the others' coordinates (the official code uses the batch-wide
minimum: ``make_level(batch_origin=True)`` under ``official_quirks``); only training-mode BatchNorm
statistics mix observations, as in the original.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minidiffuser.layers import Dropout, GroupedAttention, Mlp, group_rank, to_padded
from minidiffuser.points.serialization import serialize
from minidiffuser.points.sparse_conv import SubMConv3d, build_neighbor_map


@dataclass
class PointLevel:
    """One resolution of the point cloud (flat layout; see module docstring).

    coord (N, 3) float metres (centred frame); grid (N, 3) long voxel indices from ``origin`` (B, 3) at
    ``grid_size``; rank (N,) index inside its observation; counts (B,); ``order``/``inverse`` (N,) the
    serialization permutation of this level; ``parent`` (N_finer,) maps the finer level's points to
    this level's (set when this level was made by pooling).
    """

    feat: torch.Tensor
    coord: torch.Tensor
    grid: torch.Tensor
    batch: torch.Tensor
    origin: torch.Tensor
    grid_size: float
    num_groups: int
    rank: torch.Tensor
    counts: torch.Tensor
    order: torch.Tensor | None = None
    inverse: torch.Tensor | None = None
    parent: torch.Tensor | None = None
    # structures of this level's sites, built once per forward and shared (by reference) with every level
    # object ``with_feat`` derives from it, so all layers of a level (encoder and decoder stage alike) reuse
    # them: neighbour maps (with their convolution plans) by kernel size, patch layouts by (kind, K)
    _nmaps: dict | None = None
    # official_quirks: the features the next CPE convolves when they differ from ``feat`` (Pointcept's
    # SerializedUnpooling refreshes point.feat but not the sparse tensor the CPE reads: the skip branch)
    cpe_feat: torch.Tensor | None = None
    _layouts: dict | None = None

    @property
    def max_len(self) -> int:
        return int(self.counts.max()) if len(self.counts) else 0

    def with_feat(self, feat: torch.Tensor) -> PointLevel:
        if self._nmaps is None:
            self._nmaps = {}
        if self._layouts is None:
            self._layouts = {}
        return PointLevel(feat, self.coord, self.grid, self.batch, self.origin, self.grid_size, self.num_groups,
                          self.rank, self.counts, self.order, self.inverse, self.parent, self._nmaps,
                          _layouts=self._layouts)

    def neighbor_map(self, kernel_size: int):
        if self._nmaps is None:
            self._nmaps = {}
        if kernel_size not in self._nmaps:
            self._nmaps[kernel_size] = build_neighbor_map(self.grid, self.batch, kernel_size)
        return self._nmaps[kernel_size]

    def patch_layout(self, K: int, official: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """How serialized attention lays this level's points out in patches of K (cached per (kind, K)).

        Returns (src (T,): the point (flat index) in each of the T patch slots, in curve order; valid (T,) bool
        or None: real slots (the fixed model masks its padding slots; official_quirks fills them with re-used
        points, unmasked); slot (N,): each point's slot). Padding slots of the fixed model read point 0:
        as keys they are masked and as queries their outputs are never read, so what they hold does not matter
        (one gather instead of zero-fill + scatter, and exact zero gradients into point 0)."""
        if self._layouts is None:
            self._layouts = {}
        key = ("official" if official else "masked", K)
        if key not in self._layouts:
            if official:
                idx, pos = reuse_padding(self.counts, K)
                self._layouts[key] = (self.order[idx], None, pos[self.inverse])
            else:
                self._layouts[key] = _masked_patch_layout(self.order, self.inverse, self.batch, self.counts, K)
        return self._layouts[key]

    def padded(self, x: torch.Tensor | None = None) -> torch.Tensor:
        """Flat (N, ...) -> (B, max_len, ...) zero-padded (default: this level's features)."""
        return to_padded(self.feat if x is None else x, self.batch, self.rank, self.num_groups, self.max_len)

    def mask(self) -> torch.Tensor:
        """(B, max_len) bool, True where a real point sits."""
        return torch.arange(self.max_len, device=self.counts.device)[None] < self.counts[:, None]

    def unpadded(self, x: torch.Tensor) -> torch.Tensor:
        return x[self.batch, self.rank]


def _masked_patch_layout(order, inverse, batch, counts, K: int):
    """``PointLevel.patch_layout`` of the fixed model: each observation's points in curve order, padded to a
    multiple of K with masked slots."""
    N = len(order)
    b_sorted = batch[order]
    starts = torch.cumsum(counts, 0) - counts
    padded = torch.div(counts + K - 1, K, rounding_mode="floor") * K
    pad_starts = torch.cumsum(padded, 0) - padded
    pos = pad_starts[b_sorted] + torch.arange(N, device=order.device) - starts[b_sorted]
    total = int(padded.sum())
    src = torch.zeros(total, dtype=order.dtype, device=order.device)
    src[pos] = order
    valid = torch.zeros(total, dtype=torch.bool, device=order.device)
    valid[pos] = True
    return src, valid, pos[inverse]


def voxel_clusters(grid: torch.Tensor, batch: torch.Tensor):
    """Group points sharing (batch, voxel). Returns (inverse (N,), batch (V,), grid (V, 3)) with the V
    voxels sorted by batch first, so observations stay contiguous."""
    span = int(grid.max()) + 1 if len(grid) else 1
    key = ((batch * span + grid[:, 0]) * span + grid[:, 1]) * span + grid[:, 2]
    uniq, inverse = torch.unique(key, sorted=True, return_inverse=True)
    vb = torch.div(uniq, span ** 3, rounding_mode="floor")
    rem = uniq - vb * span ** 3
    vgrid = torch.stack([torch.div(rem, span * span, rounding_mode="floor"),
                         torch.div(rem, span, rounding_mode="floor") % span, rem % span], dim=1)
    return inverse, vb, vgrid


def segment_mean(x: torch.Tensor, inverse: torch.Tensor, n: int) -> torch.Tensor:
    counts = torch.bincount(inverse, minlength=n).to(x.dtype).clamp_min(1)
    return x.new_zeros(n, *x.shape[1:]).index_add_(0, inverse, x) / counts.view(-1, *[1] * (x.ndim - 1))


def make_level(feat, coord, batch, num_groups: int, grid_size: float, batch_origin: bool = False) -> PointLevel:
    """Finest level from flat points (N, C), (N, 3), (N,) sorted by batch.

    The grid is anchored at each observation's minimum coordinate. Points sharing a voxel (augmentation
    can move two 1 cm voxels into one) are merged by averaging features and coordinates, so every
    active site is unique, as submanifold convolution requires.

    ``batch_origin`` (official_quirks): anchor every observation's grid at the minimum over the WHOLE
    batch instead, as the released code does (Pointcept's ``Point``: ``grid_coord = trunc((coord -
    coord.min(0)) / grid_size)`` over the concatenated batch); then one observation's voxel indices,
    merged voxels and hence features depend on the other observations of its batch (a Level-1 leak).
    ``origin`` (B, 3) holds that one minimum in every row.
    """
    if batch_origin:
        low = coord.amin(0) if len(coord) else coord.new_zeros(3)
        origin = low.expand(num_groups, 3).contiguous()
    else:
        big = torch.full((num_groups, 3), float("inf"), device=coord.device, dtype=coord.dtype)
        origin = big.scatter_reduce(0, batch[:, None].expand(-1, 3), coord, "amin", include_self=True)
        origin = torch.where(torch.isfinite(origin), origin, torch.zeros_like(origin))
    grid = torch.floor((coord - origin[batch]) / grid_size).long().clamp_min(0)
    inverse, batch, grid = voxel_clusters(grid, batch)
    feat, coord = segment_mean(feat, inverse, len(batch)), segment_mean(coord, inverse, len(batch))
    rank, counts = group_rank(batch, num_groups)
    return PointLevel(feat, coord, grid, batch, origin, grid_size, num_groups, rank, counts)


def serialize_level(level: PointLevel, order_name: str) -> PointLevel:
    s = serialize(level.grid, level.batch, (order_name,))
    level.order, level.inverse = s.order[0], s.inverse[0]
    return level


class BNAct(nn.Sequential):
    def __init__(self, dim: int):
        super().__init__(nn.BatchNorm1d(dim, eps=1e-3, momentum=0.01), nn.GELU())


class Embedding(nn.Module):
    """Stem: submanifold conv (no bias) -> BatchNorm -> GELU."""

    def __init__(self, in_channels: int, channels: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = SubMConv3d(in_channels, channels, kernel_size, bias=False)
        self.norm = BNAct(channels)

    def forward(self, level: PointLevel) -> PointLevel:
        return level.with_feat(self.norm(self.conv(level.feat, level.neighbor_map(self.kernel_size))))


def reuse_padding(counts: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The released code's (Pointcept PTv3) patch padding, for ``official_quirks``: each observation with
    more than K points is padded to a multiple of K by re-using the points one patch earlier, and nothing
    is masked (the copies are attended to twice). Returns (gather index into the observation-sorted
    points, length total; position of every real point in the padded layout)."""
    idx, pos = [], []
    start = pad_start = 0
    for n in counts.tolist():
        p = n if n <= K else -(-n // K) * K
        j = torch.arange(p)
        idx.append(start + torch.where(j < n, j, j - K))
        pos.append(pad_start + torch.arange(n))
        start, pad_start = start + n, pad_start + p
    return torch.cat(idx).to(counts.device), torch.cat(pos).to(counts.device)


class SerializedAttention(nn.Module):
    """Self-attention inside patches of ``patch_size`` consecutive points along the level's curve.

    Padding: the last, partial patch of an observation is filled with masked slots. ``reuse_padding``
    (official_quirks) reproduces the released non-flash path instead: the patch size is
    min(patch_size, the smallest observation's point count) and partial patches are filled with points
    re-used from the previous patch, unmasked (``reuse_padding``)."""

    def __init__(self, channels: int, heads: int, patch_size: int, attn_drop: float, proj_drop: float,
                 official_padding: bool = False):
        super().__init__()
        self.official_padding = official_padding
        self.heads, self.head_dim, self.patch_size = heads, channels // heads, patch_size
        self.qkv = nn.Linear(channels, 3 * channels)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.proj = nn.Linear(channels, channels)
        self.attn_drop, self.proj_drop = attn_drop, Dropout(proj_drop)

    def forward(self, x: torch.Tensor, level: PointLevel) -> torch.Tensor:
        C = x.shape[1]
        if self.official_padding:
            # serialized order groups the points by observation (batch index in the curve code's high bits)
            K = min(self.patch_size, int(level.counts.min()))
        else:
            K = self.patch_size
        src, valid, slot = level.patch_layout(K, self.official_padding)
        buf = self.qkv(x)[src]  # (T, 3C) in patch order
        P = buf.shape[0] // K
        q, k, v = buf.view(P, K, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if valid is None else valid.view(P, 1, 1, K),
                                             dropout_p=self.attn_drop if self.training else 0.0)
        out = out.transpose(1, 2).reshape(-1, C)[slot]
        return self.proj_drop(self.proj(out))


class Block(nn.Module):
    """Pre-norm PTv3 block: x += CPE(x); x += Attn(LN(x)); x += MLP(LN(x)). CPE = subm conv k3 -> Linear -> LN."""

    def __init__(self, channels: int, heads: int, patch_size: int, mlp_ratio: int, attn_drop: float,
                 proj_drop: float, official_padding: bool = False):
        super().__init__()
        self.cpe_conv = SubMConv3d(channels, channels, 3, bias=True)
        self.cpe = nn.Sequential(nn.Linear(channels, channels), nn.LayerNorm(channels))
        self.norm1, self.norm2 = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.attn = SerializedAttention(channels, heads, patch_size, attn_drop, proj_drop, official_padding)
        self.mlp = Mlp(channels, channels * mlp_ratio, drop=proj_drop)

    def forward(self, level: PointLevel) -> PointLevel:
        x = level.feat
        conv_in = x if level.cpe_feat is None else level.cpe_feat
        x = x + self.cpe(self.cpe_conv(conv_in, level.neighbor_map(3)))
        x = x + self.attn(self.norm1(x), level)
        x = x + self.mlp(self.norm2(x))
        return level.with_feat(x)


class CABlock(nn.Module):
    """Pre-norm cross-attention from each point to the text tokens of its own observation, then an MLP."""

    def __init__(self, channels: int, heads: int, context_channels: int, mlp_ratio: int, attn_drop: float,
                 proj_drop: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.attn = GroupedAttention(channels, context_channels, heads, attn_drop, proj_drop)
        self.mlp = Mlp(channels, channels * mlp_ratio, drop=proj_drop)

    def forward(self, level: PointLevel, text: torch.Tensor, text_mask: torch.Tensor) -> PointLevel:
        x = level.feat
        x = x + level.unpadded(self.attn(level.padded(self.norm1(x)), text, text_mask))
        x = x + self.mlp(self.norm2(x))
        return level.with_feat(x)


class SerializedPooling(nn.Module):
    """Stride-2 pooling: points sharing a parent voxel (grid >> 1) merge; feature = max of Linear(x),
    coord = mean; then BatchNorm + GELU. Same clusters as dropping the curve code's lowest 3 bits."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.proj = nn.Linear(in_channels, out_channels)
        self.norm = BNAct(out_channels)

    def forward(self, level: PointLevel) -> PointLevel:
        inverse, batch, grid = voxel_clusters(level.grid >> 1, level.batch)
        n = len(batch)
        feat = self.proj(level.feat)
        pooled = feat.new_zeros(n, feat.shape[1]).scatter_reduce(
            0, inverse[:, None].expand_as(feat), feat, "amax", include_self=False)
        coord = segment_mean(level.coord, inverse, n)
        rank, cnt = group_rank(batch, level.num_groups)
        return PointLevel(self.norm(pooled), coord, grid, batch, level.origin, level.grid_size * 2,
                          level.num_groups, rank, cnt, parent=inverse)


class SerializedUnpooling(nn.Module):
    """feat = BN-GELU(Linear(skip)) + BN-GELU(Linear(coarse))[parent]. ``stale_cpe`` (official_quirks): the
    next block's CPE convolves the skip branch alone, as in the released code (Pointcept's PTv3 unpooling
    adds the coarse features to ``point.feat`` without refreshing the sparse tensor its CPE reads)."""

    def __init__(self, coarse_channels: int, skip_channels: int, out_channels: int, stale_cpe: bool = False):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(coarse_channels, out_channels), BNAct(out_channels))
        self.proj_skip = nn.Sequential(nn.Linear(skip_channels, out_channels), BNAct(out_channels))
        self.stale_cpe = stale_cpe

    def forward(self, coarse: PointLevel, skip: PointLevel) -> PointLevel:
        skip_feat = self.proj_skip(skip.feat)
        # index_select: its gradient sums the children of a parent in a fixed order (see sparse_conv.lookup)
        level = skip.with_feat(skip_feat + self.proj(coarse.feat).index_select(0, coarse.parent))
        if self.stale_cpe:
            level.cpe_feat = skip_feat
        return level


class ConvBlock(nn.Module):
    """Local 3x3x3 feature for the query stream: subm conv (bias) -> Linear -> LayerNorm."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = SubMConv3d(in_channels, out_channels, 3, bias=True)
        self.post = nn.Sequential(nn.Linear(out_channels, out_channels), nn.LayerNorm(out_channels))

    def forward(self, level: PointLevel) -> torch.Tensor:
        return self.post(self.conv(level.feat, level.neighbor_map(3)))


class PointUNet(nn.Module):
    """Five encoder stages (pool -> Block -> CABlock), four decoder stages (unpool -> Block -> CABlock).

    ``forward(level0, text, text_mask)`` returns the query levels, coarsest first: [bottleneck, decoder
    stage 3, 2, 1, 0] as ``PointLevel`` objects, plus, when ``local_query``, each level's ConvBlock
    feature (N_level, query_channels) in the same order.
    """

    def __init__(self, cfg):
        super().__init__()
        enc, dec = cfg.enc_channels, cfg.dec_channels
        kw = {"mlp_ratio": cfg.mlp_ratio, "attn_drop": cfg.attn_drop, "proj_drop": cfg.proj_drop}
        block_kw = {**kw, "official_padding": cfg.official_quirks}
        self.orders, self.shuffle = tuple(cfg.serialization_orders), cfg.shuffle_orders
        self.embedding = Embedding(cfg.in_channels, enc[0], cfg.stem_kernel)
        self.pools = nn.ModuleList(SerializedPooling(enc[s - 1], enc[s]) for s in range(1, len(enc)))
        self.enc_blocks = nn.ModuleList(Block(c, h, cfg.patch_size, **block_kw) for c, h in zip(enc, cfg.enc_heads))
        self.enc_cross = nn.ModuleList(CABlock(c, h, cfg.context_channels, **kw)
                                       for c, h in zip(enc, cfg.enc_heads))
        coarse = [*dec[1:], enc[-1]]  # decoder stage s reads stage s+1's output (the bottleneck for the last)
        self.unpools = nn.ModuleList(SerializedUnpooling(coarse[s], enc[s], dec[s], stale_cpe=cfg.official_quirks)
                                     for s in range(len(dec)))
        self.dec_blocks = nn.ModuleList(Block(c, h, cfg.patch_size, **block_kw) for c, h in zip(dec, cfg.dec_heads))
        self.dec_cross = nn.ModuleList(CABlock(c, h, cfg.context_channels, **kw)
                                       for c, h in zip(dec, cfg.dec_heads))
        self.local_query = cfg.local_query
        if cfg.local_query:
            self.mid_conv = ConvBlock(enc[-1], cfg.query_channels)
            self.dec_convs = nn.ModuleList(ConvBlock(c, cfg.query_channels) for c in dec)

    @property
    def level_channels(self) -> list[int]:
        enc = [b.norm1.normalized_shape[0] for b in self.enc_blocks]
        dec = [b.norm1.normalized_shape[0] for b in self.dec_blocks]
        return [enc[-1], *reversed(dec)]

    def _order(self, stage: int) -> str:
        if self.shuffle == "always" or (self.shuffle == "train" and self.training):
            return self.orders[int(torch.randint(len(self.orders), ()))]
        return self.orders[stage % len(self.orders)]

    def forward(self, level: PointLevel, text: torch.Tensor, text_mask: torch.Tensor):
        skips = []
        for s in range(len(self.enc_blocks)):
            level = self.embedding(level) if s == 0 else self.pools[s - 1](level)
            serialize_level(level, self._order(s))
            level = self.enc_cross[s](self.enc_blocks[s](level), text, text_mask)
            skips.append(level)
        levels = [level]
        convs = [self.mid_conv(level)] if self.local_query else []
        for s in reversed(range(len(self.dec_blocks))):
            level = self.unpools[s](level, skips[s])
            level = self.dec_cross[s](self.dec_blocks[s](level), text, text_mask)
            levels.append(level)
            if self.local_query:
                convs.append(self.dec_convs[s](level))
        return levels, convs

