"""Typed schemas of a training run. Hydra YAML (harness/conf/) only composes them.

Stable keys (docs and scripts rely on them): ``model``, ``model.preset``, ``data``, ``data.path``,
``train.B``, ``train.M``, ``train.steps``, ``train.seed``, ``train.eval_every``, ``train.ckpt_every``.
``validate_config`` turns every bad value into a ``ConfigError`` before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


class ConfigError(ValueError):
    """A bad configuration value; the message names the key, the value and what was expected."""


@dataclass
class ModelConfig:
    """``name``: a registered policy (``model=<name>`` picks its typed schema, harness/model_schemas.py);
    ``preset``: one of its presets (null: the policy's default preset); ``options``: fields of the policy's
    own config dataclass (the ablation switches, e.g. ``model.options.rope3d=false``); null = the preset's
    value. From Python, ``options`` may be a plain dict."""

    name: str = "minidiffuser"
    preset: Optional[str] = None
    options: Any = field(default_factory=dict)


@dataclass
class DataConfig:
    """``path``: a dataset folder (``mdh data metaworld`` output, or a 3D-LOTUS voxel1cm folder).
    ``val_split``: held-out split for offline evaluation (if the folder has none, the train split is
    evaluated without augmentation and the record says so). ``num_points``: null = the model preset's."""

    name: str = "metaworld"
    path: str = "data/metaworld"
    split: str = "train"
    val_split: str = "val"
    kind: str = "voxel1cm"
    instructions: Optional[str] = None
    embeds: Optional[str] = None
    meta_preset: Optional[str] = None
    taskvars: Optional[list[str]] = None
    num_points: Optional[int] = None
    workers: int = 2
    skip_bad: bool = False
    eval_keysteps: int = 64


@dataclass
class TrainConfig:
    """Optimisation as the paper: AdamW (betas 0.9/0.98, eps 1e-6, weight decay 0.05 except biases and
    norm weights), linear warm-up then cosine with ``cosine_cycles`` and an LR floor, gradient clipping,
    optional EMA of the weights (``ema_decay``), bf16 autocast on CUDA only."""

    B: int = 8
    M: int = 64
    steps: int = 2000
    seed: int = 0
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.05
    warmup_steps: int = 100
    cosine_cycles: float = 0.5
    lr_floor: float = 1e-5
    grad_clip: float = 200.0
    ema_decay: Optional[float] = None
    bf16: bool = True
    eval_every: int = 200
    ckpt_every: int = 200
    sampler: str = "ddpm"
    sampler_steps: Optional[int] = None
    device: str = "auto"
    recipe_steps: Optional[int] = None
    progress: bool = True


@dataclass
class ClusterConfig:
    """Where runs execute (the sweeps issue adds launchers); ``name`` is recorded."""

    name: str = "local"


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def _positive_int(value, key: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")


def validate_config(cfg: RunConfig) -> None:
    """Check a run configuration before any work; raises ``ConfigError`` naming key and value."""
    from harness.policy import policy_names

    t, d, m = cfg.train, cfg.data, cfg.model
    _positive_int(t.B, "train.B")
    _positive_int(t.M, "train.M")
    _positive_int(t.steps, "train.steps")
    _positive_int(t.eval_every, "train.eval_every")
    _positive_int(t.ckpt_every, "train.ckpt_every")
    _positive_int(t.warmup_steps, "train.warmup_steps", 0)
    _positive_int(d.workers, "data.workers", 0)
    _positive_int(d.eval_keysteps, "data.eval_keysteps")
    if not t.lr > 0:
        raise ConfigError(f"train.lr must be > 0, got {t.lr!r}")
    if t.ema_decay is not None and not 0 < t.ema_decay < 1:
        raise ConfigError(f"train.ema_decay must be in (0, 1) or null, got {t.ema_decay!r}")
    if t.sampler not in ("ddpm", "ddim"):
        raise ConfigError(f"train.sampler must be ddpm or ddim, got {t.sampler!r}")
    if t.device not in ("auto", "cpu") and not str(t.device).startswith("cuda"):
        raise ConfigError(f"train.device must be auto, cpu or cuda[:i], got {t.device!r}")
    if m.name not in policy_names():
        raise ConfigError(f"unknown model {m.name!r}; choices: {policy_names()}")
    if not Path(d.path).expanduser().exists():
        raise ConfigError(f"data.path {d.path!r} does not exist (generate the embedded suite with "
                          "`mdh data metaworld --out DIR`, or point data.path at a 3D-LOTUS voxel1cm folder)")
