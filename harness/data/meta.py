"""Per-dataset metadata: everything a transform needs that differs between benchmarks.

Transforms hold no benchmark constants in code; they read them from the ``DatasetMeta`` that travels with
the dataset (``meta.json`` at the dataset root, written by our generators). Data sets that were not
written by us (the published 3D-LOTUS RLBench-18 folders) get a named preset (``rlbench18``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from harness.data.errors import DataError

META_FILENAME = "meta.json"


@dataclass
class DatasetMeta:
    """Facts about one dataset. Positions are metres in the world frame.

    ``workspace_bounds``: ((xmin, ymin, zmin), (xmax, ymax, zmax)) points outside are cropped.
    ``table_height``: z of the table top; points at or below ``table_height + table_margin`` are table.
    ``robot_base``: (x, y, z) of the robot base; the z-rotation augmentation turns about the vertical
    axis through it.
    ``robot_labels`` / ``gripper_labels``: semantic ids (the ``sem``/``mask`` values) of arm links to remove
    and of gripper parts to keep. ``robot_link_boxes``: prefixes of ``bbox_info`` keys used for box removal.
    ``cameras``: camera names in the order of the camera axis of image arrays.
    ``oracle_success``: per task, fraction of episodes whose extracted keyposes succeed when replayed.
    """

    source: str
    generator_version: str = "unknown"
    workspace_bounds: tuple[tuple[float, float, float], tuple[float, float, float]] = (
        (-1.0, -1.0, -1.0),
        (1.0, 1.0, 2.0),
    )
    table_height: float = 0.0
    table_margin: float = 0.0005
    robot_base: tuple[float, float, float] = (0.0, 0.0, 0.0)
    cameras: list[str] = field(default_factory=list)
    image_size: tuple[int, int] | None = None
    voxel_size: float = 0.01
    robot_labels: list[int] = field(default_factory=list)
    gripper_labels: list[int] = field(default_factory=list)
    robot_link_boxes: list[str] = field(default_factory=list)
    keypose_method: str = "unknown"
    splits: dict[str, list[int]] = field(default_factory=dict)
    oracle_success: dict[str, float] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, path: object = None) -> DatasetMeta:
        """Check ``d`` (a parsed meta.json) against this class's typed fields and build the metadata.

        Every problem is collected and raised in one ``DataError`` naming each key: unknown keys, missing
        required keys (``REQUIRED``: everything the transforms read), wrong types (no coercion: "0.01" is
        not a number, and neither is true), wrong shapes and impossible values (lo >= hi, voxel_size <= 0).
        """
        if not isinstance(d, dict):
            raise DataError(f"metadata must be a JSON object, got {type(d).__name__}", path)
        hints = typing.get_type_hints(cls)
        problems: dict[str, str] = {}
        unknown = sorted(set(d) - set(hints))
        if unknown:
            problems[",".join(unknown)] = (f"{', '.join(unknown)}: unknown metadata key"
                                           f"{'s' if len(unknown) > 1 else ''} {unknown}; expected a subset "
                                           f"of {sorted(hints)}")
        for name in REQUIRED:
            if name not in d:
                problems[name] = f"{name}: required but missing (the transforms read it; no default is assumed)"
        values = {}
        for name, value in d.items():
            if name not in hints:
                continue
            try:
                values[name] = _conform(value, hints[name], name)
                _check_value(name, values[name])
            except _SchemaError as e:
                problems[name] = str(e)
        if problems:
            listing = "; ".join(problems.values())
            raise DataError(f"metadata does not match the DatasetMeta schema ({len(problems)} problem"
                            f"{'s' if len(problems) > 1 else ''}): {listing}", path, ",".join(problems))
        return cls(**values)

    def save(self, root: str | os.PathLike) -> Path:
        """Write ``meta.json`` into ``root`` atomically; returns its path."""
        path = Path(root) / META_FILENAME
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> DatasetMeta:
        path = Path(path)
        if path.is_dir():
            path = path / META_FILENAME
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise DataError("dataset metadata file not found", path) from None
        except json.JSONDecodeError as e:
            raise DataError(f"metadata is not valid JSON: {e}", path) from None
        return cls.from_dict(d, path)


# Everything a transform or reader reads: a meta.json must state it (a silent default means another crop).
REQUIRED = ("source", "workspace_bounds", "table_height", "table_margin", "robot_base", "voxel_size",
            "robot_labels", "gripper_labels", "robot_link_boxes")


class _SchemaError(Exception):
    def __init__(self, key: str, problem: str):
        super().__init__(f"{key}: {problem}")


def _describe(value) -> str:
    return f"{value!r:.60} ({type(value).__name__})"


def _conform(value, hint, key: str):
    """``value`` checked against the type ``hint`` (float, int, str, dict, X | None, tuple[...], list[X],
    dict[K, V]) and converted (tuples for tuples, float for float); raises ``_SchemaError`` naming the
    sub-key (``workspace_bounds[1][2]``)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _conform(value, inner, key)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _SchemaError(key, f"must be a number, got {_describe(value)}")
        if not math.isfinite(value):
            raise _SchemaError(key, f"must be finite, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _SchemaError(key, f"must be an integer, got {_describe(value)}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise _SchemaError(key, f"must be a string, got {_describe(value)}")
        return value
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise _SchemaError(key, f"must be an object, got {_describe(value)}")
        if not args:
            return dict(value)
        return {_conform(k, args[0], f"{key} key {k!r}"): _conform(v, args[1], f"{key}[{k!r}]")
                for k, v in value.items()}
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _SchemaError(key, f"must be a list, got {_describe(value)}")
        if origin is list:
            return [_conform(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        if len(value) != len(args):
            raise _SchemaError(key, f"must have {len(args)} entries, got {len(value)}: {value!r:.80}")
        return tuple(_conform(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    raise TypeError(f"no schema rule for {hint!r} ({key})")  # a new field type: teach _conform


def _check_value(name: str, value) -> None:
    """Constraints beyond the type, on an already conformed ``value``."""
    if name == "workspace_bounds":
        lo, hi = value
        bad = [axis for axis, a, b in zip("xyz", lo, hi) if not a < b]
        if bad:
            raise _SchemaError("workspace_bounds", f"must be [[xmin, ymin, zmin], [xmax, ymax, zmax]] with "
                               f"min < max, but {', '.join(bad)} has min >= max: {[list(lo), list(hi)]}")
    elif name == "voxel_size" and not value > 0:
        raise _SchemaError("voxel_size", f"must be > 0 metres, got {value!r}")
    elif name == "table_margin" and value < 0:
        raise _SchemaError("table_margin", f"must be >= 0 metres, got {value!r}")
    elif name == "image_size" and value is not None and min(value) <= 0:
        raise _SchemaError("image_size", f"must be two positive integers [H, W], got {list(value)}")
    elif name == "source" and not value:
        raise _SchemaError("source", "must be a non-empty string")


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON through a temporary file and ``os.replace`` so a reader never sees half a file."""
    from harness.record import write_text_atomic

    write_text_atomic(Path(path), json.dumps(obj, indent=2, sort_keys=False) + "\n")


# The published 3D-LOTUS PerAct-18 data (../shared/reference/minidiffuser.md §3.2, §3.5): the workspace box
# of gen_simple_policy_data.py, TABLE_HEIGHT = 0.7505 m, and the official augmentation turns about the world
# z axis through the origin, so the rotation centre is the origin (not the Panda's physical base).
RLBENCH18 = DatasetMeta(
    source="rlbench",
    generator_version="3d-lotus keysteps_bbox_pcd",
    workspace_bounds=((-0.5, -1.0, 0.2), (1.5, 1.0, 2.0)),
    table_height=0.7505,
    table_margin=0.0,
    robot_base=(0.0, 0.0, 0.0),
    cameras=["left_shoulder", "right_shoulder", "wrist", "front"],
    image_size=None,
    voxel_size=0.01,
    # the key prefixes 3D-LOTUS's RobotBox reads: link0's visual box, links 1-7's respondable boxes
    robot_link_boxes=["Panda_link0_visual"] + [f"Panda_link{i}_respondable" for i in range(1, 8)],
    keypose_method="peract",
)

PRESETS: dict[str, DatasetMeta] = {"rlbench18": RLBENCH18}


def find_meta(path: str | os.PathLike, max_up: int = 3) -> Path | None:
    """Find ``meta.json`` in ``path`` or up to ``max_up`` parent folders (datasets nest split/format dirs)."""
    from harness.data.formats import find_upwards

    return find_upwards(path, (META_FILENAME,), max_up)


def resolve_meta(path: str | os.PathLike, preset: str | None = None) -> tuple[DatasetMeta, str]:
    """Metadata for the dataset at ``path`` and where it came from ("file:<path>" or "preset:<name>").

    A named ``preset`` wins (an explicit choice); otherwise a ``meta.json`` beside the data; otherwise
    ``rlbench18`` (the published 3D-LOTUS data ships no metadata file).
    """
    if preset is not None:
        if preset not in PRESETS:
            raise DataError(f"unknown metadata preset {preset!r}; choices: {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[preset]), f"preset:{preset}"
    found = find_meta(path)
    if found is not None:
        return DatasetMeta.load(found), f"file:{found}"
    return dataclasses.replace(RLBENCH18), "preset:rlbench18 (no meta.json found)"
