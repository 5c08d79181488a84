"""``toy``: a tiny third-party policy for mdh, complete and honest (it trains), in one module.

It is what docs/new_architecture.md walks through: the ``Policy`` protocol of harness/policy.py, a typed
config dataclass with presets, a ``PolicyEntry`` named by the entry point (``mdh_toy_policy-0.1.dist-info``
here; ``pyproject.toml`` for a real install), and loss terms of its own (``noise_mse``, ``gripper_bce``)
that ``mdh train`` logs under those names.

Model: every point's features (xyz, rgb, height) go through a small MLP and are mean-pooled over the valid
points; with the mean instruction token and the current pose this gives ONE condition vector per
observation (``encode``). ``denoise`` runs an MLP on [x_t, timestep embedding, condition] for each of the M
samples separately, so samples share the condition and never see each other (``shares_condition``). The
position (3 numbers) is diffused; the gripper comes from a head on the condition; the orientation is the
current pose's (a toy does not need to predict it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from harness.diffusion import (
    SamplerConfig,
    ScheduleConfig,
    initial_sample,
    make_sampler,
    make_train_scheduler,
    run_sampler,
)
from harness.policy import DataInfo, InputSpec, PolicyEntry


@dataclass
class ToyConfig:
    """Every field is settable as ``model.options.<field>`` (nested: ``model.options.schedule.<field>``)."""

    hidden: int = 32
    num_points: int = 64  # points per observation the data pipeline delivers (``data.num_points`` overrides)
    text_dim: int = 512  # width of the instruction token embeddings
    time_freqs: int = 8  # sinusoidal timestep features (sin and cos of each)
    dropout: float = 0.0  # in the denoiser MLP; elementwise, so it never mixes samples
    noise_weight: float = 1.0
    gripper_weight: float = 0.5
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def validate(self) -> ToyConfig:
        """Called by ``PolicyEntry.make_config``: a bad value is a configuration error before any work."""
        for name in ("hidden", "num_points", "text_dim", "time_freqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"ToyConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ToyConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.noise_weight < 0 or self.gripper_weight < 0:
            raise ValueError("ToyConfig loss weights must be >= 0")
        return self


PRESETS = {
    "tiny": {"hidden": 16, "num_points": 64, "time_freqs": 4},
    "base": {"hidden": 64, "num_points": 512, "dropout": 0.1},
}

LOSS_TERMS = ("noise_mse", "gripper_bce", "total")


def timestep_features(t: torch.Tensor, n: int, T: int) -> torch.Tensor:
    """(...) long timesteps in [0, T) -> (..., 2n) sin/cos features, periods from 2 pi to about 2 pi T."""
    freqs = torch.exp(torch.arange(n, device=t.device, dtype=torch.float32) * (-math.log(T) / n))
    angle = t.float()[..., None] * freqs
    return torch.cat([angle.sin(), angle.cos()], dim=-1)


class ToyPolicy(nn.Module):
    """The ``harness.policy.Policy`` protocol on points + instruction tokens."""

    shares_condition = True
    action_dim = 3

    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        self.input_spec = InputSpec("points", num_points=config.num_points, text_dim=config.text_dim)
        self.noise_scheduler = make_train_scheduler(config.schedule)
        h = config.hidden
        self.point_mlp = nn.Sequential(nn.Linear(7, h), nn.GELU(), nn.Linear(h, h))
        self.text_proj = nn.Linear(config.text_dim, h)
        self.cond_mlp = nn.Sequential(nn.Linear(2 * h + 4, h), nn.GELU(), nn.Linear(h, h))
        self.time_mlp = nn.Sequential(nn.Linear(2 * config.time_freqs, h), nn.GELU())
        self.denoiser = nn.Sequential(nn.Linear(self.action_dim + 2 * h, h), nn.GELU(), nn.Dropout(config.dropout),
                                      nn.Linear(h, h), nn.GELU(), nn.Linear(h, self.action_dim))
        self.gripper_head = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.Linear(h, 1))

    # ------------------------------------------------------------------------------------------ protocol
    def diffusion_target(self, batch: dict) -> torch.Tensor:
        return batch["target"][:, :3]

    def encode(self, batch: dict) -> torch.Tensor:
        """(B, hidden): masked mean of the point features, mean instruction token, current xyz + open."""
        mask = batch["point_mask"].to(batch["points"].dtype)[..., None]
        feats = self.point_mlp(torch.cat([batch["points"], batch["colors"], batch["height"]], dim=-1))
        points = (feats * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        tmask = batch["text_mask"].to(batch["text_tokens"].dtype)[..., None]
        text = self.text_proj((batch["text_tokens"] * tmask).sum(1) / tmask.sum(1).clamp(min=1.0))
        pose = batch["pose"]
        return self.cond_mlp(torch.cat([points, text, pose[:, :3], pose[:, 7:8]], dim=-1))

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        B, M, _ = x_t.shape
        temb = self.time_mlp(timestep_features(t, self.config.time_freqs,
                                               self.noise_scheduler.config.num_train_timesteps))
        cond = condition[:, None, :].expand(B, M, condition.shape[-1])
        return self.denoiser(torch.cat([x_t, temb, cond], dim=-1))

    def loss(self, batch: dict, level2, condition: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.config
        noise_mse = F.mse_loss(self.denoise(level2.x_t, level2.t, condition), level2.noise)
        gripper_bce = F.binary_cross_entropy_with_logits(self.gripper_head(condition)[:, 0], batch["target"][:, 7])
        total = cfg.noise_weight * noise_mse + cfg.gripper_weight * gripper_bce
        return {"noise_mse": noise_mse, "gripper_bce": gripper_bce, "total": total}

    @torch.no_grad()
    def sample(self, batch: dict, sampler=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 8) [xyz, unit quat xyzw (the current pose's), open logit] in the batch's centred frame."""
        sampler = sampler if sampler is not None else make_sampler(self.noise_scheduler, SamplerConfig())
        cond = self.encode(batch)
        B, device = cond.shape[0], cond.device
        x = initial_sample(self.noise_scheduler, (B, 1, self.action_dim), generator, device)
        pos = run_sampler(lambda x, t: self.denoise(x, t, cond), x, sampler, generator)[:, 0]
        quat = F.normalize(batch["pose"][:, 3:7].to(pos), dim=-1)
        return torch.cat([pos, quat, self.gripper_head(cond)], dim=-1)


def build(config: ToyConfig, data_info: DataInfo | None = None) -> ToyPolicy:
    """``PolicyEntry.build``: the dataset facts must agree with the config (the instruction width)."""
    if data_info is not None and data_info.text_dim is not None and data_info.text_dim != config.text_dim:
        raise ValueError(f"the instruction embeddings are {data_info.text_dim}-d but the toy policy expects "
                         f"{config.text_dim} (set model.options.text_dim={data_info.text_dim})")
    return ToyPolicy(config)


# Named by the entry point: [project.entry-points."mdh.policies"] toy = "mdh_toy_policy:ENTRY"
ENTRY = PolicyEntry(name="toy", config_class=ToyConfig, build=build, presets=PRESETS, default_preset="base",
                    description="toy MLP on mean-pooled points: a complete third-party policy example")
