"""3D Diffuser Actor packaged episodes (``ep<N>.dat``) and ``instructions.pkl``: writer -> reader round trips,
detection, cameras, placeholder instructions, bad input, and a real RLBench episode repackaged as 3DDA does."""

from __future__ import annotations

import datetime
import pickle
from collections import OrderedDict
from itertools import pairwise
from pathlib import Path

import blosc
import numpy as np
import pytest
import torch

from harness.data.errors import DataError
from harness.data.formats import dda_dat, open_source
from harness.data.formats.dda_dat import (
    PERACT_CAMERAS,
    DdaDatSource,
    loads,
    read_dat,
    write_dat,
    write_dda_episode,
    write_dda_instructions,
)

FIXTURE = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "rlbench"
EP0 = FIXTURE / "reach_target" / "variation0" / "episodes" / "episode0"
TV = "close_jar+3"


def make_episode(seed: int = 0, K: int = 3, n_cam: int = 4, H: int = 6, W: int = 5) -> dict:
    """Arrays for ``write_dda_episode``: every uint8 colour value occurs; K+1 poses; K trajectories whose ends
    are the keyframe poses (lengths 3, 4, 5, ... so the derived demo steps are 0, 2, 5, 9, ...)."""
    rng = np.random.default_rng(seed)
    rgb = (np.arange(K * n_cam * H * W * 3) % 256).astype(np.uint8).reshape(K, n_cam, H, W, 3)
    rgb = rng.permuted(rgb, axis=2)
    pts = rng.uniform(-1, 2, size=(K, n_cam, H, W, 3)).astype(np.float32)
    quat = rng.normal(size=(K + 1, 4))
    poses = np.concatenate([rng.uniform([0.0, -0.3, 0.8], [0.5, 0.3, 1.2], size=(K + 1, 3)),
                            quat / np.linalg.norm(quat, axis=1, keepdims=True),
                            (np.arange(K + 1) % 2)[:, None]], axis=1).astype(np.float32)  # plausible in RLBench
    trajs = [np.concatenate([poses[k : k + 1], rng.normal(size=(k + 1, 8)), poses[k + 1 : k + 2]]).astype(np.float32)
             for k in range(K)]
    return {"rgb": rgb, "point_maps": pts, "currents": poses[:-1], "targets": poses[1:],
            "cameras": list(PERACT_CAMERAS[:n_cam]) + [f"cam{i}" for i in range(4, n_cam)],
            "trajectories": trajs, "poses": poses}


def write(root: Path, ep: dict, taskvar: str = TV, key: str = "ep0", split: str = "train", **kw) -> Path:
    args = {k: ep[k] for k in ("rgb", "point_maps", "currents", "targets", "cameras", "trajectories")}
    args.update(kw)
    return write_dda_episode(root / split / taskvar / f"{key}.dat", **args)


def raw_list(path: Path) -> list:
    """What 3DDA's own loader sees: pickle.loads(blosc.decompress(bytes)) (our own test files only)."""
    return pickle.loads(blosc.decompress(path.read_bytes()))


def expect_error(fn, path: Path, key: str | None, *words: str) -> DataError:
    """``fn()`` raises DataError naming ``path``, ``key`` (None: no key) and every one of ``words``."""
    with pytest.raises(DataError) as err:
        fn()
    msg = str(err.value)
    assert err.value.path == str(path) and err.value.key == key, msg
    for w in words:
        assert w in msg, msg
    return err.value


# ------------------------------------------------------------------------------------------- round trips


def test_writer_produces_3dda_byte_format(tmp_path):
    ep = make_episode()
    path = write(tmp_path, ep)
    obj = raw_list(path)
    assert isinstance(obj, list) and len(obj) == 6
    assert obj[0] == [0, 1, 2]
    assert isinstance(obj[1], np.ndarray) and obj[1].dtype == np.float32 and obj[1].shape == (3, 4, 2, 3, 6, 5)
    np.testing.assert_array_equal(obj[1][:, :, 0], ep["rgb"].transpose(0, 1, 4, 2, 3) / np.float32(255) * 2 - 1)
    np.testing.assert_array_equal(obj[1][:, :, 1], ep["point_maps"].transpose(0, 1, 4, 2, 3))
    for k in range(3):
        for idx, want in ((2, ep["targets"][k]), (4, ep["currents"][k])):
            t = obj[idx][k]
            assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and tuple(t.shape) == (1, 8)
            np.testing.assert_array_equal(t.numpy()[0], want)
        np.testing.assert_array_equal(obj[5][k].numpy(), ep["trajectories"][k])
    assert len(obj[3]) == 4 and all(list(d) == list(PERACT_CAMERAS) for d in obj[3])
    assert not list(path.parent.glob(".*"))  # the atomic write left no temporary


def test_round_trip_exact(tmp_path):
    ep = make_episode()
    write(tmp_path, ep)
    got = DdaDatSource(tmp_path).read_episode(TV, "ep0")
    assert (got.task, got.variation, got.episode) == ("close_jar", 3, "ep0")
    assert got.rgb_images.dtype == np.uint8 and got.rgb_images.shape == (3, 4, 6, 5, 3)
    np.testing.assert_array_equal(got.rgb_images, ep["rgb"])
    assert sorted(np.unique(got.rgb_images)) == list(range(256))
    assert got.point_maps.dtype == np.float32
    np.testing.assert_array_equal(got.point_maps, ep["point_maps"])
    assert got.actions.dtype == np.float32 and got.actions.shape == (4, 8)
    np.testing.assert_array_equal(got.actions, ep["poses"])
    assert got.key_frameids == [0, 2, 5, 9] and got.extra["key_frameids_from"] == "trajectories"
    assert got.extra["cameras"] == list(PERACT_CAMERAS) and got.extra["frame_ids"] == [0, 1, 2]
    assert got.extra["path"] == str(tmp_path / "train" / TV / "ep0.dat")
    for a, b in zip(got.extra["trajectory"], ep["trajectories"]):
        np.testing.assert_array_equal(a, b)
    assert len(got) == 4 and got.num_keysteps == 3
    ks = got.keystep(2)
    np.testing.assert_array_equal(ks.target, ep["poses"][3])
    np.testing.assert_array_equal(ks.points, ep["point_maps"][2].reshape(-1, 3))


def test_key_frameids_without_trajectories(tmp_path):
    ep = make_episode()
    write(tmp_path, ep, trajectories=None, frame_ids=[0, 4, 7])
    assert raw_list(tmp_path / "train" / TV / "ep0.dat")[5] == []
    got = DdaDatSource(tmp_path).read_episode(TV, "ep0")
    assert got.key_frameids == [0, 4, 7, 8] and got.extra["key_frameids_from"] == "frame_ids"
    assert got.extra["trajectory"] == []
    np.testing.assert_array_equal(got.actions, ep["poses"])


def test_loads_rebuilds_tensor_views_and_dtypes():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    objs = [base, base[1:3, 2:5], base.t(), base[:, ::2], torch.zeros(0, 8), torch.tensor(2.5, dtype=torch.float64),
            torch.arange(5), torch.tensor([True, False]), {"a": [base[0]]}]
    for protocol in (2, 4, 5):
        back = loads(pickle.dumps(objs, protocol=protocol))
        for a, b in zip(objs[:-1], back[:-1]):
            assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
            assert torch.equal(a, b) and not b.requires_grad
        assert torch.equal(back[-1]["a"][0], base[0])


# ------------------------------------------------------------------------------------------- detection


def test_detect_split_and_root_and_open_source(tmp_path):
    ep = make_episode(K=2)
    write(tmp_path, ep)
    write(tmp_path, ep, split="val", key="ep5")
    assert DdaDatSource.detect(tmp_path) and DdaDatSource.detect(tmp_path / "train")
    assert DdaDatSource.detect(tmp_path / "val")
    assert not DdaDatSource.detect(tmp_path / "train" / TV)
    (tmp_path / "other" / "close_jar+0").mkdir(parents=True)
    (tmp_path / "other" / "close_jar+0" / "episode0.pkl").write_bytes(b"x")
    assert not DdaDatSource.detect(tmp_path / "other") and not DdaDatSource.detect(tmp_path / "missing")
    for path in (tmp_path, tmp_path / "train"):
        src = open_source(path)
        assert isinstance(src, DdaDatSource) and src.path == tmp_path / "train", path
        assert src.episode_keys(TV) == ["ep0"]
    assert isinstance(open_source(tmp_path, "dda_dat"), DdaDatSource)
    assert DdaDatSource(tmp_path, split="val").episode_keys(TV) == ["ep5"]
    assert DdaDatSource(tmp_path / "val").episode_keys(TV) == ["ep5"]  # a split folder: split= is ignored
    assert DdaDatSource.has_split(tmp_path, "val") and DdaDatSource.has_split(tmp_path, "train")
    assert not DdaDatSource.has_split(tmp_path, "test") and not DdaDatSource.has_split(tmp_path / "train", "val")
    with pytest.raises(DataError, match=r"no 3DDA split 'test'.*splits found: \[") as err:
        DdaDatSource(tmp_path, split="test")
    assert str(tmp_path) in str(err.value)


def test_taskvars_and_episode_keys_in_natural_order(tmp_path):
    ep = make_episode(K=2, n_cam=1, H=2, W=2)
    for tv in ("b_task+10", "b_task+2", "a_task+0"):
        for key in ("ep10", "ep2", "ep0"):
            write(tmp_path, ep, taskvar=tv, key=key)
    split = tmp_path / "train"
    (split / "a_task+0" / ".ep3.dat.abc.tmp").write_bytes(b"half")  # an interrupted atomic write
    (split / "a_task+0" / "notes.txt").write_text("x")
    (split / "c_task+1").mkdir()
    src = DdaDatSource(split)
    assert src.taskvars() == ["a_task+0", "b_task+2", "b_task+10"]
    assert src.episode_keys("a_task+0") == ["ep0", "ep2", "ep10"]
    assert list(src.bad_taskvars()) == ["c_task+1"]
    assert src.taskvar_path("b_task+2") == split / "b_task+2"
    expect_error(lambda: src.episode_keys("c_task+1"), split / "c_task+1", "c_task+1", "no ep<N>.dat")


# ------------------------------------------------------------------------------------------- cameras, text


def test_camera_selection_and_reorder(tmp_path):
    ep = make_episode()
    write(tmp_path, ep)
    got = DdaDatSource(tmp_path, cameras=["front", "wrist"]).read_episode(TV, "ep0")
    assert got.extra["cameras"] == ["front", "wrist"]
    np.testing.assert_array_equal(got.rgb_images, ep["rgb"][:, [3, 2]])
    np.testing.assert_array_equal(got.point_maps, ep["point_maps"][:, [3, 2]])
    path = tmp_path / "train" / TV / "ep0.dat"
    expect_error(lambda: DdaDatSource(tmp_path, cameras=["front", "overhead"]).read_episode(TV, "ep0"),
                 path, "ep0", "['overhead']", str(list(PERACT_CAMERAS)))


def test_instructions_round_trip_with_placeholder_keys(tmp_path):
    ep = make_episode(K=2)
    data = tmp_path / "data" / "Peract_packaged"
    write(data, ep)
    write(data, ep, taskvar="open_drawer+0")
    rng = np.random.default_rng(1)
    emb = {"close_jar": {3: rng.normal(size=(2, 53, 512)), 7: rng.normal(size=(1, 53, 512))},
           "push_buttons": {0: rng.normal(size=(3, 53, 512))}}
    instr = write_dda_instructions(tmp_path / "instructions" / "peract" / "instructions.pkl", emb)
    raw = pickle.loads(instr.read_bytes())  # 3DDA's format: plain pickle of torch tensors
    assert isinstance(raw["close_jar"][3], torch.Tensor) and tuple(raw["close_jar"][3].shape) == (2, 53, 512)

    src = DdaDatSource(data)  # found three levels up from the split folder
    assert src.instructions_path == instr
    assert src.instructions(TV) == ["close_jar+3 #0", "close_jar+3 #1"]
    assert src.instructions("open_drawer+0") == ["open drawer"]  # not in the file: the task name
    table = src.instruction_embeddings()
    assert sorted(table) == ["close_jar+3 #0", "close_jar+3 #1", "close_jar+7 #0", "push_buttons+0 #0",
                             "push_buttons+0 #1", "push_buttons+0 #2"]
    for tv, i, (task, var) in (("close_jar+3", 1, ("close_jar", 3)), ("push_buttons+0", 2, ("push_buttons", 0))):
        v = table[f"{tv} #{i}"]
        assert v.dtype == np.float32 and v.shape == (53, 512)
        np.testing.assert_array_equal(v, emb[task][var][i].astype(np.float32))

    explicit = write_dda_instructions(tmp_path / "elsewhere.pkl", {"open_drawer": {0: np.ones((1, 53, 512))}})
    src = DdaDatSource(data, instructions=explicit)
    assert src.instructions("open_drawer+0") == ["open_drawer+0 #0"] and src.instructions(TV) == ["close jar"]


def test_keystep_dataset_uses_the_embeddings(tmp_path):
    """KeystepDataset merges ``instruction_embeddings()``: with ``require_text`` every keystep gets the tokens of
    one of its task-variation's placeholder keys."""
    from harness.data.dataset import KeystepDataset

    ep = make_episode(K=3)
    for tv in (TV, "open_drawer+0"):
        write(tmp_path, ep, taskvar=tv)
    emb = {"close_jar": {3: np.random.default_rng(2).normal(size=(2, 53, 512))}}
    write_dda_instructions(tmp_path / "instructions.pkl", emb)
    ds = KeystepDataset(tmp_path, fmt="dda_dat", taskvars=[TV], meta_preset="rlbench18")
    assert len(ds) == 3
    for i in range(len(ds)):
        ks = ds[i]
        assert ks.instruction == "close_jar+3 #0"  # no transform: the first paraphrase
        np.testing.assert_array_equal(ks.text_tokens, emb["close_jar"][3][0].astype(np.float32))
    with pytest.raises(DataError, match="'open drawer' of open_drawer\\+0 has no embedding"):
        KeystepDataset(tmp_path, fmt="dda_dat", meta_preset="rlbench18")


def test_instructions_fallback_and_errors(tmp_path):
    write(tmp_path, make_episode(K=2))
    src = DdaDatSource(tmp_path)
    assert src.instructions_path is None
    assert src.instructions(TV) == ["close jar"] and src.instruction_embeddings() == {}
    missing = tmp_path / "nope.pkl"
    expect_error(lambda: DdaDatSource(tmp_path, instructions=missing).instructions(TV), missing, None,
                 "not found")
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({"close_jar": {3: torch.ones(2, 53)}}))
    expect_error(lambda: DdaDatSource(tmp_path, instructions=bad).instruction_embeddings(), bad, "close_jar/3",
                 "shape (2, 53)")
    bad.write_bytes(pickle.dumps({"close_jar": {3: torch.full((1, 53, 512), float("nan"))}}))
    expect_error(lambda: DdaDatSource(tmp_path, instructions=bad).instructions(TV), bad, "close_jar/3",
                 "non-finite")


# ------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def good(tmp_path):
    """(root, path of ep0.dat, its 6-element list) of a valid K=3 episode."""
    path = write(tmp_path, make_episode())
    return tmp_path, path, raw_list(path)


def _read(root):
    return lambda: DdaDatSource(root).read_episode(TV, "ep0")


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty", "bad_pickle"])
def test_corrupt_files(good, kind):
    root, path, obj = good
    data = path.read_bytes()
    path.write_bytes({"garbage": np.random.default_rng(0).bytes(300), "truncated": data[: len(data) // 2],
                      "empty": b"", "bad_pickle": blosc.compress(pickle.dumps(obj)[:-100])}[kind])
    words = {"empty": "empty", "bad_pickle": "cannot unpickle"}.get(kind, "not a blosc-compressed buffer")
    expect_error(_read(root), path, "ep0", words)


def _edit(k, value):
    def f(obj):
        obj[k] = value(obj) if callable(value) else value
        return obj
    return f


BAD = {
    "five_elements": (lambda o: o[:5], "6-element list", "5-element list"),
    "a_dict": (lambda o: dict(enumerate(o)), "6-element list", "got a dict"),
    "obs_rank": (_edit(1, lambda o: o[1][:, :, 0]), "element [1]", "(K=3, n_cam, 2, 3, H, W)"),
    "obs_axis2": (_edit(1, lambda o: o[1][:, :, :1]), "element [1]", "shape (3, 4, 1, 3, 6, 5)"),
    "obs_K": (_edit(1, lambda o: o[1][:2]), "element [1]", "(K=3, n_cam, 2, 3, H, W)"),
    "obs_nan": (_edit(1, lambda o: np.where(np.arange(5) == 4, np.nan, o[1]).astype(np.float32)),
                "element [1]", "non-finite"),
    "obs_int": (_edit(1, lambda o: o[1].astype(np.int32)), "element [1]", "dtype int32"),
    "rgb_range": (_edit(1, lambda o: o[1] * np.float32(255)), "RGB channel", "[-1, 1]"),
    "frame_ids_bool": (_edit(0, [0, True, 2]), "element [0]", "ints"),
    "frame_ids_order": (_edit(0, [0, 2, 1]), "element [0]", "strictly increasing"),
    "targets_short": (_edit(2, lambda o: o[2][:2]), "element [2]", "2 entries", "K=3"),
    "currents_long": (_edit(4, lambda o: o[4] + o[4][:1]), "element [4]", "4 entries", "K=3"),
    "current_shape": (_edit(4, lambda o: [o[4][0].reshape(2, 4)] + o[4][1:]), "element [4]", "entry 0",
                      "shape (2, 4)"),
    "target_inf": (_edit(2, lambda o: o[2][:2] + [o[2][2] * float("inf")]), "element [2]", "non-finite"),
    "target_mismatch": (_edit(2, lambda o: [o[2][0], o[2][1] + 0.01, o[2][2]]), "element [2]",
                        "entry 1", "element [4]", "entry 2"),
    "pixels_K": (_edit(3, lambda o: o[3][:3]), "element [3]", "K+1=4"),
    "pixels_cameras": (_edit(3, lambda o: [{c: (0, 0) for c in PERACT_CAMERAS[:3]}] * 4), "element [3]",
                       "4 cameras on axis 1"),
    "traj_count": (_edit(5, lambda o: o[5][:1]), "element [5]", "K=3"),
    "traj_shape": (_edit(5, lambda o: [t[:, :7] for t in o[5]]), "element [5]", "entry 0", "(N_k, 8)"),
    "string_tensor": (_edit(2, lambda o: ["x"] * 3), "element [2]", "entry 0", "str"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_malformed_episode_lists(good, name):
    root, path, obj = good
    edit, *words = BAD[name]
    write_dat(path, edit(obj))
    expect_error(_read(root), path, "ep0", *words)


def test_target_mismatch_is_also_refused_by_the_writer(tmp_path):
    ep = make_episode()
    path = tmp_path / "x.dat"
    with pytest.raises(DataError, match=r"targets\[0\] differs from currents\[1\]"):
        write_dda_episode(path, ep["rgb"], ep["point_maps"], ep["currents"], ep["targets"][::-1], ep["cameras"])
    assert not path.exists()


@pytest.mark.parametrize("value,refused", [
    (OrderedDict([("left_shoulder", (0, 0))]), "SETITEM on a collections.OrderedDict object"),
    (datetime.date(2024, 1, 1), "datetime.date"),
])
def test_unexpected_classes_are_refused(good, value, refused):
    root, path, obj = good
    obj[3][1] = value
    write_dat(path, obj)
    err = expect_error(_read(root), path, "ep0", "unsafe pickle", refused)
    assert err.path == str(path)


def test_missing_taskvar_and_episode(good):
    root, path, _ = good
    src = DdaDatSource(root)
    expect_error(lambda: src.read_episode("open_drawer+0", "ep0"), root / "train", "open_drawer+0",
                 "unknown task-variation", TV)
    expect_error(lambda: src.read_episode(TV, "ep7"), root / "train" / TV, "ep7", "unknown episode", "['ep0']")
    path.unlink()  # listed when the source was opened, gone since
    expect_error(lambda: src.read_episode(TV, "ep0"), path, "ep0", "not found")
    expect_error(lambda: read_dat(root / "train"), root / "train", None, "found a folder")
    with pytest.raises(DataError, match="does not exist"):
        DdaDatSource(root / "nowhere")


# ------------------------------------------------------------------------------------------- real RLBench episode


def _need_fixture() -> None:
    if not (EP0 / "low_dim_obs.pkl").is_file():
        pytest.skip(f"RLBench fixture not found at {FIXTURE} (../shared/fixtures/rlbench)")


def test_real_rlbench_episodes_repackaged(tmp_path):
    """Keyframes of the two real reach_target episodes (128x128), packaged as 3DDA does (dense trajectory from
    low_dim_obs.pkl), read back through KeystepDataset: the same points, colours, images and poses as the raw
    reader, and demo-step keyframe ids recovered from the trajectory lengths."""
    _need_fixture()
    from harness.data.dataset import KeystepDataset
    from harness.data.formats.rlbench_raw import RLBenchRawSource, load_demo
    from harness.data.meta import PRESETS
    from harness.data.validate import check_episode

    raw_src = RLBenchRawSource(FIXTURE)
    raw = {k: raw_src.read_episode("reach_target+0", k) for k in raw_src.episode_keys("reach_target+0")}
    root = tmp_path / "Peract_packaged"
    for i, (key, ep) in enumerate(raw.items()):
        demo = load_demo(FIXTURE / "reach_target" / "variation0" / "episodes" / key / "low_dim_obs.pkl")
        dense = np.array([np.append(o.gripper_pose, o.gripper_open) for o in demo], dtype=np.float32)
        f = ep.key_frameids
        write_dda_episode(root / "train" / "reach_target+0" / f"ep{i}.dat", ep.rgb_images[:-1],
                          ep.point_maps[:-1], ep.actions[:-1], ep.actions[1:], ep.extra["cameras"],
                          trajectories=[dense[a : b + 1] for a, b in pairwise(f)])

    ds = KeystepDataset(root, fmt="dda_dat", require_text=False, meta_preset="rlbench18")
    assert isinstance(ds.source, DdaDatSource)
    assert len(ds) == sum(e.num_keysteps for e in raw.values()) > 0
    for i, (tv, key, t) in enumerate(ds.index):
        ref = raw[f"episode{key[2:]}"]
        ks, want = ds[i], ref.keystep(t)
        assert ks.key == f"reach_target+0-{key}-t{t}"
        for name in ("points", "colors", "images", "point_maps", "pose", "target", "history"):
            np.testing.assert_array_equal(getattr(ks, name), getattr(want, name), err_msg=name)
        ep = ds.episode(tv, key)
        assert ep.key_frameids == ref.key_frameids and ep.extra["key_frameids_from"] == "trajectories"
        np.testing.assert_array_equal(ep.rgb_images, ref.rgb_images[:-1])
        check_episode(ep, PRESETS["rlbench18"], None, ep.extra["path"], key)


def test_module_registers_its_source():
    from harness.data.formats import get_source, source_names

    assert get_source("dda_dat") is DdaDatSource and "dda_dat" in source_names()
    assert dda_dat.DdaDatSource.name == "dda_dat"
