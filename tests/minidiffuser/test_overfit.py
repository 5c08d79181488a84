"""Overfitting a fixed small batch drives the sampled position error under 1 cm (slow: ~2-3 min on CPU)."""

from __future__ import annotations

import pytest
import torch

from harness.bench.synthetic import synthetic_batch
from harness.level2 import sample_level2
from harness.policy import build_policy
from harness.rotations import quat_to_euler_bins


@pytest.mark.slow
def test_overfit_fixed_batch_under_1cm():
    torch.manual_seed(0)
    policy = build_policy("minidiffuser", preset="tiny", attn_drop=0.0, proj_drop=0.0, head_dropout=0.0)
    batch = synthetic_batch(B=4, N=policy.cfg.num_points, seed=0, full=True)
    steps = 1000
    opt = torch.optim.AdamW(policy.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        cond = policy.encode(batch)
        losses = policy.loss(batch, sample_level2(policy.diffusion_target(batch), 256, policy.noise_scheduler), cond)
        losses["total"].backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    policy.eval()
    actions = policy.sample(batch, generator=torch.Generator().manual_seed(0))  # DDPM-100, as the paper
    err_cm = (actions[:, :3] - batch["target"][:, :3]).norm(dim=-1) * 100
    assert float(err_cm.mean()) < 1.0, err_cm.tolist()
    bins_pred = quat_to_euler_bins(actions[:, 3:7])
    assert torch.equal(bins_pred, quat_to_euler_bins(batch["target"][:, 3:7]))
    assert torch.equal((actions[:, 7] > 0).float(), batch["target"][:, 7])
