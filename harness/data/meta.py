"""Per-dataset metadata: everything a transform needs that differs between benchmarks.

Transforms hold no benchmark constants in code; they read them from the ``DatasetMeta`` that travels with
the dataset (``meta.json`` at the dataset root, written by our generators). Data sets that were not
written by us (the published 3D-LOTUS RLBench-18 folders) get a named preset (``rlbench18``).
"""

from __future__ import annotations

import dataclasses
import json
import os
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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DataError(f"unknown metadata keys {unknown}; expected a subset of {sorted(known)}", path)
        if "source" not in d:
            raise DataError("metadata has no 'source' key", path, "source")
        d = dict(d)
        if "workspace_bounds" in d:
            lo, hi = d["workspace_bounds"]
            d["workspace_bounds"] = (tuple(float(v) for v in lo), tuple(float(v) for v in hi))
        if "robot_base" in d:
            d["robot_base"] = tuple(float(v) for v in d["robot_base"])
        if d.get("image_size") is not None:
            d["image_size"] = tuple(int(v) for v in d["image_size"])
        return cls(**d)

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
    p = Path(path).resolve()
    for _ in range(max_up + 1):
        if (p / META_FILENAME).is_file():
            return p / META_FILENAME
        if p.parent == p:
            break
        p = p.parent
    return None


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
