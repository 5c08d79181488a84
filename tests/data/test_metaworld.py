"""The embedded Meta-World suite: layout, determinism, disjoint splits, and the geometry of the renders.

Needs metaworld + mujoco and an offscreen GL back end (EGL by default, see harness/data/metaworld);
skips otherwise. One small suite (2 tasks x 2 train + 1 val + 1 test episodes at 64 px) is generated per
module, about 15 s on 2 CPU cores.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np
import pytest

pytestmark = pytest.mark.metaworld
try:
    import metaworld  # noqa: F401
    import mujoco  # noqa: F401
except ImportError as e:
    pytest.skip(f"metaworld/mujoco not installed ({e}); pip install -e '.[metaworld]'",
                allow_module_level=True)
except Exception as e:  # noqa: BLE001 - mujoco fails at import when MUJOCO_GL cannot be loaded
    pytest.skip(f"mujoco cannot load MUJOCO_GL={os.environ.get('MUJOCO_GL')!r}: {type(e).__name__}: {e}",
                allow_module_level=True)

from harness.data.errors import DataError
from harness.data.formats.instructions import (
    read_instr_embeds,
    read_taskvar_instructions,
    read_taskvars,
)
from harness.data.formats.lotus_lmdb import LotusLmdbSource, read_lmdb
from harness.data.meta import DatasetMeta
from harness.data.metaworld import scene
from harness.data.metaworld.cameras import (
    CAMERAS,
    camera_to_world,
    depth_to_world,
    intrinsics,
    project_to_pixel,
)
from harness.data.metaworld.generate import generate_suite
from harness.data.metaworld.instructions import TASK_INSTRUCTIONS
from harness.data.metaworld.render import KeyframeRenderer
from harness.data.metaworld.rollout import record_expert, restore_state
from harness.data.metaworld.tasks import MT10, all_tasks, resolve_tasks

TASKS = ["pick-place-v3", "reach-v3"]
SIZE = 64
SPLITS = ("train", "val", "test")
KINDS = ("keysteps", "voxel1cm")


@pytest.fixture(scope="module")
def gl():
    try:
        scene.check_gl()
    except RuntimeError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def suite(tmp_path_factory, gl):
    out = tmp_path_factory.mktemp("metaworld") / "suite"
    summary = generate_suite(out, tasks=TASKS, episodes=2, image_size=SIZE, seed=0, progress=False)
    return out, summary


def _obj_label(task: str = "pick-place-v3") -> int:
    env = scene.make_env(task, max_image_size=SIZE)
    try:
        return int(scene.body_labels(env.model)[env.model.body("obj").id])
    finally:
        env.close()


# ------------------------------------------------------------------------------------------ the suite


def test_layout(suite):
    out, summary = suite
    meta = DatasetMeta.load(out)
    assert meta.source == "metaworld"
    assert meta.cameras == [c.name for c in CAMERAS] and len(meta.cameras) == 4
    assert meta.image_size == (SIZE, SIZE) and meta.voxel_size == 0.01
    assert meta.table_height == 0.0 and meta.robot_base == (0.0, 0.0, 0.0)
    assert set(meta.gripper_labels).isdisjoint(meta.robot_labels)
    assert sorted(meta.oracle_success) == sorted(TASKS)
    assert set(meta.splits) == set(SPLITS)
    taskvars = [f"{t}+0" for t in TASKS]
    assert read_taskvars(out / "taskvars.json") == taskvars
    instructions = read_taskvar_instructions(out / "taskvars_instructions.json")
    assert sorted(instructions) == sorted(taskvars) and all(len(v) >= 3 for v in instructions.values())
    embeds = read_instr_embeds(out / "instr_embeds_hash.npy")
    assert {s for v in instructions.values() for s in v} == set(embeds)
    assert not (out / ".staging").exists()

    expected = {"train": 2, "val": 1, "test": 1}
    for split in SPLITS:
        for kind in KINDS:
            for tv in taskvars:
                values = read_lmdb(out / split / kind / tv)
                assert sorted(values) == [f"episode{k}" for k in range(expected[split])], (split, kind, tv)
    value = read_lmdb(out / "train" / "keysteps" / "pick-place-v3+0")["episode0"]
    T = len(value["key_frameids"])
    assert T >= 3 and value["key_frameids"][0] == 0
    assert value["rgb"].shape == (T, 4, SIZE, SIZE, 3) and value["rgb"].dtype == np.uint8
    assert value["pc"].shape == (T, 4, SIZE, SIZE, 3) and value["pc"].dtype == np.float32
    assert value["depth"].shape == (T, 4, SIZE, SIZE) and value["mask"].dtype == np.int32
    assert value["action"].shape == (T, 8)
    np.testing.assert_allclose(np.linalg.norm(value["action"][:, 3:7], axis=1), 1.0, atol=1e-5)  # unit quats
    assert set(np.unique(value["action"][:, 7])) == {0.0, 1.0}  # pick-place opens and closes
    # every training-format reader sees it
    for kind in KINDS:
        src = LotusLmdbSource(out, split="train", kind=kind)
        ep = src.read_episode("pick-place-v3+0", "episode0")
        assert ep.num_keysteps == T - 1
        ks = ep.keystep(0)
        assert ks.points is not None and ks.points.shape[1] == 3
    # the summary agrees with the meta
    for task in TASKS:
        assert summary["tasks"][task]["oracle"] == meta.oracle_success[task]
        assert summary["tasks"][task]["episodes"] == expected


def test_suite_passes_the_bad_input_checks(suite):
    """meta.json matches the schema; every episode of every split and kind passes the value checks
    (unit quaternions, poses near the workspace, gripper in [0, 1], clouds left after crop and table
    removal); inspect reports no problems."""
    from harness.data.dataset import KeystepDataset
    from harness.data.inspect import inspect_dataset
    from harness.data.transforms import TransformConfig

    out, _ = suite
    assert DatasetMeta.from_dict(json.loads((out / "meta.json").read_text())) == DatasetMeta.load(out)
    for split in SPLITS:
        for kind in KINDS:
            ds = KeystepDataset(out, split=split, kind=kind, transform=TransformConfig(num_points=256))
            assert len(ds) > 0 and not ds.skipped, (split, kind, ds.skipped)
            s = inspect_dataset(out, split=split, kind=kind)
            assert s["problems"] == [] and s["keysteps"] == len(ds), (split, kind)


def test_oracle_replays_succeed(suite):
    # The keyposes of the pick-place and reach demos solve the task when replayed (measured 20/20 each).
    _, summary = suite
    for task in TASKS:
        assert summary["tasks"][task]["oracle"] >= 0.75, (task, summary["tasks"][task])


def test_splits_use_disjoint_seeds_and_episodes_differ(suite):
    out, _ = suite
    meta = DatasetMeta.load(out)
    for task in TASKS:
        seeds = meta.extra["tasks"][task]["seeds"]
        assert all(len(seeds[s]) == len(set(seeds[s])) for s in SPLITS)
        assert set(seeds["train"]).isdisjoint(seeds["val"])
        assert set(seeds["train"]).isdisjoint(seeds["test"])
        assert set(seeds["val"]).isdisjoint(seeds["test"])
    assert set(meta.splits["train"]).isdisjoint(meta.splits["val"] + meta.splits["test"])
    assert set(meta.splits["val"]).isdisjoint(meta.splits["test"])
    # different seeds -> different object/goal placements -> different demonstrations
    values = read_lmdb(out / "train" / "keysteps" / "pick-place-v3+0")
    a, b = values["episode0"]["action"], values["episode1"]["action"]
    assert not np.allclose(a[-1, :3], b[-1, :3], atol=0.01)


def test_same_seed_gives_identical_lmdbs(suite, tmp_path):
    out, _ = suite
    again = tmp_path / "again"
    generate_suite(again, tasks=["pick-place-v3"], episodes=2, image_size=SIZE, seed=0, progress=False)
    for split in SPLITS:
        for kind in KINDS:
            first = read_lmdb(out / split / kind / "pick-place-v3+0")
            second = read_lmdb(again / split / kind / "pick-place-v3+0")
            assert sorted(first) == sorted(second)
            for key in first:
                _assert_same(first[key], second[key], f"{split}/{kind}/{key}")


def _assert_same(x, y, where):
    if isinstance(x, dict):
        assert sorted(x) == sorted(y), where
        for k in x:
            _assert_same(x[k], y[k], f"{where}.{k}")
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y)):
            _assert_same(u, v, f"{where}[{i}]")
    else:
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), where


def test_object_is_in_the_point_cloud_before_the_grasp(suite):
    out, _ = suite
    obj = _obj_label()
    for key, value in read_lmdb(out / "train" / "keysteps" / "pick-place-v3+0").items():
        grip = value["action"][:, 7]
        before = [k for k in range(len(grip) - 1) if grip[k] == 1.0 and grip[k + 1] == 0.0]
        assert before, f"{key}: no open->closed keypose"
        k = before[0]
        target = value["action"][k + 1, :3]
        points = value["pc"][k][value["mask"][k] == obj]
        assert len(points) > 0, f"{key}: the puck is not visible at keyframe {k}"
        assert np.linalg.norm(points - target, axis=1).min() < 0.03, key
    voxel = read_lmdb(out / "train" / "voxel1cm" / "pick-place-v3+0")["episode0"]
    lo, hi = (np.asarray(b) for b in DatasetMeta.load(out).workspace_bounds)
    for xyz in voxel["xyz"]:  # background (far plane) never survives into the voxel format
        assert np.all((xyz > lo) & (xyz < hi))


def test_orientation_is_recorded_away_from_the_euler_singularity(suite):
    """The Sawyer hand frame points down at pitch = 90 deg, where Euler-bin targets turn to noise; the
    recorded tool frame reads roll ~180, pitch ~0, so every keypose falls in one stable bin triple."""
    from scipy.spatial.transform import Rotation

    from harness.rotations import quat_to_euler_bins

    out, _ = suite
    for task in TASKS:
        for key, value in read_lmdb(out / "train" / "voxel1cm" / f"{task}+0").items():
            quats = value["action"][:, 3:7]
            euler = Rotation.from_quat(quats).as_euler("xyz", degrees=True)
            assert np.all(np.abs(euler[:, 1]) < 20), (task, key, euler)
            assert np.all(np.abs(np.abs(euler[:, 0]) - 180) < 20), (task, key, euler)
            bins = quat_to_euler_bins(quats)
            assert set(bins[:, 1].tolist()) <= {35, 36, 37}, (task, key, bins)


def test_resume_skips_done_tasks_and_rejects_changed_settings(suite):
    out, _ = suite
    again = generate_suite(out, tasks=TASKS, episodes=2, image_size=SIZE, seed=0, progress=False)
    assert all(t["skipped"] for t in again["tasks"].values())
    with pytest.raises(DataError, match="image_size"):
        generate_suite(out, tasks=TASKS, episodes=2, image_size=32, seed=0, progress=False)


# ------------------------------------------------------------------------------------- rendering


def test_backprojected_depth_lands_on_the_body(gl):
    env = scene.make_env("pick-place-v3", max_image_size=SIZE)
    try:
        # the state right after reset, with kinematics (and the goal marker) recomputed
        restore_state(env, record_expert(env, "pick-place-v3", 3, max_steps=1).states[0])
        obj = env.data.body("obj").xpos.copy()
        label = int(scene.body_labels(env.model)[env.model.body("obj").id])
        with KeyframeRenderer(env.model, CAMERAS, SIZE) as renderer:
            frame = renderer.render(env.data)
            poses = renderer.camera_poses(env.data)
            seen = centred = 0
            for i in range(len(CAMERAS)):
                pixels = frame.mask[i] == label
                if not pixels.any():
                    continue
                seen += 1
                # the puck is a cylinder of radius 2 cm and half-height 2 cm: surface points within 2.9 cm
                dist = np.linalg.norm(frame.pc[i][pixels] - obj, axis=1)
                assert dist.max() < 0.029 and dist.min() > 0.015, (CAMERAS[i].name, dist.min(), dist.max())
                u, v, z = project_to_pixel(obj, renderer.K[i], poses[i])
                # the centre projects onto the puck, or onto something in front of it (the fingers)
                centred += int(frame.mask[i][int(v), int(u)] == label)
                assert 0 < frame.depth[i][int(v), int(u)] < z, CAMERAS[i].name
            assert seen >= 3 and centred >= 2
            background = frame.mask == scene.BACKGROUND
            assert background.any() and np.all(frame.depth[background] > 50.0)
            assert np.all(frame.depth[~background] < 10.0)
    finally:
        env.close()


@pytest.mark.filterwarnings("ignore:Constant\\(s\\) may be too high")
def test_restored_state_renders_like_the_live_rollout(gl):
    from harness.data.metaworld.tasks import expert_policy

    env = scene.make_env("pick-place-v3", max_image_size=32)
    try:
        demo = record_expert(env, "pick-place-v3", 5)
        with KeyframeRenderer(env.model, CAMERAS, 32) as renderer:
            obs = scene.reset_to_seed(env, 5)
            policy = expert_policy("pick-place-v3")
            for _ in range(12):
                obs, *_ = env.step(policy.get_action(obs))
            live = renderer.render(env.data)
            restore_state(env, demo.states[12])
            restored = renderer.render(env.data)
        for field in ("rgb", "depth", "mask", "pc"):
            assert np.array_equal(getattr(live, field), getattr(restored, field)), field
    finally:
        env.close()


def test_depth_to_world_inverts_projection():
    K = intrinsics(50.0, 48, 48)
    xmat = np.array([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]])  # camera looking along +y (MuJoCo axes)
    T = camera_to_world(np.array([0.1, -0.5, 0.3]), xmat.reshape(-1))
    rng = np.random.default_rng(0)
    depth = rng.uniform(0.5, 2.0, size=(48, 48))
    world = depth_to_world(depth, K, T)
    for v, u in [(0, 0), (10, 37), (47, 47)]:
        pu, pv, z = project_to_pixel(world[v, u], K, T)
        assert abs(pu - (u + 0.5)) < 1e-3 and abs(pv - (v + 0.5)) < 1e-3 and abs(z - depth[v, u]) < 1e-4
    # image centre looks along the camera's forward axis (+y here); image top is world +z
    assert world[23:25, 23:25, 1].mean() > -0.5 and world[0, 24, 2] > world[47, 24, 2]


# -------------------------------------------------------------------------------------- scene facts


def test_body_labels_pin_the_robot(gl):
    for task in ("pick-place-v3", "coffee-button-v3", "hand-insert-v3"):
        env = scene.make_env(task, max_image_size=SIZE)
        try:
            labels = scene.body_labels(env.model)
            assert sorted(labels.tolist()) == list(range(env.model.nbody)), task  # a permutation
            for i, name in enumerate(scene.SAWYER_BODIES):
                assert labels[env.model.body(name).id] == scene.SAWYER_FIRST_LABEL + i, (task, name)
            if task == "pick-place-v3":
                assert np.array_equal(labels, np.arange(env.model.nbody))
                assert scene.table_top_z(env) == pytest.approx(0.0, abs=1e-9)
        finally:
            env.close()
    assert [scene.SAWYER_BODIES[i - scene.SAWYER_FIRST_LABEL] for i in scene.GRIPPER_LABELS] == list(
        scene.GRIPPER_BODIES)


def test_task_names_and_instructions():
    assert resolve_tasks("mt10") == list(MT10) and len(MT10) == 10
    assert resolve_tasks("pick-place-v3, reach-v3") == ["pick-place-v3", "reach-v3"]
    assert len(resolve_tasks("mt50")) == 50
    with pytest.raises(ValueError, match="pick-plce-v3"):
        resolve_tasks(["pick-plce-v3"])
    assert set(TASK_INSTRUCTIONS) == set(all_tasks())
    assert all(len(set(v)) >= 3 for v in TASK_INSTRUCTIONS.values())
