"""`mdh data convert-rlbench` against the real reach_target episodes (../shared/fixtures/rlbench).

Raw roots with more task-variations or other layouts are built from symlinks to the fixture (read-only).
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import lmdb
import numpy as np
import pytest

from harness.data import convert_rlbench as conv
from harness.data.convert_rlbench import convert_rlbench
from harness.data.dataset import KeystepDataset
from harness.data.errors import DataError
from harness.data.formats import open_source
from harness.data.formats.lotus_lmdb import LotusLmdbSource, close_readonly
from harness.data.formats.rlbench_raw import RLBenchRawSource
from harness.data.transforms import crop_to_workspace, voxelize

FIXTURE = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "rlbench"
VAR0 = FIXTURE / "reach_target" / "variation0"
EP0 = VAR0 / "episodes" / "episode0"
TV = "reach_target+0"


@pytest.fixture(autouse=True)
def _need_fixture():
    if not (EP0 / "low_dim_obs.pkl").is_file():
        pytest.skip(f"RLBench fixture not found at {FIXTURE} (../shared beside the checkout)")


def _convert(raw, out, **kw):
    kw.setdefault("encoder", "hash")
    kw.setdefault("progress", False)
    return convert_rlbench(raw, out, **kw)


def _link_variation(dst: Path, var: int, skip: dict | None = None) -> None:
    """``dst/reach_target/variation<var>`` made of symlinks to the fixture's variation0; ``skip`` maps an
    episode name to child names left out (to break it)."""
    vdir = dst / "reach_target" / f"variation{var}"
    for ep in sorted((VAR0 / "episodes").iterdir()):
        e = vdir / "episodes" / ep.name
        e.mkdir(parents=True)
        for child in ep.iterdir():
            if child.name not in (skip or {}).get(ep.name, ()):
                (e / child.name).symlink_to(child)
    (vdir / "variation_descriptions.pkl").write_bytes(pickle.dumps([f"reach the target {var}", "touch it"]))


def _two_taskvars(root: Path) -> Path:
    for var in (0, 1):
        _link_variation(root, var)
    return root


def _lmdb_items(path: Path) -> dict[bytes, bytes]:
    close_readonly(path)
    env = lmdb.open(str(path), readonly=True, lock=False, subdir=True)
    try:
        with env.begin() as txn:
            return dict(txn.cursor())
    finally:
        env.close()


def _snapshot(out: Path) -> dict:
    """Every LMDB's (key, value bytes), the instruction files, and meta.json without timings and paths."""
    snap = {str(p.relative_to(out)): _lmdb_items(p) for p in sorted(out.glob("*/*/*+*"))}
    for name in ("taskvars.json", "taskvars_instructions.json", "instr_embeds_hash.npy"):
        snap[name] = (out / name).read_bytes()
    meta = json.loads((out / "meta.json").read_text())
    for per_split in meta["extra"]["converted"].values():
        for rec in per_split.values():
            rec.pop("seconds")
            rec.pop("source")
    snap["meta.json"] = meta
    return snap


# --------------------------------------------------------------------------------------------- content


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("conv") / "out"
    _convert(FIXTURE, out)
    return out


def test_converted_lmdbs_load_with_the_raw_readers_numbers(converted):
    raw = RLBenchRawSource(FIXTURE)
    keys = LotusLmdbSource(converted, kind="keysteps")
    vox = LotusLmdbSource(converted, kind="voxel1cm")
    assert keys.taskvars() == vox.taskvars() == [TV]
    assert keys.episode_keys(TV) == vox.episode_keys(TV) == ["episode0", "episode1"]
    meta = json.loads((converted / "meta.json").read_text())
    bounds = meta["workspace_bounds"]
    for key, frames in (("episode0", [0, 69]), ("episode1", [0, 63])):
        r, k, v = raw.read_episode(TV, key), keys.read_episode(TV, key), vox.read_episode(TV, key)
        # reach_target never toggles the gripper: its only keypose is the last frame, plus frame 0
        assert r.key_frameids == k.key_frameids == v.key_frameids == frames
        np.testing.assert_array_equal(k.actions, r.actions)
        np.testing.assert_array_equal(v.actions, r.actions)
        assert k.point_maps.shape == (2, 4, 128, 128, 3) and k.rgb_images.dtype == np.uint8
        np.testing.assert_array_equal(k.point_maps, r.point_maps)
        np.testing.assert_array_equal(k.rgb_images, r.rgb_images)
        np.testing.assert_array_equal(k.depth, r.depth)
        for t in range(2):
            pts = r.point_maps[t].reshape(-1, 3)
            inside = pts[crop_to_workspace(pts, bounds)]
            n_voxels = len(voxelize(inside, 0.01).first)
            assert 15000 < len(v.xyz[t]) == n_voxels, (key, t)
            assert crop_to_workspace(v.xyz[t], bounds).all()


def test_every_camera_sees_the_table_top_at_075(converted):
    keys = LotusLmdbSource(converted, kind="keysteps")
    for key in keys.episode_keys(TV):
        ep = keys.read_episode(TV, key)
        for t in range(len(ep)):
            for c, cam in enumerate(ep.extra.get("cameras") or range(4)):
                pts = ep.point_maps[t, c].reshape(-1, 3)
                z = pts[crop_to_workspace(pts, ((-0.3, -0.5, 0.6), (0.7, 0.5, 1.6))), 2]
                counts, edges = np.histogram(z, bins=np.arange(0.6, 1.6, 0.01))
                mode = edges[counts.argmax()] + 0.005  # the most populated 1 cm slab is the table top
                assert abs(mode - 0.75) <= 0.01, (key, t, cam, mode)


def test_meta_instructions_and_what_inspect_and_training_read(converted):
    meta = json.loads((converted / "meta.json").read_text())
    assert meta["source"] == "rlbench" and meta["image_size"] == [128, 128]
    assert meta["cameras"] == ["left_shoulder", "right_shoulder", "wrist", "front"]
    rec = meta["extra"]["converted"]["train"][TV]
    assert rec["episodes"] == 2 and rec["keysteps"] == 2 and rec["keyframes"]["episode1"] == [0, 63]
    assert rec["instructions_fallback"] is True  # this asset's descriptions pickle holds no strings
    assert json.loads((converted / "taskvars.json").read_text()) == [TV]
    assert json.loads((converted / "taskvars_instructions.json").read_text()) == {TV: ["reach target"]}
    assert meta["robot_link_boxes"] == []  # upstream RLBench records no link boxes
    ds = KeystepDataset(converted)  # what `mdh train data.path=OUT` opens: meta.json and text found beside
    assert ds.meta_source == f"file:{converted / 'meta.json'}" and len(ds) == 2
    assert ds[0].text_tokens is not None and ds[0].points.shape[1] == 3
    assert isinstance(open_source(converted / "train" / "voxel1cm"), LotusLmdbSource)


def test_peract_keypose_rule_is_selectable_and_recorded(tmp_path):
    _convert(VAR0, tmp_path / "out", keyposes="peract", cameras=["front", "wrist"])
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["extra"]["settings"]["keyposes"] == "peract" and "rule='peract'" in meta["keypose_method"]
    assert meta["cameras"] == ["front", "wrist"]
    ep = LotusLmdbSource(tmp_path / "out", kind="keysteps").read_episode(TV, "episode0")
    assert ep.key_frameids == [0, 69] and ep.point_maps.shape[1] == 2


# --------------------------------------------------------------------------------------------- layouts


def test_all_variations_layout_and_split_folders(tmp_path):
    raw = tmp_path / "raw"
    for split, var in (("train", 3), ("val", 5)):
        for ep in sorted((VAR0 / "episodes").iterdir()):
            e = raw / split / "reach_target" / "all_variations" / "episodes" / ep.name
            e.mkdir(parents=True)
            for child in ep.iterdir():
                (e / child.name).symlink_to(child)
            (e / "variation_number.pkl").write_bytes(pickle.dumps(var))
            (e / "variation_descriptions.pkl").write_bytes(pickle.dumps([f"reach variation {var}"]))
    s = _convert(raw, tmp_path / "out")
    assert s["converted"] == ["train/reach_target+3", "val/reach_target+5"]
    assert LotusLmdbSource(tmp_path / "out", split="val").taskvars() == ["reach_target+5"]
    instr = json.loads((tmp_path / "out" / "taskvars_instructions.json").read_text())
    assert instr == {"reach_target+3": ["reach variation 3"], "reach_target+5": ["reach variation 5"]}


def test_tasks_filter_and_unknown_task(tmp_path):
    with pytest.raises(DataError, match=r"tasks \['close_jar'\] not found.*reach_target"):
        _convert(FIXTURE, tmp_path / "out", tasks=["close_jar"])
    assert not (tmp_path / "out" / "train").exists()


# --------------------------------------------------------------------------------------------- resume


def test_an_interrupted_conversion_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    raw = _two_taskvars(tmp_path / "raw")
    _convert(raw, tmp_path / "clean")
    clean = _snapshot(tmp_path / "clean")

    real = conv.keysteps_to_voxel_value
    calls = {"n": 0}

    def dies_on_the_third_episode(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # the first episode of reach_target+1
            raise KeyboardInterrupt
        return real(*a, **k)

    out = tmp_path / "out"
    monkeypatch.setattr(conv, "keysteps_to_voxel_value", dies_on_the_third_episode)
    with pytest.raises(KeyboardInterrupt):
        _convert(raw, out)
    # reach_target+0 is complete and recorded; reach_target+1 is nowhere a reader looks
    assert LotusLmdbSource(out).taskvars() == ["reach_target+0"]
    assert LotusLmdbSource(out, kind="keysteps").taskvars() == ["reach_target+0"]
    assert list(json.loads((out / "meta.json").read_text())["extra"]["converted"]["train"]) == ["reach_target+0"]
    monkeypatch.setattr(conv, "keysteps_to_voxel_value", real)
    s = _convert(raw, out)
    assert s["kept"] == ["train/reach_target+0"] and s["converted"] == ["train/reach_target+1"]
    assert not (out / ".staging").exists()
    assert _snapshot(out) == clean


@pytest.mark.parametrize("moves_done", [1, 2])
def test_a_kill_before_the_record_is_written_converts_again(tmp_path, monkeypatch, moves_done):
    """Killed after one of the two LMDB moves, or after both but before meta.json records the
    task-variation: the folders are not trusted, the next run converts it again."""
    out = tmp_path / "out"
    real_move, real_save = conv.replace_dir_atomic, conv.DatasetMeta.save
    calls = {"n": 0}

    def move(tmp, final):
        calls["n"] += 1
        if calls["n"] > moves_done:
            raise KeyboardInterrupt
        real_move(tmp, final)

    def save(self, root):
        raise KeyboardInterrupt

    monkeypatch.setattr(conv, "replace_dir_atomic", move)
    monkeypatch.setattr(conv.DatasetMeta, "save", save)
    with pytest.raises(KeyboardInterrupt):
        _convert(VAR0, out)
    assert (out / "train" / "keysteps" / TV).is_dir()
    assert (out / "train" / "voxel1cm" / TV).is_dir() == (moves_done == 2)
    assert not (out / "meta.json").exists()  # no record: the next run does not trust the folders
    monkeypatch.setattr(conv, "replace_dir_atomic", real_move)
    monkeypatch.setattr(conv.DatasetMeta, "save", real_save)
    s = _convert(VAR0, out)
    assert s["converted"] == ["train/" + TV] and LotusLmdbSource(out).taskvars() == [TV]


def test_resume_with_other_settings_is_refused(tmp_path):
    _convert(VAR0, tmp_path / "out")
    with pytest.raises(DataError, match=r"other settings.*keyposes: 'lotus' -> 'peract'") as err:
        _convert(VAR0, tmp_path / "out", keyposes="peract")
    assert str(tmp_path / "out" / "meta.json") in str(err.value)


def test_two_workers_write_what_one_writes(tmp_path):
    raw = _two_taskvars(tmp_path / "raw")
    _convert(raw, tmp_path / "one")
    s = _convert(raw, tmp_path / "two", workers=2)
    assert sorted(s["converted"]) == ["train/reach_target+0", "train/reach_target+1"]
    assert _snapshot(tmp_path / "two") == _snapshot(tmp_path / "one")


# --------------------------------------------------------------------------------------------- bad input


def test_a_missing_camera_folder_names_the_folder_and_writes_nothing(tmp_path):
    raw = tmp_path / "raw"
    _link_variation(raw, 0, skip={"episode1": ("wrist_depth",)})
    with pytest.raises(DataError, match="camera folder wrist_depth is missing") as err:
        _convert(raw, tmp_path / "out")
    assert "episode1" in str(err.value) and str(raw / "reach_target") in str(err.value)
    assert LotusLmdbSource.detect(tmp_path / "out") is False
    s = _convert(raw, tmp_path / "out", skip_bad=True)  # --skip-bad converts the rest and says what it left
    assert s["episodes"] == 1 and "wrist_depth" in s["skipped"]["train/" + TV]["episode1"]


def test_frame_count_not_matching_the_demo_length(tmp_path):
    raw = tmp_path / "raw"
    _link_variation(raw, 0, skip={"episode0": ("front_rgb",)})
    front = raw / "reach_target" / "variation0" / "episodes" / "episode0" / "front_rgb"
    front.mkdir()
    for i in range(69):  # one PNG short of the 70-step demo
        (front / f"{i}.png").symlink_to(EP0 / "front_rgb" / f"{i}.png")
    with pytest.raises(DataError, match="69 PNG images but the demo has 70 steps") as err:
        _convert(raw, tmp_path / "out")
    assert str(front) in str(err.value)


def test_not_a_raw_folder(tmp_path):
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="not a raw RLBench folder"):
        _convert(tmp_path / "nothing", tmp_path / "out")
    shutil.rmtree(tmp_path / "nothing")
    with pytest.raises(DataError, match="does not exist"):
        _convert(tmp_path / "nothing", tmp_path / "out")


def test_cli_convert_then_inspect(tmp_path, capsys):
    from harness.cli import main

    assert main(["data", "convert-rlbench", str(VAR0), str(tmp_path / "out"), "--encoder", "hash",
                 "--no-progress"]) == 0
    assert "converted 1 task-variation(s)" in capsys.readouterr().out
    assert main(["data", "convert-rlbench", str(VAR0), str(tmp_path / "out"), "--encoder", "hash",
                 "--no-progress"]) == 0
    assert "kept 1 already converted" in capsys.readouterr().out
    assert main(["data", "inspect", str(tmp_path / "out"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["episodes"] == 2 and summary["keysteps"] == 2


def _with_link_boxes(tmp_path: Path, fake_rlbench, bad: str | None = None) -> Path:
    """A raw root whose episode0 records link boxes in misc (as the GemBench fork does); ``bad`` names an
    entry given 5 numbers at frame 69."""
    from harness.data.formats.rlbench_raw import load_pickle
    from harness.data.meta import RLBENCH18

    raw = tmp_path / "raw"
    _link_variation(raw, 0, skip={"episode0": ("low_dim_obs.pkl",)})
    shutil.rmtree(raw / "reach_target" / "variation0" / "episodes" / "episode1")
    demo = fake_rlbench.copy_demo(load_pickle(EP0 / "low_dim_obs.pkl"))
    for i, obs in enumerate(demo._observations):
        obs.misc = dict(obs.misc)
        for j, link in enumerate(RLBENCH18.robot_link_boxes):
            obs.misc[f"{link}_bbox"] = np.array([-1, 1, -1, 1, -1, 1], np.float64) * 0.05 * (j + 1)
            obs.misc[f"{link}_pose"] = np.array([0.1 * j, 0, 1 + i / 100, 0, 0, 0, 1], np.float64)
        if bad is not None and i == 69:
            obs.misc[bad] = np.zeros(5)
    ep = raw / "reach_target" / "variation0" / "episodes" / "episode0"
    (ep / "low_dim_obs.pkl").write_bytes(pickle.dumps(demo, protocol=3))
    return raw


def test_link_boxes_recorded_in_misc_are_kept_and_enable_box_removal(tmp_path, fake_rlbench):
    from harness.data.meta import RLBENCH18

    _convert(_with_link_boxes(tmp_path, fake_rlbench), tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["robot_link_boxes"] == RLBENCH18.robot_link_boxes
    ep = LotusLmdbSource(tmp_path / "out", kind="keysteps").read_episode(TV, "episode0")
    assert ep.bbox_info["Panda_link3_respondable_bbox"].shape == (2, 6)
    np.testing.assert_allclose(ep.pose_info["Panda_link2_respondable_pose"][:, 2], [1.0, 1.69], rtol=1e-6)


def test_a_malformed_link_box_names_the_entry(tmp_path, fake_rlbench):
    raw = _with_link_boxes(tmp_path, fake_rlbench, bad="Panda_link3_respondable_bbox")
    with pytest.raises(DataError, match="must hold 6 finite numbers.*at keyframe 1") as err:
        _convert(raw, tmp_path / "out")
    assert "[Panda_link3_respondable_bbox]" in str(err.value) and "low_dim_obs.pkl" in str(err.value)
