"""Keypose discovery on hand-built gripper/velocity sequences (expected indices traced by hand)."""

from __future__ import annotations

import numpy as np
import pytest

from harness.data.keyposes import gripper_stride_keyposes, peract_keyposes

MOVING = 1.0  # a joint velocity far above the 0.1 stopping threshold


def _vel(n: int, stopped: list[int] = (), value: float = 0.0) -> np.ndarray:
    v = np.full((n, 7), MOVING)
    v[list(stopped)] = value
    return v


# ------------------------------------------------------------------------------------------ PerAct rule


def test_peract_gripper_toggles_and_last_frame():
    g = np.array([1, 1, 1, 0, 0, 0, 0, 1, 1, 1])
    assert peract_keyposes(g, _vel(10)) == [3, 7, 9]


def test_peract_only_last_frame_when_nothing_happens():
    assert peract_keyposes(np.ones(12), _vel(12)) == [11]  # reach_target: the last frame only


def test_peract_arm_stop_with_four_step_refractory_period():
    # the arm rests over frames 3..10: a stop at 3, then none for 4 frames, the next at 8, then the last
    g = np.ones(20)
    assert peract_keyposes(g, _vel(20, range(3, 11))) == [3, 8, 19]


def test_peract_stop_threshold():
    g = np.ones(10)
    assert peract_keyposes(g, _vel(10, [4], value=0.05)) == [4, 9]  # within atol 0.1: stopped
    assert peract_keyposes(g, _vel(10, [4], value=0.2)) == [9]       # above it: moving
    assert peract_keyposes(g, _vel(10, [4], value=0.2), stopping_delta=0.3) == [4, 9]


def test_peract_stop_needs_a_steady_gripper():
    # resting the whole time; the stop at frame 0 blocks frames 1..4, frames 5-6 see the toggle in their
    # window (i-2..i+1), frame 7 is the first steady stop, then the refractory period, then the last frame
    g = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
    assert peract_keyposes(g, _vel(12, range(12))) == [5, 7, 11]


def test_peract_no_stop_in_the_last_two_frames():
    g = np.ones(10)
    assert peract_keyposes(g, _vel(10, [8])) == [9]     # i == n-2 is never a stop
    assert peract_keyposes(g, _vel(10, [7])) == [7, 9]  # i == n-3 can be


def test_peract_drops_the_near_duplicate_before_the_last_frame():
    g = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0])  # toggle at 8, last frame 9: 8 is dropped
    assert peract_keyposes(g, _vel(10)) == [9]
    g = np.array([1, 1, 1, 1, 1, 1, 1, 0, 0, 0])  # toggle at 7 is two frames before the last: kept
    assert peract_keyposes(g, _vel(10)) == [7, 9]
    g = np.array([1, 1, 1, 0, 0, 0, 0, 0, 1, 1])  # only the second-to-last of the list is dropped
    assert peract_keyposes(g, _vel(10)) == [3, 9]


def test_peract_length_mismatch():
    with pytest.raises(ValueError, match="joint_velocities"):
        peract_keyposes(np.ones(5), np.zeros((4, 7)))


# ---------------------------------------------------------------------------------- gripper + stride


def test_stride_changes_stride_and_last_frame():
    g = np.array([0] * 7 + [1] * 8 + [0] * 5)  # changes at 7 and 15, 20 frames
    # stride 5 -> 5 (2 from the change at 7: dropped), 10 (kept), 15 (is a change) -> plus the last frame 19
    assert gripper_stride_keyposes(g, 5) == [7, 10, 15, 19]


def test_stride_drops_frames_within_two_of_a_change_only():
    g = np.array([0] * 10 + [1] * 10)  # change at 10
    # stride 4 -> 4, 8 (|8-10| = 2: dropped), 12 (dropped), 16
    assert gripper_stride_keyposes(g, 4) == [4, 10, 16, 19]
    g = np.array([0] * 11 + [1] * 9)  # change at 11: 8 is 3 away (kept), 12 is 1 away (dropped)
    assert gripper_stride_keyposes(g, 4) == [4, 8, 11, 16, 19]


def test_stride_without_changes():
    assert gripper_stride_keyposes(np.ones(10), 4) == [4, 8, 9]
    assert gripper_stride_keyposes(np.ones(10, bool), 50) == [9]
    assert gripper_stride_keyposes(np.array([True, False]), 1) == [1]


def test_stride_degenerate():
    assert gripper_stride_keyposes(np.ones(1), 3) == []
    assert gripper_stride_keyposes(np.ones(0), 3) == []
    with pytest.raises(ValueError, match="stride"):
        gripper_stride_keyposes(np.ones(5), 0)


def test_stride_output_is_sorted_unique_and_excludes_frame_zero():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 60))
        g = rng.random(n) < 0.5
        kps = gripper_stride_keyposes(g, int(rng.integers(1, 10)))
        assert kps == sorted(set(kps)) and kps[-1] == n - 1 and 0 not in kps
        changes = [i for i in range(1, n) if g[i] != g[i - 1]]
        assert set(changes) <= set(kps)


def test_peract_rule_reads_the_last_frames_for_the_window_before_frame_0():
    # The gripper opens at the start and is closed at the end; the arm stops only at frame 1.
    g = np.array([1] * 6 + [0] * 6)
    vel = np.ones((12, 7))
    vel[1] = 0
    # lotus (3D-LOTUS / Mini-Diffuser / 3DDA): the window i-2..i+1 is clamped at 0, so frame 1 is a stop
    assert peract_keyposes(g, vel) == [1, 6, 11]
    # peract: demo[i-2] at i = 1 is demo[-1] (closed), so the window disagrees and frame 1 is no stop
    assert peract_keyposes(g, vel, rule="peract") == [6, 11]
    # with the same state at both ends the rules agree
    assert peract_keyposes(np.ones(12), vel) == peract_keyposes(np.ones(12), vel, rule="peract") == [1, 11]


def test_unknown_keypose_rule_is_refused():
    with pytest.raises(ValueError, match="unknown keypose rule 'perac'.*lotus"):
        peract_keyposes(np.ones(5), np.zeros((5, 7)), rule="perac")
