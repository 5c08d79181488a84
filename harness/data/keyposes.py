"""Keypose (keyframe) discovery from a recorded demonstration.

Two rules:
- ``peract_keyposes``: the PerAct heuristic shared by 3D Diffuser Actor and Mini-Diffuser (gripper toggles,
  arm stopped, last frame; ../shared/reference/rlbench_and_metaworld.md §1.4).
- ``gripper_stride_keyposes``: for continuous-servo experts (Meta-World) whose arm never stops: physical
  gripper-state changes plus a fixed stride plus the last frame (§3.2: the stopped-arm rule finds almost
  nothing there).
Both return sorted frame indices, excluding frame 0; callers prepend 0 as the 3D-LOTUS keystep script does.

``peract_keyposes`` has the published variants as switches (../shared/reference/rlbench_and_metaworld.md §1.4):
``rule="lotus"`` (default; 3D-LOTUS / Mini-Diffuser's ``rlbench_keystep_detection.py``, identical to 3D
Diffuser Actor's ``keypoint_discovery``): the gripper window ``i-2 .. i+1`` is clamped at frame 0.
``rule="peract"`` (PerAct's ``demo_loading_utils.py``): ``demo[i-1]`` and ``demo[i-2]`` are not clamped, so
at i = 0, 1 they read the LAST frames (Python's negative indexing) - the published behaviour, kept as is.
The two differ only when the gripper state of the first two frames differs from that of the last ones.
"""

from __future__ import annotations

import numpy as np

KEYPOSE_RULES = ("lotus", "peract")


def peract_keyposes(gripper_open: np.ndarray, joint_velocities: np.ndarray,
                    stopping_delta: float = 0.1, rule: str = "lotus") -> list[int]:
    """PerAct keyposes. ``gripper_open`` (T,), ``joint_velocities`` (T, n_joints); ``rule`` in
    ``KEYPOSE_RULES`` (module docstring)."""
    if rule not in KEYPOSE_RULES:
        raise ValueError(f"unknown keypose rule {rule!r}; choices: {list(KEYPOSE_RULES)}")
    gripper_open = np.asarray(gripper_open)
    joint_velocities = np.asarray(joint_velocities)
    n = len(gripper_open)
    if joint_velocities.shape[0] != n:
        raise ValueError(f"gripper_open has {n} frames but joint_velocities has {joint_velocities.shape[0]}")
    kps: list[int] = []
    prev = gripper_open[0]
    buf = 0
    for i in range(n):
        im1, im2 = (max(0, i - 1), max(0, i - 2)) if rule == "lotus" else (i - 1, i - 2)
        no_change = i < n - 2 and (gripper_open[i] == gripper_open[i + 1] == gripper_open[im1]
                                   == gripper_open[im2])
        stopped = (buf <= 0 and np.allclose(joint_velocities[i], 0, atol=stopping_delta)
                   and i != n - 2 and no_change)
        buf = 4 if stopped else buf - 1  # 4-step refractory period after a stop
        if i != 0 and (gripper_open[i] != prev or i == n - 1 or stopped):
            kps.append(i)
        prev = gripper_open[i]
    if len(kps) > 1 and kps[-1] - 1 == kps[-2]:
        kps.pop(-2)  # the near-duplicate just before the last frame
    return kps


def gripper_stride_keyposes(gripper_open: np.ndarray, stride: int) -> list[int]:
    """Frames where the physical gripper state changes, every ``stride``-th frame, and the last frame.

    ``gripper_open`` (T,) of 0/1 (or bool). A change is recorded at the first frame with the new state.
    Stride frames that fall within 2 frames of a gripper change are dropped, so the replayed keypose
    sequence does not stutter around a grasp.
    """
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    g = np.asarray(gripper_open).astype(bool)
    n = len(g)
    if n < 2:
        return [n - 1] if n == 1 and n - 1 > 0 else []
    changes = [i for i in range(1, n) if g[i] != g[i - 1]]
    strided = [i for i in range(stride, n - 1, stride) if all(abs(i - c) > 2 for c in changes)]
    return sorted(set(changes) | set(strided) | {n - 1})
