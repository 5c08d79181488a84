"""Plausibility checks on a decoded ``Episode``: values that load fine but break training later.

Readers already check shapes and NaN/inf. These checks need the dataset's metadata (workspace, table,
robot labels) or the transform settings, so they run where the dataset indexes its episodes (every
episode is read once at start-up) and in ``mdh data inspect``:

- at least 2 keyframes (a keystep pairs observation t with the action at keyframe t + 1);
- actions: finite; quaternion (xyzw) norm within ``QUAT_TOL`` of 1; position inside the workspace box
  grown by ``POSITION_MARGIN`` metres; gripper open value in [0, 1] within ``GRIPPER_TOL``;
- every observation (keyframes 0 .. T-2) keeps at least one point after the workspace crop, the table
  removal and, when the data carry labels, the label-based robot removal. This is a count, not the
  transform: voxelization and box-based robot removal are skipped (the box test costs a rotation per
  link and point), so an observation emptied only by those still fails in the transform, which the
  dataset reports as a ``DataError`` naming the file, episode and keystep.

Every failure is a ``DataError(problem, path, key)`` with the episode as key and the keyframe in the text.
"""

from __future__ import annotations

import numpy as np

from harness.data.episode import Episode
from harness.data.errors import DataError
from harness.data.transforms import crop_to_workspace, remove_robot_by_labels, remove_table

QUAT_TOL = 1e-2  # |norm - 1| above this is not a rotation that was stored as float32
GRIPPER_TOL = 1e-2
POSITION_MARGIN = 1.0  # metres around the workspace box; a gripper pose beyond that is a unit or sign bug


def _fmt(v) -> str:
    return np.array2string(np.asarray(v, dtype=np.float64), precision=4, separator=", ", max_line_width=200)


def _first_bad(bad: np.ndarray) -> tuple[int, str]:
    rows = np.flatnonzero(bad)
    more = f" (and {len(rows) - 1} more rows)" if len(rows) > 1 else ""
    return int(rows[0]), more


def check_actions(actions: np.ndarray, meta, path: object = None, key: object = None) -> None:
    """``actions`` (T, 8) [xyz, quat xyzw, open]; raises ``DataError`` at the first implausible row."""
    a = np.asarray(actions, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 8:
        raise DataError(f"'action' has shape {a.shape}, expected (T, 8) [xyz, quat xyzw, open]", path, key)
    finite = np.isfinite(a).all(axis=1)
    if not finite.all():
        i, more = _first_bad(~finite)
        raise DataError(f"'action'[{i}] (keyframe {i}) is not finite: {_fmt(a[i])}{more}", path, key)
    lo = np.asarray(meta.workspace_bounds[0], np.float64) - POSITION_MARGIN
    hi = np.asarray(meta.workspace_bounds[1], np.float64) + POSITION_MARGIN
    outside = ~np.all((a[:, :3] >= lo) & (a[:, :3] <= hi), axis=1)
    if outside.any():
        i, more = _first_bad(outside)
        raise DataError(f"'action'[{i}] (keyframe {i}) position {_fmt(a[i, :3])} m is outside the workspace "
                        f"{_fmt(meta.workspace_bounds[0])}..{_fmt(meta.workspace_bounds[1])} grown by "
                        f"{POSITION_MARGIN:g} m{more}", path, key)
    norm = np.linalg.norm(a[:, 3:7], axis=1)
    not_unit = np.abs(norm - 1.0) > QUAT_TOL
    if not_unit.any():
        i, more = _first_bad(not_unit)
        raise DataError(f"'action'[{i}] (keyframe {i}) quaternion xyzw {_fmt(a[i, 3:7])} has norm "
                        f"{norm[i]:.4g}, expected a unit quaternion (|norm - 1| <= {QUAT_TOL:g}){more}",
                        path, key)
    grip = a[:, 7]
    bad_grip = (grip < -GRIPPER_TOL) | (grip > 1.0 + GRIPPER_TOL)
    if bad_grip.any():
        i, more = _first_bad(bad_grip)
        raise DataError(f"'action'[{i}] (keyframe {i}) gripper open value {grip[i]:.6g} is outside [0, 1]"
                        f"{more}", path, key)


def _observation(ep: Episode, t: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(points (N, 3), labels (N,) or None) of keyframe ``t`` as ``Episode.keystep`` builds them."""
    if ep.xyz is not None:
        return np.asarray(ep.xyz[t]), (np.asarray(ep.sem[t]) if ep.sem is not None else None)
    if ep.point_maps is not None:
        labels = np.asarray(ep.mask[t]).reshape(-1) if ep.mask is not None else None
        return np.asarray(ep.point_maps[t]).reshape(-1, 3), labels
    return np.zeros((0, 3), np.float32), None


def check_observations(ep: Episode, meta, cfg=None, path: object = None, key: object = None) -> None:
    """Every observation keyframe (0 .. T-2) keeps a point after crop/table/label removal.

    ``cfg``: the dataset's ``TransformConfig`` (its ``crop``, ``remove_table``, ``remove_robot`` switches
    apply); None (raw keysteps, nothing removed): the cloud must hold a finite point.
    """
    for t in range(ep.num_keysteps):
        pts, labels = _observation(ep, t)
        keep = np.isfinite(pts).all(axis=1)
        steps = []
        if cfg is not None and cfg.crop:
            keep &= crop_to_workspace(pts, meta.workspace_bounds)
            steps.append(f"the workspace crop {_fmt(meta.workspace_bounds[0])}..{_fmt(meta.workspace_bounds[1])}")
        if cfg is not None and cfg.remove_table:
            keep &= remove_table(pts, meta.table_height, meta.table_margin)
            steps.append(f"the table removal (table at {meta.table_height:g} m)")
        if (cfg is not None and cfg.remove_robot in ("auto", "labels") and labels is not None
                and meta.robot_labels):
            keep &= remove_robot_by_labels(labels, meta.robot_labels, meta.gripper_labels)
            steps.append("the robot removal by labels")
        if not keep.any():
            after = f" after {', '.join(steps)}" if steps else ""
            raise DataError(f"keystep {t} (keyframe {t}, task-variation {ep.taskvar}): the point cloud is "
                            f"empty{after} ({len(pts)} points before)", path, key)


def check_length(ep: Episode, path: object = None, key: object = None) -> None:
    """An episode needs 2 keyframes for one keystep; a shorter one raises ``DataError``."""
    if len(ep) < 2:
        raise DataError(f"episode has {len(ep)} keyframe(s), so no keystep: a keystep pairs the observation "
                        "at keyframe t with the action at keyframe t + 1 (at least 2 needed)", path, key)


def check_episode(ep: Episode, meta, cfg=None, path: object = None, key: object = None) -> None:
    """All checks of this module on one episode (see the module docstring); raises ``DataError``."""
    check_length(ep, path, key)
    check_actions(ep.actions, meta, path, key)
    check_observations(ep, meta, cfg, path, key)
