"""Oracle replay: can the extracted keyposes alone solve the episode?

A move-then-actuate controller, like RLBench's ``MoveArmThenGripper``: for each keypose after frame 0,
servo the hand toward the keypose xyz keeping the *previous* gripper state until within ``tolerance`` or
``move_steps`` steps, then, if the gripper state changes, command the new state for ``grip_steps`` steps
while holding position. The hand orientation is fixed in Meta-World, so the quaternion is ignored.
Success is ``info["success"]`` at any step, within the task's ``max_path_length`` (500) steps.
This is the ceiling a perfect keypose predictor reaches with this executor.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from harness.data.metaworld.scene import reset_to_seed


@dataclass(frozen=True)
class ServoConfig:
    """Executor settings. ``tolerance`` metres; ``gain`` converts position error (m) into metaworld's
    action units (1 unit = 1 cm of mocap motion per step), clipped to [-1, 1]."""

    tolerance: float = 0.005
    move_steps: int = 60
    grip_steps: int = 10
    gain: float = 10.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ReplayResult:
    """``success``; ``steps`` env steps used; ``success_step`` first successful step (or None);
    ``keyposes_reached`` how many keyposes the hand got within tolerance of before its step budget."""

    success: bool
    steps: int
    success_step: int | None
    keyposes_reached: int


def grip_command(open_state: float) -> float:
    """Metaworld grab effort for a gripper state: -1 opens fully, +1 closes."""
    return -1.0 if open_state >= 0.5 else 1.0


def replay_keyposes(env, seed: int, actions: np.ndarray, config: ServoConfig = ServoConfig()) -> ReplayResult:
    """Replay ``actions`` (K, 8) [xyz, quat xyzw, open] from the placement of ``seed``; row 0 is the start
    pose (its open state is the initial gripper command)."""
    actions = np.asarray(actions, dtype=np.float64)
    if actions.ndim != 2 or actions.shape[1] != 8 or len(actions) < 1:
        raise ValueError(f"actions has shape {actions.shape}, expected (K >= 1, 8)")
    obs = reset_to_seed(env, seed)
    limit = env.max_path_length
    steps, reached = 0, 0

    def step(target: np.ndarray, open_state: float):
        nonlocal obs, steps
        delta = np.clip(config.gain * (target - obs[:3]), -1.0, 1.0)
        obs, _, _, _, info = env.step(np.append(delta, grip_command(open_state)).astype(np.float32))
        steps += 1
        return bool(info["success"])

    prev_open = actions[0, 7]
    for k in range(1, len(actions)):
        target, new_open = actions[k, :3], actions[k, 7]
        for _ in range(config.move_steps):
            if np.linalg.norm(target - obs[:3]) < config.tolerance:
                break
            if steps >= limit:
                return ReplayResult(False, steps, None, reached)
            if step(target, prev_open):
                return ReplayResult(True, steps, steps, reached)
        reached += int(np.linalg.norm(target - obs[:3]) < config.tolerance)
        if new_open != prev_open:
            for _ in range(config.grip_steps):
                if steps >= limit:
                    return ReplayResult(False, steps, None, reached)
                if step(target, new_open):
                    return ReplayResult(True, steps, steps, reached)
        prev_open = new_open
    return ReplayResult(False, steps, None, reached)
