"""3D FlowMatch Actor zarr stores: round trips, episode boundaries, detection, instructions, bad input,
and real RLBench episodes (../shared/fixtures/rlbench) through the writer and ``KeystepDataset``."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

zarr = pytest.importorskip("zarr", reason="the zarr extra is not installed (pip install 'mdh[zarr]')")

from harness.data.errors import DataError
from harness.data.formats import open_source
from harness.data.formats.flowmatch_zarr import (
    CAMERAS,
    PERACT_TASKS,
    FlowMatchZarrSource,
    write_flowmatch_instructions,
    write_flowmatch_zarr,
)
from harness.data.meta import RLBENCH18
from harness.data.validate import check_episode

FIXTURE = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "rlbench"
TASKS = ["reach_red", "push_box"]
H, W = 6, 8

# ------------------------------------------------------------------------------------------- helpers


def _poses(rng: np.random.Generator, n: int) -> np.ndarray:
    """n plausible gripper poses [xyz in the PerAct workspace, unit quaternion xyzw, open in {0, 1}]."""
    pos = rng.uniform([-0.2, -0.3, 0.8], [0.4, 0.3, 1.3], size=(n, 3))
    quat = rng.normal(size=(n, 4))
    quat /= np.linalg.norm(quat, axis=1, keepdims=True)
    grip = rng.integers(0, 2, size=(n, 1))
    return np.concatenate([pos, quat, grip], axis=1).astype(np.float32)


def _episode(rng, task: str, var: int, k: int, poses: np.ndarray | None = None) -> dict:
    """A K-row episode: K observations and K + 1 poses (the K currents, then the last target)."""
    poses = _poses(rng, k + 1) if poses is None else np.asarray(poses, np.float32)
    assert poses.shape == (k + 1, 8)
    return {
        "task": task, "variation": var,
        "rgb": rng.integers(0, 256, size=(k, len(CAMERAS), H, W, 3), dtype=np.uint8),
        "point_maps": rng.uniform(-0.5, 1.5, size=(k, len(CAMERAS), H, W, 3)).astype(np.float32),
        "currents": poses[:-1], "targets": poses[1:],
    }


def _poses_of(ep: dict) -> np.ndarray:
    return np.concatenate([ep["currents"], ep["targets"][-1:]])


def _store_episodes(seed: int = 0) -> list[dict]:
    """Rows in store order; expected episodes per task-variation below (EXPECTED)."""
    rng = np.random.default_rng(seed)
    a = _episode(rng, "reach_red", 0, 3)
    # B follows A in the same task-variation and starts exactly at A's last target, so only the pose-history
    # chain (prev1/prev2 against the previous row) tells them apart.
    b_poses = _poses(rng, 3)
    b_poses[0] = a["targets"][-1]
    b = _episode(rng, "reach_red", 0, 2, b_poses)
    c = _episode(rng, "reach_red", 1, 1)
    d = _episode(rng, "push_box", 0, 4)
    e = _episode(rng, "push_box", 1, 2)
    f = _episode(rng, "push_box", 0, 2)  # push_box+0 again after another variation
    return [a, b, c, d, e, f]


# taskvar -> episode key -> index into _store_episodes()
EXPECTED = {
    "push_box+0": {"episode0": 3, "episode1": 5},
    "push_box+1": {"episode0": 4},
    "reach_red+0": {"episode0": 0, "episode1": 1},
    "reach_red+1": {"episode0": 2},
}


@pytest.fixture(scope="module")
def store_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fm")
    eps = _store_episodes()
    write_flowmatch_zarr(root / "train.zarr", eps, TASKS)
    write_flowmatch_zarr(root / "val.zarr", eps[2:3], TASKS)
    return root


@pytest.fixture
def fresh_store(tmp_path) -> Path:
    """A writable copy of the synthetic store (root with train.zarr) for tests that corrupt it."""
    write_flowmatch_zarr(tmp_path / "train.zarr", _store_episodes(), TASKS)
    return tmp_path


def _replace_array(store: Path, name: str, data: np.ndarray) -> None:
    """Overwrite one array of a v2 store with ``data`` (any shape and dtype)."""
    group = zarr.open_group(str(store), mode="r+")
    if int(zarr.__version__.split(".")[0]) >= 3:
        arr = group.create_array(name, shape=data.shape, dtype=data.dtype, overwrite=True)
        arr[...] = data
    else:
        group.create_dataset(name, data=data, overwrite=True)


def _set_rows(store: Path, name: str, index, value) -> None:
    group = zarr.open_group(str(store), mode="r+")
    arr = group[name]
    data = np.asarray(arr[...])
    data[index] = value
    arr[...] = data


def _where(e: pytest.ExceptionInfo) -> tuple[str, str]:
    return e.value.path or "", e.value.key or ""


# ------------------------------------------------------------------------------------------- round trip


def test_round_trip_recovers_every_episode(store_root):
    eps = _store_episodes()
    src = FlowMatchZarrSource(store_root, tasks=TASKS)
    assert src.path == store_root / "train.zarr"
    assert src.taskvars() == list(EXPECTED)
    for tv, keys in EXPECTED.items():
        assert src.episode_keys(tv) == list(keys)
        for key, i in keys.items():
            ep, want = src.read_episode(tv, key), eps[i]
            k = len(want["currents"])
            assert (ep.task, ep.variation, ep.episode) == (want["task"], want["variation"], key)
            assert ep.actions.dtype == np.float32 and ep.actions.shape == (k + 1, 8)
            np.testing.assert_array_equal(ep.actions, _poses_of(want))
            assert ep.key_frameids == list(range(k + 1))
            assert ep.rgb_images.dtype == np.uint8 and ep.rgb_images.shape == (k, 4, H, W, 3)
            np.testing.assert_array_equal(ep.rgb_images, want["rgb"])
            assert ep.point_maps.dtype == np.float32 and ep.point_maps.shape == (k, 4, H, W, 3)
            np.testing.assert_array_equal(ep.point_maps, want["point_maps"].astype(np.float16).astype(np.float32))
            assert ep.extra["cameras"] == list(CAMERAS)
            r0, r1 = ep.extra["rows"]
            assert r1 - r0 == k and src.episode_rows(tv, key) == (r0, r1)
            assert ep.extra["history"].shape == (k, 3, 8)
            np.testing.assert_array_equal(ep.extra["history"][:, 2], want["currents"])
            # the converter's clamped history: prev1/prev2 of the first row repeat its pose
            np.testing.assert_array_equal(ep.extra["history"][0, 0], want["currents"][0])
            np.testing.assert_array_equal(ep.extra["history"][0, 1], want["currents"][0])
            check_episode(ep, RLBENCH18, None, src.taskvar_path(tv), key)
            last = ep.keystep(ep.num_keysteps - 1)
            assert ep.num_keysteps == k
            np.testing.assert_array_equal(last.target, want["targets"][-1])
            assert last.images.shape == (4, 3, H, W) and last.point_maps.shape == (4, 3, H, W)


def test_store_rows_match_the_converter(store_root):
    """The arrays are what 3DFA's peract_to_zarr.py writes: shapes, dtypes, row chunks, Blosc lz4, v2."""
    meta = json.loads((store_root / "train.zarr" / "pcd" / ".zarray").read_text())
    assert meta["zarr_format"] == 2 and meta["dtype"] == "<f2"
    assert meta["compressor"]["id"] == "blosc" and meta["compressor"]["cname"] == "lz4"
    assert meta["compressor"]["clevel"] == 1 and meta["compressor"]["shuffle"] == 1
    assert meta["chunks"] == [1, 4, 3, H, W]
    assert (store_root / "train.zarr" / ".zgroup").is_file()
    g = zarr.open_group(str(store_root / "train.zarr"), mode="r")
    n = sum(len(e["currents"]) for e in _store_episodes())
    want = {"rgb": ((n, 4, 3, H, W), np.uint8), "pcd": ((n, 4, 3, H, W), np.float16),
            "proprioception": ((n, 3, 1, 8), np.float32), "action": ((n, 1, 1, 8), np.float32),
            "task_id": ((n,), np.uint8), "variation": ((n,), np.uint8)}
    for name, (shape, dtype) in want.items():
        assert g[name].shape == shape and g[name].dtype == dtype, name
    prop = np.asarray(g["proprioception"][...])[:, :, 0]
    d = _store_episodes()[3]  # push_box+0 episode0 is the 7th row onward (rows of A, B, C come first)
    r0 = 3 + 2 + 1
    np.testing.assert_array_equal(prop[r0 + 2], np.stack([d["currents"][0], d["currents"][1], d["currents"][2]]))
    np.testing.assert_array_equal(prop[r0 + 1], np.stack([d["currents"][0], d["currents"][0], d["currents"][1]]))
    np.testing.assert_array_equal(np.asarray(g["task_id"][...])[:6], [0] * 6)
    np.testing.assert_array_equal(np.asarray(g["variation"][...])[:6], [0, 0, 0, 0, 0, 1])


@pytest.mark.parametrize("case", ["target_only", "history_only"])
def test_consecutive_episodes_of_one_taskvar_are_split(tmp_path, case):
    """Each half of the boundary rule alone must split two back-to-back episodes of one task-variation."""
    rng = np.random.default_rng(1)
    a_poses = _poses(rng, 3)
    b_poses = _poses(rng, 3)
    if case == "target_only":  # history chain holds (a0 == a1 == b0); only A's last target differs from b0
        a_poses[1] = a_poses[0]
        b_poses[0] = a_poses[0]
    else:  # B starts at A's last target; only the history chain breaks
        b_poses[0] = a_poses[2]
    eps = [_episode(rng, "push_box", 0, 2, a_poses), _episode(rng, "push_box", 0, 2, b_poses)]
    write_flowmatch_zarr(tmp_path / "train.zarr", eps, TASKS)
    src = FlowMatchZarrSource(tmp_path)
    assert src.episode_keys("push_box+0") == ["episode0", "episode1"]
    np.testing.assert_array_equal(src.read_episode("push_box+0", "episode1").actions, b_poses)


def test_degenerate_boundary_merges_two_episodes(tmp_path):
    """The documented limit: A ends with two keysteps that do not move, onto B's first pose -> one episode."""
    rng = np.random.default_rng(2)
    a_poses = _poses(rng, 3)
    a_poses[1] = a_poses[2] = a_poses[0]
    b_poses = _poses(rng, 3)
    b_poses[0] = a_poses[0]
    write_flowmatch_zarr(tmp_path / "train.zarr", [_episode(rng, "push_box", 0, 2, a_poses),
                                                   _episode(rng, "push_box", 0, 2, b_poses)], TASKS)
    src = FlowMatchZarrSource(tmp_path)
    assert src.episode_keys("push_box+0") == ["episode0"]
    np.testing.assert_array_equal(src.read_episode("push_box+0", "episode0").actions,
                                  np.concatenate([a_poses[:2], b_poses]))


def test_float16_point_maps_keep_about_half_a_millimetre(tmp_path):
    rng = np.random.default_rng(3)
    ep = _episode(rng, "push_box", 0, 2)
    ep["point_maps"] = rng.uniform(-1.0, 1.0, size=ep["point_maps"].shape).astype(np.float32)
    write_flowmatch_zarr(tmp_path / "train.zarr", [ep], TASKS)
    got = FlowMatchZarrSource(tmp_path).read_episode("push_box+0", "episode0").point_maps
    np.testing.assert_array_equal(got, ep["point_maps"].astype(np.float16).astype(np.float32))
    err = np.abs(got - ep["point_maps"])
    assert err.max() <= 2.0**-11 * 1.0 + 1e-9  # |x| < 1 m -> under 0.49 mm
    assert err.max() > 0  # float16 does round


# ------------------------------------------------------------------------------------------- detection


def test_detects_root_and_store_levels(store_root, tmp_path):
    store = store_root / "train.zarr"
    assert FlowMatchZarrSource.detect(store_root) and FlowMatchZarrSource.detect(store)
    assert not FlowMatchZarrSource.detect(tmp_path)
    assert not FlowMatchZarrSource.detect(tmp_path / "nothing")
    (tmp_path / "g.zarr").mkdir()
    (tmp_path / "g.zarr" / ".zgroup").write_text('{"zarr_format": 2}')
    assert not FlowMatchZarrSource.detect(tmp_path / "g.zarr")  # a zarr group without the arrays
    assert FlowMatchZarrSource(store).taskvars() == FlowMatchZarrSource(store_root).taskvars()
    val = FlowMatchZarrSource(store_root, split="val")
    assert val.path == store_root / "val.zarr" and val.taskvars() == ["reach_red+1"]
    with pytest.raises(DataError, match="split 'test'.*stores here: \\['train.zarr', 'val.zarr'\\]"):
        FlowMatchZarrSource(store_root, split="test")
    assert FlowMatchZarrSource.has_split(store_root, "val") and not FlowMatchZarrSource.has_split(store_root, "test")
    assert FlowMatchZarrSource.has_split(store, "train") and not FlowMatchZarrSource.has_split(store, "val")


def test_open_source_finds_it(store_root):
    for path in (store_root, store_root / "train.zarr"):
        src = open_source(path)
        assert isinstance(src, FlowMatchZarrSource), path
        assert src.taskvars() == list(EXPECTED)  # tasks from the store's attribute
        assert isinstance(open_source(path, "flowmatch_zarr"), FlowMatchZarrSource)
    assert open_source(store_root, split="val").path == store_root / "val.zarr"


def test_detect_does_not_import_zarr(store_root):
    code = textwrap.dedent(f"""
        import sys
        from harness.data.formats.flowmatch_zarr import FlowMatchZarrSource
        assert FlowMatchZarrSource.detect({str(store_root)!r})
        print("zarr" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_task_list_default_and_argument(store_root, tmp_path):
    # The store's attribute names the tasks; without it the PerAct-18 list of 3DFA applies.
    assert FlowMatchZarrSource(store_root).tasks == TASKS
    shutil.copytree(store_root / "train.zarr", tmp_path / "train.zarr")
    (tmp_path / "train.zarr" / ".zattrs").write_text("{}")
    assert FlowMatchZarrSource(tmp_path).taskvars() == [f"{PERACT_TASKS[1]}+0", f"{PERACT_TASKS[1]}+1",
                                                       f"{PERACT_TASKS[0]}+0", f"{PERACT_TASKS[0]}+1"]
    assert PERACT_TASKS[:2] == ("place_cups", "close_jar") and len(PERACT_TASKS) == 18
    renamed = FlowMatchZarrSource(tmp_path, tasks=["t_a", "t_b"])
    assert renamed.taskvars() == ["t_a+0", "t_a+1", "t_b+0", "t_b+1"]


def test_pickled_source_reopens_the_store(store_root):
    src = FlowMatchZarrSource(store_root)
    copy = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(copy.read_episode("push_box+1", "episode0").rgb_images,
                                  src.read_episode("push_box+1", "episode0").rgb_images)


# ------------------------------------------------------------------------------------------- cameras


def test_camera_selection_and_order(store_root):
    eps = _store_episodes()
    src = FlowMatchZarrSource(store_root, cameras=["front", "wrist"])
    ep = src.read_episode("push_box+0", "episode0")
    assert ep.extra["cameras"] == ["front", "wrist"]
    assert ep.rgb_images.shape[1] == 2 and ep.point_maps.shape[1] == 2
    np.testing.assert_array_equal(ep.rgb_images, eps[3]["rgb"][:, [3, 2]])
    np.testing.assert_array_equal(ep.point_maps,
                                  eps[3]["point_maps"][:, [3, 2]].astype(np.float16).astype(np.float32))
    with pytest.raises(DataError, match="cameras must be distinct names among"):
        FlowMatchZarrSource(store_root, cameras=["overhead"])
    with pytest.raises(DataError, match="cameras must be distinct"):
        FlowMatchZarrSource(store_root, cameras=["front", "front"])


# ------------------------------------------------------------------------------------------- instructions


def test_instructions_from_3dfa_json(tmp_path, store_root):
    root = tmp_path / "data"
    shutil.copytree(store_root, root)
    # without a JSON: the task name
    assert FlowMatchZarrSource(root).instructions("push_box+1") == ["push box"]
    table = {"push_box": {0: ["push the box"], 1: ["push the box left", "shove it left"]},
             "reach_red": {0: ["reach red"], 1: ["reach the red ball"]}}
    write_flowmatch_instructions(root / "instructions" / "peract" / "instructions.json", table)
    src = FlowMatchZarrSource(root / "train.zarr")  # found one level up
    assert src.instructions("push_box+1") == ["push the box left", "shove it left"]
    assert src.instructions_path() == (root / "instructions" / "peract" / "instructions.json").resolve()
    # an explicit file wins
    other = write_flowmatch_instructions(tmp_path / "other.json", {"push_box": {1: ["other"]}})
    explicit = FlowMatchZarrSource(root, instructions=other)
    assert explicit.instructions("push_box+1") == ["other"]
    with pytest.raises(DataError, match="no entry for task 'reach_red' variation 0") as e:
        explicit.instructions("reach_red+0")
    assert _where(e) == (str(other), "reach_red/0")
    with pytest.raises(DataError, match="unknown task-variation"):
        src.instructions("push_box+7")
    (tmp_path / "bad.json").write_text(json.dumps({"push_box": ["not", "by", "variation"]}))
    with pytest.raises(DataError, match="must map task -> {variation"):
        FlowMatchZarrSource(root, instructions=tmp_path / "bad.json").instructions("push_box+0")


# ------------------------------------------------------------------------------------------- bad input


def test_wrong_shape_names_the_array(fresh_store):
    store = fresh_store / "train.zarr"
    n = 14
    _replace_array(store, "pcd", np.zeros((n, 4, 3, H), np.float16))
    with pytest.raises(DataError, match=r"shape \(14, 4, 3, 6\).*expected \(N, 4, 3, H, W\) float16") as e:
        FlowMatchZarrSource(fresh_store)
    assert _where(e)[0] == str(store / "pcd")
    _replace_array(store, "pcd", np.zeros((n, 4, 3, H, W), np.float16))
    _replace_array(store, "rgb", np.zeros((n, 4, 3, H, W), np.float32))
    with pytest.raises(DataError, match="dtype float32, expected .* uint8") as e:
        FlowMatchZarrSource(fresh_store)
    assert _where(e)[0] == str(store / "rgb")
    _replace_array(store, "rgb", np.zeros((n, 2, 3, H, W), np.uint8))  # a two-camera store
    with pytest.raises(DataError, match=r"expected \(N, 4, 3, H, W\) uint8") as e:
        FlowMatchZarrSource(fresh_store)
    assert _where(e)[0].endswith("train.zarr/rgb")


def test_mismatched_lengths_name_the_array(fresh_store):
    store = fresh_store / "train.zarr"
    _replace_array(store, "variation", np.zeros(13, np.uint8))
    with pytest.raises(DataError, match="array has 13 rows but 'action' has 14") as e:
        FlowMatchZarrSource(fresh_store)
    assert _where(e)[0] == str(store / "variation")


def test_missing_array_is_named(fresh_store):
    store = fresh_store / "train.zarr"
    shutil.rmtree(store / "rgb")
    assert FlowMatchZarrSource.detect(fresh_store)  # still a 3DFA store, a broken one
    with pytest.raises(DataError, match="array 'rgb' is missing") as e:
        FlowMatchZarrSource(fresh_store)
    assert _where(e)[0] == str(store / "rgb")


def test_task_id_outside_the_task_list(fresh_store):
    store = fresh_store / "train.zarr"
    with pytest.raises(DataError, match=r"task_id 1 at row 6 is outside the task list \(1 tasks") as e:
        FlowMatchZarrSource(fresh_store, tasks=["reach_red"])
    assert _where(e) == (str(store / "task_id"), "row 6")


def test_non_finite_values_name_array_and_row(fresh_store):
    store = fresh_store / "train.zarr"
    _set_rows(store, "pcd", (7, 2, 0, 1, 1), np.nan)  # push_box+0 episode0 starts at row 6
    src = FlowMatchZarrSource(fresh_store)
    with pytest.raises(DataError, match="row 7 \\(keystep 1\\) camera wrist: .*non-finite") as e:
        src.read_episode("push_box+0", "episode0")
    assert _where(e) == (str(store / "pcd"), "push_box+0/episode0 (row 7)")
    src.read_episode("push_box+0", "episode1")  # other episodes still read
    _set_rows(store, "action", (4, 0, 0, 2), np.inf)
    with pytest.raises(DataError, match="row 4 holds a non-finite value") as e:
        FlowMatchZarrSource(fresh_store)
    assert _where(e) == (str(store / "action"), "row 4")


def test_unreadable_store_and_unknown_names(fresh_store):
    src = FlowMatchZarrSource(fresh_store)
    with pytest.raises(DataError, match="unknown task-variation 'stack_cups\\+0'"):
        src.episode_keys("stack_cups+0")
    with pytest.raises(DataError, match="unknown episode 'episode9'"):
        src.read_episode("push_box+0", "episode9")
    (fresh_store / "train.zarr" / ".zgroup").write_text("{not json")
    with pytest.raises(DataError, match="cannot open the zarr store") as e:
        FlowMatchZarrSource(fresh_store)
    assert _where(e)[0] == str(fresh_store / "train.zarr")


def test_missing_zarr_tells_how_to_install(store_root, monkeypatch):
    monkeypatch.setitem(sys.modules, "zarr", None)  # `import zarr` now raises ImportError
    assert FlowMatchZarrSource.detect(store_root)
    with pytest.raises(DataError, match=r"pip install 'mdh\[zarr\]'"):
        FlowMatchZarrSource(store_root)


def test_writer_is_atomic_and_checks_input(tmp_path):
    rng = np.random.default_rng(4)
    path = tmp_path / "train.zarr"
    write_flowmatch_zarr(path, [_episode(rng, "push_box", 0, 2)], TASKS)
    write_flowmatch_zarr(path, [_episode(rng, "reach_red", 3, 1)], TASKS)  # replaces the store
    assert FlowMatchZarrSource(tmp_path).taskvars() == ["reach_red+3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.zarr"]  # no temporary folder left
    bad = _episode(rng, "push_box", 0, 2)
    bad["rgb"] = bad["rgb"][:, :3]
    with pytest.raises(DataError, match="rgb is .* expected \\(K=2, 4, H, W, 3\\) uint8") as e:
        write_flowmatch_zarr(path, [_episode(rng, "push_box", 0, 1), bad], TASKS)
    assert e.value.key == "episodes[1]"
    with pytest.raises(DataError, match="task 'stack_cups' is not in tasks"):
        write_flowmatch_zarr(path, [_episode(rng, "stack_cups", 0, 1)], TASKS)
    assert FlowMatchZarrSource(tmp_path).taskvars() == ["reach_red+3"]  # a failed write left it alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.zarr"]


# ------------------------------------------------------------------------------------------- real data


def test_real_rlbench_episodes_through_keystep_dataset(tmp_path):
    if not (FIXTURE / "reach_target" / "variation0" / "episodes" / "episode0" / "low_dim_obs.pkl").is_file():
        pytest.skip(f"RLBench fixture not found at {FIXTURE} (../shared/fixtures/rlbench)")
    from harness.data.dataset import KeystepDataset
    from harness.data.formats.rlbench_raw import RLBenchRawSource

    raw = RLBenchRawSource(FIXTURE)
    raw_eps = [raw.read_episode("reach_target+0", k) for k in raw.episode_keys("reach_target+0")]
    assert raw_eps[0].rgb_images.shape[2:4] == (128, 128)
    write_flowmatch_zarr(tmp_path / "train.zarr", [
        {"task": "reach_target", "variation": 0, "rgb": ep.rgb_images[:-1], "point_maps": ep.point_maps[:-1],
         "currents": ep.actions[:-1], "targets": ep.actions[1:]} for ep in raw_eps], ["reach_target"])

    ds = KeystepDataset(tmp_path, fmt="flowmatch_zarr", require_text=False, meta_preset="rlbench18")
    assert isinstance(ds.source, FlowMatchZarrSource)
    assert len(ds) == sum(ep.num_keysteps for ep in raw_eps)
    assert ds.summary()["episodes"] == len(raw_eps)
    for i in range(len(ds)):
        _, key, t = ds.index[i]
        ks = ds[i]
        want = raw_eps[int(key.removeprefix("episode"))]
        np.testing.assert_array_equal(ks.pose, want.actions[t])
        np.testing.assert_array_equal(ks.target, want.actions[t + 1])
        assert ks.instruction == "reach target"
        np.testing.assert_array_equal(
            ks.point_maps, want.point_maps[t].astype(np.float16).astype(np.float32).transpose(0, 3, 1, 2))
        np.testing.assert_allclose(ks.point_maps, want.point_maps[t].transpose(0, 3, 1, 2),
                                   rtol=2.0**-11, atol=2.0**-25)  # the documented float16 bound
        np.testing.assert_allclose(ks.images, want.rgb_images[t].transpose(0, 3, 1, 2) / 127.5 - 1, atol=1e-6)
