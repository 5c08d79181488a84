"""The identity of a run: a fingerprint of everything in its configuration that changes the result.

Two configurations with the same fingerprint train the same model the same way (up to where the data
lives and how fast it is read); a run folder belongs to exactly one fingerprint. It names default run
folders (readable prefix + short fingerprint) and guards resume: a checkpoint or record written under
another fingerprint is refused with the keys that differ.

Left out, because they change where or how fast a run goes but not what it computes:
``data.path``, ``data.instructions``, ``data.embeds`` (paths: the data may move to scratch between
requeues; the dataset's content is checked separately, see ``data_identity`` in harness/train.py),
``data.workers`` (the augmentation RNG is a function of seed, epoch and index, not of the worker),
``train.device``, ``train.progress``, ``train.ckpt_every``, ``train.recipe_steps`` (cost projection only),
and the whole ``cluster`` group. ``model.options`` entries left null (= the preset's value) are dropped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping

NON_SEMANTIC_KEYS = frozenset({
    "data.path", "data.instructions", "data.embeds", "data.workers",
    "train.device", "train.progress", "train.ckpt_every", "train.recipe_steps",
    "train.log_every_s", "train.keep_ckpt_every",
})
NON_SEMANTIC_GROUPS = ("cluster", "hydra")
FINGERPRINT_LENGTH = 10


def _flatten(value, prefix: str, out: dict) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = value


def _canonical(value):
    """JSON-stable form: tuples as lists, every number as float (the schemas fix the types; 1 and 1.0 are
    one value), bools kept."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    return str(value)


# Settings added after runs existed: left out while unset, so every earlier run keeps its fingerprint
ADDED_OPTIONAL_KEYS = frozenset({"train.init_weights"})


def semantic_config(config) -> dict:
    """A run configuration (``RunConfig`` dataclass, or its nested-dict form as Hydra resolves it) ->
    flat ``{"train.B": 8.0, "model.options.rope3d": False, ...}`` of the keys that change the result."""
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    if not isinstance(config, Mapping):
        raise TypeError(f"expected a RunConfig or a dict, got {type(config).__name__}")
    flat: dict = {}
    _flatten(config, "", flat)
    return {k: _canonical(v) for k, v in sorted(flat.items())
            if k not in NON_SEMANTIC_KEYS and k.split(".")[0] not in NON_SEMANTIC_GROUPS
            and not ((k.startswith("model.options.") or k in ADDED_OPTIONAL_KEYS) and v is None)}


def record_semantic_config(record: Mapping | None) -> dict | None:
    """The semantic configuration a run record was written under (records older than the fingerprint:
    recomputed from their resolved ``config``); None when the record holds neither."""
    if not record:
        return None
    if isinstance(record.get("semantic_config"), Mapping):
        return dict(record["semantic_config"])
    if isinstance(record.get("config"), Mapping):
        try:
            return semantic_config(record["config"])
        except (TypeError, ValueError):
            return None
    return None


def fingerprint(config) -> str:
    """Short hex digest of ``semantic_config(config)``."""
    text = json.dumps(semantic_config(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:FINGERPRINT_LENGTH]


def config_differences(old: Mapping, new: Mapping) -> list[str]:
    """``["train.lr: 0.0003 -> 0.01", "model.options.rope3d: <unset> -> False"]`` between two
    ``semantic_config`` dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if a != b:
            out.append(f"{key}: {_show(a)} -> {_show(b)}")
    return out


def _show(v) -> str:
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return str(v)


def register_resolver() -> None:
    """``${mdh_fingerprint:${model},${data},${train}}`` in Hydra configs (the default run folder name)."""
    from omegaconf import DictConfig, OmegaConf

    def resolve(model, data, train) -> str:
        def plain(node):
            return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
        return fingerprint({"model": plain(model), "data": plain(data), "train": plain(train)})

    if not OmegaConf.has_resolver("mdh_fingerprint"):
        OmegaConf.register_new_resolver("mdh_fingerprint", resolve)
