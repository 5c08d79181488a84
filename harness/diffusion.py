"""Noise schedules and samplers, all from ``diffusers``.

- ``scaled_linear`` with T = 100: the paper's and the official code's schedule. It NEVER reaches pure
  noise: alpha_bar_T ~= 0.485, so x_T = 0.70 x0 + 0.72 eps, and sampling starts from
  ``add_noise(0, eps, T-1)`` = 0.72 eps around the point-cloud centroid (reference §1.12).
- ``squaredcos_cap_v2``: the cosine schedule, alpha_bar_T ~= 2e-7 at T = 100 (reaches noise).
- ``zero_snr``: scaled_linear rescaled to zero terminal SNR (alpha_bar_T = 0 exactly).
Samplers: ``ddpm`` (ancestral, all T steps, as the paper) and ``ddim`` with k steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler

SCHEDULES = ("scaled_linear", "squaredcos_cap_v2", "zero_snr")


@dataclass
class ScheduleConfig:
    """``clip_sample``: clamp each step's x0 estimate to +-``clip_range`` (metres for positions)."""

    schedule: str = "scaled_linear"
    num_train_timesteps: int = 100
    clip_sample: bool = True
    clip_range: float = 1.0


def make_train_scheduler(cfg: ScheduleConfig) -> DDPMScheduler:
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {cfg.schedule!r}; choices: {list(SCHEDULES)}")
    if cfg.num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {cfg.num_train_timesteps}")
    beta = "scaled_linear" if cfg.schedule == "zero_snr" else cfg.schedule
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=beta,
                         prediction_type="epsilon", clip_sample=cfg.clip_sample,
                         clip_sample_range=cfg.clip_range, rescale_betas_zero_snr=cfg.schedule == "zero_snr")


@dataclass
class SamplerConfig:
    """``name``: "ddpm" (all training steps, ancestral) or "ddim" (``steps`` steps, eta 0)."""

    name: str = "ddpm"
    steps: int | None = None


def make_sampler(train_scheduler: DDPMScheduler, cfg: SamplerConfig):
    """A fresh scheduler for sampling, with its timesteps set."""
    if cfg.name == "ddpm":
        s = DDPMScheduler.from_config(train_scheduler.config)
        s.set_timesteps(cfg.steps or train_scheduler.config.num_train_timesteps)
    elif cfg.name == "ddim":
        s = DDIMScheduler.from_config(train_scheduler.config)
        s.set_timesteps(cfg.steps or 10)
    else:
        raise ValueError(f"unknown sampler {cfg.name!r}; choices: ddpm, ddim")
    return s


def initial_sample(train_scheduler: DDPMScheduler, shape, generator: torch.Generator | None = None,
                   device=None) -> torch.Tensor:
    """x_T = add_noise(0, eps, T-1): pure noise when the schedule reaches it, 0.72 eps for scaled_linear."""
    eps = torch.randn(shape, generator=generator, device=device)
    t = torch.full(shape[:1], train_scheduler.config.num_train_timesteps - 1, dtype=torch.long, device=device)
    return train_scheduler.add_noise(torch.zeros_like(eps), eps, t)


def run_sampler(denoise, x: torch.Tensor, sampler, generator: torch.Generator | None = None) -> torch.Tensor:
    """Iterate ``x <- sampler.step(denoise(x, t), t, x)`` over the sampler's timesteps.

    ``denoise(x, t_tensor) -> eps_hat`` with ``x`` and ``eps_hat`` of the same shape and ``t_tensor`` a
    long tensor of x's leading shape without the last dimension.
    """
    for t in sampler.timesteps:
        t_full = torch.full(x.shape[:-1], int(t), dtype=torch.long, device=x.device)
        eps = denoise(x, t_full)
        x = sampler.step(eps, t, x, generator=generator).prev_sample
    return x
