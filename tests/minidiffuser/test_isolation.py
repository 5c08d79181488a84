"""Level-2 isolation: samples never leak into each other or into the condition (eval mode, dropout off)."""

from __future__ import annotations

import pytest
import torch

from harness.policy import build_policy
from harness.bench.synthetic import synthetic_batch

VARIANTS = {
    "default": {},
    "quirks": {"official_quirks": True},
    "joint-head": {"head": "joint"},
    "no-rope-no-local": {"rope3d": False, "local_query": False},
    "transformer": {"backbone": "transformer", "local_query": False},
}


def _policy(**kw):
    torch.manual_seed(0)
    return build_policy("minidiffuser", preset="tiny", **kw).eval()


def _samples(policy, B, M, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, M, policy.action_dim, generator=g) * 0.2
    t = torch.randint(0, 100, (B, M), generator=g)
    return x, t


@pytest.fixture(scope="module")
def batch():
    return synthetic_batch(B=3, N=256)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_changing_one_sample_changes_no_other_exactly(variant, batch):
    policy = _policy(**VARIANTS[variant])
    with torch.no_grad():
        cond = policy.encode(batch)
        x, t = _samples(policy, 3, 6)
        base = policy.denoise(x, t, cond)
        x2, t2 = x.clone(), t.clone()
        x2[1, 2] += 0.37
        t2[1, 2] = (t2[1, 2] + 41) % 100
        changed = policy.denoise(x2, t2, cond)
    others = torch.ones(3, 6, dtype=torch.bool)
    others[1, 2] = False
    assert torch.equal(base[others], changed[others])
    assert not torch.allclose(base[1, 2], changed[1, 2])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_sample_among_m_equals_sample_alone(variant, batch):
    policy = _policy(**VARIANTS[variant])
    with torch.no_grad():
        cond = policy.encode(batch)
        x, t = _samples(policy, 3, 8)
        together = policy.denoise(x, t, cond)
        for m in range(8):
            alone = policy.denoise(x[:, m:m + 1], t[:, m:m + 1], cond)
            torch.testing.assert_close(alone[:, 0], together[:, m], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["default", "transformer"])
def test_condition_independent_of_m_and_samples(variant, batch):
    policy = _policy(**VARIANTS[variant])
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


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_gradient_of_one_sample_wrt_another_is_zero(variant, batch):
    policy = _policy(**VARIANTS[variant])
    cond = policy.encode(batch)
    x, t = _samples(policy, 3, 5)
    x.requires_grad_(True)
    out = policy.denoise(x, t, cond)
    (grad,) = torch.autograd.grad(out[2, 3].pow(2).sum(), x)
    own = torch.zeros(3, 5, dtype=torch.bool)
    own[2, 3] = True
    assert torch.count_nonzero(grad[~own]) == 0
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
