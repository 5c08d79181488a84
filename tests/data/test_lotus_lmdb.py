"""3D-LOTUS LMDB formats: round trips, compatibility with the original msgpack_numpy code, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import lmdb
import msgpack
import numpy as np
import pytest

from harness.data.errors import DataError
from harness.data.formats import open_source, parse_taskvar
from harness.data.formats.lotus_lmdb import (
    LmdbWriter,
    LotusLmdbSource,
    keysteps_to_voxel_value,
    keysteps_value,
    pack,
    read_lmdb,
    unpack,
    voxel_value,
)
from harness.data.meta import DatasetMeta

_ORIGINAL_PACKB, _ORIGINAL_UNPACKB = msgpack.packb, msgpack.unpackb  # before any test patches them

# ------------------------------------------------------------------------------------------- helpers


def assert_values_equal(a: dict, b: dict) -> None:
    """Equal keys; arrays equal with the same dtype and shape; lists of arrays and dicts recursively."""
    assert sorted(a) == sorted(b)
    for k, x in a.items():
        y = b[k]
        if isinstance(x, np.ndarray):
            assert isinstance(y, np.ndarray), k
            assert x.dtype == y.dtype and x.shape == y.shape, (k, x.dtype, y.dtype, x.shape, y.shape)
            np.testing.assert_array_equal(x, y, err_msg=k)
        elif isinstance(x, dict):
            assert_values_equal(x, y)
        elif isinstance(x, list) and x and isinstance(x[0], np.ndarray):
            assert len(x) == len(y), k
            for i, (u, v) in enumerate(zip(x, y)):
                assert u.dtype == v.dtype and u.shape == v.shape, (k, i)
                np.testing.assert_array_equal(u, v, err_msg=f"{k}[{i}]")
        else:
            assert x == y, k


def _write(path, values: dict) -> None:
    with LmdbWriter(path) as w:
        for k, v in values.items():
            w.put(k, v)


@pytest.fixture
def rng():
    return np.random.default_rng(123)


# ----------------------------------------------------------------------------------------- round trips


def test_keysteps_roundtrip(tmp_path, synth, rng):
    value = synth.make_keysteps_value(rng, T=4, n_cam=3, H=5, W=7)
    _write(tmp_path / "close_jar+0", {"episode0": value})
    back = read_lmdb(tmp_path / "close_jar+0")
    assert list(back) == ["episode0"]
    got = back["episode0"]
    assert_values_equal(value, got)
    assert got["rgb"].dtype == np.uint8 and got["rgb"].shape == (4, 3, 5, 7, 3)
    assert got["pc"].dtype == np.float32 and got["pc"].shape == (4, 3, 5, 7, 3)
    assert got["action"].dtype == np.float32 and got["action"].shape == (4, 8)
    assert got["depth"].shape == (4, 3, 5, 7) and got["mask"].shape == (4, 3, 5, 7)
    assert got["key_frameids"] == [0, 10, 20, 30]
    assert got["bbox_info"]["Panda_link0_visual_bbox"].shape == (4, 6)
    assert got["pose_info"]["Panda_link1_visual_pose"].shape == (4, 7)


def test_voxel_roundtrip(tmp_path, synth, rng):
    ks = synth.make_keysteps_value(rng, T=3)
    value = keysteps_to_voxel_value(ks, synth.synthetic_meta())
    _write(tmp_path / "close_jar+0", {"episode0": value})
    got = read_lmdb(tmp_path / "close_jar+0")["episode0"]
    assert_values_equal(value, got)
    assert len(got["xyz"]) == len(got["rgb"]) == len(got["sem"]) == 3
    for x, c, s in zip(got["xyz"], got["rgb"], got["sem"]):
        assert x.dtype == np.float32 and x.ndim == 2 and x.shape[1] == 3
        assert c.dtype == np.uint8 and c.shape == x.shape
        assert s.shape == (len(x),) and s.dtype == np.int32
    assert got["action"].shape == (3, 8) and got["key_frameids"] == [0, 10, 20]


def test_pack_unpack_roundtrip_and_scalars():
    value = {"a": np.arange(6, dtype=np.int16).reshape(2, 3), "b": [1, 2], "c": {"d": np.float32(1.5)},
             "s": "x"}
    back = unpack(pack(value))
    np.testing.assert_array_equal(back["a"], value["a"])
    assert back["a"].dtype == np.int16 and back["b"] == [1, 2] and back["c"]["d"] == np.float32(1.5)
    assert back["s"] == "x"


def test_writer_grows_a_full_map(tmp_path):
    big = {"blob": np.ones((512, 1024), np.float32)}  # 2 MiB into a 64 KiB map
    with LmdbWriter(tmp_path / "t+0", map_size=1 << 16) as w:
        w.put("episode0", big)
    np.testing.assert_array_equal(read_lmdb(tmp_path / "t+0")["episode0"]["blob"], big["blob"])


def test_source_reads_both_kinds_from_dataset_root(dataset_root):
    ds = dataset_root
    vox = LotusLmdbSource(ds.root)  # <root>/train/voxel1cm by default
    assert vox.path == ds.root / "train" / "voxel1cm"
    assert vox.taskvars() == ds.taskvars
    for tv in ds.taskvars:
        assert vox.episode_keys(tv) == sorted(ds.lengths[tv])
        for key, T in ds.lengths[tv].items():
            ep = vox.read_episode(tv, key)
            want = ds.voxel[tv][key]
            assert (ep.task, ep.variation, ep.episode) == (*parse_taskvar(tv), key)
            assert len(ep) == T and ep.num_keysteps == T - 1
            np.testing.assert_array_equal(ep.actions, want["action"])
            assert ep.key_frameids == want["key_frameids"]
            for t in range(T):
                np.testing.assert_array_equal(ep.xyz[t], want["xyz"][t])
                np.testing.assert_array_equal(ep.rgb[t], want["rgb"][t])
                np.testing.assert_array_equal(ep.sem[t], want["sem"][t])
            assert ep.rgb_images is None
    assert vox.kind == "voxel1cm"

    kst = LotusLmdbSource(ds.root, kind="keysteps")
    tv, key = ds.taskvars[0], "episode1"
    ep = kst.read_episode(tv, key)
    want = ds.keysteps[tv][key]
    np.testing.assert_array_equal(ep.rgb_images, want["rgb"])
    np.testing.assert_array_equal(ep.point_maps, want["pc"])
    np.testing.assert_array_equal(ep.mask, want["mask"])
    assert ep.xyz is None and kst.kind == "keysteps"
    # the keystep flattens the cameras' point maps and keeps the mask as labels
    ks = ep.keystep(0)
    assert ks.points.shape == (want["pc"][0].size // 3, 3) and ks.labels.shape == (len(ks.points),)
    assert ks.images.shape == (2, 3, 8, 12) and ks.images.min() >= -1 and ks.images.max() <= 1


def test_open_source_detects_lmdb_folder(dataset_root):
    src = open_source(dataset_root.root / "train" / "voxel1cm")
    assert src.name == "lotus_lmdb" and src.taskvars() == dataset_root.taskvars


def test_episode_keys_in_natural_order(tmp_path, synth, rng):
    value = keysteps_to_voxel_value(synth.make_keysteps_value(rng, T=2), synth.synthetic_meta())
    _write(tmp_path / "t+0", {f"episode{k}": value for k in (10, 2, 1)})
    assert LotusLmdbSource(tmp_path).episode_keys("t+0") == ["episode1", "episode2", "episode10"]


def test_source_pickles_and_two_sources_share_a_folder(dataset_root):
    """py-lmdb >= 3 refuses a second handle on an open environment: two readers of one folder (train and
    validation datasets, inspect then render) and a pickled copy must all work, and closing one does not
    break the other."""
    import pickle

    tv = dataset_root.taskvars[0]
    T = dataset_root.lengths[tv]["episode0"]
    src = LotusLmdbSource(dataset_root.root)
    other = LotusLmdbSource(dataset_root.root)
    assert len(src.read_episode(tv, "episode0")) == T
    assert len(other.read_episode(tv, "episode0")) == T
    clone = pickle.loads(pickle.dumps(src))
    assert len(clone.read_episode(tv, "episode0")) == T
    assert read_lmdb(dataset_root.lmdb_path("voxel1cm", tv)).keys() == {"episode0", "episode1"}
    other.close()
    assert len(src.read_episode(tv, "episode1")) == dataset_root.lengths[tv]["episode1"]


def test_forked_child_reads_after_parent_opened(dataset_root):
    """A forked DataLoader worker inherits the parent's open handles; it must still be able to read."""
    import os

    tv = dataset_root.taskvars[0]
    src = LotusLmdbSource(dataset_root.root)
    src.read_episode(tv, "episode0")  # the parent holds the environment open
    pid = os.fork()
    if pid == 0:  # child: report through the exit status only
        try:
            ok = len(src.read_episode(tv, "episode1")) == dataset_root.lengths[tv]["episode1"]
        except Exception:  # noqa: BLE001 - any failure in the child is reported through the exit status
            ok = False
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(src.read_episode(tv, "episode1")) == dataset_root.lengths[tv]["episode1"]


def test_rewritten_lmdb_is_reread(tmp_path, synth, rng):
    """Writing into an LMDB that a reader has open, then reading it again, sees the new value."""
    v1 = keysteps_to_voxel_value(synth.make_keysteps_value(rng, T=2), synth.synthetic_meta())
    v2 = keysteps_to_voxel_value(synth.make_keysteps_value(rng, T=3), synth.synthetic_meta())
    _write(tmp_path / "t+0", {"episode0": v1})
    src = LotusLmdbSource(tmp_path)
    assert len(src.read_episode("t+0", "episode0")) == 2
    _write(tmp_path / "t+0", {"episode0": v2})
    assert len(LotusLmdbSource(tmp_path).read_episode("t+0", "episode0")) == 3


# ----------------------------------------------------------------------- the original code's msgpack


def test_original_decoder_reads_what_we_write(tmp_path, synth, msgpack_patched):
    """Decode our LMDBs exactly as 3D-LOTUS / Mini-Diffuser do: msgpack_numpy.patch(); msgpack.unpackb()."""
    assert msgpack_patched.unpackb is not _ORIGINAL_UNPACKB  # the patch is active inside the fixture
    dataset_root = synth.make_dataset(tmp_path)  # fresh: no reader of ours holds these LMDBs open
    tv = dataset_root.taskvars[0]
    env = lmdb.open(str(dataset_root.lmdb_path("keysteps", tv)), readonly=True)
    with env.begin() as txn:
        value = msgpack_patched.unpackb(txn.get(b"episode0"))
    env.close()
    T = dataset_root.lengths[tv]["episode0"]
    assert {"rgb", "pc", "action", "key_frameids", "depth", "mask", "bbox_info", "pose_info"} <= set(value)
    assert value["rgb"].dtype == np.uint8 and value["rgb"].shape == (T, 2, 8, 12, 3)
    assert value["pc"].dtype == np.float32 and value["pc"].shape == (T, 2, 8, 12, 3)
    assert value["action"].dtype == np.float32 and value["action"].shape == (T, 8)
    assert isinstance(value["key_frameids"], list) and len(value["key_frameids"]) == T
    np.testing.assert_array_equal(value["pc"], dataset_root.keysteps[tv]["episode0"]["pc"])

    env = lmdb.open(str(dataset_root.lmdb_path("voxel1cm", tv)), readonly=True)
    with env.begin() as txn:
        value = msgpack_patched.unpackb(txn.get(b"episode1"))
    env.close()
    T = dataset_root.lengths[tv]["episode1"]
    assert isinstance(value["xyz"], list) and len(value["xyz"]) == T
    assert all(x.dtype == np.float32 and x.shape[1] == 3 for x in value["xyz"])
    assert all(c.dtype == np.uint8 and c.shape == x.shape for c, x in zip(value["rgb"], value["xyz"]))
    assert value["action"].shape == (T, 8) and len(value["key_frameids"]) == T



def test_patch_fixture_restores_msgpack(synth):
    with synth.original_msgpack() as m:
        assert m.packb is not _ORIGINAL_PACKB
    assert msgpack.packb is _ORIGINAL_PACKB and msgpack.unpackb is _ORIGINAL_UNPACKB



def test_reader_reads_value_encoded_the_original_way(tmp_path, synth, rng):
    value = synth.make_keysteps_value(rng, T=3)
    vox = keysteps_to_voxel_value(value, synth.synthetic_meta())
    with synth.original_msgpack() as m:
        data_ks, data_vox = m.packb(value), m.packb(vox)
    synth.put_raw(tmp_path / "ks" / "open_drawer+2", "episode0", data_ks)
    synth.put_raw(tmp_path / "vox" / "open_drawer+2", "episode0", data_vox)

    ep = LotusLmdbSource(tmp_path / "ks").read_episode("open_drawer+2", "episode0")
    assert (ep.task, ep.variation) == ("open_drawer", 2)
    np.testing.assert_array_equal(ep.rgb_images, value["rgb"])
    np.testing.assert_array_equal(ep.point_maps, value["pc"])
    np.testing.assert_array_equal(ep.actions, value["action"])
    assert ep.rgb_images.dtype == np.uint8 and ep.point_maps.dtype == np.float32
    ep = LotusLmdbSource(tmp_path / "vox").read_episode("open_drawer+2", "episode0")
    for t in range(3):
        np.testing.assert_array_equal(ep.xyz[t], vox["xyz"][t])
    assert_values_equal(read_lmdb(tmp_path / "vox" / "open_drawer+2")["episode0"], vox)


def test_original_code_in_a_clean_interpreter(tmp_path, dataset_root):
    """The literal original snippet, in a subprocess so the global patch cannot leak: it reads our LMDB and
    writes one that our reader then reads (another process may open what ours holds open)."""
    src = dataset_root.lmdb_path("keysteps", dataset_root.taskvars[0])
    out = tmp_path / "orig" / "stack_blocks+7"
    code = textwrap.dedent(f"""
        import json, lmdb, msgpack, msgpack_numpy, numpy as np
        msgpack_numpy.patch()
        env = lmdb.open({str(src)!r}, readonly=True)
        txn = env.begin()
        v = msgpack.unpackb(txn.get(b"episode0"))
        print(json.dumps({{k: [str(v[k].dtype), list(v[k].shape)] for k in ("rgb", "pc", "action")}}))
        out = lmdb.open({str(out)!r}, map_size=1 << 26)
        with out.begin(write=True) as w:
            w.put(b"episode0", msgpack.packb(v))
    """)
    (tmp_path / "orig").mkdir()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    T = dataset_root.lengths[dataset_root.taskvars[0]]["episode0"]
    assert json.loads(r.stdout) == {"rgb": ["uint8", [T, 2, 8, 12, 3]], "pc": ["float32", [T, 2, 8, 12, 3]],
                                    "action": ["float32", [T, 8]]}
    ep = LotusLmdbSource(tmp_path / "orig").read_episode("stack_blocks+7", "episode0")
    want = dataset_root.keysteps[dataset_root.taskvars[0]]["episode0"]["pc"]
    np.testing.assert_array_equal(ep.point_maps, want)


# ------------------------------------------------------------------------------ keysteps -> voxel1cm


def test_keysteps_to_voxel_crop_is_strict_and_voxels_are_1cm():
    meta = DatasetMeta(source="t", workspace_bounds=((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), voxel_size=0.01)
    pts = np.array([
        [0.101, 0.101, 0.101],   # voxel A, first point: its colour and label win
        [0.109, 0.105, 0.103],   # voxel A
        [0.1055, 0.1085, 0.1095],  # voxel A
        [0.111, 0.101, 0.101],   # voxel B (next cm in x)
        [0.0, 0.5, 0.5],         # on the lower x face: outside (strict)
        [0.5, 1.0, 0.5],         # on the upper y face: outside
        [0.5, 0.5, 1.2],         # beyond z
        [0.5, 0.5, 0.5],         # voxel C
    ], np.float32)
    n = len(pts)
    rgb = np.arange(n * 3, dtype=np.uint8).reshape(n, 3)
    labels = np.arange(10, 10 + n, dtype=np.int32)
    value = keysteps_value(rgb.reshape(1, 1, 1, n, 3), pts.reshape(1, 1, 1, n, 3), np.zeros((1, 8)), [0],
                           mask=labels.reshape(1, 1, 1, n))
    out = keysteps_to_voxel_value(value, meta)
    xyz, col, sem = out["xyz"][0], out["rgb"][0], out["sem"][0]
    assert xyz.shape == (3, 3) and xyz.dtype == np.float32
    order = np.argsort(xyz[:, 0])  # A, B, C
    xyz, col, sem = xyz[order], col[order], sem[order]
    np.testing.assert_allclose(xyz[0], pts[:3].mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(xyz[1], pts[3], atol=1e-6)
    np.testing.assert_allclose(xyz[2], pts[7], atol=1e-6)
    np.testing.assert_array_equal(col, rgb[[0, 3, 7]])
    np.testing.assert_array_equal(sem, labels[[0, 3, 7]])
    # every kept voxel holds points of one 1 cm cell only
    assert len({tuple(np.floor(p / 0.01).astype(int)) for p in pts[:3]}) == 1


def test_keysteps_to_voxel_keeps_actions_and_boxes(synth, rng):
    value = synth.make_keysteps_value(rng, T=3)
    out = keysteps_to_voxel_value(value, synth.synthetic_meta())
    np.testing.assert_array_equal(out["action"], value["action"])
    assert out["key_frameids"] == value["key_frameids"]
    assert sorted(out["bbox_info"]) == sorted(value["bbox_info"])
    lo, hi = np.array([-0.5, -0.5, -0.05]), np.array([0.5, 0.5, 0.7])
    for x in out["xyz"]:
        assert np.all((x > lo) & (x < hi))


# ------------------------------------------------------------------------------------------ bad input


def _assert_names(err: DataError, path, key=None, *words):
    msg = str(err.value)
    assert str(path) in msg, msg
    if key is not None:
        assert str(key) in msg, msg
    for w in words:
        assert w in msg, msg


def test_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError) as e:
        LotusLmdbSource(missing)
    _assert_names(e, missing, None, "does not exist")
    with pytest.raises(DataError) as e:
        open_source(missing)
    _assert_names(e, missing)


def test_folder_without_lmdbs(tmp_path):
    (tmp_path / "close_jar+0").mkdir()
    with pytest.raises(DataError) as e:
        LotusLmdbSource(tmp_path)
    _assert_names(e, tmp_path, None, "no <task>+<variation> LMDB")


def test_badly_named_taskvar_folder(tmp_path, synth, rng):
    value = keysteps_to_voxel_value(synth.make_keysteps_value(rng, T=2), synth.synthetic_meta())
    _write(tmp_path / "close_jar", {"episode0": value})
    with pytest.raises(DataError) as e:
        LotusLmdbSource(tmp_path)
    _assert_names(e, tmp_path / "close_jar", None, "<task>+<variation>")


def test_unknown_taskvar_and_key(dataset_root):
    src = LotusLmdbSource(dataset_root.root)
    with pytest.raises(DataError) as e:
        src.read_episode("nothing+0", "episode0")
    _assert_names(e, src.path, None, "nothing+0")
    with pytest.raises(DataError) as e:
        src.read_episode(dataset_root.taskvars[0], "episode99")
    _assert_names(e, src.path / dataset_root.taskvars[0], "episode99", "not found")


@pytest.fixture
def bad_db(tmp_path, synth):
    """Write one raw value under close_jar+0/episode3 and return (source, lmdb path)."""

    def write(data: bytes | dict):
        db = tmp_path / "close_jar+0"
        synth.put_raw(db, "episode3", data if isinstance(data, bytes) else pack(data))
        return LotusLmdbSource(tmp_path), db

    return write


def _read_bad(write, data):
    src, db = write(data)
    with pytest.raises(DataError) as e:
        src.read_episode("close_jar+0", "episode3")
    _assert_names(e, db, "episode3")
    return str(e.value)


def test_corrupt_value(bad_db):
    msg = _read_bad(bad_db, b"\xc1\xc1 this is not msgpack \x00\xff")
    assert "cannot decode" in msg
    msg = _read_bad(bad_db, pack([1, 2, 3]))
    assert "expected a dict" in msg


def test_truncated_value(bad_db, synth, rng):
    data = pack(synth.make_keysteps_value(rng, T=2))
    assert "cannot decode" in _read_bad(bad_db, data[: len(data) // 2])


@pytest.mark.parametrize("missing", ["action", "key_frameids"])
def test_missing_key(bad_db, synth, rng, missing):
    value = synth.make_keysteps_value(rng, T=3)
    del value[missing]
    msg = _read_bad(bad_db, value)
    assert f"missing key '{missing}'" in msg


def test_value_of_unknown_kind(bad_db, synth, rng):
    value = synth.make_keysteps_value(rng, T=3)
    del value["pc"]
    assert "unrecognised" in _read_bad(bad_db, value)


def test_inconsistent_lengths_keysteps(bad_db, synth, rng):
    value = synth.make_keysteps_value(rng, T=3)
    value["action"] = value["action"][:2]
    msg = _read_bad(bad_db, value)
    assert "inconsistent lengths" in msg and "'action'" in msg and "T=2" in msg and "T=3" in msg

    value = synth.make_keysteps_value(rng, T=3)
    value["key_frameids"] = [0, 5]
    msg = _read_bad(bad_db, value)
    assert "'key_frameids'" in msg and "inconsistent lengths" in msg

    value = synth.make_keysteps_value(rng, T=3)
    value["pc"] = value["pc"][:2]
    assert "'pc'" in _read_bad(bad_db, value)

    value = synth.make_keysteps_value(rng, T=3)
    value["key_frameids"] = 7
    assert "'key_frameids'" in _read_bad(bad_db, value)


def test_inconsistent_lengths_voxel(bad_db, synth, rng):
    good = keysteps_to_voxel_value(synth.make_keysteps_value(rng, T=3), synth.synthetic_meta())
    value = dict(good, rgb=good["rgb"][:2])
    assert "inconsistent lengths" in _read_bad(bad_db, value)
    value = dict(good, action=good["action"][:1])
    assert "inconsistent lengths" in _read_bad(bad_db, value)
    value = dict(good, key_frameids=good["key_frameids"] + [99])
    assert "'key_frameids'" in _read_bad(bad_db, value)
    value = dict(good, rgb=[c[:-1] for c in good["rgb"]])
    assert "'rgb'[0]" in _read_bad(bad_db, value)
    value = dict(good, sem=[s[:-1] for s in good["sem"]])
    assert "'sem'" in _read_bad(bad_db, value)


def test_action_with_wrong_width(bad_db, synth, rng):
    value = synth.make_keysteps_value(rng, T=3)
    value["action"] = value["action"][:, :7]
    assert "(T, 8)" in _read_bad(bad_db, value)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_points(bad_db, synth, rng, bad):
    value = synth.make_keysteps_value(rng, T=3)
    value["pc"] = value["pc"].copy()
    value["pc"][1, 0, 2, 3, 1] = bad
    msg = _read_bad(bad_db, value)
    assert "'pc'" in msg and "NaN or inf" in msg and "[1, 0, 2, 3, 1]" in msg

    vox = keysteps_to_voxel_value(synth.make_keysteps_value(rng, T=3), synth.synthetic_meta())
    vox["xyz"][2] = vox["xyz"][2].copy()
    vox["xyz"][2][5, 0] = bad
    msg = _read_bad(bad_db, vox)
    assert "'xyz'[2]" in msg and "NaN or inf" in msg


@pytest.mark.parametrize("kind", ["keysteps", "voxel1cm"])
def test_non_finite_action(bad_db, synth, rng, kind):
    value = synth.make_keysteps_value(rng, T=3)
    if kind == "voxel1cm":
        value = keysteps_to_voxel_value(value, synth.synthetic_meta())
    value["action"] = value["action"].copy()
    value["action"][2, 4] = np.nan
    msg = _read_bad(bad_db, value)
    assert "'action'" in msg and "NaN or inf" in msg


def test_value_builders_validate(synth, rng):
    good = synth.make_keysteps_value(rng, T=2)
    with pytest.raises(DataError, match="uint8"):
        keysteps_value(good["rgb"].astype(np.float32), good["pc"], good["action"], good["key_frameids"],
                       path="p", key="k")
    with pytest.raises(DataError, match=r"'depth'.*\[path=p, key=k\]"):
        keysteps_value(good["rgb"], good["pc"], good["action"], good["key_frameids"], depth=np.zeros((2, 1)),
                       path="p", key="k")
    with pytest.raises(DataError, match=r"'xyz'\[0\] has shape"):
        voxel_value([np.zeros((4, 2))], [np.zeros((4, 2))], np.zeros((1, 8)), [0])
