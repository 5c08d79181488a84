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


class KeyposeExecutor:
    """The move-then-actuate executor, one keypose at a time (the oracle replay and closed-loop evaluation
    drive the hand through this same object, so their successes are comparable).

    ``execute(target, new_open)`` returns "success" (the task reported success), "limit" (the episode's
    ``max_path_length`` env steps are spent) or "done" (the keypose is executed: reached, or its
    ``move_steps`` budget spent). ``obs`` is the latest observation, ``steps`` the env steps used,
    ``reached`` the keyposes the hand got within tolerance of, ``last_reached`` whether the latest did.
    """

    def __init__(self, env, obs: np.ndarray, config: ServoConfig = ServoConfig(), open_state: float = 1.0,
                 on_step=None):
        """``on_step()``: called after every env step (e.g. a video recorder)."""
        self.env, self.obs, self.config, self.on_step = env, obs, config, on_step
        self.prev_open = float(open_state)
        self.limit = env.max_path_length
        self.steps, self.reached, self.success_step = 0, 0, None
        self.last_reached = False

    def _step(self, target: np.ndarray, open_state: float) -> bool:
        delta = np.clip(self.config.gain * (target - self.obs[:3]), -1.0, 1.0)
        self.obs, _, _, _, info = self.env.step(np.append(delta, grip_command(open_state)).astype(np.float32))
        self.steps += 1
        if self.on_step is not None:
            self.on_step()
        if info["success"]:
            self.success_step = self.steps
        return bool(info["success"])

    def execute(self, target: np.ndarray, new_open: float) -> str:
        target = np.asarray(target, dtype=np.float64)
        cfg = self.config
        for _ in range(cfg.move_steps):
            if np.linalg.norm(target - self.obs[:3]) < cfg.tolerance:
                break
            if self.steps >= self.limit:
                return "limit"
            if self._step(target, self.prev_open):
                return "success"
        self.last_reached = bool(np.linalg.norm(target - self.obs[:3]) < cfg.tolerance)
        self.reached += int(self.last_reached)
        if new_open != self.prev_open:
            for _ in range(cfg.grip_steps):
                if self.steps >= self.limit:
                    return "limit"
                if self._step(target, new_open):
                    return "success"
        self.prev_open = float(new_open)
        return "done"


def replay_keyposes(env, seed: int, actions: np.ndarray, config: ServoConfig = ServoConfig()) -> ReplayResult:
    """Replay ``actions`` (K, 8) [xyz, quat xyzw, open] from the placement of ``seed``; row 0 is the start
    pose (its open state is the initial gripper command)."""
    actions = np.asarray(actions, dtype=np.float64)
    if actions.ndim != 2 or actions.shape[1] != 8 or len(actions) < 1:
        raise ValueError(f"actions has shape {actions.shape}, expected (K >= 1, 8)")
    ex = KeyposeExecutor(env, reset_to_seed(env, seed), config, open_state=actions[0, 7])
    for k in range(1, len(actions)):
        status = ex.execute(actions[k, :3], actions[k, 7])
        if status == "success":
            return ReplayResult(True, ex.steps, ex.steps, ex.reached)
        if status == "limit":
            return ReplayResult(False, ex.steps, None, ex.reached)
    return ReplayResult(False, ex.steps, None, ex.reached)
