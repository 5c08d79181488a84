"""The CPU fast paths compute what the plain formulations compute: dropout (same draws, bitwise), the
query stream's attention (q normalised before its head transpose, the empty-group multiply skipped), the
serialized attention's cached patch layout, and the per-level structures built once per forward and shared
by every layer of that level (neighbour maps with their convolution plans, patch layouts)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minidiffuser.layers import Dropout, GroupedAttention, RotaryPositionEncoding3D, dropout


@pytest.mark.parametrize("shape", [(5,), (17,), (300, 7), (8, 64, 96)])
@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_dropout_equals_f_dropout_bit_for_bit(shape, p):
    """Same mask (the same bernoulli_ draw), same output, same gradient, same generator state after."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, requires_grad=True)
    grad = torch.randn(shape, generator=g)
    runs = []
    for fn in (F.dropout, dropout):
        torch.manual_seed(3)
        out = fn(x, p, True)
        runs.append((out, *torch.autograd.grad(out, x, grad), torch.rand(4)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_dropout_module_is_an_nn_dropout():
    m = Dropout(0.3)
    assert isinstance(m, nn.Dropout) and m.state_dict() == {} and repr(m) == repr(nn.Dropout(0.3))
    x = torch.randn(6, 5)
    assert torch.equal(m.eval()(x), x)  # eval: identity
    torch.manual_seed(1)
    a = m.train()(x)
    torch.manual_seed(1)
    assert torch.equal(a, F.dropout(x, 0.3, True))


def _reference_grouped_attention(att, x, kv, key_mask, q_xyz, k_xyz):
    """GroupedAttention as written before (q normalised in head-major layout, output always multiplied by
    the non-empty-group indicator)."""
    B, Lq, C = x.shape
    q = att.q(x).view(B, Lq, att.heads, att.head_dim).transpose(1, 2)
    k, v = att.kv(kv).view(B, kv.shape[1], 2, att.heads, att.head_dim).permute(2, 0, 3, 1, 4)
    k = att.k_norm(k)
    q = att.q_norm(q)
    if att.rope is not None:
        q = att.rope.rotate(q, q_xyz)
        if att.rope_keys:
            k = att.rope.rotate(k, k_xyz)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
    out = out * key_mask.any(dim=1).to(out.dtype)[:, None, None, None]
    return att.proj(out.transpose(1, 2).reshape(B, Lq, C))


@pytest.mark.parametrize("empty_group", [False, True])
def test_grouped_attention_equals_the_plain_formulation(empty_group):
    torch.manual_seed(0)
    att = GroupedAttention(24, 16, 2, rope=RotaryPositionEncoding3D(12)).eval()
    with torch.no_grad():
        att.q_norm.weight.uniform_(0.5, 1.5)
        att.q_norm.bias.uniform_(-0.2, 0.2)
    g = torch.Generator().manual_seed(1)
    x, kv = torch.randn(3, 5, 24, generator=g), torch.randn(3, 7, 16, generator=g)
    q_xyz, k_xyz = torch.randn(3, 5, 3, generator=g), torch.randn(3, 7, 3, generator=g)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    if empty_group:
        mask[2] = False
    with torch.no_grad():
        out = att(x, kv, mask, q_xyz, k_xyz)
        ref = _reference_grouped_attention(att, x, kv, mask, q_xyz, k_xyz)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    if empty_group:
        assert torch.count_nonzero(out[2] - att.proj.bias) == 0  # an empty group reads nothing, never NaN


def _level(counts=(70, 23, 41), seed=0, C=8):
    from minidiffuser.points.unet import make_level, serialize_level

    g = torch.Generator().manual_seed(seed)
    batch = torch.cat([torch.full((n,), b) for b, n in enumerate(counts)])
    coord = torch.rand(len(batch), 3, generator=g) * 0.08
    level = make_level(torch.randn(len(batch), C, generator=g), coord, batch, len(counts), 0.01)
    return serialize_level(level, "hilbert")


def _reference_serialized_attention(att, x, level):
    """SerializedAttention as written before: zero-filled padding slots, scattered then gathered twice."""
    N, C = x.shape
    K = att.patch_size
    order = level.order
    b_sorted = level.batch[order]
    starts = torch.cumsum(level.counts, 0) - level.counts
    padded = torch.div(level.counts + K - 1, K, rounding_mode="floor") * K
    pad_starts = torch.cumsum(padded, 0) - padded
    pos = pad_starts[b_sorted] + torch.arange(N) - starts[b_sorted]
    total = int(padded.sum())
    buf = x.new_zeros(total, 3 * C)
    buf[pos] = att.qkv(x)[order]
    valid = torch.zeros(total, dtype=torch.bool)
    valid[pos] = True
    P = total // K
    q, k, v = buf.view(P, K, 3, att.heads, att.head_dim).permute(2, 0, 3, 1, 4)
    q, k = att.q_norm(q), att.k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid.view(P, 1, 1, K))
    return att.proj(out.transpose(1, 2).reshape(total, C)[pos][level.inverse])


def test_serialized_attention_layout_equals_the_plain_formulation_with_gradients():
    from minidiffuser.points.unet import SerializedAttention

    level = _level()
    torch.manual_seed(0)
    att = SerializedAttention(8, 2, patch_size=16, attn_drop=0.0, proj_drop=0.0)
    x = level.feat.clone().requires_grad_(True)
    out, ref = att(x, level), _reference_serialized_attention(att, x, level)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    for a, b in zip(torch.autograd.grad(out, [x, *att.parameters()], grad),
                    torch.autograd.grad(ref, [x, *att.parameters()], grad)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert level.patch_layout(16) is level.patch_layout(16)  # built once, then reused


def test_level_structures_are_built_once_per_level_per_forward(monkeypatch):
    """Neighbour maps and patch layouts: one per level and forward, shared by the encoder and decoder
    blocks, the stem and the local-query ConvBlocks of that level."""
    from harness.bench.synthetic import synthetic_batch
    from harness.policy import build_policy
    from minidiffuser.points import unet

    calls = {"nmap": 0, "layout": 0}
    build_map, build_layout = unet.build_neighbor_map, unet._masked_patch_layout

    def count_map(*a, **k):
        calls["nmap"] += 1
        return build_map(*a, **k)

    def count_layout(*a, **k):
        calls["layout"] += 1
        return build_layout(*a, **k)

    monkeypatch.setattr(unet, "build_neighbor_map", count_map)
    monkeypatch.setattr(unet, "_masked_patch_layout", count_layout)
    policy = build_policy("minidiffuser", preset="tiny")  # stem kernel 3: the stem shares level 0's map
    with torch.no_grad():
        policy.encode(synthetic_batch(B=2, N=256))
    assert calls == {"nmap": 5, "layout": 5}


def test_patch_layout_slots_cover_every_point_once():
    level = _level(counts=(5, 16, 33))
    src, valid, slot = level.patch_layout(8)
    assert len(src) % 8 == 0 and int(valid.sum()) == len(level.order)
    assert torch.equal(src[slot], torch.arange(len(level.order)))  # point i sits in slot slot[i]
    assert valid[slot].all()
    # per observation: ceil(n / 8) patches, never shared with another observation
    assert len(src) == sum(math.ceil(n / 8) * 8 for n in level.counts.tolist())  # (after voxel merging)
    owner = level.batch[src].view(-1, 8)
    assert (owner[valid.view(-1, 8)].view(-1) >= 0).all()
    for patch, ok in zip(owner, valid.view(-1, 8)):
        assert patch[ok].unique().numel() == 1
