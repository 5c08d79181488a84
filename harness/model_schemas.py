"""Per-policy Hydra schemas: ``model=<name>`` composes the typed options of that policy.

For every registered policy (built-ins and plugins alike, harness/policy.py) a node is stored in Hydra's
ConfigStore group ``model``: a subclass of ``ModelConfig`` whose ``options`` is ``options_schema(entry)``
(every field of the policy's config dataclass, typed, defaulting to null = the preset's value). So
``model.options.<field>=...`` needs no ``+``, a wrong type or an unknown field fails at compose time, and
``mdh train --help`` lists every field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Optional

from harness.config import ModelConfig
from harness.policy import get_policy, options_schema, policy_names


def model_node(name: str) -> type:
    """The structured-config class of ``model=<name>``."""
    entry = get_policy(name)
    options = options_schema(entry)
    return dataclasses.make_dataclass(
        f"{options.__name__[:-len('Options')]}Model",
        [("name", str, field(default=name)),
         ("preset", Optional[str], field(default=entry.default_preset)),  # noqa: UP045 - OmegaConf
         ("options", options, field(default_factory=options))],
        bases=(ModelConfig,))


def register_model_schemas() -> list[str]:
    """Store one ``model/<name>`` node per registered policy; returns the names."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    names = policy_names()
    for name in names:
        cs.store(group="model", name=name, node=model_node(name))
    return names
