"""Typed schemas of a training run. Hydra YAML (harness/conf/) only composes them.

Stable keys (docs and scripts rely on them): ``model``, ``model.preset``, ``data``, ``data.path``,
``train.B``, ``train.M``, ``train.steps``, ``train.seed``, ``train.eval_every``, ``train.ckpt_every``.
``validate_config`` turns every bad value into a ``ConfigError`` before any work starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A bad configuration value; the message names the key, the value and what was expected."""


@dataclass
class ModelConfig:
    """``name``: a registered policy (``model=<name>`` picks its typed schema, harness/model_schemas.py);
    ``preset``: one of its presets (null: the policy's default preset); ``options``: fields of the policy's
    own config dataclass (the ablation switches, e.g. ``model.options.rope3d=false``); null = the preset's
    value. From Python, ``options`` may be a plain dict."""

    name: str = "minidiffuser"
    preset: str | None = None
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
    instructions: str | None = None
    embeds: str | None = None
    meta_preset: str | None = None
    taskvars: list[str] | None = None
    num_points: int | None = None
    workers: int | None = None  # null: from the CPUs this process may use (see loader_plan)
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
    ema_decay: float | None = None
    bf16: bool = True
    eval_every: int = 200
    ckpt_every: int = 200
    sampler: str = "ddpm"
    sampler_steps: int | None = None  # null: ddpm all T steps, ddim DEFAULT_DDIM_STEPS = 10 (harness/diffusion.py)
    device: str = "auto"
    recipe_steps: int | None = None
    progress: bool = True
    init_weights: str | None = None  # a checkpoint (or run folder) whose model weights start a NEW run
    log_every_s: float = 30.0  # wall-clock seconds between progress notes (log line, record.json, steps.csv)
    keep_ckpt_every: int | None = None  # also keep ckpt/step_<step>.pt at every multiple of it (and the end)


@dataclass
class ClusterConfig:
    """Where ``mdh sweep`` runs its jobs (harness/launch.py); not part of a run's identity.

    ``name``: "local" (one after another, each in a fresh process), "local_parallel" (at most ``max_parallel``
    subprocesses through submitit) or "slurm" (submitit job array). SLURM: ``partition``, ``account``,
    ``qos``, ``gpus_per_task``, ``tasks_per_node`` (processes of one run, each a rank on one device; null:
    one per GPU, else 1; with GPUs it must equal ``gpus_per_task``), ``cpus_per_task`` (per process),
    ``mem_gb`` (> 0; null: the cluster's default),
    ``timeout_min`` (time limit), ``array_parallelism``, ``signal_delay_s`` (SIGUSR2 this long before the
    limit: the run checkpoints and requeues itself), ``max_requeues`` (preemptions / time limits survived
    before the run is left interrupted), ``setup`` (shell lines before the job, e.g. module loads).
    """

    name: str = "local"
    max_parallel: int = 2
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gpus_per_task: int = 0
    tasks_per_node: int | None = None  # processes per run (SLURM tasks = torch.distributed ranks); null: gpus_per_task, else 1
    cpus_per_task: int = 2
    mem_gb: float | None = None
    timeout_min: int = 60
    array_parallelism: int = 16
    signal_delay_s: int = 120
    max_requeues: int = 3
    setup: list[str] = field(default_factory=list)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def _positive_int(value, key: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")


def _number(value, key: str, low: float | None = None, high: float | None = None, *, low_open: bool = False,
            high_open: bool = False) -> None:
    """``value`` must be a finite number within [low, high] (``*_open``: the bound itself excluded)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ConfigError(f"{key} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (value >= high if high_open else value > high):
        raise ConfigError(f"{key} must be {'<' if high_open else '<='} {high}, got {value!r}")


DATA_KINDS = ("voxel1cm", "keysteps")
SAMPLERS = ("ddpm", "ddim")


def validate_config(cfg: RunConfig) -> None:
    """Check every field of a run configuration before any work; raises ``ConfigError`` naming the key, the
    value and what was expected. Nothing is silently replaced by a default."""
    from harness.policy import policy_names

    t, d, m = cfg.train, cfg.data, cfg.model
    for key, value, minimum in (("train.B", t.B, 1), ("train.M", t.M, 1), ("train.steps", t.steps, 1),
                                ("train.eval_every", t.eval_every, 1), ("train.ckpt_every", t.ckpt_every, 1),
                                ("train.warmup_steps", t.warmup_steps, 0), ("train.seed", t.seed, 0),
                                ("data.eval_keysteps", d.eval_keysteps, 1)):
        _positive_int(value, key, minimum)
    for key, value in (("data.workers", d.workers), ("data.num_points", d.num_points),
                       ("train.sampler_steps", t.sampler_steps), ("train.recipe_steps", t.recipe_steps)):
        if value is not None:
            _positive_int(value, key, 0 if key == "data.workers" else 1)
    _number(t.lr, "train.lr", 0, low_open=True)
    _number(t.lr_floor, "train.lr_floor", 0, t.lr)
    _number(t.eps, "train.eps", 0, low_open=True)
    _number(t.weight_decay, "train.weight_decay", 0)
    _number(t.cosine_cycles, "train.cosine_cycles", 0, low_open=True)
    _number(t.grad_clip, "train.grad_clip", 0, low_open=True)
    if len(t.betas) != 2:
        raise ConfigError(f"train.betas must be two numbers, got {t.betas!r}")
    for i, beta in enumerate(t.betas):
        _number(beta, f"train.betas[{i}]", 0, 1, high_open=True)
    _number(t.log_every_s, "train.log_every_s", 0, low_open=True)
    if t.keep_ckpt_every is not None:
        _positive_int(t.keep_ckpt_every, "train.keep_ckpt_every", 1)
    if t.ema_decay is not None:
        _number(t.ema_decay, "train.ema_decay", 0, 1, low_open=True, high_open=True)
    if t.sampler not in SAMPLERS:
        raise ConfigError(f"train.sampler must be one of {SAMPLERS}, got {t.sampler!r}")
    if t.device not in ("auto", "cpu") and not str(t.device).startswith("cuda"):
        raise ConfigError(f"train.device must be auto, cpu or cuda[:i], got {t.device!r}")
    if d.kind not in DATA_KINDS:
        raise ConfigError(f"data.kind must be one of {DATA_KINDS}, got {d.kind!r}")
    for key, value in (("data.split", d.split), ("data.val_split", d.val_split), ("data.name", d.name)):
        if not isinstance(value, str) or not value or "/" in value:
            raise ConfigError(f"{key} must be a non-empty folder name, got {value!r}")
    c = cfg.cluster
    if c.name not in ("local", "local_parallel", "slurm"):
        raise ConfigError(f"cluster must be local, local_parallel or slurm, got {c.name!r}")
    for key, value, minimum in (("cluster.max_parallel", c.max_parallel, 1), ("cluster.gpus_per_task", c.gpus_per_task, 0),
                                ("cluster.cpus_per_task", c.cpus_per_task, 1), ("cluster.timeout_min", c.timeout_min, 1),
                                ("cluster.array_parallelism", c.array_parallelism, 1),
                                ("cluster.signal_delay_s", c.signal_delay_s, 0), ("cluster.max_requeues", c.max_requeues, 0)):
        _positive_int(value, key, minimum)
    if c.tasks_per_node is not None:
        _positive_int(c.tasks_per_node, "cluster.tasks_per_node", 1)
        if c.gpus_per_task and c.tasks_per_node != c.gpus_per_task:
            raise ConfigError(f"cluster.tasks_per_node={c.tasks_per_node} but cluster.gpus_per_task={c.gpus_per_task}: "
                              f"a run trains one process per GPU; set cluster.tasks_per_node={c.gpus_per_task} or null")
    if c.mem_gb is not None:  # null: the cluster's default; 0 is not "the default" but an error
        _number(c.mem_gb, "cluster.mem_gb", 0, low_open=True)
    if m.name not in policy_names():
        raise ConfigError(f"unknown model {m.name!r}; choices: {policy_names()}")
    if not Path(d.path).expanduser().exists():
        raise ConfigError(f"data.path {d.path!r} does not exist (generate the embedded suite with "
                          "`mdh data metaworld --out DIR`, or point data.path at a 3D-LOTUS voxel1cm folder)")
