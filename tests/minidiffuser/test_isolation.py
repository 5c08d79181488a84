"""Level-2 isolation: samples never leak into each other or into the condition, in eval AND train mode.

Train mode matters: a layer that normalises over the B*M samples (BatchNorm) or otherwise pools across them
is the identity-like running-statistics path in eval mode and leaks only while training. With dropout
active the runs stay comparable exactly: dropout is elementwise, so it never creates a cross-sample
gradient, and two calls that draw masks of the same shapes from the same seed draw the same masks.
"""

from __future__ import annotations

import pytest
import torch

from harness.bench.synthetic import synthetic_batch
from harness.policy import build_policy

VARIANTS = {
    "default": {},
    "quirks": {"official_quirks": True},
    "joint-head": {"head": "joint"},
    "no-rope-no-local": {"rope3d": False, "local_query": False},
    "transformer": {"backbone": "transformer", "local_query": False},
    "keypose-bounds": {"position_norm": "keypose_bounds", "schedule": {"schedule": "squaredcos_cap_v2"}},
}
MODES = ["eval", "train"]
NO_DROPOUT = {"attn_drop": 0.0, "proj_drop": 0.0, "head_dropout": 0.0}


def _policy(mode: str = "eval", **kw):
    torch.manual_seed(0)
    return build_policy("minidiffuser", preset="tiny", **kw).train(mode == "train")


def _samples(policy, B, M, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, M, policy.action_dim, generator=g) * 0.2
    t = torch.randint(0, 100, (B, M), generator=g)
    return x, t


def _denoise(policy, x, t, cond, seed=11):
    """Denoise with the global RNG reset first: in train mode two calls on inputs of the same shapes then
    draw identical dropout masks, so any difference between them comes from the inputs alone."""
    torch.manual_seed(seed)
    return policy.denoise(x, t, cond)


@pytest.fixture(scope="module")
def batch():
    return synthetic_batch(B=3, N=256)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_changing_one_sample_changes_no_other_exactly(variant, mode, batch):
    # dropout stays ON in train mode: same shapes + same seed -> same masks (see _denoise)
    policy = _policy(mode, **VARIANTS[variant])
    with torch.no_grad():
        torch.manual_seed(5)
        cond = policy.encode(batch)
        x, t = _samples(policy, 3, 6)
        base = _denoise(policy, x, t, cond)
        x2, t2 = x.clone(), t.clone()
        x2[1, 2] += 0.37
        t2[1, 2] = (t2[1, 2] + 41) % 100
        changed = _denoise(policy, x2, t2, cond)
        if mode == "train":  # the comparison is only sound if the masks really are reproducible
            assert torch.equal(base, _denoise(policy, x, t, cond))
    others = torch.ones(3, 6, dtype=torch.bool)
    others[1, 2] = False
    assert torch.equal(base[others], changed[others]), (base[others] - changed[others]).abs().max()
    assert not torch.allclose(base[1, 2], changed[1, 2])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_sample_among_m_equals_sample_alone(variant, mode, batch):
    # M samples vs 1 sample draw dropout masks of different shapes, which no seed can align; so train mode
    # runs with dropout off by config: it then still differs from eval mode in every train-only path of
    # the modules (BatchNorm batch statistics, anything keyed on self.training), which is what this guards.
    policy = _policy(mode, **VARIANTS[variant], **(NO_DROPOUT if mode == "train" else {}))
    if policy.cfg.official_quirks:
        # the documented text-tiling quirk gives sample (b, m) the text of observation (b*M + m) mod B, which
        # depends on M; with one instruction for every observation the tiling is a no-op and the rest holds
        batch = {**batch, "text_tokens": batch["text_tokens"][:1].expand_as(batch["text_tokens"]),
                 "text_mask": batch["text_mask"][:1].expand_as(batch["text_mask"])}
    with torch.no_grad():
        torch.manual_seed(5)
        cond = policy.encode(batch)
        x, t = _samples(policy, 3, 8)
        together = policy.denoise(x, t, cond)
        for m in range(8):
            alone = policy.denoise(x[:, m:m + 1], t[:, m:m + 1], cond)
            torch.testing.assert_close(alone[:, 0], together[:, m], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", ["default", "transformer"])
def test_condition_independent_of_m_and_samples(variant, mode, batch):
    policy = _policy(mode, **VARIANTS[variant])
    with torch.no_grad():
        torch.manual_seed(5)
        cond = policy.encode(batch)
        snapshot = [lv.feat.clone() for lv in cond.levels] + [cond.pooled_text.clone(), cond.global_feat.clone()]
        for M in (1, 4, 16):
            x, t = _samples(policy, 3, M, seed=M)
            policy.denoise(x, t, cond)
        torch.manual_seed(5)
        again = policy.encode(batch)
    after = [lv.feat for lv in cond.levels] + [cond.pooled_text, cond.global_feat]
    fresh = [lv.feat for lv in again.levels] + [again.pooled_text, again.global_feat]
    for a, b, c in zip(snapshot, after, fresh):
        assert torch.equal(a, b)  # denoising never writes into the condition
        assert torch.equal(a, c)  # encoding does not depend on M or on the samples


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_gradient_of_one_sample_wrt_another_is_zero(variant, mode, batch):
    # dropout stays ON in train mode: an elementwise mask zeroes or scales a sample's own entries only, so
    # the cross-sample gradient is exactly zero with any mask; anything pooling over samples makes it nonzero
    policy = _policy(mode, **VARIANTS[variant])
    torch.manual_seed(5)
    cond = policy.encode(batch)
    x, t = _samples(policy, 3, 5)
    x.requires_grad_(True)
    out = _denoise(policy, x, t, cond)
    (grad,) = torch.autograd.grad(out[2, 3].pow(2).sum(), x)
    own = torch.zeros(3, 5, dtype=torch.bool)
    own[2, 3] = True
    assert torch.count_nonzero(grad[~own]) == 0, grad[~own].abs().max()
    assert torch.count_nonzero(grad[own]) > 0


def test_samples_do_not_read_other_observations_text(batch):
    """Fixed model: observation 0's samples ignore observation 1's instruction (the tiling bug is gone)."""
    policy = _policy()
    other = dict(batch)
    other["text_tokens"] = batch["text_tokens"].clone()
    other["text_tokens"][1] += 3.0
    with torch.no_grad():
        torch.manual_seed(3)
        a = policy.denoise(*_samples(policy, 3, 6), policy.encode(batch))
        torch.manual_seed(3)
        b = policy.denoise(*_samples(policy, 3, 6), policy.encode(other))
    torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(a[2], b[2], atol=1e-6, rtol=0)
    assert not torch.allclose(a[1], b[1])


def test_official_text_tiling_quirk_reproduced(batch):
    """With official_quirks, sample (b, m) is modulated by the text of observation (b*M + m) mod B."""
    policy = _policy(official_quirks=True)
    pooled = torch.arange(3, dtype=torch.float32)[:, None].expand(3, policy.cfg.context_channels)
    t = torch.zeros(3, 4, dtype=torch.long)
    ctx = policy.query.context(t, pooled) - policy.query.context(t, torch.zeros_like(pooled))
    expected = (torch.arange(12) % 3).view(3, 4).float()
    torch.testing.assert_close(ctx[..., 0], expected)
    fixed = _policy().query.context(t, pooled) - _policy().query.context(t, torch.zeros_like(pooled))
    torch.testing.assert_close(fixed[..., 0], torch.arange(3.0)[:, None].expand(3, 4))
