"""Shared layers: multi-head attention over padded per-observation groups, 3D RoPE, FiLM LayerNorm,
MLPs, the sinusoidal timestep embedding, and helpers between flat (N, C) and padded (B, N_max, C) layouts.

Every attention here is block-diagonal by construction: queries and keys are grouped per observation
(the batch dimension) and padded keys are masked, so no dense mask over all queries x all points exists.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def init_weights(module: nn.Module) -> None:
    """Official init: Linear trunc-normal(0.02) with zero bias, LayerNorm (1, 0)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def group_rank(batch: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``batch`` (N,) sorted ascending: (rank of each row inside its group (N,), counts (B,))."""
    counts = torch.bincount(batch, minlength=num_groups)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(len(batch), device=batch.device) - starts[batch], counts


def to_padded(x: torch.Tensor, batch: torch.Tensor, rank: torch.Tensor, num_groups: int,
              max_len: int) -> torch.Tensor:
    """Flat (N, ...) grouped by ``batch`` -> zero-padded (B, max_len, ...)."""
    out = x.new_zeros((num_groups, max_len, *x.shape[1:]))
    out[batch, rank] = x
    return out


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(...,) integer timesteps -> (..., dim): [sin(t f_i), cos(t f_i)], f_i = 1e4^(-i / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(1e4) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    ang = t.float()[..., None] * freqs
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)


class _MaskScale(torch.autograd.Function):
    """x * mask * scale in ONE kernel each way (``torch.addcmul`` on a 0-d zero), mask a {0, 1} tensor."""

    @staticmethod
    def forward(ctx, x, mask, scale):
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return torch.addcmul(x.new_zeros(()), x, mask, value=scale)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return torch.addcmul(grad.new_zeros(()), grad, mask, value=ctx.scale), None, None


_SCALES: dict = {}


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with the same random draws and bitwise the same output and gradient
    (tests/minidiffuser/test_fast_paths.py), in one full pass over x less on CPU. F.dropout draws
    ``empty_like(x).bernoulli_(1 - p)``, divides that mask by 1 - p in place, then multiplies; here the same
    draw is multiplied by x and by the same float ``1 / (1 - p)`` in one ``addcmul`` (x * 1 * s == x * s
    exactly), and the backward is one ``addcmul`` as F.dropout's one multiply. (A parallel kernel less per
    dropout: the U-Net has ~55 on (N, C) tensors a step.) Elsewhere (CUDA's fused kernel draws differently),
    or when nothing is dropped, it is F.dropout."""
    if not training or p == 0.0 or x.device.type != "cpu" or not x.is_floating_point() or p >= 1.0:
        return F.dropout(x, p, training)
    keep = 1.0 - p
    key = (x.dtype, keep)
    if key not in _SCALES:  # the noise value F.dropout computes: 1 divided by (1 - p) in x's dtype
        _SCALES[key] = float(torch.ones((), dtype=x.dtype).div_(keep))
    mask = torch.empty_like(x).bernoulli_(keep)  # exactly F.dropout's draw
    return _MaskScale.apply(x, mask, _SCALES[key])


class Dropout(nn.Dropout):
    """``nn.Dropout`` through :func:`dropout` (same draws, same outputs, one kernel less on CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return super().forward(x)
        return dropout(x, self.p, self.training)


class Mlp(nn.Sequential):
    def __init__(self, dim: int, hidden: int, out: int | None = None, drop: float = 0.0):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), Dropout(drop), nn.Linear(hidden, out or dim),
                         Dropout(drop))


class FiLMNorm(nn.Module):
    """Adaptive LayerNorm: LN(x) * (1 + scale) + shift, (shift, scale) = Linear(SiLU(context))."""

    def __init__(self, dim: int, context_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(context_dim, 2 * dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor, activated: bool = False) -> torch.Tensor:
        """``activated``: ``context`` is already SiLU(context) (the query stream computes it once for its ten
        FiLM layers, which all read the same context)."""
        mod = self.modulation[1](context) if activated else self.modulation(context)
        shift, scale = mod.chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class RotaryPositionEncoding3D(nn.Module):
    """3D rotary position encoding for a head dim divisible by 6 (reference §1.8).

    For each axis, head_dim/3 channels hold head_dim/6 (cos, sin) pairs at frequencies
    f_j = exp(-j ln(1e4) / (head_dim/3)), j = 0, 2, 4, ...; coordinates in metres.
    ``rotate(v, xyz)`` turns each channel pair (v0, v1) -> (v0 cos - v1 sin, v1 cos + v0 sin). Rotating
    both q and k makes their dot product depend on the relative position only.
    """

    def __init__(self, head_dim: int):
        super().__init__()
        if head_dim % 6:
            raise ValueError(f"3D RoPE needs head_dim divisible by 6, got {head_dim}")
        per_axis = head_dim // 3
        j = torch.arange(0, per_axis, 2, dtype=torch.float32)
        self.register_buffer("freqs", torch.exp(-j * math.log(1e4) / per_axis), persistent=False)

    def rotate(self, v: torch.Tensor, xyz: torch.Tensor) -> torch.Tensor:
        """v (B, H, L, d), xyz (B, L, 3) -> v rotated by the positions (same shape)."""
        ang = xyz.float()[..., None] * self.freqs  # (B, L, 3, d/6)
        cos = torch.repeat_interleave(torch.cos(ang), 2, dim=-1).flatten(-2)[:, None]  # (B, 1, L, d)
        sin = torch.repeat_interleave(torch.sin(ang), 2, dim=-1).flatten(-2)[:, None]
        v_pair = v.reshape(*v.shape[:-1], -1, 2)
        rot_half = torch.stack([-v_pair[..., 1], v_pair[..., 0]], dim=-1).reshape(v.shape)
        return v * cos.to(v.dtype) + rot_half * sin.to(v.dtype)


class GroupedAttention(nn.Module):
    """Multi-head attention of queries (B, Lq, Cq) to keys/values (B, Lk, Ckv) of the SAME group b only.

    ``key_mask`` (B, Lk) bool, True = a real key. q and k get a per-head LayerNorm (qk-norm). With ``rope``
    given, q and k are rotated by ``q_xyz`` (B, Lq, 3) / ``k_xyz`` (B, Lk, 3) (``rope_keys=False``
    rotates q only: the official code's bug). ``rope_before_norm``: rotate q BEFORE its LayerNorm, as the
    official ``QuerySupportAttention.forward`` does (not equivalent: LayerNorm does not commute with the
    rotation); the default normalises first. A group with no valid key returns zeros.
    """

    def __init__(self, q_dim: int, kv_dim: int, heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 rope: RotaryPositionEncoding3D | None = None, rope_keys: bool = True,
                 rope_before_norm: bool = False):
        super().__init__()
        if q_dim % heads:
            raise ValueError(f"{q_dim} channels not divisible by {heads} heads")
        self.heads, self.head_dim = heads, q_dim // heads
        self.q = nn.Linear(q_dim, q_dim)
        self.kv = nn.Linear(kv_dim, 2 * q_dim)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.proj = nn.Linear(q_dim, q_dim)
        self.attn_drop, self.proj_drop = attn_drop, Dropout(proj_drop)
        self.rope, self.rope_keys, self.rope_before_norm = rope, rope_keys, rope_before_norm

    def forward(self, x: torch.Tensor, kv: torch.Tensor, key_mask: torch.Tensor,
                q_xyz: torch.Tensor | None = None, k_xyz: torch.Tensor | None = None) -> torch.Tensor:
        B, Lq, C = x.shape
        Lk = kv.shape[1]
        q = self.q(x).view(B, Lq, self.heads, self.head_dim)
        k, v = self.kv(kv).view(B, Lk, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k = self.k_norm(k)
        if self.rope is not None and self.rope_before_norm:
            q = self.q_norm(self.rope.rotate(q.transpose(1, 2), q_xyz))
        else:
            # normalised in the Linear's layout (contiguous rows: no copy), then viewed head-major
            q = self.q_norm(q).transpose(1, 2)
            if self.rope is not None:
                q = self.rope.rotate(q, q_xyz)
        if self.rope is not None and self.rope_keys:
            k = self.rope.rotate(k, k_xyz)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :],
                                             dropout_p=self.attn_drop if self.training else 0.0)
        has_key = key_mask.any(dim=1)
        # empty groups -> 0, never NaN; on CPU the check is free and the multiply (a full pass over the
        # output, forward and backward) is skipped when every group has a key
        if out.device.type != "cpu" or not bool(has_key.all()):
            out = out * has_key.to(out.dtype)[:, None, None, None]
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, Lq, C)))
