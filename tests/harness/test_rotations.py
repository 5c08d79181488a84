from __future__ import annotations

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from harness.rotations import (
    euler_bins_to_quat,
    geodesic_deg,
    quat_to_6d,
    quat_to_euler_bins,
    quat_to_matrix,
    sixd_to_quat,
)


def _quats(n=200, seed=0):
    return torch.tensor(Rotation.random(n, random_state=seed).as_quat(), dtype=torch.float32)


def test_euler_bins_round_trip_within_half_a_bin():
    q = _quats()
    bins = quat_to_euler_bins(q)
    assert bins.dtype == torch.int64 and bins.min() >= 0 and bins.max() < 72
    # each Euler angle is off by at most 2.5 deg; composed, the rotation is off by a few degrees
    # (4.7 deg is the worst of these 200; a wrong axis order or offset would give tens of degrees)
    err = geodesic_deg(q, euler_bins_to_quat(bins))
    assert float(err.max()) < 5.5 and float(err.mean()) < 3.0


def test_euler_bins_match_the_official_recipe_and_wrap():
    # +180 deg about x: euler x = 180 -> (180 + 180) / 5 = 72 -> wraps to 0
    q = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    assert quat_to_euler_bins(q).tolist() == [[0, 36, 36]]
    q = torch.tensor(Rotation.from_euler("xyz", [10, -20, 30], degrees=True).as_quat()[None])
    assert quat_to_euler_bins(q).tolist() == [[38, 32, 42]]


def test_gimbal_fix_snaps_pitch():
    q = torch.tensor(Rotation.from_euler("xyz", [0, 89.6, 0], degrees=True).as_quat()[None])
    assert quat_to_euler_bins(q)[0, 1] == 54  # (90 + 180) / 5


def test_6d_round_trip_and_matrix():
    q = _quats()
    assert float(geodesic_deg(q, sixd_to_quat(quat_to_6d(q))).max()) < 1e-3
    np.testing.assert_allclose(quat_to_matrix(q).numpy(), Rotation.from_quat(q.numpy()).as_matrix(), atol=1e-5)


def test_geodesic_is_sign_invariant():
    q = _quats(10)
    assert float(geodesic_deg(q, -q).max()) < 1e-3
    r = torch.tensor(Rotation.from_euler("z", 30, degrees=True).as_quat()[None], dtype=torch.float32)
    assert abs(float(geodesic_deg(torch.tensor([[0.0, 0, 0, 1]]), r)[0]) - 30) < 1e-4
