"""Record one scripted-expert demonstration and pick its keyframes.

The rollout keeps, per frame, the full MuJoCo physics state (``mj_getState(mjSTATE_FULLPHYSICS)``: time,
qpos, qvel, actuator state, mocap pose, ...) so that keyframes can be rendered afterwards by restoring the
state, instead of rendering every step. Frame 0 is the state after reset; frame t the state after step t.
The demonstration runs until the first step with ``info["success"]`` (like RLBench demos) plus up to
``settle_steps`` (default 10) more expert steps while success holds, or until the task's ``max_path_length``
(then ``success`` is False and the caller moves on to the next seed). Why settle: the demo would end at
the first frame inside the success region, on its edge, so a replay that reaches the last keypose only to
within 5 mm often stays outside (reach: 0/10); with 10 settle steps the oracle on 10 demos per MT10 task
(stride 10, open threshold 0.8) went from 46/100 to 90/100.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from harness.data.keyposes import gripper_stride_keyposes
from harness.data.metaworld.scene import OPEN_THRESHOLD, hand_pose, is_open, reset_to_seed
from harness.data.metaworld.tasks import expert_policy


@dataclass
class Demo:
    """One expert rollout of T frames.

    ``states`` (T, S) float64 full physics states; ``poses`` (T, 8) float64 [hand xyz, hand quat xyzw,
    physical open]; ``finger_gap`` (T,) obs[3] (normalised finger separation); ``commands`` (T - 1, 4) the
    expert's actions; ``success`` whether info["success"] was reached (at the last frame).
    """

    task: str
    seed: int
    states: np.ndarray
    poses: np.ndarray
    finger_gap: np.ndarray
    commands: np.ndarray
    success: bool

    def __len__(self) -> int:
        return int(self.states.shape[0])

    @property
    def gripper_open(self) -> np.ndarray:
        """(T,) float64 physical gripper state, 1.0 open, 0.0 closed."""
        return self.poses[:, 7]

    def keyframes(self, stride: int) -> list[int]:
        """Frame 0 + ``gripper_stride_keyposes(physical open, stride)``: sorted, unique, last frame last."""
        return [0] + gripper_stride_keyposes(self.gripper_open, stride)


def frame_pose(env, obs: np.ndarray, threshold: float) -> np.ndarray:
    """(8,) [hand xyz, tool quat xyzw, physical open] now: the pose layout of the recorded demos, and of the
    history closed-loop evaluation feeds the policy."""
    xyz, quat = hand_pose(env)
    return np.concatenate([xyz, quat, [is_open(obs, threshold)]])


def record_expert(env, task: str, seed: int, max_steps: int | None = None,
                  open_threshold: float = OPEN_THRESHOLD, settle_steps: int = 10) -> Demo:
    """Run ``task``'s scripted expert from the placement of ``seed`` until success or ``max_steps``
    (default and upper bound: the env's ``max_path_length``, 500), then up to ``settle_steps`` more steps
    while ``info["success"]`` stays true (so the last frame is not on the edge of the success region)."""
    import mujoco

    model, data = env.model, env.data
    spec = mujoco.mjtState.mjSTATE_FULLPHYSICS
    size = mujoco.mj_stateSize(model, spec)
    policy = expert_policy(task)
    limit = min(int(max_steps or env.max_path_length), env.max_path_length)
    states, poses, gaps, commands = [], [], [], []

    def keep(obs: np.ndarray, action: np.ndarray | None) -> None:
        state = np.empty(size, dtype=np.float64)
        mujoco.mj_getState(model, data, state, spec)
        states.append(state)
        poses.append(frame_pose(env, obs, open_threshold))
        gaps.append(float(obs[3]))
        if action is not None:
            commands.append(action)

    obs = reset_to_seed(env, seed)
    keep(obs, None)
    success = False
    with warnings.catch_warnings():
        # The experts' proportional gains trip metaworld's own "Constant(s) may be too high" warning.
        warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high")
        while env.curr_path_length < limit:
            action = np.asarray(policy.get_action(obs), dtype=np.float32)
            obs, _, _, _, info = env.step(action)
            keep(obs, action)
            if info["success"]:
                success = True
                break
        for _ in range(settle_steps if success else 0):
            if env.curr_path_length >= limit:
                break
            action = np.asarray(policy.get_action(obs), dtype=np.float32)
            next_obs, _, _, _, info = env.step(action)
            if not info["success"]:
                break  # this step is not recorded: the demo ends on a successful frame
            obs = next_obs
            keep(obs, action)
    return Demo(task=task, seed=int(seed), states=np.stack(states), poses=np.stack(poses),
                finger_gap=np.asarray(gaps, dtype=np.float64),
                commands=np.stack(commands) if commands else np.zeros((0, 4), np.float32), success=success)


def restore_state(env, state: np.ndarray) -> None:
    """Put ``env.data`` back into a recorded full physics state and recompute its kinematics."""
    import mujoco

    mujoco.mj_setState(env.model, env.data, np.asarray(state, dtype=np.float64),
                       mujoco.mjtState.mjSTATE_FULLPHYSICS)
    mujoco.mj_forward(env.model, env.data)
