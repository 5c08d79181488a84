"""The policy contract every architecture implements, and the registry that finds them by name.

A policy diffuses an ``action_dim``-dimensional target per observation. The harness drives it as:

    policy = build_policy(name, config, data_info)        # config: the policy's own typed dataclass
    policy.input_spec                                     # what it reads: points or images, sizes, text width
    cond = policy.encode(batch)                           # once per observation
    l2 = sample_level2(policy.diffusion_target(batch), M, policy.noise_scheduler)
    losses = policy.loss(batch, l2, cond)                 # named terms, "total" included
    actions = policy.sample(batch, sampler, generator)    # (B, 8) in the batch's centred frame
    world = world_actions(actions, batch)                 # (B, 8) in the world frame

Policies are found through the entry-point group ``mdh.policies``, built-ins included (pyproject.toml
declares ``minidiffuser``): this module imports no model package. An entry point names a ``PolicyEntry``.
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, runtime_checkable

import torch

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "mdh.policies"
MODALITIES = ("points", "images")


# --------------------------------------------------------------------------------------------- contract


@dataclass(frozen=True)
class InputSpec:
    """What a policy reads from a collated Level-1 batch (B observations).

    ``modality``: "points" (``points``/``colors`` (B, N, 3), ``height`` (B, N, 1), ``point_mask`` (B, N)) or
    "images" (``images`` (B, n_cam, 3, H, W) in [-1, 1], ``point_maps`` (B, n_cam, 3, H, W) metres, same frame
    as ``pose``). Always: ``pose``/``target`` (B, 8), ``history`` (B, n_hist, 8), ``offset`` (B, 3); with
    ``text_dim``: ``text_tokens`` (B, L, text_dim) and ``text_mask`` (B, L). ``num_points`` is N (points);
    ``cameras`` / ``image_size`` pin the camera axis and (H, W) when the policy needs fixed ones.
    """

    modality: str = "points"
    num_points: int | None = None
    text_dim: int | None = None
    n_hist: int = 1
    cameras: tuple[str, ...] | None = None
    image_size: tuple[int, int] | None = None

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise ValueError(f"InputSpec.modality must be one of {MODALITIES}, got {self.modality!r}")
        if self.modality == "points" and not (isinstance(self.num_points, int) and self.num_points > 0):
            raise ValueError(f"a points policy needs InputSpec.num_points > 0, got {self.num_points!r}")

    def transform(self, train: bool = True, num_points: int | None = None):
        """The ``harness.data.transforms.TransformConfig`` that delivers what this spec reads (``num_points``
        overrides the cloud size, e.g. ``data.num_points``); training and ``mdh bench step`` both use it."""
        from harness.data.transforms import TransformConfig

        return TransformConfig(num_points=num_points or self.num_points or 4000, train=train,
                               images=self.modality == "images")

    def batch_keys(self) -> dict[str, tuple[tuple, torch.dtype]]:
        """key -> (shape with "B", "L", "H", "W", "n_cam" for free sizes, dtype) of every tensor read."""
        keys: dict[str, tuple[tuple, torch.dtype]] = {
            "pose": (("B", 8), torch.float32), "target": (("B", 8), torch.float32),
            "history": (("B", self.n_hist, 8), torch.float32), "offset": (("B", 3), torch.float32)}
        if self.modality == "points":
            n = self.num_points
            keys.update(points=(("B", n, 3), torch.float32), colors=(("B", n, 3), torch.float32),
                        height=(("B", n, 1), torch.float32), point_mask=(("B", n), torch.bool))
        else:
            cams = len(self.cameras) if self.cameras else "n_cam"
            h, w = self.image_size or ("H", "W")
            keys.update(images=(("B", cams, 3, h, w), torch.float32),
                        point_maps=(("B", cams, 3, h, w), torch.float32))
        if self.text_dim is not None:
            keys.update(text_tokens=(("B", "L", self.text_dim), torch.float32), text_mask=(("B", "L"), torch.bool))
        return keys

    def check_batch(self, batch: Mapping, where: str = "batch") -> None:
        """Raise ``ValueError`` naming the key, its shape/dtype and what this spec expects."""
        sizes: dict[str, int] = {}
        for key, (shape, dtype) in self.batch_keys().items():
            value = batch.get(key)
            if not torch.is_tensor(value):
                raise ValueError(f"{where} has no tensor {key!r}; the policy reads {sorted(self.batch_keys())}")
            if value.dtype != dtype or value.ndim != len(shape):
                raise ValueError(f"{where}[{key!r}] is {tuple(value.shape)} {value.dtype}, expected {shape} {dtype}")
            for dim, want in zip(value.shape, shape):
                if isinstance(want, str):
                    if sizes.setdefault(want, dim) != dim:
                        raise ValueError(f"{where}[{key!r}] has {want}={dim}, other keys have {sizes[want]}")
                elif dim != want:
                    raise ValueError(f"{where}[{key!r}] is {tuple(value.shape)}, expected {shape}")


@dataclass(frozen=True)
class DataInfo:
    """Dataset facts a policy may size or normalise itself with (passed to ``PolicyEntry.build``).

    ``meta``: the dataset's ``DatasetMeta`` (workspace bounds, table, robot base, cameras, image size);
    ``text_dim``: width of the instruction embeddings (None: no embeddings found); ``has_images``: the
    data holds camera images + point maps (the "keysteps" format or raw RLBench); ``keypose_bounds()``:
    (low (3,), high (3,)) world-frame metres holding every training target position + 0.04 m
    (harness/data/bounds.py), computed on first call (it reads every training episode's actions) and
    None when the harness gave no way to compute them.
    """

    meta: Any = None
    text_dim: int | None = None
    has_images: bool = False
    bounds_fn: Callable[[], tuple[list, list]] | None = field(default=None, repr=False, compare=False)

    def keypose_bounds(self) -> tuple[list, list] | None:
        if self.bounds_fn is None:
            return None
        cached = getattr(self, "_bounds", None)
        if cached is None:
            cached = self.bounds_fn()
            object.__setattr__(self, "_bounds", cached)
        return cached


@runtime_checkable
class Policy(Protocol):
    """What the harness calls. A ``torch.nn.Module`` with:"""

    config: Any                   # the typed config dataclass it was built from (recorded in record.json)
    input_spec: InputSpec         # batch keys, shapes, dtypes it reads
    action_dim: int               # numbers diffused per sample (3: position; 9: position + 6D rotation)
    shares_condition: bool        # True: denoise never changes the condition (Level-2 "shared" strategy)
    noise_scheduler: Any          # diffusers scheduler used for training (sample_level2) and sampling

    def diffusion_target(self, batch: dict) -> torch.Tensor:
        """(B, action_dim) clean target x0 in the policy's diffusion space."""

    def encode(self, batch: dict) -> Any:
        """The condition for B observations; computed once per observation."""

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, condition: Any) -> torch.Tensor:
        """x_t (B, M, D), t (B, M) -> predicted noise (B, M, D)."""

    def loss(self, batch: dict, level2, condition: Any) -> dict[str, torch.Tensor]:
        """Named scalar loss terms including "total" (every other term is logged under its own name)."""

    def sample(self, batch: dict, sampler, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 8) actions [x, y, z, qx, qy, qz, qw, open_logit] in the batch's centred frame."""


def world_actions(actions: torch.Tensor, batch: Mapping) -> torch.Tensor:
    """(B, 8) actions in the batch's frame -> world frame: add ``offset`` back and undo the z-rotation
    augmentation (``rotation`` radians about the robot base ``rotation_center``, when the batch has one;
    evaluation batches are not rotated). Used by offline and closed-loop evaluation alike."""
    out = actions.clone()
    offset = batch["offset"].to(out)
    out[:, :3] = out[:, :3] + offset
    angle = batch.get("rotation")
    if angle is not None and torch.is_tensor(angle) and bool((angle != 0).any()):
        center = batch.get("rotation_center")
        if center is None:
            raise ValueError("batch is rotated (augmented) but has no 'rotation_center' to undo it about")
        from scipy.spatial.transform import Rotation

        undo = Rotation.from_euler("z", -angle.detach().cpu().double().numpy().reshape(-1, 1))
        c = center.to(out).cpu().double().numpy()
        pos = undo.apply(out[:, :3].detach().cpu().double().numpy() - c) + c
        quat = (undo * Rotation.from_quat(out[:, 3:7].detach().cpu().double().numpy())).as_quat()
        out[:, :3] = torch.as_tensor(pos, dtype=out.dtype)
        out[:, 3:7] = torch.as_tensor(quat, dtype=out.dtype)
    return out


# --------------------------------------------------------------------------------------------- config checks


def check_number(config: Any, name: str, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False, integer: bool = False,
                 where: str | None = None) -> None:
    """Raise ``ValueError("<where>.<name> must be ..., got <value>")`` unless ``config.<name>`` (each element,
    for a tuple) is a finite number (an integer, with ``integer``; never a bool) within [low, high]
    (``*_open``: the bound itself excluded). ``where``: the name of the config (default: its class name).
    For the ``validate()`` of policy configs: a bad value is one clear error, never a ZeroDivisionError or a
    silently odd model."""
    import math
    import numbers

    value = getattr(config, name)
    label = f"{where or type(config).__name__}.{name}"
    items = list(enumerate(value)) if isinstance(value, (tuple, list)) else [(None, value)]
    for i, v in items:
        key = label if i is None else f"{label}[{i}]"
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or (integer and not isinstance(v, numbers.Integral)):
            raise ValueError(f"{key} must be {'an integer' if integer else 'a number'}, got {v!r}")
        if not math.isfinite(v):
            raise ValueError(f"{key} must be a finite number, got {v!r}")
        if low is not None and (v <= low if low_open else v < low):
            raise ValueError(f"{key} must be {'>' if low_open else '>='} {low}, got {v!r}")
        if high is not None and (v >= high if high_open else v > high):
            raise ValueError(f"{key} must be {'<' if high_open else '<='} {high}, got {v!r}")


# --------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class PolicyEntry:
    """How the harness finds, configures and builds one architecture.

    ``name``: what users type (``model=<name>``); ``config_class``: the policy's typed config dataclass,
    which becomes the Hydra schema of ``model.options`` (every field settable, type-checked at compose);
    ``build(config, data_info) -> Policy``; ``presets``: named field values (``model.preset``), applied
    under the user's options; ``default_preset``: the preset used when none is given; ``variants``: named
    option sets (e.g. another Level-2 strategy) that the conformance suite checks as well as the preset;
    ``checkpoint_importers``: name -> ``importer(ckpt, out_dir, data_path) -> dict`` turning a checkpoint in
    some foreign format into a run folder (``mdh checkpoint NAME CKPT OUT_RUN_DIR --model <policy>``); the
    returned dict describes the source (``path``, ``sha256``, ``imported_from``, as record.json's
    ``weights_source``). An importer raises ``FileNotFoundError``, ``FileExistsError`` or ``ValueError`` for
    bad input (reported in one line).
    """

    name: str
    config_class: type
    build: Callable[[Any, DataInfo | None], Any]
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    default_preset: str | None = None
    description: str = ""
    variants: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    checkpoint_importers: Mapping[str, Callable[..., dict]] = field(default_factory=dict)

    def __post_init__(self):
        if not dataclasses.is_dataclass(self.config_class):
            raise TypeError(f"PolicyEntry {self.name!r}: config_class must be a dataclass")
        for key, importer in self.checkpoint_importers.items():
            if not callable(importer):
                raise TypeError(f"PolicyEntry {self.name!r}: checkpoint_importers[{key!r}] is not callable")
        if self.default_preset is not None and self.default_preset not in self.presets:
            raise ValueError(f"PolicyEntry {self.name!r}: default_preset {self.default_preset!r} not in presets "
                             f"{sorted(self.presets)}")

    def make_config(self, preset: str | None = None, **overrides) -> Any:
        """The preset's values under ``overrides`` -> a validated ``config_class`` instance. Unknown presets
        or fields raise ``ValueError`` listing the choices."""
        preset = preset if preset is not None else self.default_preset
        if preset is not None and preset not in self.presets:
            raise ValueError(f"unknown preset {preset!r} for policy {self.name!r}; choices: {sorted(self.presets)}")
        fields = {f.name: f for f in dataclasses.fields(self.config_class)}
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            raise ValueError(f"unknown {self.config_class.__name__} fields {unknown}; choices: {sorted(fields)}")
        values = _merged(self.presets.get(preset, {}) if preset is not None else {}, overrides)
        if "preset" in fields and preset is not None:
            values["preset"] = preset
        config = _construct(self.config_class, values)
        validate = getattr(config, "validate", None)
        return validate() or config if callable(validate) else config


def _merged(preset: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict:
    """``overrides`` over ``preset``, nested mappings merged key by key (``schedule.clip_range=2`` keeps a
    preset's ``schedule.schedule``)."""
    out = dict(preset)
    for k, v in overrides.items():
        out[k] = _merged(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def _construct(cls: type, values: Mapping[str, Any]) -> Any:
    """``cls(**values)`` with nested dataclass fields built from dicts and lists turned into tuples where the
    field is a tuple (Hydra hands back lists)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        hint = hints.get(name)
        inner = _strip_optional(hint)
        if dataclasses.is_dataclass(inner) and isinstance(value, Mapping):
            value = _construct(inner, value)
        elif typing.get_origin(inner) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def _strip_optional(hint):
    if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


_REGISTRY: dict[str, PolicyEntry] = {}
_PLUGIN_ERRORS: dict[str, str] = {}

MIGRATION_HINT = ("since mdh 0.2 an entry point in 'mdh.policies' must name a harness.policy.PolicyEntry "
                  "(name, config_class, build(config, data_info), presets); see docs/new_architecture.md, "
                  "'Migrating from a factory function'")


def register_policy(entry: PolicyEntry) -> PolicyEntry:
    """Register ``entry`` under ``entry.name`` (entry points do this for installed packages)."""
    if not isinstance(entry, PolicyEntry):
        raise TypeError(f"register_policy expects a PolicyEntry, got {type(entry).__name__}; {MIGRATION_HINT}")
    if entry.name in _REGISTRY and _REGISTRY[entry.name] is not entry:
        raise ValueError(f"policy {entry.name!r} is already registered")
    _REGISTRY[entry.name] = entry
    return entry


def _load_entry_points() -> None:
    """Register every policy declared in the entry-point group ``mdh.policies`` (built-ins included).

    A plugin that fails to import, or names something other than a ``PolicyEntry``, is reported (a log
    warning, and the error of ``get_policy`` for that name), never silently dropped, and never takes the
    other policies down.
    """
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _REGISTRY or ep.name in _PLUGIN_ERRORS:
            continue
        try:
            entry = ep.load()
        except Exception as e:  # noqa: BLE001 - a broken plugin must not break the built-ins
            _PLUGIN_ERRORS[ep.name] = f"{ep.value}: {type(e).__name__}: {e}"
            log.warning("policy plugin %r (%s) failed to load: %s", ep.name, ep.value, e)
            continue
        if not isinstance(entry, PolicyEntry):
            _PLUGIN_ERRORS[ep.name] = (f"{ep.value} is a {type(entry).__name__}, not a PolicyEntry; "
                                       f"{MIGRATION_HINT}")
            log.warning("policy plugin %r: %s", ep.name, _PLUGIN_ERRORS[ep.name])
            continue
        if entry.name != ep.name:
            _PLUGIN_ERRORS[ep.name] = f"{ep.value} is registered as {ep.name!r} but its PolicyEntry says {entry.name!r}"
            log.warning("policy plugin %r: %s", ep.name, _PLUGIN_ERRORS[ep.name])
            continue
        _REGISTRY.setdefault(ep.name, entry)


def policy_names() -> list[str]:
    """Names of every registered policy (entry points are read on first use)."""
    _load_entry_points()
    return sorted(_REGISTRY)


def get_policy(name: str) -> PolicyEntry:
    """The ``PolicyEntry`` of ``name``; unknown names list the choices, broken plugins say why."""
    _load_entry_points()
    if name not in _REGISTRY:
        if name in _PLUGIN_ERRORS:
            raise KeyError(f"policy plugin {name!r} failed to load: {_PLUGIN_ERRORS[name]}")
        raise KeyError(f"unknown policy {name!r}; choices: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def build_policy(name: str, config: Any = None, data_info: DataInfo | None = None, *,
                 preset: str | None = None, **overrides) -> Any:
    """Build the policy ``name`` from its typed ``config`` (or from ``preset`` + field ``overrides``) and the
    dataset facts ``data_info``. Checks that the result declares the contract's attributes."""
    entry = get_policy(name)
    if config is None:
        config = entry.make_config(preset, **overrides)
    elif preset is not None or overrides:
        raise TypeError("pass either a config or preset/overrides, not both")
    policy = entry.build(config, data_info)
    missing = [a for a in ("config", "input_spec", "action_dim", "shares_condition", "noise_scheduler",
                           "diffusion_target", "encode", "denoise", "loss", "sample") if not hasattr(policy, a)]
    if missing:
        raise TypeError(f"policy {name!r} ({type(policy).__name__}) lacks {missing} of the policy contract "
                        "(harness/policy.py: Policy)")
    if not isinstance(policy.input_spec, InputSpec):
        raise TypeError(f"policy {name!r}: input_spec must be a harness.policy.InputSpec")
    return policy


# --------------------------------------------------------------------------------------------- Hydra schemas


def options_schema(entry: PolicyEntry) -> type:
    """A dataclass with every field of ``entry.config_class`` typed ``Optional[...]`` and defaulting to None
    (None = the preset's value): the Hydra schema of ``model.options``. Nested dataclasses recurse."""
    return _optional_schema(entry.config_class, f"{_camel(entry.name)}Options", skip=("preset",))


def _optional_schema(cls: type, name: str, skip: tuple[str, ...] = ()) -> type:
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        hint = _strip_optional(hints[f.name])
        if dataclasses.is_dataclass(hint):
            sub = _optional_schema(hint, f"{name}_{f.name}")
            fields.append((f.name, sub, field(default_factory=sub)))
        else:
            fields.append((f.name, Optional[hint], field(default=None)))  # noqa: UP045 - OmegaConf needs Optional
    return dataclasses.make_dataclass(name, fields)


def options_to_overrides(options: Any) -> dict:
    """A filled ``options_schema`` instance (or a plain dict) -> the non-null field overrides, nested."""
    if dataclasses.is_dataclass(options) and not isinstance(options, type):
        options = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    out = {}
    for k, v in dict(options or {}).items():
        if dataclasses.is_dataclass(v) or isinstance(v, Mapping):
            v = options_to_overrides(v)
            if v:
                out[k] = v
        elif v is not None:
            out[k] = v
    return out


def _camel(name: str) -> str:
    return "".join(p.capitalize() for p in name.replace("-", "_").split("_")) or "Policy"
