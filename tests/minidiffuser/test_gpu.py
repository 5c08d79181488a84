"""CUDA correctness of Mini-Diffuser against the CPU path (skipped without a GPU; run with -m gpu)."""

from __future__ import annotations

import copy

import pytest
import torch

from harness.bench.synthetic import synthetic_batch
from harness.level2 import sample_level2
from harness.policy import build_policy

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("kw", [{}, {"backbone": "transformer", "local_query": False}, {"head": "joint"}])
def test_cuda_matches_cpu(kw):
    torch.manual_seed(0)
    cpu = build_policy("minidiffuser", preset="tiny", shuffle_orders="never", **kw).eval()
    gpu = copy.deepcopy(cpu).cuda()
    batch = synthetic_batch(B=3, N=cpu.cfg.num_points)
    batch_gpu = {k: v.cuda() for k, v in batch.items()}
    x = torch.randn(3, 8, cpu.action_dim) * 0.2
    t = torch.randint(0, 100, (3, 8))
    with torch.no_grad():
        a = cpu.denoise(x, t, cpu.encode(batch))
        b = gpu.denoise(x.cuda(), t.cuda(), gpu.encode(batch_gpu)).cpu()
    torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)


def test_cuda_training_step_runs_and_reports_memory():
    torch.manual_seed(0)
    policy = build_policy("minidiffuser", preset="small").cuda().train()
    batch = {k: v.cuda() for k, v in synthetic_batch(B=8, N=policy.cfg.num_points).items()}
    torch.cuda.reset_peak_memory_stats()
    cond = policy.encode(batch)
    loss = policy.loss(batch, sample_level2(policy.diffusion_target(batch), 64, policy.noise_scheduler), cond)
    loss["total"].backward()
    assert torch.isfinite(loss["total"]) and torch.cuda.max_memory_allocated() > 0
