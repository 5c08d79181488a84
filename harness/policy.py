"""The Policy protocol every architecture implements, and the registry that finds them by name.

A policy diffuses an ``action_dim``-dimensional target per observation. The harness drives it as:

    cond = policy.encode(batch)                       # once per observation
    l2 = sample_level2(policy.diffusion_target(batch), M, policy.noise_scheduler)
    losses = policy.loss(batch, l2, cond)             # dict of named terms, "total" included
    actions = policy.sample(batch, sampler)           # (B, 8) [xyz, quat xyzw, open logit], world frame

``shares_condition`` is True when ``denoise`` never changes the condition (non-invasive): then the M
samples of an observation share one encoded condition and cost only their light query tokens.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Protocol, runtime_checkable

import torch

log = logging.getLogger(__name__)


@runtime_checkable
class Policy(Protocol):
    action_dim: int
    shares_condition: bool
    noise_scheduler: Any

    def diffusion_target(self, batch: dict) -> torch.Tensor:
        """(B, action_dim) clean target x0 in the policy's diffusion space."""

    def encode(self, batch: dict) -> Any:
        """The condition for B observations; computed once per observation."""

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, condition: Any) -> torch.Tensor:
        """x_t (B, M, D), t (B, M) -> predicted noise (B, M, D)."""

    def loss(self, batch: dict, level2, condition: Any) -> dict[str, torch.Tensor]:
        """Named loss terms including "total"."""

    def sample(self, batch: dict, sampler) -> torch.Tensor:
        """(B, 8) actions [x, y, z, qx, qy, qz, qw, open_logit] in the batch's (centred) frame."""


_REGISTRY: dict[str, Callable[..., Any]] = {}


def register_policy(name: str):
    """Decorator: ``@register_policy("minidiffuser")`` on a factory ``f(**config) -> Policy``."""

    def deco(factory):
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"policy {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return deco


ENTRY_POINT_GROUP = "mdh.policies"
_PLUGIN_ERRORS: dict[str, str] = {}


def _load_builtin() -> None:
    import minidiffuser.policy  # noqa: F401  (registers "minidiffuser")

    _load_plugins()


def _load_plugins() -> None:
    """Register third-party policies declared as entry points in the group ``mdh.policies``.

    An entry point names a factory ``f(**config) -> Policy`` (``name = "pkg.module:factory"``); its entry
    point name is the policy name. A plugin that fails to import is reported (log warning, and in the
    error of ``build_policy`` for that name), never silently dropped.
    """
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _REGISTRY or ep.name in _PLUGIN_ERRORS:
            continue
        try:
            factory = ep.load()
        except Exception as e:  # a broken plugin must not break the built-ins
            _PLUGIN_ERRORS[ep.name] = f"{ep.value}: {type(e).__name__}: {e}"
            log.warning("policy plugin %r (%s) failed to load: %s", ep.name, ep.value, e)
            continue
        if not callable(factory):
            _PLUGIN_ERRORS[ep.name] = f"{ep.value} is not callable"
            continue
        _REGISTRY.setdefault(ep.name, factory)


def policy_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def build_policy(name: str, **config) -> Any:
    """Instantiate the policy registered as ``name``; an unknown name lists the choices."""
    _load_builtin()
    if name not in _REGISTRY:
        if name in _PLUGIN_ERRORS:
            raise KeyError(f"policy plugin {name!r} failed to load: {_PLUGIN_ERRORS[name]}")
        raise KeyError(f"unknown policy {name!r}; choices: {sorted(_REGISTRY)}")
    return _REGISTRY[name](**config)
