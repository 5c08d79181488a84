"""KeystepDataset + collate on the synthetic 3D-LOTUS dataset, its metadata, and every bad-input case."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from harness.data.collate import collate_keysteps
from harness.data.dataset import KeystepDataset
from harness.data.episode import Keystep
from harness.data.errors import DataError
from harness.data.formats.instructions import write_instr_embeds
from harness.data.formats.lotus_lmdb import pack
from harness.data.meta import DatasetMeta, find_meta, resolve_meta
from harness.data.transforms import TransformConfig

N = 256
ITEM_KEYS = {"points", "colors", "height", "point_mask", "pose", "target", "history", "offset", "rotation", "rotation_center",
             "text_tokens", "instruction", "task", "variation", "key"}


@pytest.fixture(scope="module")
def ds(dataset_root):
    return KeystepDataset(dataset_root.root, transform=TransformConfig(num_points=N), seed=7)


# ----------------------------------------------------------------------------------------- the index


@pytest.mark.parametrize("kind", ["voxel1cm", "keysteps"])
def test_length_is_sum_of_T_minus_one(dataset_root, kind):
    d = KeystepDataset(dataset_root.root, kind=kind)
    assert len(d) == dataset_root.num_keysteps == sum(T - 1 for v in dataset_root.lengths.values()
                                                      for T in v.values())
    assert d.index[0] == (dataset_root.taskvars[0], "episode0", 0)
    assert sorted({tv for tv, _, _ in d.index}) == dataset_root.taskvars
    s = d.summary()
    assert s["keysteps"] == len(d) and s["episodes"] == dataset_root.num_episodes
    assert s["tasks"] == ["push_box", "reach_red"] and s["skipped"] == {}


def test_raw_keysteps_pair_observation_t_with_action_t_plus_one(dataset_root):
    d = KeystepDataset(dataset_root.root, n_hist=3)
    for i, (tv, key, t) in enumerate(d.index):
        ks = d[i]
        assert isinstance(ks, Keystep) and ks.keystep == t and ks.taskvar == tv and ks.episode == key
        value = dataset_root.voxel[tv][key]
        np.testing.assert_array_equal(ks.pose, value["action"][t])
        np.testing.assert_array_equal(ks.target, value["action"][t + 1])
        np.testing.assert_array_equal(ks.history[-1], value["action"][t])
        assert ks.history.shape == (3, 8)
        np.testing.assert_array_equal(ks.points, value["xyz"][t])
        assert ks.instruction == dataset_root.instructions[tv][0]  # no transform: eval, first paraphrase
        np.testing.assert_array_equal(ks.text_tokens, dataset_root.embeds[ks.instruction])


def test_episode_keystep_history_and_range(dataset_root):
    from harness.data.formats.lotus_lmdb import LotusLmdbSource

    ep = LotusLmdbSource(dataset_root.root, kind="keysteps").read_episode("reach_red+0", "episode1")
    T = len(ep)
    assert T == 4 and ep.num_keysteps == 3 and ep.taskvar == "reach_red+0"
    ks = ep.keystep(1, n_hist=3)
    np.testing.assert_array_equal(ks.history, ep.actions[[0, 0, 1]])  # oldest first, clamped at frame 0
    assert ks.key == "reach_red+0-episode1-t1"
    assert ks.images.shape == (2, 3, 8, 12) and ks.point_maps.shape == (2, 3, 8, 12)
    np.testing.assert_array_equal(ks.point_maps.transpose(0, 2, 3, 1), ep.point_maps[1])
    assert ks.bbox_info["Panda_link0_visual_bbox"].shape == (6,)
    assert [k.keystep for k in ep.keysteps()] == [0, 1, 2]
    for t in (-1, T - 1):
        with pytest.raises(IndexError, match="out of range"):
            ep.keystep(t)


def test_items_have_documented_keys_and_fixed_shapes(ds, dataset_root):
    for i in range(len(ds)):
        it = ds[i]
        assert set(it) == ITEM_KEYS
        assert it["points"].shape == (N, 3) and it["points"].dtype == np.float32
        assert it["colors"].shape == (N, 3) and it["height"].shape == (N, 1)
        assert it["point_mask"].shape == (N,) and it["point_mask"].any()
        assert it["pose"].shape == (8,) and it["target"].shape == (8,) and it["history"].shape == (1, 8)
        assert it["offset"].shape == (3,)
        tv = f"{it['task']}+{it['variation']}"
        assert it["instruction"] in dataset_root.instructions[tv]
        np.testing.assert_array_equal(it["text_tokens"], dataset_root.embeds[it["instruction"]])
        assert it["text_tokens"].shape[1] == 512 and it["text_tokens"].dtype == np.float32
        assert np.all(np.abs(it["colors"]) <= 1)


def test_keysteps_kind_items(dataset_root):
    d = KeystepDataset(dataset_root.root, kind="keysteps",
                       transform=TransformConfig(num_points=N, train=False))
    it = d[0]
    assert it["points"].shape == (N, 3) and it["rotation"] == 0
    # the world cloud sits inside the workspace, above the table
    world = (it["points"] + it["offset"])[it["point_mask"]]
    lo, hi = dataset_root.meta.workspace_bounds
    assert np.all((world > lo) & (world < hi)) and np.all(world[:, 2] > 0.0005)


@pytest.mark.parametrize("train", [False, True])
def test_image_policies_get_images_and_point_maps_in_the_points_frame(dataset_root, train):
    """TransformConfig(images=True), what an InputSpec(modality="images") asks for: the camera images and the
    world point maps, rotated and centred exactly like the points and poses; they collate."""
    from harness.data.transforms import rotate_z
    from harness.policy import InputSpec

    d = KeystepDataset(dataset_root.root, kind="keysteps",
                       transform=TransformConfig(num_points=N, train=train, images=True), seed=3)
    raw = KeystepDataset(dataset_root.root, kind="keysteps", transform=None)
    for i in (0, 5):
        it, ks = d[i], raw[i]
        n_cam, _, H, W = ks.point_maps.shape
        assert it["images"].shape == (n_cam, 3, H, W) and np.allclose(it["images"], ks.images)
        world = ks.point_maps.transpose(0, 2, 3, 1).reshape(-1, 3)
        turned = rotate_z(world, ks.pose[None], float(it["rotation"]), dataset_root.meta.robot_base)[0]
        expected = (turned - it["offset"]).reshape(n_cam, H, W, 3).transpose(0, 3, 1, 2)
        assert it["point_maps"].shape == (n_cam, 3, H, W)
        assert np.allclose(it["point_maps"], expected, atol=1e-5)
        assert (it["rotation"] != 0) == train
    batch = collate_keysteps([d[0], d[1]])
    InputSpec("images", text_dim=batch["text_tokens"].shape[-1]).check_batch(batch)


def test_text_files_and_meta_are_found_beside_the_data(ds, dataset_root):
    assert ds.instructions_path == (dataset_root.root / "taskvars_instructions.json").resolve()
    assert ds.embeds_path == (dataset_root.root / "instr_embeds_hash.npy").resolve()
    assert ds.meta_source == f"file:{(dataset_root.root / 'meta.json').resolve()}"
    assert ds.meta == dataset_root.meta
    assert ds.source.path == dataset_root.root / "train" / "voxel1cm"


def test_deterministic_for_seed_epoch_index(ds, dataset_root):
    a, b = ds[3], ds[3]
    again = KeystepDataset(dataset_root.root, transform=TransformConfig(num_points=N), seed=7)[3]
    for k in ("points", "colors", "point_mask", "target", "offset", "rotation"):
        np.testing.assert_array_equal(a[k], b[k])
        np.testing.assert_array_equal(a[k], again[k])
    assert a["instruction"] == again["instruction"]
    other_seed = KeystepDataset(dataset_root.root, transform=TransformConfig(num_points=N), seed=8)[3]
    assert other_seed["rotation"] != a["rotation"]
    ds.set_epoch(1)
    try:
        assert ds[3]["rotation"] != a["rotation"]
    finally:
        ds.set_epoch(0)
    np.testing.assert_array_equal(ds[3]["points"], a["points"])


def test_taskvars_filter(dataset_root):
    d = KeystepDataset(dataset_root.root, taskvars=["reach_red+1"])
    assert {tv for tv, _, _ in d.index} == {"reach_red+1"}
    assert len(d) == sum(T - 1 for T in dataset_root.lengths["reach_red+1"].values())
    with pytest.raises(DataError) as e:
        KeystepDataset(dataset_root.root, taskvars=["reach_red+1", "fly+0"])
    assert "fly+0" in str(e.value) and str(dataset_root.root) in str(e.value)


def test_dataloader_with_workers(dataset_root):
    """Forked workers re-open the LMDBs the parent already holds (py-lmdb >= 3 forbids a second handle)."""
    d = KeystepDataset(dataset_root.root, transform=TransformConfig(num_points=64))
    loader = DataLoader(d, batch_size=4, num_workers=2, collate_fn=collate_keysteps,
                        multiprocessing_context="fork")
    keys = [k for batch in loader for k in batch["key"]]
    assert sorted(keys) == sorted(f"{tv}-{key}-t{t}" for tv, key, t in d.index)


# --------------------------------------------------------------------------------------------- collate


def test_collate_shapes_and_text_padding(ds):
    items = [ds[i] for i in range(len(ds))]
    lengths = {len(it["text_tokens"]) for it in items}
    assert len(lengths) > 1  # the synthetic paraphrases differ in length: padding is exercised
    batch = collate_keysteps(items[:6])
    B = 6
    assert batch["points"].shape == (B, N, 3) and batch["points"].dtype == torch.float32
    assert batch["colors"].shape == (B, N, 3) and batch["height"].shape == (B, N, 1)
    assert batch["point_mask"].shape == (B, N) and batch["point_mask"].dtype == torch.bool
    assert batch["pose"].shape == (B, 8) and batch["target"].shape == (B, 8)
    assert batch["history"].shape == (B, 1, 8) and batch["offset"].shape == (B, 3)
    assert batch["rotation"].shape == (B,)
    assert all(len(batch[k]) == B for k in ("key", "task", "instruction", "variation"))
    L = max(len(it["text_tokens"]) for it in items[:6])
    assert batch["text_tokens"].shape == (B, L, 512) and batch["text_mask"].shape == (B, L)
    for b, it in enumerate(items[:6]):
        n = len(it["text_tokens"])
        assert batch["text_mask"][b].sum() == n and batch["text_mask"][b, :n].all()
        np.testing.assert_array_equal(batch["text_tokens"][b, :n].numpy(), it["text_tokens"])
        assert not batch["text_tokens"][b, n:].any()
        np.testing.assert_array_equal(batch["points"][b].numpy(), it["points"])


def test_collate_errors(ds):
    with pytest.raises(ValueError, match="empty"):
        collate_keysteps([])
    a, b = ds[0], dict(ds[1])
    b["points"] = b["points"][:10]
    with pytest.raises(ValueError, match="'points'"):
        collate_keysteps([a, b])
    c = dict(ds[1], text_tokens=np.zeros((3, 8), np.float32))
    with pytest.raises(ValueError, match="widths"):
        collate_keysteps([a, c])
    no_text = collate_keysteps([dict(a, text_tokens=None)])
    assert "text_tokens" not in no_text and "text_mask" not in no_text


# ------------------------------------------------------------------------------------------- metadata


def test_meta_roundtrip_and_lookup(tmp_path, synth):
    meta = synth.synthetic_meta()
    path = meta.save(tmp_path)
    assert DatasetMeta.load(path) == meta and DatasetMeta.load(tmp_path) == meta
    nested = tmp_path / "train" / "voxel1cm"
    nested.mkdir(parents=True)
    assert find_meta(nested) == path.resolve()
    got, where = resolve_meta(nested)
    assert got == meta and where == f"file:{path.resolve()}"
    got, where = resolve_meta(nested, preset="rlbench18")
    assert got.table_height == 0.7505 and where == "preset:rlbench18"
    with pytest.raises(DataError, match="unknown metadata preset"):
        resolve_meta(nested, preset="nope")


def test_meta_load_errors(tmp_path):
    path = tmp_path / "meta.json"
    path.write_text("{ this is not json")
    with pytest.raises(DataError) as e:
        DatasetMeta.load(path)
    assert str(path) in str(e.value) and "not valid JSON" in str(e.value)
    path.write_text(json.dumps({"source": "x", "tabel_height": 0.5}))
    with pytest.raises(DataError) as e:
        DatasetMeta.load(path)
    assert str(path) in str(e.value) and "tabel_height" in str(e.value) and "unknown" in str(e.value)
    path.write_text(json.dumps({"table_height": 0.5}))
    with pytest.raises(DataError) as e:
        DatasetMeta.load(path)
    assert "source" in str(e.value) and str(path) in str(e.value)
    with pytest.raises(DataError) as e:
        DatasetMeta.load(tmp_path / "absent")
    assert str(tmp_path / "absent") in str(e.value)


def test_dataset_meta_from_bad_meta_json(tmp_path, synth):
    d = synth.make_dataset(tmp_path)
    (d.root / "meta.json").write_text('{"source": "x", "workspace": 1}')
    with pytest.raises(DataError) as e:
        KeystepDataset(d.root)
    assert "workspace" in str(e.value) and str(d.root / "meta.json") in str(e.value)


# ------------------------------------------------------------------------------------------ bad input


def test_missing_folder(tmp_path):
    with pytest.raises(DataError) as e:
        KeystepDataset(tmp_path / "no_such_dataset")
    assert str(tmp_path / "no_such_dataset") in str(e.value) and "does not exist" in str(e.value)


def _corrupt(d, tv: str, key: str, synth, kind: str = "voxel1cm", data: bytes | None = None, mutate=None):
    """Overwrite one episode: raw ``data`` or the stored value passed through ``mutate``."""
    if data is None:
        value = dict((d.voxel if kind == "voxel1cm" else d.keysteps)[tv][key])
        mutate(value)
        data = pack(value)
    synth.put_raw(d.lmdb_path(kind, tv), key, data)
    return d.lmdb_path(kind, tv)


def _nan_xyz(v):
    v["xyz"] = [x.copy() for x in v["xyz"]]
    v["xyz"][1][3, 2] = np.nan


def _inf_pc(v):
    v["pc"] = v["pc"].copy()
    v["pc"][0, 1, 2, 3, 0] = np.inf


def _nan_action(v):
    v["action"] = v["action"].copy()
    v["action"][0, 0] = np.nan


BAD_CASES = {
    "corrupt value": ("voxel1cm", b"\x93\x01garbage", None, "cannot decode"),
    "missing action": ("voxel1cm", None, lambda v: v.pop("action"), "missing key 'action'"),
    "missing key_frameids": ("keysteps", None, lambda v: v.pop("key_frameids"), "missing key 'key_frameids'"),
    "rgb vs action": ("keysteps", None, lambda v: v.update(action=v["action"][:-1]), "inconsistent lengths"),
    "key_frameids vs T": ("voxel1cm", None, lambda v: v.update(key_frameids=v["key_frameids"][:-1]),
                          "'key_frameids' has"),
    "nan xyz": ("voxel1cm", None, _nan_xyz, "'xyz'[1] contains NaN or inf"),
    "inf pc": ("keysteps", None, _inf_pc, "'pc' contains NaN or inf"),
    "nan action": ("voxel1cm", None, _nan_action, "'action' contains NaN or inf"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_episode_raises_then_is_skipped(tmp_path, synth, case):
    kind, data, mutate, words = BAD_CASES[case]
    d = synth.make_dataset(tmp_path)
    tv, key = "reach_red+0", "episode1"
    db = _corrupt(d, tv, key, synth, kind, data, mutate)
    with pytest.raises(DataError) as e:
        KeystepDataset(d.root, kind=kind)
    msg = str(e.value)
    assert str(db) in msg and f"key={key}" in msg and words in msg, msg

    good = KeystepDataset(d.root, kind=kind, skip_bad=True, transform=TransformConfig(num_points=N))
    assert len(good) == d.num_keysteps - (d.lengths[tv][key] - 1)
    assert (tv, key) not in {(t, k) for t, k, _ in good.index}
    assert sum(good.skipped.values()) == 1 and words in next(iter(good.skipped))
    assert good.summary()["skipped"] == dict(good.skipped)
    for i in range(len(good)):
        assert good[i]["points"].shape == (N, 3)


def test_skip_bad_counts_several(tmp_path, synth):
    d = synth.make_dataset(tmp_path)
    _corrupt(d, "push_box+0", "episode0", synth, data=b"\xff\xff")
    _corrupt(d, "reach_red+1", "episode1", synth, mutate=_nan_action)
    _corrupt(d, "reach_red+1", "episode0", synth, mutate=_nan_action)
    good = KeystepDataset(d.root, skip_bad=True)
    assert sum(good.skipped.values()) == 3 and len(good.skipped) == 2  # two kinds of problem
    bad = {("push_box+0", "episode0"), ("reach_red+1", "episode1"), ("reach_red+1", "episode0")}
    want = sum(T - 1 for tv, eps in d.lengths.items() for k, T in eps.items() if (tv, k) not in bad)
    assert len(good) == want > 0


def test_corrupt_lmdb_file(tmp_path, synth):
    d = synth.make_dataset(tmp_path)
    db = d.lmdb_path("voxel1cm", "push_box+0")
    (db / "data.mdb").write_bytes(b"not an lmdb file at all" * 500)
    with pytest.raises(DataError) as e:
        KeystepDataset(d.root)
    assert str(db) in str(e.value) and "cannot open LMDB" in str(e.value)


def test_instruction_without_embedding(tmp_path, synth):
    d = synth.make_dataset(tmp_path)
    missing = d.instructions["reach_red+1"][1]
    write_instr_embeds(d.root / "instr_embeds_hash.npy", {k: v for k, v in d.embeds.items() if k != missing})
    with pytest.raises(DataError) as e:
        KeystepDataset(d.root)
    msg = str(e.value)
    assert missing in msg and "no embedding" in msg and str(d.root / "instr_embeds_hash.npy") in msg
    assert "reach_red+1" in msg

    good = KeystepDataset(d.root, skip_bad=True)  # every episode of that task-variation is skipped
    assert sum(good.skipped.values()) == len(d.lengths["reach_red+1"])
    assert {tv for tv, _, _ in good.index} == {"push_box+0", "reach_red+0"}

    lax = KeystepDataset(d.root, require_text=False, transform=TransformConfig(num_points=N))
    assert len(lax) == d.num_keysteps
    seen = {}
    for i in range(len(lax)):
        it = lax[i]
        seen[it["instruction"]] = it["text_tokens"]
    assert all((v is None) == (k == missing) for k, v in seen.items())


def test_no_embeddings_file_at_all(tmp_path, synth):
    d = synth.make_dataset(tmp_path)
    (d.root / "instr_embeds_hash.npy").unlink()
    with pytest.raises(DataError) as e:
        KeystepDataset(d.root)
    assert "no embedding" in str(e.value) and str(d.root) in str(e.value)


def test_explicit_text_files(tmp_path, synth):
    d = synth.make_dataset(tmp_path / "a")
    other = tmp_path / "elsewhere"
    other.mkdir()
    (d.root / "taskvars_instructions.json").rename(other / "instr.json")
    (d.root / "instr_embeds_hash.npy").rename(other / "emb.npy")
    ds = KeystepDataset(d.root, instructions=other / "instr.json", embeds=other / "emb.npy")
    assert ds.instructions_for("push_box+0") == d.instructions["push_box+0"]
    # without the instructions file the task name is the instruction, and it has no embedding
    with pytest.raises(DataError, match="'push box'"):
        KeystepDataset(d.root, embeds=other / "emb.npy")
