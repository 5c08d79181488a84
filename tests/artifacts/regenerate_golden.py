"""Regenerate the pinned outputs of a seeded tiny Mini-Diffuser (tests/minidiffuser/test_golden.py).

    .venv/bin/python tests/artifacts/regenerate_golden.py

Run it only when a change to the model is intended to change its outputs, and say so in the commit.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from harness.bench.synthetic import synthetic_batch
from harness.diffusion import SamplerConfig, make_sampler
from harness.level2 import sample_level2
from harness.policy import build_policy

GOLDEN = Path(__file__).with_name("minidiffuser_tiny_golden.json")


def compute() -> dict:
    """Losses (eval mode, fixed Level-2 draw) and DDIM-10 sampled actions of a seeded tiny model."""
    torch.manual_seed(0)
    policy = build_policy("minidiffuser", preset="tiny").eval()
    batch = synthetic_batch(B=3, N=policy.cfg.num_points, seed=1)
    torch.manual_seed(1)
    cond = policy.encode(batch)
    level2 = sample_level2(policy.diffusion_target(batch), 4, policy.noise_scheduler,
                           generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        losses = {k: float(v) for k, v in policy.loss(batch, level2, cond).items()}
        torch.manual_seed(3)
        actions = policy.sample(batch, make_sampler(policy.noise_scheduler, SamplerConfig("ddim", 10)),
                                generator=torch.Generator().manual_seed(4))
    return {"losses": losses, "actions": actions.tolist(), "params": policy.num_parameters()}


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps(compute(), indent=1) + "\n")
    print(f"wrote {GOLDEN}")
