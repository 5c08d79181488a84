"""Closed-loop evaluation logic (harness/evaluate): outcome mapping against a STAND-IN environment (a plain
object with the methods the episode loop calls, not Meta-World), the summary's Wilson intervals, the
episodes.jsonl round trip and the paired comparison."""

from __future__ import annotations

import json

import numpy as np
import pytest

import harness.evaluate.metaworld_eval as mw
from harness.data.metaworld import scene
from harness.data.metaworld.replay import ServoConfig
from harness.evaluate.closed_loop import (
    OUTCOMES,
    EpisodeResult,
    paired_comparison,
    read_episodes,
    summarize,
    write_episodes,
)
from harness.report.stats import wilson_interval


class StandInEnv:
    """Stand-in for a Meta-World env: the hand (obs[:3]) moves 1 cm per unit of action per step, like the
    mocap; success when the hand is within 1 cm of ``goal`` with the gripper closed (obs[3] < 0.5)."""

    max_path_length = 200
    mocap_low = np.array([-0.5, 0.4, 0.05])
    mocap_high = np.array([0.5, 1.0, 0.5])

    def __init__(self, goal=(0.0, 0.7, 0.2), fail_step_at: int | None = None, nan_at: int | None = None):
        self.goal = np.array(goal)
        self.fail_step_at, self.nan_at = fail_step_at, nan_at
        self.obs = None
        self.n = 0

    def reset_to(self, seed: int) -> np.ndarray:
        self.obs = np.zeros(39)
        self.obs[:3] = [0.0, 0.6, 0.2]
        self.obs[3] = 1.0
        self.n = 0
        return self.obs.copy()

    def step(self, action):
        self.n += 1
        if self.fail_step_at is not None and self.n >= self.fail_step_at:
            raise RuntimeError("MuJoCo Warning: Nan, Inf or huge value in QACC")
        self.obs[:3] = np.clip(self.obs[:3] + 0.01 * np.asarray(action[:3]), self.mocap_low, self.mocap_high)
        self.obs[3] = 1.0 if action[3] < 0 else 0.0
        if self.nan_at is not None and self.n >= self.nan_at:
            self.obs[0] = np.nan
        success = np.linalg.norm(self.obs[:3] - self.goal) < 0.01 and self.obs[3] < 0.5
        return self.obs.copy(), 0.0, False, False, {"success": float(success)}


@pytest.fixture
def stand_in(monkeypatch):
    """Route reset and pose reading of the episode loop to the stand-in."""
    monkeypatch.setattr(scene, "reset_to_seed", lambda env, seed: env.reset_to(seed))
    monkeypatch.setattr(mw, "current_pose", lambda env, obs, thr: np.concatenate([obs[:3], [0, 0, 0, 1],
                                                                                  [obs[3]]]))


def _episode(env, predict, **cfg):
    config = mw.MetaWorldEvalConfig(max_keyposes=cfg.pop("max_keyposes", 4), servo=ServoConfig(move_steps=60))
    return mw.run_episode(env, lambda e: "frame", lambda frame, poses, task: {"poses": list(poses)}, predict,
                          "stand-in-task", 7, config, 0.6, policy_name="p")


def _action(xyz, open_logit):
    return np.array([*xyz, 0, 0, 0, 1, open_logit], dtype=float)


def test_success(stand_in):
    env = StandInEnv()
    r = _episode(env, lambda batch, seed, k: _action(env.goal, -5.0))  # go to the goal, close
    assert r.outcome == "success" and r.keyposes == 1 and r.env_steps > 0 and r.error is None


def test_keypose_budget_is_a_policy_failure(stand_in):
    env = StandInEnv()
    seen = []

    def predict(batch, seed, k):
        seen.append((seed, k, len(batch["poses"])))
        return _action([0.2, 0.6, 0.2], 5.0)  # somewhere else, open

    r = _episode(env, predict, max_keyposes=3)
    assert r.outcome == "policy_failure" and r.keyposes == 3 and "keypose budget (3)" in r.error
    assert seen == [(7, 0, 1), (7, 1, 2), (7, 2, 3)]  # seeded per keypose; the pose history grows


def test_non_finite_prediction_is_a_policy_failure(stand_in):
    r = _episode(StandInEnv(), lambda b, s, k: _action([np.nan, 0.6, 0.2], 1.0))
    assert r.outcome == "policy_failure" and "non-finite" in r.error


def test_a_target_below_the_box_floor_is_clipped_as_the_environment_does(stand_in):
    """Meta-World clips mocap targets to its box, so a keypose 2 cm under the floor (the demonstrations sit at
    it) is executed at the floor: the episode goes on, and the clip is recorded."""
    env = StandInEnv()
    env.goal = np.array([0.0, 0.6, env.mocap_low[2]])  # a goal ON the box floor
    below = env.goal - [0, 0, 0.02]
    r = _episode(env, lambda b, s, k: _action(below, -5.0))
    assert r.outcome == "success" and r.error is None
    assert r.clipped_keyposes == 1 and r.clip_max_m == pytest.approx(0.02) and r.clip_mean_m == pytest.approx(0.02)


def test_far_targets_are_clipped_every_keypose_and_summarised(stand_in):
    r = _episode(StandInEnv(), lambda b, s, k: _action([0.0, 0.7, -0.3], 1.0), max_keyposes=3)
    assert r.outcome == "policy_failure" and r.clipped_keyposes == 3 and r.env_steps > 0
    assert r.clip_max_m == pytest.approx(0.05 + 0.3)  # z = -0.3 moved up to the floor at 0.05
    s = summarize([r, EpisodeResult("stand-in-task", 8, "success")])
    assert s["clipping"] == {"keyposes": 3, "episodes": 1, "max_m": r.clip_max_m}


@pytest.mark.parametrize("env, text", [(StandInEnv(fail_step_at=3), "step: RuntimeError"),
                                       (StandInEnv(nan_at=2), "non-finite simulator state")])
def test_simulator_failures_are_sim_errors(stand_in, env, text):
    r = _episode(env, lambda b, s, k: _action([0.2, 0.6, 0.2], 1.0))
    assert r.outcome == "sim_error" and text in r.error


def test_a_failing_reset_is_a_sim_error(monkeypatch):
    def boom(env, seed):
        raise ValueError("cannot reset")

    monkeypatch.setattr(scene, "reset_to_seed", boom)
    r = _episode(StandInEnv(), lambda b, s, k: _action([0, 0.7, 0.2], 1.0))
    assert r.outcome == "sim_error" and "reset: ValueError: cannot reset" in r.error


def test_policy_errors_propagate(stand_in):
    def broken(batch, seed, k):
        raise KeyError("a bug in the policy is not a simulator outcome")

    with pytest.raises(KeyError):
        _episode(StandInEnv(), broken)


def _results(outcomes, task="t", policy="p"):
    return [EpisodeResult(task, i, o, policy=policy) for i, o in enumerate(outcomes)]


def test_summary_counts_policy_attributable_episodes_with_wilson_intervals():
    res = _results(["success"] * 3 + ["policy_failure", "unreachable", "sim_error", "infra_failure"])
    s = summarize(res, oracle=_results(["success"] * 4 + ["policy_failure"], policy="oracle"))
    assert (s["successes"], s["episodes"], s["excluded"]) == (3, 5, 2)
    assert s["success"] == 0.6 and s["success_ci"] == list(wilson_interval(3, 5))
    assert s["failures"] == {"success": 3, "policy_failure": 1, "unreachable": 1, "sim_error": 1, "infra_failure": 1}
    assert set(s["failures"]) == set(OUTCOMES)
    assert s["oracle_success"] == 0.8 and s["per_task"]["t"]["episodes"] == 5


def test_episodes_file_round_trip_and_bad_lines(tmp_path):
    res = _results(["success", "sim_error"])
    res[1].error = "boom"
    write_episodes(tmp_path / "episodes.jsonl", res)
    assert read_episodes(tmp_path / "episodes.jsonl") == res
    lines = (tmp_path / "episodes.jsonl").read_text().splitlines()
    assert all(json.loads(line)["task"] == "t" for line in lines)
    (tmp_path / "bad.jsonl").write_text(lines[0] + "\n{\"task\": \"t\", \"seed\": 1, \"outcome\": \"maybe\"}\n")
    with pytest.raises(ValueError, match="bad.jsonl line 2"):
        read_episodes(tmp_path / "bad.jsonl")


def test_paired_comparison_pairs_the_same_seeds():
    a = _results(["success", "success", "policy_failure", "success", "sim_error"])
    b = _results(["policy_failure", "success", "policy_failure", "policy_failure", "success"])
    r = paired_comparison(a, b)
    assert r["n"] == 4 and r["unpaired"] == 2  # seed 4: a simulator error on A's side, not a policy outcome
    assert r["a"] == 0.75 and r["b"] == 0.25 and r["difference"] == pytest.approx(0.5)
    d = np.array([1, 0, 0, 1], float)
    from scipy.stats import t

    half = t.ppf(0.975, 3) * d.std(ddof=1) / 2
    assert r["ci"] == pytest.approx([0.5 - half, 0.5 + half])


def test_train_seeds_are_the_datasets_own_and_test_seeds_stay_held_out():
    from types import SimpleNamespace

    meta = SimpleNamespace(extra="{'settings': {'seed': 0}}",
                           splits={"train": [0, 1, 2], "val": [1000000], "test": [2000000, 2000001]})
    assert mw.evaluation_seeds(meta, 2, 1, split="train") == [1, 2]
    assert mw.evaluation_seeds(meta, 2) == [2000000, 2000001]
    with pytest.raises(ValueError, match="3 training seeds"):
        mw.evaluation_seeds(meta, 3, 1, split="train")
    with pytest.raises(ValueError, match="'test' or 'train'"):
        mw.evaluation_seeds(meta, 1, split="val")


def test_the_keypose_budget_covers_the_longest_demonstration_twice():
    assert mw.default_max_keyposes([6, 12, 9]) == 24  # door-open's demonstrations need 12
    assert mw.default_max_keyposes([3, 4]) == 10 and mw.default_max_keyposes([]) == 10
