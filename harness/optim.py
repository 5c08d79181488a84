"""AdamW with the paper's parameter groups and the warm-up + cosine schedule with an LR floor."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and kernels; never biases or normalisation weights (every 1-D parameter).

    (The official code matches names containing 'bias'/'LayerNorm', which its module names never contain,
    so it decays LayerNorm weights by accident: reference §9.9.)
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, warmup: int, total: int, cycles: float, floor_factor: float) -> float:
    """Multiplier of the base LR at ``step``: linear warm-up over ``warmup`` steps, then
    0.5 * (1 + cos(2 pi cycles p)) with p the fraction of the remaining steps, never below ``floor_factor``."""
    if warmup > 0 and step < warmup:
        return max((step + 1) / warmup, floor_factor)
    p = (step - warmup) / max(1, total - warmup)
    return max(0.5 * (1.0 + math.cos(2.0 * math.pi * cycles * p)), floor_factor)


def make_optimizer(model: nn.Module, cfg) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW + LambdaLR from a ``TrainConfig``."""
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    floor = min(1.0, cfg.lr_floor / cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps, cfg.cosine_cycles, floor))
    return opt, sched
