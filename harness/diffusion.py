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
    """``schedule``: one of ``SCHEDULES``; ``num_train_timesteps`` T >= 1; ``clip_sample``: clamp each step's
    x0 estimate to +-``clip_range`` (metres for positions; > 0)."""

    schedule: str = "scaled_linear"
    num_train_timesteps: int = 100
    clip_sample: bool = True
    clip_range: float = 1.0

    def validate(self, where: str = "ScheduleConfig") -> ScheduleConfig:
        """Raise ``ValueError`` naming the field and value; policy configs call it on their ``schedule``."""
        from harness.policy import check_number

        if self.schedule not in SCHEDULES:
            raise ValueError(f"{where}.schedule: unknown noise schedule {self.schedule!r}; choices: {list(SCHEDULES)}")
        check_number(self, "num_train_timesteps", 1, integer=True, where=where)
        check_number(self, "clip_range", 0, low_open=True, where=where)
        return self


def make_train_scheduler(cfg: ScheduleConfig) -> DDPMScheduler:
    cfg.validate()
    beta = "scaled_linear" if cfg.schedule == "zero_snr" else cfg.schedule
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=beta,
                         prediction_type="epsilon", clip_sample=cfg.clip_sample,
                         clip_sample_range=cfg.clip_range, rescale_betas_zero_snr=cfg.schedule == "zero_snr")


DEFAULT_DDIM_STEPS = 10  # DDIM steps when none are given (``SamplerConfig.steps`` / ``train.sampler_steps`` null)


@dataclass
class SamplerConfig:
    """``name``: "ddpm" (ancestral, ``steps`` or else all training steps) or "ddim" (eta 0, ``steps`` or else
    ``DEFAULT_DDIM_STEPS`` = 10 steps)."""

    name: str = "ddpm"
    steps: int | None = None


def make_sampler(train_scheduler: DDPMScheduler, cfg: SamplerConfig):
    """A fresh scheduler for sampling, with its timesteps set (``cfg.steps`` None: DDPM all training steps,
    DDIM ``DEFAULT_DDIM_STEPS``)."""
    if cfg.steps is not None and (isinstance(cfg.steps, bool) or not isinstance(cfg.steps, int) or cfg.steps < 1):
        raise ValueError(f"sampler steps must be an integer >= 1 (or None for the default), got {cfg.steps!r}")
    if cfg.name == "ddpm":
        s = DDPMScheduler.from_config(train_scheduler.config)
        s.set_timesteps(train_scheduler.config.num_train_timesteps if cfg.steps is None else cfg.steps)
    elif cfg.name == "ddim":
        s = DDIMScheduler.from_config(train_scheduler.config)
        s.set_timesteps(DEFAULT_DDIM_STEPS if cfg.steps is None else cfg.steps)
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
