"""Raw RLBench reader against two real reach_target episodes (../shared/fixtures/rlbench)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.data.errors import DataError
from harness.data.formats import rlbench_raw
from harness.data.formats.rlbench_raw import RLBenchRawSource, backproject, load_pickle, read_depth_png

FIXTURE = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "rlbench"
TASK_DIR = FIXTURE / "reach_target"
VAR_DIR = TASK_DIR / "variation0"
EP0 = VAR_DIR / "episodes" / "episode0"
CAMERAS = ["left_shoulder", "right_shoulder", "wrist", "front"]
PERACT_BOUNDS = (np.array([-0.3, -0.5, 0.6]), np.array([0.7, 0.5, 1.6]))


def _need_fixture() -> None:
    if not (EP0 / "low_dim_obs.pkl").is_file():
        pytest.skip(f"RLBench fixture not found at {FIXTURE}")


@pytest.fixture(scope="module")
def source() -> RLBenchRawSource:
    _need_fixture()
    return RLBenchRawSource(FIXTURE)


@pytest.fixture(scope="module")
def episodes(source) -> dict:
    return {k: source.read_episode("reach_target+0", k) for k in source.episode_keys("reach_target+0")}


def _link_episode(dst: Path, skip: tuple[str, ...] = (), low_dim: bool = True) -> Path:
    """A writable copy of fixture episode0 made of symlinks (the fixture itself is read-only)."""
    dst.mkdir(parents=True)
    for p in EP0.iterdir():
        if p.name in skip or (p.name == "low_dim_obs.pkl" and not low_dim):
            continue
        (dst / p.name).symlink_to(p)
    return dst


# ------------------------------------------------------------------------------------------- detection


def test_detects_root_task_and_variation_levels():
    _need_fixture()
    for path in (FIXTURE, TASK_DIR, VAR_DIR):
        assert RLBenchRawSource.detect(path), path
        src = RLBenchRawSource(path)
        assert src.taskvars() == ["reach_target+0"]
        assert src.episode_keys("reach_target+0") == ["episode0", "episode1"]


def test_rejects_lmdb_folder_and_empty_folder(tmp_path):
    lmdb = tmp_path / "lmdbs"
    (lmdb / "close_jar+0").mkdir(parents=True)
    (lmdb / "close_jar+0" / "data.mdb").write_bytes(b"\0" * 16)
    (lmdb / "close_jar+0" / "lock.mdb").write_bytes(b"\0" * 16)
    assert not RLBenchRawSource.detect(lmdb)
    assert not RLBenchRawSource.detect(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert not RLBenchRawSource.detect(tmp_path / "empty")
    with pytest.raises(DataError, match="lmdbs"):
        RLBenchRawSource(lmdb)


def test_episode_keys_natural_order(tmp_path):
    eps = tmp_path / "close_jar" / "variation3" / "episodes"
    for k in (10, 2, 1):
        (eps / f"episode{k}").mkdir(parents=True)
    (eps / ".DS_Store").write_bytes(b"")
    src = RLBenchRawSource(tmp_path)
    assert src.taskvars() == ["close_jar+3"]
    assert src.episode_keys("close_jar+3") == ["episode1", "episode2", "episode10"]
    with pytest.raises(DataError, match="close_jar\\+9"):
        src.episode_keys("close_jar+9")


def test_all_variations_layout(tmp_path, monkeypatch):
    _need_fixture()
    ep = _link_episode(tmp_path / "reach_target" / "all_variations" / "episodes" / "episode0")
    (ep / "variation_number.pkl").write_bytes(pickle.dumps(2))
    (ep / "variation_descriptions.pkl").write_bytes(pickle.dumps(["reach the red target", "touch it"]))
    src = RLBenchRawSource(tmp_path)
    assert RLBenchRawSource.detect(tmp_path / "reach_target" / "all_variations")
    assert src.taskvars() == ["reach_target+2"]
    assert src.instructions("reach_target+2") == ["reach the red target", "touch it"]
    e = src.read_episode("reach_target+2", "episode0")
    assert e.variation == 2 and e.key_frameids == [0, 69]
    assert e.extra["instructions_fallback"] is False


# ------------------------------------------------------------------------------------------- episodes


def test_lengths_keyframes_and_shapes(episodes):
    expected = {"episode0": (70, [0, 69]), "episode1": (64, [0, 63])}
    for key, (length, frames) in expected.items():
        e = episodes[key]
        assert e.extra["demo_length"] == length
        assert e.key_frameids == frames
        assert e.task == "reach_target" and e.variation == 0 and e.episode == key
        assert e.actions.shape == (2, 8) and e.actions.dtype == np.float32
        assert e.rgb_images.shape == (2, 4, 128, 128, 3) and e.rgb_images.dtype == np.uint8
        assert e.point_maps.shape == (2, 4, 128, 128, 3) and e.point_maps.dtype == np.float32
        assert e.depth.shape == (2, 4, 128, 128) and e.depth.dtype == np.float32
        assert e.mask is None  # the fixture has no mask folders
        assert e.extra["cameras"] == CAMERAS
        assert e.num_keysteps == 1


def test_actions_finite_unit_quaternions(episodes):
    for e in episodes.values():
        assert np.isfinite(e.actions).all()
        np.testing.assert_allclose(np.linalg.norm(e.actions[:, 3:7], axis=1), 1.0, atol=1e-4)
        assert set(e.actions[:, 7].tolist()) <= {0.0, 1.0}
        ks = e.keystep(0)
        np.testing.assert_array_equal(ks.target, e.actions[1])


def test_instruction_fallback(source, episodes):
    # In this asset variation_descriptions.pkl holds an Observation, not list[str].
    assert source.instructions("reach_target+0") == ["reach target"]
    assert episodes["episode0"].extra["instructions"] == ["reach target"]
    assert episodes["episode0"].extra["instructions_fallback"] is True


def test_front_camera_table_height(episodes):
    for e in episodes.values():
        pts = e.point_maps[0, CAMERAS.index("front")].reshape(-1, 3)
        lo, hi = PERACT_BOUNDS
        inside = pts[((pts >= lo) & (pts <= hi)).all(axis=1)]
        assert len(inside) > 1000
        z = inside[:, 2]
        assert abs(np.percentile(z, 5) - 0.75) < 0.005
        assert abs(np.median(z[z < 0.8]) - 0.75) < 0.005  # the low points are the table top


def test_backprojection_matches_pyrep_formula(episodes):
    # PyRep: world = inv([K @ inv(E)[:3]; 0 0 0 1]) @ [u*d, v*d, d, 1]
    demo = load_pickle(EP0 / "low_dim_obs.pkl")
    misc = demo[0].misc
    K, E = misc["front_camera_intrinsics"], misc["front_camera_extrinsics"]
    depth = episodes["episode0"].depth[0, CAMERAS.index("front")].astype(np.float64)
    h, w = depth.shape
    u, v = np.meshgrid(np.arange(w), np.arange(h))
    upc = np.stack([u * depth, v * depth, depth, np.ones_like(depth)], -1).reshape(-1, 4).T
    proj = np.vstack([K @ np.linalg.inv(E)[:3], [0, 0, 0, 1]])
    ref = (np.linalg.inv(proj) @ upc)[:3].T.reshape(h, w, 3)
    np.testing.assert_allclose(backproject(depth, K, E), ref, atol=1e-5)
    np.testing.assert_allclose(episodes["episode0"].point_maps[0, CAMERAS.index("front")], ref, atol=1e-5)


def test_only_keyframe_pngs_are_decoded(source, monkeypatch):
    calls = []
    real = rlbench_raw.read_png
    def counting(p, *a, **k):
        calls.append(Path(p).name)
        return real(p, *a, **k)

    monkeypatch.setattr(rlbench_raw, "read_png", counting)
    source.read_episode("reach_target+0", "episode1")
    assert len(calls) == 2 * 4 * 2  # keyframes x cameras x (rgb, depth)
    assert set(calls) == {"0.png", "63.png"}


def test_camera_selection(source):
    src = RLBenchRawSource(FIXTURE, cameras=["front"])
    e = src.read_episode("reach_target+0", "episode0")
    assert e.rgb_images.shape == (2, 1, 128, 128, 3)
    np.testing.assert_array_equal(e.point_maps[:, 0], source.read_episode("reach_target+0", "episode0")
                                  .point_maps[:, CAMERAS.index("front")])


# ------------------------------------------------------------------------------------------- decoding


def test_depth_png_decoding(tmp_path):
    px = np.array([[[0, 0, 0], [255, 255, 255]], [[1, 2, 3], [128, 64, 32]]], dtype=np.uint8)
    path = tmp_path / "d.png"
    Image.fromarray(px, mode="RGB").save(path)
    near, far = 0.01, 4.5
    got = read_depth_png(path, near, far)
    p = px.astype(np.float64)
    d01 = (p[..., 0] * 65536 + p[..., 1] * 256 + p[..., 2]) / (2**24 - 1)
    assert got.shape == (2, 2) and got.dtype == np.float32
    np.testing.assert_allclose(got, near + d01 * (far - near), rtol=1e-6)
    assert got[0, 0] == pytest.approx(near) and got[0, 1] == pytest.approx(far)


def test_packed_depth_must_be_rgb(tmp_path):
    path = tmp_path / "gray.png"
    Image.fromarray(np.zeros((2, 2), dtype=np.uint8), mode="L").save(path)
    with pytest.raises(DataError, match="gray.png"):
        read_depth_png(path, 0.0, 1.0)


# ------------------------------------------------------------------------------------------- bad input


def test_corrupt_pickle_names_path(tmp_path):
    _need_fixture()
    ep = _link_episode(tmp_path / "reach_target" / "variation0" / "episodes" / "episode0", low_dim=False)
    (ep / "low_dim_obs.pkl").write_bytes((EP0 / "low_dim_obs.pkl").read_bytes()[:5000])
    src = RLBenchRawSource(tmp_path)
    with pytest.raises(DataError) as err:
        src.read_episode("reach_target+0", "episode0")
    assert str(ep / "low_dim_obs.pkl") in str(err.value) and "episode0" in str(err.value)


def test_missing_low_dim_file(tmp_path):
    _need_fixture()
    ep = _link_episode(tmp_path / "reach_target" / "variation0" / "episodes" / "episode0", low_dim=False)
    with pytest.raises(DataError, match="file not found") as err:
        RLBenchRawSource(tmp_path).read_episode("reach_target+0", "episode0")
    assert str(ep / "low_dim_obs.pkl") in str(err.value)


def test_missing_camera_folder_names_folder(tmp_path, source):
    ep = _link_episode(tmp_path / "reach_target" / "variation0" / "episodes" / "episode0",
                       skip=("wrist_depth",))
    with pytest.raises(DataError) as err:
        RLBenchRawSource(tmp_path).read_episode("reach_target+0", "episode0")
    assert str(ep / "wrist_depth") in str(err.value)
    with pytest.raises(DataError, match="overhead_rgb"):
        RLBenchRawSource(FIXTURE, cameras=["front", "overhead"]).read_episode("reach_target+0", "episode0")


def test_camera_image_count_mismatch(tmp_path, source):
    ep = _link_episode(tmp_path / "reach_target" / "variation0" / "episodes" / "episode0",
                       skip=("front_rgb",))
    (ep / "front_rgb").mkdir()
    for i in range(3):
        (ep / "front_rgb" / f"{i}.png").symlink_to(EP0 / "front_rgb" / f"{i}.png")
    with pytest.raises(DataError, match="3 PNG images but the demo has 70") as err:
        RLBenchRawSource(tmp_path).read_episode("reach_target+0", "episode0")
    assert str(ep / "front_rgb") in str(err.value)


def test_non_finite_gripper_pose(tmp_path, monkeypatch, source, fake_rlbench):
    demo = fake_rlbench.copy_demo(load_pickle(EP0 / "low_dim_obs.pkl"))
    demo._observations[5].gripper_pose = np.full(7, np.nan)
    ep = _link_episode(tmp_path / "reach_target" / "variation0" / "episodes" / "episode0", low_dim=False)
    (ep / "low_dim_obs.pkl").write_bytes(pickle.dumps(demo, protocol=3))
    with pytest.raises(DataError, match="non-finite gripper pose at step 5") as err:
        RLBenchRawSource(tmp_path).read_episode("reach_target+0", "episode0")
    assert str(ep / "low_dim_obs.pkl") in str(err.value) and "obs[5].gripper_pose" in str(err.value)


def test_unknown_globals_are_refused(tmp_path):
    rl = tmp_path / "rl.pkl"
    rl.write_bytes(b"\x80\x03crlbench.backend.spawn\nSpawnBoundary\nq\x00.")
    with pytest.raises(DataError, match="rlbench.backend.spawn.SpawnBoundary") as err:
        load_pickle(rl)
    assert str(rl) in str(err.value)
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(DataError, match="os.system"):
        load_pickle(evil)
