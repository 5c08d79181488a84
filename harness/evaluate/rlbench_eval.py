"""Closed-loop RLBench evaluation (optional extra: CoppeliaSim 4.1, PyRep, the PerAct fork of RLBench).

Follows the official evaluators (../shared/reference/rlbench_and_metaworld.md §1.5): four cameras
(front, left_shoulder, right_shoulder, wrist) at 256 px with world-frame point clouds,
``MoveArmThenGripper(EndEffectorPoseViaPlanning(collision_checking=False), Discrete())``, the PerAct fork's
9-element action ``[x, y, z, qx, qy, qz, qw, gripper, ignore_collisions=1]``, ``set_variation`` before
``reset_to_demo`` on the stored test episodes, at most 25 keyposes, and the official ``Mover``: the arm moves
first with the PREVIOUS gripper state, up to ``max_tries`` times until the tip is within ``tolerance`` of
the target (or the task succeeds), then the same pose is sent with the new gripper state.

Outcomes (harness/evaluate/closed_loop.py): ``IKError``, ``ConfigurationPathError`` and
``InvalidActionError`` are planning failures of the predicted pose -> ``unreachable`` (the episode ends,
as Mini-Diffuser's evaluator does; ``continue_after_planning_error`` re-samples instead, as 3DDA's does,
and the episode then ends as a policy failure unless it succeeds); any other simulator exception ->
``sim_error``; 25 keyposes without reward 1 -> ``policy_failure``.

``results.jsonl`` holds one line per (task, variation) like the official evaluator:
{checkpoint, task, variation, num_demos, sr}, and ``summary_by_task`` the demo-weighted success per task.
The stepping, retry and outcome logic is exercised in the tests against a stand-in task object; a real
test runs only where ``rlbench`` imports.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness.evaluate.closed_loop import EpisodeResult

CAMERAS = ("front", "left_shoulder", "right_shoulder", "wrist")
INSTALL_HINT = ("RLBench evaluation needs CoppeliaSim 4.1.0, PyRep and the PerAct fork of RLBench "
                "(README 'RLBench (optional extra)'); none of them is importable here")


@dataclass
class RLBenchEvalConfig:
    """``max_keyposes`` (official: 25), ``max_tries`` of the arm move (3DDA: 2), ``tolerance`` metres,
    ``cameras`` and ``image_size`` of the observation, ``headless``."""

    tasks: list[str] = field(default_factory=list)
    episodes: int = 25
    max_keyposes: int = 25
    max_tries: int = 2
    tolerance: float = 0.005
    continue_after_planning_error: bool = False
    cameras: tuple[str, ...] = CAMERAS
    image_size: int = 256
    headless: bool = True


def planning_errors() -> tuple[type, ...]:
    """The exception classes that mean "this pose cannot be planned to" (imported from the simulator)."""
    from pyrep.errors import ConfigurationPathError, IKError
    from rlbench.backend.exceptions import InvalidActionError

    return IKError, ConfigurationPathError, InvalidActionError


@dataclass
class RLBenchFrame:
    """The cameras of one observation in the dataset's layout: rgb (n_cam, H, W, 3) uint8, pc (..., 3)."""

    rgb: np.ndarray
    pc: np.ndarray
    depth: np.ndarray | None = None
    mask: np.ndarray | None = None


def observation_frame(obs, cameras: tuple[str, ...]) -> RLBenchFrame:
    """An RLBench ``Observation`` -> the frame ``LiveObservation`` turns into a batch."""
    rgb = np.stack([np.asarray(getattr(obs, f"{c}_rgb"), dtype=np.uint8) for c in cameras])
    pc = np.stack([np.asarray(getattr(obs, f"{c}_point_cloud"), dtype=np.float32) for c in cameras])
    return RLBenchFrame(rgb=rgb, pc=pc)


def observation_pose(obs) -> np.ndarray:
    """[x, y, z, qx, qy, qz, qw, open] of the gripper (RLBench's xyzw ``gripper_pose``)."""
    return np.concatenate([np.asarray(obs.gripper_pose, dtype=np.float64), [float(obs.gripper_open)]])


def move(task, action: np.ndarray, last_gripper: float, cfg: RLBenchEvalConfig):
    """The official Mover: arm first with ``last_gripper``, retried up to ``max_tries`` times until within
    ``tolerance`` or success; then the new gripper state if it changed. Returns (obs, reward, terminate).
    Exceptions propagate (the caller maps them)."""
    target = np.asarray(action[:3], dtype=np.float64)
    new_gripper = float(action[7] > 0.5)
    obs, reward, terminate = None, 0.0, False
    for _ in range(cfg.max_tries):
        obs, reward, terminate = task.step(np.concatenate([action[:7], [last_gripper, 1.0]]))
        if reward == 1 or np.linalg.norm(np.asarray(obs.gripper_pose[:3]) - target) < cfg.tolerance:
            break
    if reward != 1 and new_gripper != last_gripper:
        obs, reward, terminate = task.step(np.concatenate([action[:7], [new_gripper, 1.0]]))
    return obs, reward, terminate


def run_episode(task, demo, variation: int, observe, predict, task_name: str, episode: int,
                cfg: RLBenchEvalConfig, errors: tuple[type, ...], policy_name: str = "") -> EpisodeResult:
    """One RLBench episode on a stored test demo. ``observe(frame, poses, task_name) -> batch``;
    ``predict(batch, seed, k) -> (8,)`` [xyz, quat xyzw, open logit] world frame."""
    t0 = time.perf_counter()
    keyposes, planning_failures = 0, 0

    def result(outcome: str, error: str | None = None) -> EpisodeResult:
        return EpisodeResult(task_name, episode, outcome, keyposes, keyposes, time.perf_counter() - t0, error,
                             policy=policy_name)

    try:
        task.set_variation(variation)  # before reset_to_demo: the PerAct fork does not set it itself
        _, obs = task.reset_to_demo(demo)
    except Exception as e:  # noqa: BLE001 - a simulator failure is an outcome
        return result("sim_error", f"reset: {type(e).__name__}: {e}")
    poses = [observation_pose(obs)]
    last_gripper = float(obs.gripper_open)
    for _ in range(cfg.max_keyposes):
        action = np.asarray(predict(observe(observation_frame(obs, cfg.cameras), poses, task_name), episode,
                                    keyposes), dtype=np.float64)
        keyposes += 1
        if action.shape != (8,) or not np.isfinite(action).all():
            return result("policy_failure", f"non-finite or malformed action {action.tolist()}")
        action[3:7] /= max(np.linalg.norm(action[3:7]), 1e-12)  # RLBench asserts a unit quaternion
        action[7] = 1.0 if action[7] > 0 else 0.0  # open logit -> Discrete's 0/1
        try:
            obs, reward, _ = move(task, action, last_gripper, cfg)
        except errors as e:
            planning_failures += 1
            if not cfg.continue_after_planning_error:
                return result("unreachable", f"{type(e).__name__}: {e}")
            continue
        except Exception as e:  # noqa: BLE001
            return result("sim_error", f"step: {type(e).__name__}: {e}")
        if reward == 1:
            return result("success")
        last_gripper = action[7]
        poses.append(observation_pose(obs))
    extra = f"; {planning_failures} planning failures" if planning_failures else ""
    return result("policy_failure", f"keypose budget ({cfg.max_keyposes}) spent{extra}")


def write_results(path: Path, checkpoint: str, results: list[EpisodeResult], variations: dict) -> dict:
    """results.jsonl (one line per task and variation: {checkpoint, task, variation, num_demos, sr}, sr over
    policy-attributable episodes as the official evaluator divides successes by valid demos) and the
    demo-weighted success per task, returned."""
    from harness.evaluate.closed_loop import POLICY_ATTRIBUTABLE

    lines, by_task = [], {}
    for (task, var), eps in sorted(variations.items()):
        counted = [results[i] for i in eps if results[i].outcome in POLICY_ATTRIBUTABLE]
        n = len(counted)
        sr = sum(r.outcome == "success" for r in counted) / n if n else None
        lines.append({"checkpoint": checkpoint, "task": task, "variation": var, "num_demos": n, "sr": sr})
        t = by_task.setdefault(task, [0, 0])
        t[0] += sum(r.outcome == "success" for r in counted)
        t[1] += n
    Path(path).write_text("".join(json.dumps(x) + "\n" for x in lines))
    return {task: (s / n if n else None) for task, (s, n) in by_task.items()}


def launch_environment(data_root: str, cfg: RLBenchEvalConfig):
    """A launched RLBench ``Environment`` with the official observation and action configuration."""
    try:
        from pyrep.const import RenderMode
        from rlbench.action_modes.action_mode import MoveArmThenGripper
        from rlbench.action_modes.arm_action_modes import EndEffectorPoseViaPlanning
        from rlbench.action_modes.gripper_action_modes import Discrete
        from rlbench.environment import Environment
        from rlbench.observation_config import CameraConfig, ObservationConfig
    except ImportError as e:
        raise RuntimeError(f"{INSTALL_HINT} ({e})") from None
    on = CameraConfig(rgb=True, depth=False, point_cloud=True, mask=False,
                      image_size=(cfg.image_size, cfg.image_size), render_mode=RenderMode.OPENGL)
    off = CameraConfig()
    off.set_all(False)
    cams = {f"{c}_camera": (on if c in cfg.cameras else off)
            for c in ("front", "left_shoulder", "right_shoulder", "wrist", "overhead")}
    obs_cfg = ObservationConfig(**cams, joint_velocities=True, joint_positions=False, joint_forces=False,
                                gripper_open=True, gripper_pose=True, gripper_matrix=True,
                                gripper_joint_positions=True, task_low_dim_state=False)
    env = Environment(MoveArmThenGripper(EndEffectorPoseViaPlanning(collision_checking=False), Discrete()),
                      dataset_root=str(data_root), obs_config=obs_cfg, headless=cfg.headless)
    env.launch()
    return env
