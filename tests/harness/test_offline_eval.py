"""Offline evaluation scores the prediction against the TARGET keypose, on known outputs of a stub policy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from harness.evaluate.offline import evaluate_policy


class ReplayPolicy(torch.nn.Module):
    """A stub policy whose ``sample`` returns a fixed action per keystep (looked up by ``batch["key"]``)."""

    def __init__(self, actions: dict[str, torch.Tensor]):
        super().__init__()
        self.actions = actions
        self.calls = 0

    def sample(self, batch, sampler, generator=None):
        self.calls += 1
        assert not self.training  # evaluation samples in eval mode
        return torch.stack([self.actions[k] for k in batch["key"]])


def _quat(euler_deg) -> np.ndarray:
    return Rotation.from_euler("xyz", euler_deg, degrees=True).as_quat()  # xyzw


def _batch(keys, poses, targets, tasks, offset=(0.1, -0.2, 0.7)):
    """A centred batch: poses and targets in the batch frame, ``offset`` adds back to world."""
    return {"key": list(keys), "task": list(tasks), "pose": torch.tensor(np.array(poses), dtype=torch.float32),
            "target": torch.tensor(np.array(targets), dtype=torch.float32),
            "offset": torch.tensor([offset] * len(keys), dtype=torch.float32)}


def _action(xyz, euler_deg, open_value):
    return np.concatenate([xyz, _quat(euler_deg), [open_value]]).astype(np.float32)


def test_a_prediction_equal_to_the_target_scores_zero_whatever_the_current_pose():
    target = _action([0.3, 0.1, 0.9], [180, 0, 30], 1.0)
    pose = _action([0.0, -0.2, 1.2], [180, 0, 120], 0.0)  # 90 degrees and 40 cm away from the target
    policy = ReplayPolicy({"k0": torch.tensor(np.concatenate([target[:7], [5.0]]))})  # open logit > 0
    out = evaluate_policy(policy, [_batch(["k0"], [pose], [target], ["t"])], sampler=None, device="cpu")
    o = out["overall"]
    assert o["pos_err_cm"] == pytest.approx(0.0, abs=1e-4)
    assert o["rot_err_deg"] == pytest.approx(0.0, abs=0.05)  # float32 quaternion round-off only
    assert o["pct_within_1cm"] == o["pct_within_3deg"] == o["gripper_acc"] == o["pct_all"] == 100.0


def test_known_errors_are_measured_against_the_target_with_the_thresholds():
    # three keysteps, two tasks; predictions displaced from the target by known amounts
    targets = [_action([0.5, 0.0, 1.0], [180, 0, 0], 1.0), _action([0.2, 0.2, 0.8], [180, 0, 90], 0.0),
               _action([0.0, 0.3, 0.9], [170, 10, 0], 1.0)]
    poses = [targets[1], targets[2], targets[0]]  # current poses far from every prediction
    preds = {
        "a": np.concatenate([targets[0][:3] + [0.009, 0, 0], _quat([180, 0, 2.5]), [3.0]]),   # 0.9 cm, 2.5 deg, ok
        "b": np.concatenate([targets[1][:3] + [0, 0.02, 0], _quat([180, 0, 95]), [2.0]]),     # 2 cm, 5 deg, wrong
        "c": np.concatenate([targets[2][:3], _quat([170, 10, 0]), [-1.0]]),                  # exact, wrong grip
    }
    policy = ReplayPolicy({k: torch.tensor(v, dtype=torch.float32) for k, v in preds.items()})
    batches = [_batch(["a", "b"], poses[:2], targets[:2], ["x", "y"]), _batch(["c"], poses[2:], targets[2:], ["x"])]
    out = evaluate_policy(policy, batches, sampler=None, device="cpu")
    o = out["overall"]
    assert policy.calls == 2 and o["n"] == 3
    assert o["pos_err_cm"] == pytest.approx((0.9 + 2.0 + 0.0) / 3, abs=1e-3)
    assert o["rot_err_deg"] == pytest.approx((2.5 + 5.0 + 0.0) / 3, abs=0.05)
    assert o["pct_within_1cm"] == pytest.approx(200 / 3)
    assert o["pct_within_3deg"] == pytest.approx(200 / 3)
    assert o["gripper_acc"] == pytest.approx(100 / 3)
    assert o["pct_all"] == pytest.approx(100 / 3)
    assert out["per_task"]["x"]["n"] == 2 and out["per_task"]["y"]["pct_all"] == 0.0
    assert math.isclose(out["per_task"]["x"]["pos_err_cm"], 0.45, abs_tol=1e-3)


def test_world_actions_undo_offset_and_rotation():
    from harness.data.transforms import rotate_z
    from harness.policy import world_actions

    world = np.stack([_action([0.4, 0.1, 0.9], [180, 0, 30], 1.0), _action([0.1, -0.3, 1.1], [170, 5, -60], 0.0)])
    base = np.array([-0.3, 0.0, 0.75], np.float32)
    angles = [0.3, -0.5]
    rotated = np.stack([rotate_z(np.zeros((0, 3), np.float32), w[None], a, base)[1][0] for w, a in zip(world, angles)])
    offset = np.array([[0.2, 0.1, 0.5], [-0.1, 0.0, 0.3]], np.float32)
    centred = rotated.copy()
    centred[:, :3] -= offset
    batch = {"offset": torch.tensor(offset), "rotation": torch.tensor(angles, dtype=torch.float32),
             "rotation_center": torch.tensor(np.stack([base, base]))}
    back = world_actions(torch.tensor(centred), batch).numpy()
    assert np.allclose(back[:, :3], world[:, :3], atol=1e-5)
    dots = np.abs((back[:, 3:7] * world[:, 3:7]).sum(1))
    assert np.allclose(dots, 1.0, atol=1e-5) and np.array_equal(back[:, 7], world[:, 7])
