"""The one training step, shared by ``mdh train`` and ``mdh bench step`` so the benchmark times exactly what
training runs: autocast (bf16 on CUDA only), the Level-2 objective, backward, gradient clipping, AdamW with
the paper's parameter groups, the LR schedule and the EMA update.
"""

from __future__ import annotations

import contextlib

import torch

from harness.level2 import level2_losses
from harness.optim import make_optimizer


class TrainStep:
    """``TrainStep(policy, train_cfg, device)``; ``step(batch, M) -> (losses, grad_norm, lr)``.

    ``dist``: a ``harness.distributed.Distributed`` for data-parallel training (gradients and the returned
    losses are averaged over the processes), or None.
    ``train_cfg`` is a ``harness.config.TrainConfig`` (lr, betas, eps, weight_decay, warm-up, cosine, floor,
    grad_clip, ema_decay, bf16). ``losses`` are the policy's named terms (detached), ``grad_norm`` the norm
    before clipping, ``lr`` the rate this step used. ``state_dict``/``load_state_dict`` cover the optimizer,
    the LR schedule and the EMA weights.
    """

    def __init__(self, policy: torch.nn.Module, train_cfg, device: torch.device | str, dist=None):
        self.policy = policy
        self.cfg = train_cfg
        self.device = torch.device(device)
        # Data parallel (harness/distributed.py; None or one process: unchanged). The gradients are averaged
        # over the processes after backward rather than by wrapping the policy in DistributedDataParallel:
        # level2_losses calls policy.encode / .diffusion_target / .loss directly, never the module's
        # __call__, so DDP's hooks would not see the forward; the mean of the per-process gradients is the
        # gradient of the global batch's mean loss either way, and this needs no wrapper module and no
        # "unused parameters" setting for any plugin. The cost: one all-reduce after backward instead of
        # DDP's overlap with it.
        self.dist = dist if dist is not None and dist.enabled else None
        if self.dist is not None:
            self.dist.broadcast_module(policy)  # every rank starts from rank 0's weights (as DDP does)
        self.optimizer, self.lr_scheduler = make_optimizer(policy, train_cfg)
        self.ema = None
        if train_cfg.ema_decay is not None:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(policy, multi_avg_fn=get_ema_multi_avg_fn(train_cfg.ema_decay),
                                     use_buffers=True)

    def autocast(self):
        if self.device.type == "cuda" and self.cfg.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, batch: dict, M: int) -> tuple[dict[str, torch.Tensor], float, float]:
        if self.dist is not None:  # rank 0's buffers everywhere (as DDP's broadcast_buffers)
            self.dist.broadcast_module(self.policy, buffers_only=True)
        with self.autocast():
            losses = level2_losses(self.policy, batch, M, shard=self.dist.shard if self.dist else None)
        losses["total"].backward()
        if self.dist is not None:
            self.dist.average_gradients(self.policy.parameters())
            names = sorted(losses)  # the logged losses: the mean over ranks = the global batch's mean
            means = self.dist.all_reduce_mean(torch.stack([losses[k].detach().float() for k in names]))
            losses = {k: means[i] for i, k in enumerate(names)}
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.lr_scheduler.get_last_lr()[0]
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.policy)
        return {k: v.detach() for k, v in losses.items()}, float(grad_norm), lr

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights to evaluate: the EMA copy when there is one."""
        return self.ema.module if self.ema is not None else self.policy

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
