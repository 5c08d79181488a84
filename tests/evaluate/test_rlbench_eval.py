"""RLBench closed-loop logic (harness/evaluate/rlbench_eval.py) against a STAND-IN task object with the
methods the evaluator calls (set_variation, reset_to_demo, step) - not RLBench: the official Mover's
retries and gripper order, the 9-element action, outcome mapping of planning and simulator errors, the
keypose budget and results.jsonl. A real episode runs only where ``rlbench`` imports (marker rlbench)."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from harness.evaluate.closed_loop import EpisodeResult
from harness.evaluate.rlbench_eval import RLBenchEvalConfig, move, run_episode, write_results


class StandInIKError(Exception):
    """Stands in for pyrep.errors.IKError."""


class StandInTask:
    """Stand-in for an RLBench TaskEnvironment: each step moves the tip ``reach`` of the way to the target;
    reward 1 when the gripper closes within 1 cm of ``goal``. Records every action sent."""

    def __init__(self, goal=(0.3, 0.0, 1.0), reach=1.0, raise_at: int | None = None, exc=StandInIKError):
        self.goal, self.reach, self.raise_at, self.exc = np.array(goal), reach, raise_at, exc
        self.actions, self.variation = [], None
        self.tip = np.array([0.0, 0.0, 1.2])
        self.open = 1.0

    def _obs(self):
        return types.SimpleNamespace(
            gripper_pose=np.concatenate([self.tip, [0, 0, 0, 1]]), gripper_open=self.open,
            **{f"{c}_rgb": np.zeros((8, 8, 3), np.uint8) for c in ("front", "left_shoulder", "right_shoulder",
                                                                    "wrist")},
            **{f"{c}_point_cloud": np.zeros((8, 8, 3), np.float32) for c in ("front", "left_shoulder",
                                                                             "right_shoulder", "wrist")})

    def set_variation(self, v):
        self.variation = v

    def reset_to_demo(self, demo):
        assert self.variation is not None, "set_variation must come before reset_to_demo"
        return ["descr"], self._obs()

    def step(self, action):
        self.actions.append(np.asarray(action).copy())
        if self.raise_at is not None and len(self.actions) >= self.raise_at:
            raise self.exc("no path to the pose")
        self.tip = self.tip + self.reach * (np.asarray(action[:3]) - self.tip)
        self.open = float(action[7])
        done = np.linalg.norm(self.tip - self.goal) < 0.01 and self.open == 0.0
        return self._obs(), float(done), False


def _run(task, predict, **cfg):
    config = RLBenchEvalConfig(max_keyposes=cfg.pop("max_keyposes", 5), **cfg)
    return run_episode(task, "demo", 3, lambda frame, poses, t: {"n": len(poses), "rgb": frame.rgb.shape},
                       predict, "close_jar", 0, config, (StandInIKError,), "p")


def _pose(xyz, open_logit):
    return np.array([*xyz, 0, 0, 0, 2.0, open_logit])  # a non-unit quaternion: normalised before sending


def test_success_moves_the_arm_first_then_the_gripper_with_nine_element_actions():
    task = StandInTask()
    r = _run(task, lambda b, s, k: _pose(task.goal, -3.0))
    assert r.outcome == "success" and r.keyposes == 1 and task.variation == 3
    arm, grip = task.actions
    assert len(arm) == 9 and arm[7] == 1.0 and arm[8] == 1.0  # previous gripper state (open), ignore_collisions
    assert grip[7] == 0.0 and np.allclose(arm[:7], grip[:7]) and np.isclose(np.linalg.norm(arm[3:7]), 1.0)


def test_the_arm_move_is_retried_until_within_tolerance():
    task = StandInTask(reach=0.5)  # half way per step: 2 tries leave it short of the 5 mm tolerance
    move(task, _pose([0.3, 0.0, 1.0], 5.0), 1.0, RLBenchEvalConfig(max_tries=2))
    assert len(task.actions) == 2  # no gripper change (open -> open): no third step
    task = StandInTask(reach=1.0)
    move(task, _pose([0.3, 0.0, 1.0], 5.0), 1.0, RLBenchEvalConfig(max_tries=2))
    assert len(task.actions) == 1  # reached at the first try


def test_planning_errors_end_the_episode_as_unreachable_or_are_resampled():
    r = _run(StandInTask(raise_at=1), lambda b, s, k: _pose([0.1, 0.0, 1.0], 5.0))
    assert r.outcome == "unreachable" and "StandInIKError" in r.error
    r = _run(StandInTask(raise_at=1), lambda b, s, k: _pose([0.1, 0.0, 1.0], 5.0), max_keyposes=3,
             continue_after_planning_error=True)
    assert r.outcome == "policy_failure" and "3 planning failures" in r.error and r.keyposes == 3


def test_other_simulator_errors_are_sim_errors_and_the_budget_a_policy_failure():
    r = _run(StandInTask(raise_at=2, exc=RuntimeError), lambda b, s, k: _pose([0.1, 0.0, 1.0], 5.0))
    assert r.outcome == "sim_error" and "RuntimeError" in r.error
    seen = []

    def predict(batch, seed, k):
        seen.append(batch["n"])
        return _pose([0.1, 0.0, 1.0], 5.0)

    r = _run(StandInTask(), predict, max_keyposes=4)
    assert r.outcome == "policy_failure" and "keypose budget (4)" in r.error
    assert seen == [1, 2, 3, 4]  # the pose history grows with every executed keypose


def test_results_lines_and_demo_weighted_success(tmp_path):
    res = [EpisodeResult("close_jar", i, o) for i, o in
           enumerate(["success", "policy_failure", "success", "sim_error", "success"])]
    per_task = write_results(tmp_path / "results.jsonl", "ckpt.pt", res,
                             {("close_jar", 0): [0, 1, 2], ("close_jar", 1): [3, 4]})
    lines = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert lines == [{"checkpoint": "ckpt.pt", "task": "close_jar", "variation": 0, "num_demos": 3, "sr": 2 / 3},
                     {"checkpoint": "ckpt.pt", "task": "close_jar", "variation": 1, "num_demos": 1, "sr": 1.0}]
    assert per_task == {"close_jar": 3 / 4}  # weighted by demos, the simulator error not counted


@pytest.mark.rlbench
def test_real_rlbench_environment_launches():
    pytest.importorskip("rlbench", reason="RLBench (PerAct fork) + PyRep + CoppeliaSim are not installed here")
    from harness.evaluate.rlbench_eval import launch_environment

    env = launch_environment("/nonexistent", RLBenchEvalConfig(tasks=["close_jar"]))
    env.shutdown()
