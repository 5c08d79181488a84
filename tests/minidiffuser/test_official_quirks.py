"""``official_quirks`` behaviours of the released code, each pinned on a small hand-made input (issue
"Official parity"): RoPE applied to q BEFORE its LayerNorm (keys unrotated), and the local-query voxel
index truncated toward zero instead of floored. The fixed model (default) keeps the other order / floor."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from minidiffuser.layers import GroupedAttention, RotaryPositionEncoding3D
from minidiffuser.query import voxel_of


def _attention(rope_before_norm: bool, rope_keys: bool) -> GroupedAttention:
    torch.manual_seed(0)
    att = GroupedAttention(12, 8, heads=2, rope=RotaryPositionEncoding3D(6), rope_keys=rope_keys,
                           rope_before_norm=rope_before_norm)
    with torch.no_grad():  # non-trivial norms, so that the order matters
        for norm in (att.q_norm, att.k_norm):
            norm.weight.copy_(torch.linspace(0.5, 1.5, 6))
            norm.bias.copy_(torch.linspace(-0.2, 0.3, 6))
    return att.eval()


def _by_hand(att: GroupedAttention, x, kv, q_xyz, k_xyz, rope_first: bool) -> torch.Tensor:
    """The attention written out: q = norm(rot(Wq x)) (official) or rot(norm(Wq x)); k = norm(Wk kv)."""
    B, Lq, _ = x.shape
    q = att.q(x).view(B, Lq, 2, 6).transpose(1, 2)
    k, v = att.kv(kv).view(B, kv.shape[1], 2, 2, 6).permute(2, 0, 3, 1, 4)
    q = att.q_norm(att.rope.rotate(q, q_xyz)) if rope_first else att.rope.rotate(att.q_norm(q), q_xyz)
    k = att.k_norm(k)
    w = (q @ k.transpose(-1, -2) / math.sqrt(6)).softmax(-1)
    return att.proj((w @ v).transpose(1, 2).reshape(B, Lq, 12))


def test_official_order_rotates_q_before_its_layernorm_and_leaves_keys_unrotated():
    g = torch.Generator().manual_seed(1)
    x, kv = torch.randn(1, 3, 12, generator=g), torch.randn(1, 5, 8, generator=g)
    q_xyz, k_xyz = torch.randn(1, 3, 3, generator=g), torch.randn(1, 5, 3, generator=g)
    mask = torch.ones(1, 5, dtype=torch.bool)
    official = _attention(rope_before_norm=True, rope_keys=False)
    with torch.no_grad():
        out = official(x, kv, mask, q_xyz, k_xyz)
        torch.testing.assert_close(out, _by_hand(official, x, kv, q_xyz, k_xyz, rope_first=True))
        # the other order is another function (LayerNorm does not commute with the rotation)
        other = _by_hand(official, x, kv, q_xyz, k_xyz, rope_first=False)
        assert (out - other).abs().max() > 1e-3
        # keys unrotated: moving every key changes nothing
        torch.testing.assert_close(out, official(x, kv, mask, q_xyz, k_xyz + 5.0))


def test_fixed_model_normalises_first_and_rotates_keys():
    g = torch.Generator().manual_seed(2)
    x, kv = torch.randn(1, 2, 12, generator=g), torch.randn(1, 4, 8, generator=g)
    q_xyz, k_xyz = torch.randn(1, 2, 3, generator=g), torch.randn(1, 4, 3, generator=g)
    mask = torch.ones(1, 4, dtype=torch.bool)
    fixed = _attention(rope_before_norm=False, rope_keys=True)
    with torch.no_grad():
        out = fixed(x, kv, mask, q_xyz, k_xyz)
        # relative positions only: a common shift of queries and keys changes nothing
        torch.testing.assert_close(out, fixed(x, kv, mask, q_xyz + 0.7, k_xyz + 0.7), atol=1e-5, rtol=1e-5)
        assert F.mse_loss(out, fixed(x, kv, mask, q_xyz, k_xyz + 0.7)) > 1e-8


def test_official_voxel_index_truncates_toward_zero():
    origin = torch.zeros(1, 3)
    xyz = torch.tensor([[[-0.003, 0.015, -0.012], [0.0, 0.0999, 0.1001]]])
    assert voxel_of(xyz, origin, 0.01).tolist() == [[[-1, 1, -2], [0, 9, 10]]]
    assert voxel_of(xyz, origin, 0.01, truncate=True).tolist() == [[[0, 1, -1], [0, 9, 10]]]
