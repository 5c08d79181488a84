"""Two-level batch sampling, shared by every policy.

Level 1: B observations, each encoded once. Level 2: each observation's diffusion target is repeated M
times and every copy gets its own timestep and noise, drawn from the policy's schedule. Nothing else in a
training loop needs to know about M.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Level2Batch:
    """x0 (B, D) clean targets; x_t, noise (B, M, D); t (B, M) long timesteps."""

    x0: torch.Tensor
    x_t: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor

    @property
    def M(self) -> int:
        return int(self.x_t.shape[1])


def sample_level2(x0: torch.Tensor, M: int, scheduler, generator: torch.Generator | None = None,
                  shard: tuple[int, int] | None = None) -> Level2Batch:
    """Repeat each of the B targets M times and noise every copy independently.

    ``scheduler``: a diffusers DDPM scheduler (``config.num_train_timesteps``, ``add_noise``).
    t ~ Uniform{0, ..., T-1} and noise ~ N(0, I) per copy; x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise.

    ``shard=(index, count)``: ``x0`` is slice ``index`` of ``count`` equal slices of a global batch of
    ``B * count`` targets (data-parallel training, harness/distributed.py): t and noise are drawn for the
    whole global batch, from the same RNG state on every process, and rows ``index*B:(index+1)*B`` are kept,
    so the processes together see exactly the draws of one process at ``B * count``. None: no sharding.
    """
    if not isinstance(M, int) or M < 1:
        raise ValueError(f"Level-2 batch M must be an integer >= 1, got {M!r}")
    if x0.ndim != 2:
        raise ValueError(f"x0 must be (B, D), got shape {tuple(x0.shape)}")
    B, D = x0.shape
    index, count = shard if shard is not None else (0, 1)
    if not (isinstance(count, int) and isinstance(index, int) and count >= 1 and 0 <= index < count):
        raise ValueError(f"shard must be (index, count) with 0 <= index < count, got {shard!r}")
    T = scheduler.config.num_train_timesteps
    t = torch.randint(0, T, (B * count, M), generator=generator, device=x0.device)
    noise = torch.randn((B * count, M, D), generator=generator, device=x0.device, dtype=x0.dtype)
    if count > 1:
        t, noise = t[index * B:(index + 1) * B], noise[index * B:(index + 1) * B]
    x0_rep = x0[:, None, :].expand(B, M, D)
    x_t = scheduler.add_noise(x0_rep.reshape(B * M, D), noise.reshape(B * M, D), t.reshape(B * M))
    return Level2Batch(x0=x0, x_t=x_t.reshape(B, M, D).to(x0.dtype), t=t, noise=noise)


def level2_losses(policy, batch: dict, M: int, generator: torch.Generator | None = None,
                  shard: tuple[int, int] | None = None) -> dict:
    """The training objective of one Level-1 batch: encode each observation once, draw M noised copies
    of its target, return ``policy.loss`` (named terms with "total"). ``shard``: see ``sample_level2``."""
    condition = policy.encode(batch)
    level2 = sample_level2(policy.diffusion_target(batch), M, policy.noise_scheduler, generator, shard=shard)
    return policy.loss(batch, level2, condition)
