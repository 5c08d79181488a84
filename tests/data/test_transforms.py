"""Point-cloud transforms: masks, voxelization, sampling, geometry and the KeystepTransform pipeline."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.spatial.transform import Rotation

from harness.data.episode import Keystep
from harness.data.meta import DatasetMeta
from harness.data.transforms import (
    KeystepTransform,
    TransformConfig,
    center,
    crop_to_workspace,
    height_above_table,
    jitter,
    remove_robot_by_boxes,
    remove_robot_by_labels,
    remove_table,
    rgb_to_unit,
    rotate_z,
    sample_points,
    voxelize,
)

META = DatasetMeta(source="test", workspace_bounds=((-1.0, -1.0, 0.0), (1.0, 1.0, 1.0)), table_height=0.1,
                   table_margin=0.0005, robot_base=(0.2, -0.3, 0.0), voxel_size=0.01, robot_labels=[5, 6, 7],
                   gripper_labels=[6])


# ------------------------------------------------------------------------------------------------ masks


def test_crop_is_strict():
    bounds = ((-1.0, -1.0, 0.0), (1.0, 1.0, 1.0))
    pts = np.array([[0, 0, 0.5], [-1, 0, 0.5], [1, 0, 0.5], [0, 0, 0], [0, 0, 1.0], [0.999, -0.999, 0.001],
                    [0, 1.0001, 0.5], [np.nan, 0, 0.5]], np.float32)
    np.testing.assert_array_equal(crop_to_workspace(pts, bounds), [1, 0, 0, 0, 0, 1, 0, 0])


def test_remove_table_by_height():
    z = np.array([0.0, 0.09, 0.1, 0.1005, 0.1006, 0.5])
    pts = np.stack([np.zeros_like(z), np.zeros_like(z), z], axis=1)
    np.testing.assert_array_equal(remove_table(pts, 0.1), [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(remove_table(pts, 0.1, margin=0.0005), [0, 0, 0, 0, 1, 1])


def test_remove_robot_by_labels_keeps_gripper():
    labels = np.array([0, 5, 6, 7, 1, 6, 5])
    keep = remove_robot_by_labels(labels, robot_labels=[5, 6, 7], gripper_labels=[6])
    np.testing.assert_array_equal(keep, [1, 0, 1, 0, 1, 1, 0])
    np.testing.assert_array_equal(remove_robot_by_labels(labels, [5, 6, 7]), [1, 0, 0, 0, 1, 0, 0])
    assert remove_robot_by_labels(labels, []).all()


def test_remove_robot_by_oriented_boxes():
    # link box [xmin, xmax, ymin, ymax, zmin, zmax] in the link frame; the link sits at (0.5, 0.2, 0.3)
    # turned 30 degrees about z
    rot = Rotation.from_euler("z", 30, degrees=True)
    origin = np.array([0.5, 0.2, 0.3])
    bbox = {"Panda_link3_bbox": np.array([-0.1, 0.1, -0.05, 0.05, 0.0, 0.2]),
            "Panda_hand_bbox": np.array([-1.0, 1.0, -1.0, 1.0, -1.0, 1.0])}
    pose = {"Panda_link3_pose": np.concatenate([origin, rot.as_quat()]),
            "Panda_hand_pose": np.array([0.5, 0.2, 0.3, 0, 0, 0, 1.0])}
    local = np.array([
        [0.0, 0.0, 0.1],      # centre: inside
        [0.09, 0.04, 0.01],   # near a corner: inside
        [-0.09, -0.04, 0.19],  # opposite corner: inside
        [0.12, 0.0, 0.1],     # beyond xmax
        [0.0, 0.06, 0.1],     # beyond ymax
        [0.0, 0.0, -0.01],    # below zmin
        [0.0, 0.0, 0.21],     # above zmax
    ])
    world = rot.apply(local) + origin
    # a point inside the box were it axis-aligned, outside once the box turns by 30 degrees
    aligned_only = origin + np.array([0.095, -0.045, 0.1])
    assert np.all(np.abs(aligned_only - origin)[:2] < [0.1, 0.05])
    pts = np.vstack([world, aligned_only]).astype(np.float32)
    keep = remove_robot_by_boxes(pts, bbox, pose, ["Panda_link3"])
    np.testing.assert_array_equal(keep, [0, 0, 0, 1, 1, 1, 1, 1])
    # a gripper link left out of ``links`` keeps its points even though its huge box covers them all
    np.testing.assert_array_equal(remove_robot_by_boxes(pts, bbox, pose, ["Panda_link3"]), keep)
    assert not remove_robot_by_boxes(pts, bbox, pose, ["Panda_link3", "Panda_hand"]).any()
    with pytest.raises(KeyError, match="Panda_link9"):
        remove_robot_by_boxes(pts, bbox, pose, ["Panda_link9"])


# -------------------------------------------------------------------------------------------- voxelize


def test_voxelize_mean_first_and_inverse():
    pts = np.array([[0.001, 0.001, 0.001], [0.5, 0.5, 0.5], [0.009, 0.002, 0.003], [0.011, 0.0, 0.0],
                    [-0.001, 0.0, 0.0]], np.float32)
    vox = voxelize(pts, 0.01)
    assert vox.mean_xyz.dtype == np.float32 and vox.mean_xyz.shape == (4, 3)
    # the voxel of points 0 and 2: their mean; first = the earlier of the two
    v = vox.inverse[0]
    assert vox.inverse[2] == v and vox.first[v] == 0
    np.testing.assert_allclose(vox.mean_xyz[v], pts[[0, 2]].mean(axis=0), atol=1e-7)
    assert len(set(vox.inverse.tolist())) == 4  # -0.001 falls into the voxel below 0, 0.011 into the next
    np.testing.assert_array_equal(vox.mean_xyz[vox.inverse[1]], pts[1])
    assert sorted(vox.first.tolist()) == [0, 1, 3, 4]
    with pytest.raises(ValueError):
        voxelize(pts, 0.0)
    empty = voxelize(np.zeros((0, 3), np.float32), 0.01)
    assert empty.mean_xyz.shape == (0, 3) and empty.first.shape == (0,)


_clouds = st.one_of(
    arrays(np.float32, st.tuples(st.integers(1, 300), st.just(3)), elements=st.floats(-3.0, 3.0, width=32)),
    arrays(np.float64, st.tuples(st.integers(1, 300), st.just(3)), elements=st.floats(-30.0, 30.0)),
)


@settings(max_examples=200, deadline=None, database=None)  # no .hypothesis/ folder in the repo
@given(pts=_clouds, size=st.floats(0.001, 0.5))
def test_voxelize_is_idempotent(pts, size):
    """Random float32 and float64 clouds: the means stay in their voxels, so voxelizing again is a no-op."""
    first = voxelize(pts, size)
    assert first.mean_xyz.dtype == np.float32
    # every mean lies in the voxel of its points
    grid = np.floor(pts.astype(np.float64) / size).astype(np.int64)
    np.testing.assert_array_equal(np.floor(first.mean_xyz.astype(np.float64) / size).astype(np.int64),
                                  grid[first.first])
    again = voxelize(first.mean_xyz, size)
    assert len(again.first) == len(first.first)
    np.testing.assert_array_equal(again.mean_xyz, first.mean_xyz)
    np.testing.assert_array_equal(again.first, np.arange(len(first.first)))


# -------------------------------------------------------------------------------------------- sampling


def test_sample_points_subsample_case():
    rng = np.random.default_rng(0)
    idx, valid = sample_points(1000, 300, rng)
    assert idx.shape == (300,) and valid.shape == (300,) and valid.all()
    assert len(np.unique(idx)) == 300 and idx.min() >= 0 and idx.max() < 1000
    assert np.all(np.diff(idx) > 0)


def test_sample_points_pad_case():
    rng = np.random.default_rng(0)
    idx, valid = sample_points(50, 128, rng)
    assert idx.shape == (128,) and valid.dtype == bool
    assert valid.sum() == 50 and valid[:50].all() and not valid[50:].any()
    np.testing.assert_array_equal(idx[:50], np.arange(50))
    assert (idx[50:] == 0).all()
    idx, valid = sample_points(128, 128, rng)  # exactly N: everything, nothing padded
    assert valid.all() and (idx == np.arange(128)).all()


def test_sample_points_keep_fraction():
    rng = np.random.default_rng(1)
    for _ in range(20):
        idx, valid = sample_points(200, 400, rng, keep_fraction=(0.95, 1.0))
        k = int(valid.sum())
        assert 190 <= k <= 200 and valid[:k].all() and not valid[k:].any()
        assert len(np.unique(idx[:k])) == k and idx[:k].max() < 200
    with pytest.raises(ValueError, match="empty"):
        sample_points(0, 10, rng)


# -------------------------------------------------------------------------------------------- geometry


def _random_poses(rng, n):
    q = Rotation.random(n, random_state=1).as_quat()
    pos, opened = rng.uniform(-1, 1, (n, 3)), rng.integers(0, 2, (n, 1))
    return np.concatenate([pos, q, opened], axis=1).astype(np.float32)


def test_rotate_z_keeps_everything_relative_to_the_cloud():
    rng = np.random.default_rng(0)
    pts = rng.uniform(-1, 1, (200, 3)).astype(np.float32)
    poses = _random_poses(rng, 3)
    angle = np.deg2rad(37.0)
    base = (0.2, -0.3, 0.5)
    new_pts, new_poses = rotate_z(pts, poses, angle, base)
    assert new_pts.dtype == np.float32 and new_poses.shape == poses.shape
    for j in range(3):
        d_before = np.linalg.norm(pts - poses[j, :3], axis=1)
        d_after = np.linalg.norm(new_pts - new_poses[j, :3], axis=1)
        np.testing.assert_allclose(d_after, d_before, atol=1e-5)
    # heights unchanged; the vertical axis through the base does not move
    np.testing.assert_allclose(new_pts[:, 2], pts[:, 2], atol=1e-6)
    on_axis = np.array([[0.2, -0.3, 0.9]], np.float32)
    np.testing.assert_allclose(rotate_z(on_axis, poses, angle, base)[0], on_axis, atol=1e-6)
    # orientations: Rz * q; the open flag untouched
    rz = Rotation.from_euler("z", angle)
    for j in range(3):
        want = (rz * Rotation.from_quat(poses[j, 3:7])).as_matrix()
        np.testing.assert_allclose(Rotation.from_quat(new_poses[j, 3:7]).as_matrix(), want, atol=1e-5)
    np.testing.assert_array_equal(new_poses[:, 7], poses[:, 7])
    # the gripper's frame relative to the points is unchanged: local coordinates of every point agree
    for j in range(3):
        before = Rotation.from_quat(poses[j, 3:7]).inv().apply(pts - poses[j, :3])
        after = Rotation.from_quat(new_poses[j, 3:7]).inv().apply(new_pts - new_poses[j, :3])
        np.testing.assert_allclose(after, before, atol=1e-5)


def test_rotate_z_accepts_a_single_pose_and_zero_angle():
    rng = np.random.default_rng(0)
    pts = rng.uniform(-1, 1, (10, 3)).astype(np.float32)
    pose = _random_poses(rng, 1)[0]
    p2, q2 = rotate_z(pts, pose, 0.0, (0, 0, 0))
    assert q2.shape == (8,)
    np.testing.assert_allclose(p2, pts, atol=1e-7)
    assert np.allclose(q2[3:7], pose[3:7], atol=1e-6) or np.allclose(q2[3:7], -pose[3:7], atol=1e-6)


def test_center_and_offset_restore_world():
    rng = np.random.default_rng(0)
    pts = rng.uniform(-1, 2, (100, 3)).astype(np.float32)
    valid = np.arange(100) < 70
    off = center(pts, valid)
    assert off.shape == (3,) and off.dtype == np.float32
    np.testing.assert_allclose(off, pts[:70].mean(axis=0), atol=1e-6)
    np.testing.assert_allclose((pts - off)[valid].mean(axis=0), 0, atol=1e-6)
    np.testing.assert_allclose((pts - off) + off, pts, atol=1e-6)
    np.testing.assert_allclose(center(pts), pts.mean(axis=0), atol=1e-6)


def test_height_jitter_and_colours():
    pts = np.array([[0, 0, 0.75], [1, 1, 1.0]], np.float32)
    h = height_above_table(pts, 0.7505)
    assert h.shape == (2, 1) and h.dtype == np.float32
    np.testing.assert_allclose(h[:, 0], [-0.0005, 0.2495], atol=1e-6)
    j = jitter(np.zeros((1000, 3), np.float32), np.random.default_rng(0))
    assert j.dtype == np.float32 and j.min() >= 0 and j.max() <= 0.002 and j.mean() > 0.0008
    np.testing.assert_allclose(rgb_to_unit(np.array([0, 255, 51], np.uint8)), [-1, 1, -0.6], atol=1e-6)


# --------------------------------------------------------------------------------- KeystepTransform


def _keystep(rng, n=600, n_hist=2, labels=True):
    """Points in the META workspace: a few on the table, a few outside, a few labelled arm / gripper."""
    pts = rng.uniform([-0.9, -0.9, 0.11], [0.9, 0.9, 0.9], (n, 3))
    pts[:20, 2] = 0.05           # table points
    pts[20:30, 0] = 1.5          # outside the workspace
    pts[30, 0] = np.nan          # a broken point
    lab = np.zeros(n, np.int64)
    lab[40:60] = 5               # arm: removed
    lab[60:70] = 6               # gripper: kept
    pose, target = _random_poses(rng, 2)
    return Keystep(task="t", variation=0, episode="episode0", keystep=0, pose=pose, target=target,
                   history=np.stack([pose] * n_hist), instruction="do it",
                   text_tokens=np.ones((3, 16), np.float32), points=pts.astype(np.float32),
                   colors=rng.uniform(-1, 1, (n, 3)).astype(np.float32), labels=lab if labels else None)


def _world_of(out) -> np.ndarray:
    return (out["points"] + out["offset"])[out["point_mask"]]


def _check_shapes(out, n, n_hist):
    assert out["points"].shape == (n, 3) and out["points"].dtype == np.float32
    assert out["colors"].shape == (n, 3) and out["colors"].dtype == np.float32
    assert out["height"].shape == (n, 1) and out["height"].dtype == np.float32
    assert out["point_mask"].shape == (n,) and out["point_mask"].dtype == bool
    assert out["pose"].shape == (8,) and out["target"].shape == (8,)
    assert out["history"].shape == (n_hist, 8) and out["offset"].shape == (3,)
    assert np.ndim(out["rotation"]) == 0
    assert out["key"] == "t+0-episode0-t0" and out["task"] == "t" and out["variation"] == 0
    assert out["text_tokens"].shape == (3, 16) and out["instruction"] == "do it"
    # padded slots are zero
    invalid = ~out["point_mask"]
    assert not out["points"][invalid].any() and not out["colors"][invalid].any()
    assert not out["height"][invalid].any()


@pytest.mark.parametrize("num_points", [256, 1024])  # subsample and pad cases
@pytest.mark.parametrize("train", [True, False])
def test_keystep_transform_fixed_shapes(num_points, train):
    rng = np.random.default_rng(0)
    ks = _keystep(rng)
    out = KeystepTransform(META, TransformConfig(num_points=num_points, train=train))(ks, rng)
    _check_shapes(out, num_points, 2)
    if num_points == 256:
        assert out["point_mask"].all()
    else:
        assert 0 < out["point_mask"].sum() < num_points
    if not train:
        assert out["rotation"] == 0.0


def test_keystep_transform_removes_crop_table_arm_and_restores_world():
    rng = np.random.default_rng(0)
    ks = _keystep(rng)
    cfg = TransformConfig(num_points=1024, train=False)
    out = KeystepTransform(META, cfg)(ks, rng)
    world = _world_of(out)
    # exactly the points that survive crop, table and arm removal (no voxelization: already a clean cloud)
    keep = (np.isfinite(ks.points).all(axis=1) & crop_to_workspace(ks.points, META.workspace_bounds)
            & remove_table(ks.points, META.table_height, META.table_margin)
            & remove_robot_by_labels(ks.labels, META.robot_labels, META.gripper_labels))
    np.testing.assert_allclose(world, ks.points[keep], atol=1e-6)
    assert len(world) == len(ks.points) - 20 - 10 - 1 - 20
    assert (world[:, 2] > META.table_height + META.table_margin).all()
    height = out["height"][out["point_mask"], 0]
    np.testing.assert_allclose(height, world[:, 2] - META.table_height, atol=1e-6)
    np.testing.assert_allclose(out["points"][out["point_mask"]].mean(axis=0), 0, atol=1e-5)
    # poses live in the same frame: the offset brings them back
    np.testing.assert_allclose(out["pose"][:3] + out["offset"], ks.pose[:3], atol=1e-6)
    np.testing.assert_allclose(out["target"][:3] + out["offset"], ks.target[:3], atol=1e-6)
    np.testing.assert_allclose(out["history"][:, :3] + out["offset"], ks.history[:, :3], atol=1e-6)
    np.testing.assert_array_equal(out["target"][3:], ks.target[3:])
    # colours follow their points
    np.testing.assert_allclose(out["colors"][out["point_mask"]], ks.colors[keep], atol=1e-7)


def test_keystep_transform_eval_is_deterministic_without_rotation():
    ks = _keystep(np.random.default_rng(0))
    tf = KeystepTransform(META, TransformConfig(num_points=1024, train=False))
    a = tf(ks, np.random.default_rng(1))
    b = tf(ks, np.random.default_rng(2))  # nothing random is left in eval when every point fits
    for k in ("points", "colors", "height", "point_mask", "pose", "target", "history", "offset"):
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert a["rotation"] == b["rotation"] == 0.0
    # subsampling in eval is seeded: the same generator state gives the same points
    tf = KeystepTransform(META, TransformConfig(num_points=128, train=False))
    np.testing.assert_array_equal(tf(ks, np.random.default_rng(5))["points"],
                                  tf(ks, np.random.default_rng(5))["points"])


def test_keystep_transform_rotation_keeps_target_relative_to_cloud():
    ks = _keystep(np.random.default_rng(0))
    base = {"num_points": 1024, "keep_fraction": (1.0, 1.0), "jitter_m": 0.0}
    ev = KeystepTransform(META, TransformConfig(train=False, **base))(ks, np.random.default_rng(0))
    train_tf = KeystepTransform(META, TransformConfig(train=True, rotate_deg=45.0, **base))
    tr = train_tf(ks, np.random.default_rng(3))
    angle = float(tr["rotation"])
    assert 0 < abs(angle) <= np.deg2rad(45.0)
    np.testing.assert_array_equal(tr["point_mask"], ev["point_mask"])
    m = ev["point_mask"]
    for name in ("target", "pose"):
        d_ev = np.linalg.norm(ev["points"][m] - ev[name][:3], axis=1)
        d_tr = np.linalg.norm(tr["points"][m] - tr[name][:3], axis=1)
        np.testing.assert_allclose(d_tr, d_ev, atol=1e-5)
        want = (Rotation.from_euler("z", angle) * Rotation.from_quat(ev[name][3:7])).as_matrix()
        np.testing.assert_allclose(Rotation.from_quat(tr[name][3:7]).as_matrix(), want, atol=1e-5)
    # undoing the offset and the rotation about the base gives the world cloud back
    world_tr = tr["points"][m] + tr["offset"]
    back, _ = rotate_z(world_tr, np.zeros(8, np.float32) + [0, 0, 0, 0, 0, 0, 1, 0], -angle, META.robot_base)
    np.testing.assert_allclose(back, _world_of(ev), atol=1e-5)
    # heights come from before the rotation and do not change with it
    np.testing.assert_allclose(tr["height"], ev["height"], atol=1e-6)


def test_keystep_transform_robot_removal_modes():
    rng = np.random.default_rng(0)
    ks = _keystep(rng)
    # "auto" without labels and without boxes: nothing removed besides crop/table
    ks_nolab = dataclasses.replace(ks, labels=None)
    out = KeystepTransform(META, TransformConfig(num_points=1024, train=False))(ks_nolab, rng)
    assert out["point_mask"].sum() == len(ks.points) - 31
    # boxes: one box around the origin column
    meta = dataclasses.replace(META, robot_link_boxes=["Panda_link1"])
    ks_box = dataclasses.replace(ks_nolab,
                                 bbox_info={"Panda_link1_bbox": np.array([-0.3, 0.3, -0.3, 0.3, 0, 1.0])},
                                 pose_info={"Panda_link1_pose": np.array([0, 0, 0, 0, 0, 0, 1.0])})
    out = KeystepTransform(meta, TransformConfig(num_points=1024, train=False))(ks_box, rng)
    world = _world_of(out)
    assert len(world) > 0 and not (np.abs(world[:, :2]) <= 0.3).all(axis=1).any()
    # explicit modes
    with pytest.raises(ValueError, match="no labels"):
        KeystepTransform(META, TransformConfig(remove_robot="labels"))(ks_nolab, rng)
    with pytest.raises(ValueError, match="unknown remove_robot"):
        KeystepTransform(META, TransformConfig(remove_robot="magic"))(ks, rng)
    out = KeystepTransform(META, TransformConfig(num_points=1024, train=False, remove_robot="none"))(ks, rng)
    assert out["point_mask"].sum() == len(ks.points) - 31


def test_keystep_transform_voxelizes_when_asked_and_fails_when_nothing_is_left():
    rng = np.random.default_rng(0)
    ks = _keystep(rng)
    dense = dataclasses.replace(ks, points=np.repeat(ks.points, 3, axis=0),
                                colors=np.repeat(ks.colors, 3, axis=0), labels=np.repeat(ks.labels, 3))
    plain = KeystepTransform(META, TransformConfig(num_points=4096, train=False))(dense, rng)
    vox = KeystepTransform(META, TransformConfig(num_points=4096, train=False, voxel_size=0.01))(dense, rng)
    assert vox["point_mask"].sum() == plain["point_mask"].sum() // 3
    empty = dataclasses.replace(ks, points=ks.points[:20], colors=ks.colors[:20], labels=ks.labels[:20])
    with pytest.raises(ValueError, match="no points left"):
        KeystepTransform(META, TransformConfig(train=False))(empty, rng)
    with pytest.raises(ValueError, match="no point cloud"):
        KeystepTransform(META)(dataclasses.replace(ks, points=None), rng)


def test_rlbench18_preset_removes_arm_boxes_under_the_published_key_names():
    """The published voxel1cm data names boxes ``Panda_link0_visual_bbox``,
    ``Panda_link{1..7}_respondable_bbox`` (and the gripper's ``Panda_gripper_visual_bbox``, ...): the preset
    must find them and keep the gripper."""
    from harness.data.meta import RLBENCH18

    rng = np.random.default_rng(0)
    cube = np.array([-0.02, 0.02, -0.02, 0.02, -0.02, 0.02])
    centres = {f"Panda_link{i}_{'visual' if i == 0 else 'respondable'}": (0.1 * i, 0.0, 1.0)
               for i in range(8)}
    centres.update({"Panda_gripper_visual": (0.9, 0.0, 1.0), "Panda_leftfinger_visual": (0.9, 0.1, 1.0)})
    bbox = {f"{k}_bbox": cube for k in centres}
    pose = {f"{k}_pose": np.array([*c, 0, 0, 0, 1.0]) for k, c in centres.items()}
    arm = np.array([c for k, c in centres.items() if k.startswith("Panda_link")])
    grip = np.array([centres["Panda_gripper_visual"], centres["Panda_leftfinger_visual"]])
    scene = rng.uniform([0.0, 0.3, 0.8], [1.0, 0.9, 1.2], (100, 3))
    pts = np.vstack([arm, grip, scene]).astype(np.float32)
    pose8 = np.array([0.5, 0, 1.0, 0, 0, 0, 1, 1], np.float32)
    ks = Keystep(task="t", variation=0, episode="e", keystep=0, pose=pose8, target=pose8, history=pose8[None],
                 points=pts, colors=np.zeros_like(pts), labels=np.zeros(len(pts), np.int64),
                 bbox_info=bbox, pose_info=pose)
    out = KeystepTransform(RLBENCH18, TransformConfig(num_points=256, train=False))(ks, rng)
    world = _world_of(out)
    assert len(world) == len(grip) + len(scene)
    assert not any(np.isclose(world, a, atol=1e-5).all(axis=1).any() for a in arm)
    assert all(np.isclose(world, g, atol=1e-5).all(axis=1).any() for g in grip)
