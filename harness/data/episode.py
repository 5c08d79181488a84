"""The keystep contract (../shared/DESIGN.md "Contracts").

An ``Episode`` holds the observations recorded at an episode's keyframes and the gripper action at each of
them. A ``Keystep`` is one training example: the observation at keyframe ``t`` and, as target, the action
at keyframe ``t + 1``. Quaternions are xyzw, positions metres in the world frame.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from harness.data.transforms import rgb_to_unit

ACTION_DIM = 8  # [x, y, z, qx, qy, qz, qw, open]


@dataclass
class Keystep:
    """One training example. Every array is numpy; optional fields are None when the format lacks them.

    points (N, 3) float32 world metres; colors (N, 3) float32 in [-1, 1]; labels (N,) int semantic ids;
    images (n_cam, 3, H, W) float32 in [-1, 1]; point_maps (n_cam, 3, H, W) float32 world metres;
    text_tokens (L, D) float32; pose, target (8,) float32; history (n_hist, 8) float32 (oldest first,
    the current pose last).
    """

    task: str
    variation: int
    episode: str
    keystep: int
    pose: np.ndarray
    target: np.ndarray
    history: np.ndarray
    instruction: str = ""
    text_tokens: np.ndarray | None = None
    points: np.ndarray | None = None
    colors: np.ndarray | None = None
    labels: np.ndarray | None = None
    images: np.ndarray | None = None
    point_maps: np.ndarray | None = None
    bbox_info: dict[str, np.ndarray] | None = None
    pose_info: dict[str, np.ndarray] | None = None

    @property
    def taskvar(self) -> str:
        return f"{self.task}+{self.variation}"

    @property
    def key(self) -> str:
        return f"{self.taskvar}-{self.episode}-t{self.keystep}"


@dataclass
class Episode:
    """Observations at the keyframes of one demonstration (T keyframes, frame 0 included).

    ``actions`` (T, 8) float32 is the gripper pose + open state at each keyframe. Observations come as
    point clouds (``xyz``/``rgb``/``sem``: lists of T arrays (N_t, 3) float32, (N_t, 3) uint8, (N_t,)) or
    as camera images (``rgb_images`` (T, n_cam, H, W, 3) uint8, ``point_maps`` (T, n_cam, H, W, 3) float32
    world xyz, optional ``depth`` and ``mask``), or both. ``bbox_info``/``pose_info`` map robot link names
    to (T, 6) boxes and (T, 7) poses.
    """

    task: str
    variation: int
    episode: str
    actions: np.ndarray
    key_frameids: list[int]
    xyz: list[np.ndarray] | None = None
    rgb: list[np.ndarray] | None = None
    sem: list[np.ndarray] | None = None
    rgb_images: np.ndarray | None = None
    point_maps: np.ndarray | None = None
    depth: np.ndarray | None = None
    mask: np.ndarray | None = None
    bbox_info: dict[str, np.ndarray] | None = None
    pose_info: dict[str, np.ndarray] | None = None
    extra: dict = field(default_factory=dict)

    @property
    def taskvar(self) -> str:
        return f"{self.task}+{self.variation}"

    def __len__(self) -> int:
        return int(self.actions.shape[0])

    @property
    def num_keysteps(self) -> int:
        """Training examples in this episode: every keyframe but the last has a next action."""
        return max(len(self) - 1, 0)

    def keystep(self, t: int, n_hist: int = 1, instruction: str = "",
                text_tokens: np.ndarray | None = None) -> Keystep:
        """The example at keyframe ``t``: observation ``t``, target ``actions[t + 1]``."""
        if not 0 <= t < self.num_keysteps:
            raise IndexError(f"keystep {t} out of range for {self.taskvar}/{self.episode} "
                             f"with {self.num_keysteps} keysteps")
        hist_idx = [max(0, t - i) for i in range(n_hist - 1, -1, -1)]
        ks = Keystep(
            task=self.task, variation=self.variation, episode=self.episode, keystep=t,
            pose=self.actions[t].astype(np.float32), target=self.actions[t + 1].astype(np.float32),
            history=self.actions[hist_idx].astype(np.float32), instruction=instruction,
            text_tokens=text_tokens,
        )
        if self.xyz is not None:
            ks.points = np.asarray(self.xyz[t], dtype=np.float32)
            if self.rgb is not None:
                ks.colors = rgb_to_unit(self.rgb[t])
            if self.sem is not None:
                ks.labels = np.asarray(self.sem[t])
        if self.rgb_images is not None:
            ks.images = rgb_to_unit(self.rgb_images[t]).transpose(0, 3, 1, 2)
        if self.point_maps is not None:
            ks.point_maps = np.asarray(self.point_maps[t], dtype=np.float32).transpose(0, 3, 1, 2)
            if ks.points is None:  # keysteps-format episodes: flatten the cameras' point maps
                ks.points = np.asarray(self.point_maps[t], dtype=np.float32).reshape(-1, 3)
                if self.rgb_images is not None:
                    ks.colors = rgb_to_unit(self.rgb_images[t].reshape(-1, 3))
                if self.mask is not None:
                    ks.labels = np.asarray(self.mask[t]).reshape(-1)
        if self.bbox_info:
            ks.bbox_info = {k: np.asarray(v[t]) for k, v in self.bbox_info.items()}
        if self.pose_info:
            ks.pose_info = {k: np.asarray(v[t]) for k, v in self.pose_info.items()}
        return ks

    def keysteps(self, n_hist: int = 1) -> Iterator[Keystep]:
        for t in range(self.num_keysteps):
            yield self.keystep(t, n_hist=n_hist)

