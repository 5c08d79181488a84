"""3D RoPE of the query cross-attention (reference §1.8): the rotation itself, the relative-position property
that makes it "relative", its effect on attention and on the policy, and the official q-only quirk."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from harness.bench.synthetic import synthetic_batch
from harness.policy import build_policy
from minidiffuser.layers import GroupedAttention, RotaryPositionEncoding3D

HEAD_DIM = 12  # the tiny preset's query head dim (24 channels, 2 heads)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _pair_norms(v):
    return v.reshape(*v.shape[:-1], -1, 2).norm(dim=-1)


def _dot(rope, q, k, q_xyz, k_xyz):
    """(1, 1, 1, d) q and k rotated at (1, 1, 3) positions -> their dot product (scalar)."""
    return (rope.rotate(q, q_xyz) * rope.rotate(k, k_xyz)).sum()


def test_rope_keeps_norms_and_is_the_identity_at_the_origin():
    rope = RotaryPositionEncoding3D(HEAD_DIM)
    v, xyz = _rand(2, 3, 5, HEAD_DIM), _rand(2, 5, 3, seed=1)
    rotated = rope.rotate(v, xyz)
    torch.testing.assert_close(rotated.norm(dim=-1), v.norm(dim=-1))
    torch.testing.assert_close(_pair_norms(rotated), _pair_norms(v))  # each channel pair is a 2D rotation
    assert torch.equal(rope.rotate(v, torch.zeros(2, 5, 3)), v)
    assert (rotated - v).abs().max() > 0.1


def test_rope_matches_a_complex_rotation_reference():
    """Channel layout (docstring): x, y, z blocks of d/3 channels, pair k of a block turns by pos * f_k,
    f_k = 1e4 ** (-2k / (d/3)); written here as complex multiplication, independently of the module."""
    d = HEAD_DIM
    rope = RotaryPositionEncoding3D(d)
    v, xyz = _rand(2, 3, 4, d, seed=2), _rand(2, 4, 3, seed=3) * 2
    z = torch.view_as_complex(v.double().reshape(2, 3, 4, 3, d // 6, 2).contiguous())  # (B, H, L, axis, pair)
    f = torch.tensor([math.exp(-2 * k * math.log(1e4) / (d // 3)) for k in range(d // 6)], dtype=torch.float64)
    ang = xyz.double()[:, None, :, :, None] * f  # (B, 1, L, axis, pair)
    expected = torch.view_as_real(z * torch.polar(torch.ones_like(ang), ang)).reshape(2, 3, 4, d)
    torch.testing.assert_close(rope.rotate(v, xyz).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_rotated_dot_product_depends_only_on_the_relative_position(seed):
    rope = RotaryPositionEncoding3D(HEAD_DIM)
    q, k = _rand(1, 1, 1, HEAD_DIM, seed=seed), _rand(1, 1, 1, HEAD_DIM, seed=seed + 10)
    p, r = _rand(1, 1, 3, seed=seed + 20) * 0.5, _rand(1, 1, 3, seed=seed + 30) * 0.5
    base = _dot(rope, q, k, p, r)
    for shift in (torch.tensor([0.3, -0.7, 1.1]), torch.tensor([-2.0, 0.05, 0.4])):
        torch.testing.assert_close(_dot(rope, q, k, p + shift, r + shift), base, atol=1e-5, rtol=1e-5)
    # not vacuous: the product does depend on the relative position (and differs from the unrotated one)
    assert abs(float(_dot(rope, q, k, p, r + torch.tensor([0.0, 0.0, 0.8]))) - float(base)) > 1e-2
    assert abs(float((q * k).sum()) - float(base)) > 1e-2


def _attention(rope: bool, rope_keys: bool = True) -> GroupedAttention:
    torch.manual_seed(0)
    attn = GroupedAttention(24, 16, 2, rope=RotaryPositionEncoding3D(HEAD_DIM) if rope else None,
                            rope_keys=rope_keys).eval()
    for m in attn.modules():  # PyTorch's default init: O(1) attention logits, so positions matter visibly
        if isinstance(m, nn.Linear):
            m.reset_parameters()
    return attn


def test_attention_with_rope_differs_from_without_and_is_translation_invariant():
    x, kv = _rand(2, 5, 24, seed=4), _rand(2, 9, 16, seed=5)
    q_xyz, k_xyz = _rand(2, 5, 3, seed=6) * 0.3, _rand(2, 9, 3, seed=7) * 0.3
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    with_rope, without = _attention(True), _attention(False)
    without.load_state_dict(with_rope.state_dict())
    a = with_rope(x, kv, mask, q_xyz, k_xyz)
    b = without(x, kv, mask, q_xyz, k_xyz)
    assert (a - b).abs().max() > 0.05 * b.abs().max(), (a - b).abs().max()
    # q and k both rotated: logits see only k_xyz - q_xyz, so a common shift changes nothing
    shift = torch.tensor([0.4, -0.9, 0.25])
    torch.testing.assert_close(with_rope(x, kv, mask, q_xyz + shift, k_xyz + shift), a, atol=1e-5, rtol=1e-4)
    # official quirk (q only): an absolute modulation of the query, so the same shift does change it
    q_only = _attention(True, rope_keys=False)
    q_only.load_state_dict(with_rope.state_dict())
    c = q_only(x, kv, mask, q_xyz, k_xyz)
    assert (q_only(x, kv, mask, q_xyz + shift, k_xyz + shift) - c).abs().max() > 0.05 * c.abs().max()
    assert (c - a).abs().max() > 0.05 * a.abs().max()


# ------------------------------------------------------------------------------ the policy
# Positions are metres and the tiny head dim (12) gives frequencies 1 and 0.01 per metre, so over a 0.6 m
# scene RoPE turns pairs by < 0.6 rad: it moves the denoiser output by 0.4-1 % (measured). A RoPE that does
# nothing moves it by exactly 0; 0.1 % keeps a 4x margin below the real effect, far above rounding noise.
REL_EFFECT = 1e-3
def _policy(**kw):
    torch.manual_seed(0)
    policy = build_policy("minidiffuser", preset="tiny", **kw).eval()
    for m in policy.query.modules():  # default init: the untrained stream's output is not ~0
        if isinstance(m, nn.Linear):
            m.reset_parameters()
    return policy


def _same_weights(reference, **kw):
    policy = build_policy("minidiffuser", preset="tiny", **kw).eval()
    policy.load_state_dict(reference.state_dict())  # RoPE has no parameters: the same tensors fit both
    return policy


@pytest.fixture(scope="module")
def one_text_batch():
    """Every observation gets observation 0's instruction, so the text-tiling quirk is a no-op."""
    batch = synthetic_batch(B=3, N=256)
    return {**batch, "text_tokens": batch["text_tokens"][:1].expand_as(batch["text_tokens"]).clone(),
            "text_mask": batch["text_mask"][:1].expand_as(batch["text_mask"]).clone()}


def _denoise(policy, cond, M=6):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(cond.batch_size, M, policy.action_dim, generator=g) * 0.2
    t = torch.randint(0, 100, (cond.batch_size, M), generator=g)
    with torch.no_grad():
        return policy.denoise(x, t, cond)


def _encode(policy, batch):
    with torch.no_grad():
        torch.manual_seed(5)
        return policy.encode(batch)


@pytest.mark.parametrize("quirks", [False, True])
def test_rope3d_switch_changes_denoising_with_the_same_weights(quirks, one_text_batch):
    on = _policy(official_quirks=quirks)
    off = _same_weights(on, official_quirks=quirks, rope3d=False)
    assert all(n.attn.rope is not None and n.attn.rope_keys != quirks for n in on.query.necks)
    assert all(n.attn.rope is None for n in off.query.necks)
    cond = _encode(on, one_text_batch)
    a, b = _denoise(on, cond), _denoise(off, cond)
    assert (a - b).abs().max() > REL_EFFECT * a.abs().max(), ((a - b).abs().max(), a.abs().max())


def test_official_rope_quirk_rotates_queries_only(one_text_batch):
    """Same weights, no local query, one instruction for all: with RoPE off the quirk flag changes nothing;
    with RoPE on it changes the output (keys left unrotated), as the reference documents."""
    kw = {"local_query": False}
    fixed = _policy(**kw)
    cond = _encode(fixed, one_text_batch)
    quirk = _same_weights(fixed, official_quirks=True, **kw)
    a, c = _denoise(fixed, cond), _denoise(quirk, cond)
    assert (a - c).abs().max() > REL_EFFECT * a.abs().max(), ((a - c).abs().max(), a.abs().max())
    fixed_off = _same_weights(fixed, rope3d=False, **kw)
    quirk_off = _same_weights(fixed, rope3d=False, official_quirks=True, **kw)
    assert torch.equal(_denoise(fixed_off, cond), _denoise(quirk_off, cond))
