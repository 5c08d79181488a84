"""Train-time point-cloud transforms, each a small function of numpy arrays.

Benchmark constants (workspace, table height, robot base, labels) come from ``DatasetMeta``, never from
code. ``KeystepTransform`` chains them in the official order (../shared/reference/minidiffuser.md §3.5):
crop -> [voxelize] -> remove table -> remove robot -> exactly N points -> height feature -> z-rotation
-> jitter -> centering.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

# ---------------------------------------------------------------------------------------------- masks


def crop_to_workspace(points: np.ndarray, bounds) -> np.ndarray:
    """(N, 3) points -> (N,) bool, True strictly inside the box ((xmin, ymin, zmin), (xmax, ymax, zmax))."""
    lo, hi = np.asarray(bounds[0], dtype=np.float64), np.asarray(bounds[1], dtype=np.float64)
    return np.all((points > lo) & (points < hi), axis=1)


def remove_table(points: np.ndarray, table_height: float, margin: float = 0.0) -> np.ndarray:
    """(N, 3) -> (N,) bool keep mask: points strictly above ``table_height + margin``."""
    return points[:, 2] > table_height + margin


def remove_robot_by_labels(labels: np.ndarray, robot_labels, gripper_labels=()) -> np.ndarray:
    """(N,) semantic ids -> (N,) bool keep mask dropping arm links but keeping the gripper."""
    drop = np.isin(labels, np.asarray(list(robot_labels))) & ~np.isin(labels, np.asarray(list(gripper_labels)))
    return ~drop


def remove_robot_by_boxes(points: np.ndarray, bbox_info: dict, pose_info: dict, links) -> np.ndarray:
    """(N, 3) -> (N,) bool keep mask dropping points inside the oriented boxes of the named links.

    For link ``L``: ``bbox_info[f"{L}_bbox"]`` = [xmin, xmax, ymin, ymax, zmin, zmax] in the link frame
    (CoppeliaSim's bounding-box order) and ``pose_info[f"{L}_pose"]`` = [x, y, z, qx, qy, qz, qw]. A point
    is inside when its link-frame coordinates lie within the box. Name the gripper links out of ``links``
    to keep the gripper.
    """
    keep = np.ones(len(points), dtype=bool)
    for link in links:
        box, pose = bbox_info.get(f"{link}_bbox"), pose_info.get(f"{link}_pose")
        if box is None or pose is None:
            raise KeyError(f"robot link {link!r} has no '{link}_bbox'/'{link}_pose' entry "
                           f"(bbox keys: {sorted(bbox_info)[:8]}...)")
        box = np.asarray(box, dtype=np.float64)
        lo, hi = box[[0, 2, 4]], box[[1, 3, 5]]
        rot = Rotation.from_quat(np.asarray(pose[3:7], dtype=np.float64))
        local = rot.inv().apply(points - np.asarray(pose[:3], dtype=np.float64))
        keep &= ~np.all((local >= lo) & (local <= hi), axis=1)
    return keep


# ----------------------------------------------------------------------------------------- voxelize


@dataclass
class VoxelIndex:
    """Result of ``voxelize``: ``first`` (V,) index of each voxel's first point, ``inverse`` (N,) voxel of
    each point, ``mean_xyz`` (V, 3) float32 mean position of each voxel's points."""

    first: np.ndarray
    inverse: np.ndarray
    mean_xyz: np.ndarray


def voxelize(points: np.ndarray, voxel_size: float) -> VoxelIndex:
    """Voxel downsampling on a grid of ``voxel_size`` metres anchored at the world origin.

    Mean xyz per voxel and, through ``first``, the colour/label of the first point in input order (as
    Open3D's ``voxel_down_sample_and_trace`` used by 3D-LOTUS). Idempotent: a voxel's mean lies inside
    the voxel, so voxelizing the output again returns it unchanged.
    """
    if voxel_size <= 0:
        raise ValueError(f"voxel_size must be > 0, got {voxel_size}")
    if len(points) == 0:
        return VoxelIndex(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 3), np.float32))
    grid = np.floor(points.astype(np.float64) / voxel_size).astype(np.int64)
    _, first, inverse = np.unique(grid, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    counts = np.bincount(inverse, minlength=len(first)).astype(np.float64)
    sums = np.zeros((len(first), 3), np.float64)
    np.add.at(sums, inverse, points.astype(np.float64))
    mean = sums / counts[:, None]
    # float rounding can push a mean onto the upper face of its voxel; clamp it back inside
    cell = grid[first]
    lo = cell * voxel_size
    mean = np.clip(mean, lo, np.nextafter(lo + voxel_size, lo)).astype(np.float32)
    # rounding to float32 can push it out again (float64 input); step it back one float32 ulp at a time
    for _ in range(8):
        got = np.floor(mean.astype(np.float64) / voxel_size).astype(np.int64)
        if np.array_equal(got, cell):
            break
        mean = np.where(got < cell, np.nextafter(mean, np.float32(np.inf)), mean)
        mean = np.where(got > cell, np.nextafter(mean, np.float32(-np.inf)), mean)
    return VoxelIndex(first=first, inverse=inverse, mean_xyz=mean)


# ------------------------------------------------------------------------------------------ sampling


def sample_points(n: int, num_points: int, rng: np.random.Generator,
                  keep_fraction: tuple[float, float] = (1.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """Choose exactly ``num_points`` of ``n`` points.

    More than ``num_points``: uniformly without replacement. Otherwise keep a random fraction in
    ``keep_fraction`` of them (the official 95-100 % subset when (0.95, 1.0)) and pad with index 0.
    Returns (indices (num_points,) int64, valid (num_points,) bool); padded slots are invalid.
    """
    if n <= 0:
        raise ValueError("cannot sample from an empty point cloud (everything was cropped or removed)")
    if n > num_points:
        return np.sort(rng.choice(n, num_points, replace=False)), np.ones(num_points, bool)
    frac = rng.uniform(*keep_fraction) if keep_fraction[0] < keep_fraction[1] else keep_fraction[0]
    k = max(1, min(n, round(n * frac)))
    chosen = np.sort(rng.choice(n, k, replace=False)) if k < n else np.arange(n)
    idx = np.zeros(num_points, np.int64)
    idx[:k] = chosen
    valid = np.zeros(num_points, bool)
    valid[:k] = True
    return idx, valid


# ----------------------------------------------------------------------------------------- geometry


def rotate_z(points: np.ndarray, poses: np.ndarray, angle: float, center) -> tuple[np.ndarray, np.ndarray]:
    """Rotate about the vertical axis through ``center`` by ``angle`` radians.

    points (N, 3); poses (..., 8) [xyz, quat xyzw, open]: positions turn about the axis, orientations are
    left-multiplied by Rz(angle), the open flag is untouched. Returns (points, poses), new arrays.
    """
    rz = Rotation.from_euler("z", angle)
    c = np.asarray(center, dtype=np.float64)
    c = np.array([c[0], c[1], 0.0])
    new_points = (rz.apply(points.astype(np.float64) - c) + c).astype(np.float32)
    poses = np.asarray(poses, dtype=np.float64)
    flat = poses.reshape(-1, 8).copy()
    flat[:, :3] = rz.apply(flat[:, :3] - c) + c
    flat[:, 3:7] = (rz * Rotation.from_quat(flat[:, 3:7])).as_quat()
    return new_points, flat.reshape(poses.shape).astype(np.float32)


def jitter(points: np.ndarray, rng: np.random.Generator, low: float = 0.0, high: float = 0.002) -> np.ndarray:
    """Add per-coordinate noise U(low, high) to the points (official: U(0, 2 mm), non-zero mean)."""
    return (points + rng.uniform(low, high, size=points.shape)).astype(np.float32)


def center(points: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Offset (3,) = mean of the (valid) points; subtract it to centre, add it back to restore the world."""
    pts = points if valid is None else points[valid]
    return pts.mean(axis=0).astype(np.float32)


def height_above_table(points: np.ndarray, table_height: float) -> np.ndarray:
    """(N, 3) -> (N, 1) float32 z minus the table height."""
    return (points[:, 2:3] - table_height).astype(np.float32)


def rgb_to_unit(rgb: np.ndarray) -> np.ndarray:
    """uint8 colours in [0, 255] -> float32 in [-1, 1] (the official ``rgb / 255 * 2 - 1``)."""
    return np.asarray(rgb, dtype=np.float32) / 255.0 * 2.0 - 1.0


# ------------------------------------------------------------------------------------------ pipeline


@dataclass
class TransformConfig:
    """Switches of ``KeystepTransform``. ``remove_robot``: "auto" (labels if the keystep has them, else
    link boxes if the metadata names them, else nothing), "labels", "boxes" or "none". ``voxel_size``:
    None = the metadata's size for image-format data, no re-voxelization for already voxelized clouds."""

    num_points: int = 4000
    crop: bool = True
    remove_table: bool = True
    remove_robot: str = "auto"
    voxelize: bool = True
    voxel_size: float | None = None
    keep_fraction: tuple[float, float] = (0.95, 1.0)
    rotate_deg: float = 45.0
    jitter_m: float = 0.002
    center: bool = True
    train: bool = True
    images: bool = False  # also deliver images + point maps (image policies; needs "keysteps" data)


class KeystepTransform:
    """Turn a ``Keystep`` into fixed-size arrays for collation.

    Output dict: points (N, 3) float32 (centred if ``center``), colors (N, 3), height (N, 1), point_mask
    (N,) bool, pose (8,), target (8,), history (n_hist, 8) in the same frame as the points, offset (3,)
    (add it back for world coordinates), rotation (scalar, radians, 0 in eval) about the vertical axis through
    rotation_center (3,), and the keystep's text_tokens, instruction, task, variation, key. With ``images``:
    images (n_cam, 3, H, W) in [-1, 1] and point_maps (n_cam, 3, H, W) in the same (rotated, centred) frame
    as the points and poses.
    """

    def __init__(self, meta, config: TransformConfig | None = None):
        self.meta = meta
        self.cfg = config or TransformConfig()

    def __call__(self, ks, rng: np.random.Generator) -> dict:
        cfg, meta = self.cfg, self.meta
        if ks.points is None:
            raise ValueError(f"keystep {ks.key} has no point cloud")
        pts = np.asarray(ks.points, np.float32)
        cols = ks.colors if ks.colors is not None else np.zeros_like(pts)
        labels = ks.labels
        keep = np.isfinite(pts).all(axis=1)
        if cfg.crop:
            keep &= crop_to_workspace(pts, meta.workspace_bounds)
        pts, cols = pts[keep], cols[keep]
        labels = labels[keep] if labels is not None else None
        if cfg.voxelize and (ks.point_maps is not None or cfg.voxel_size is not None):
            vox = voxelize(pts, cfg.voxel_size or meta.voxel_size)
            pts, cols = vox.mean_xyz, cols[vox.first]
            labels = labels[vox.first] if labels is not None else None
        keep = np.ones(len(pts), bool)
        if cfg.remove_table:
            keep &= remove_table(pts, meta.table_height, meta.table_margin)
        mode = cfg.remove_robot
        if mode == "auto":
            mode = ("labels" if labels is not None and meta.robot_labels
                    else "boxes" if ks.bbox_info and meta.robot_link_boxes else "none")
        if mode == "labels":
            if labels is None:
                raise ValueError(f"remove_robot='labels' but keystep {ks.key} has no labels")
            keep &= remove_robot_by_labels(labels, meta.robot_labels, meta.gripper_labels)
        elif mode == "boxes":
            keep &= remove_robot_by_boxes(pts, ks.bbox_info or {}, ks.pose_info or {}, meta.robot_link_boxes)
        elif mode != "none":
            raise ValueError(f"unknown remove_robot mode {mode!r}; choices: auto, labels, boxes, none")
        pts, cols = pts[keep], cols[keep]
        if len(pts) == 0:
            raise ValueError(f"keystep {ks.key}: no points left after crop/table/robot removal")
        keep_fraction = cfg.keep_fraction if cfg.train else (1.0, 1.0)
        idx, valid = sample_points(len(pts), cfg.num_points, rng, keep_fraction)
        pts, cols = pts[idx], cols[idx]
        height = height_above_table(pts, meta.table_height)
        poses = np.concatenate([ks.pose[None], ks.target[None], ks.history], axis=0)
        angle = 0.0
        maps = None
        if cfg.images:
            if ks.images is None or ks.point_maps is None:
                raise ValueError(f"keystep {ks.key} has no camera images and point maps (use data.kind=keysteps)")
            maps = np.asarray(ks.point_maps, np.float32).transpose(0, 2, 3, 1)  # (n_cam, H, W, 3)
        if cfg.train and cfg.rotate_deg > 0:
            angle = float(np.deg2rad(rng.uniform(-cfg.rotate_deg, cfg.rotate_deg)))
            pts, poses = rotate_z(pts, poses, angle, meta.robot_base)
            if maps is not None:
                maps = rotate_z(maps.reshape(-1, 3), poses, angle, meta.robot_base)[0].reshape(maps.shape)
        if cfg.train and cfg.jitter_m > 0:
            pts = jitter(pts, rng, 0.0, cfg.jitter_m)
        offset = center(pts, valid) if cfg.center else np.zeros(3, np.float32)
        pts = pts - offset
        poses = poses.copy()
        poses[:, :3] -= offset
        pts[~valid] = 0.0
        cols = np.where(valid[:, None], cols, 0.0).astype(np.float32)
        height[~valid] = 0.0
        out = {
            "points": pts.astype(np.float32), "colors": cols, "height": height, "point_mask": valid,
            "pose": poses[0], "target": poses[1], "history": poses[2:], "offset": offset,
            "rotation": np.float32(angle), "text_tokens": ks.text_tokens, "instruction": ks.instruction,
            "task": ks.task, "variation": ks.variation, "key": ks.key,
            "rotation_center": np.asarray(meta.robot_base, np.float32),
        }
        if maps is not None:
            out["images"] = np.asarray(ks.images, np.float32)
            out["point_maps"] = (maps - offset).transpose(0, 3, 1, 2).astype(np.float32)
        return out
