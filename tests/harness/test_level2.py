"""The Level-2 sampler and the diffusers-backed schedules and samplers."""

from __future__ import annotations

import pytest
import torch

from harness.diffusion import (
    SamplerConfig,
    ScheduleConfig,
    initial_sample,
    make_sampler,
    make_train_scheduler,
    run_sampler,
)
from harness.level2 import sample_level2


def test_level2_shapes_and_formula():
    sched = make_train_scheduler(ScheduleConfig())
    x0 = torch.randn(5, 3)
    l2 = sample_level2(x0, 7, sched, generator=torch.Generator().manual_seed(0))
    assert l2.x_t.shape == l2.noise.shape == (5, 7, 3) and l2.t.shape == (5, 7) and l2.M == 7
    assert l2.t.min() >= 0 and l2.t.max() < 100
    abar = sched.alphas_cumprod[l2.t][..., None]
    expected = abar.sqrt() * x0[:, None] + (1 - abar).sqrt() * l2.noise
    torch.testing.assert_close(l2.x_t, expected)


def test_level2_draws_independent_t_and_noise_per_copy():
    sched = make_train_scheduler(ScheduleConfig())
    l2 = sample_level2(torch.zeros(2, 3), 256, sched, generator=torch.Generator().manual_seed(1))
    assert len(torch.unique(l2.t[0])) > 50  # not one timestep per observation
    assert not torch.allclose(l2.noise[0, 0], l2.noise[0, 1])


@pytest.mark.parametrize("M", [0, -1, 2.5])
def test_level2_rejects_bad_m(M):
    with pytest.raises(ValueError, match="M must be an integer >= 1"):
        sample_level2(torch.zeros(2, 3), M, make_train_scheduler(ScheduleConfig()))


def test_paper_schedule_never_reaches_noise_and_options_do():
    paper = make_train_scheduler(ScheduleConfig("scaled_linear", 100))
    assert 0.48 < float(paper.alphas_cumprod[-1]) < 0.49  # x_T keeps 70 % of the signal
    assert float(make_train_scheduler(ScheduleConfig("squaredcos_cap_v2", 100)).alphas_cumprod[-1]) < 1e-5
    assert float(make_train_scheduler(ScheduleConfig("zero_snr", 100)).alphas_cumprod[-1]) == 0.0
    with pytest.raises(ValueError, match="unknown noise schedule"):
        make_train_scheduler(ScheduleConfig("linear-ish"))


def test_initial_sample_scale_matches_schedule():
    paper = make_train_scheduler(ScheduleConfig())
    x = initial_sample(paper, (20000, 1, 3), torch.Generator().manual_seed(0))
    assert abs(float(x.std()) - float((1 - paper.alphas_cumprod[-1]).sqrt())) < 0.02  # 0.72 eps


def test_samplers_step_counts_and_recover_a_known_target():
    sched = make_train_scheduler(ScheduleConfig())
    target = torch.tensor([[[0.1, -0.2, 0.05]]])
    abar = sched.alphas_cumprod

    def oracle(x, t):  # the exact noise for a point mass at `target`
        a = abar[t][..., None]
        return (x - a.sqrt() * target) / (1 - a).sqrt()

    calls = []
    for cfg, n in [(SamplerConfig("ddpm"), 100), (SamplerConfig("ddim", 10), 10)]:
        sampler = make_sampler(sched, cfg)
        assert len(sampler.timesteps) == n
        calls.clear()
        x = run_sampler(lambda x, t: (calls.append(1), oracle(x, t))[1],
                        initial_sample(sched, (1, 1, 3), torch.Generator().manual_seed(0)), sampler,
                        torch.Generator().manual_seed(1))
        assert len(calls) == n
        torch.testing.assert_close(x, target, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler(sched, SamplerConfig("euler"))
