"""Bad input that used to pass loading and fail later (or kill the process): truncated LMDBs, implausible
values, an incomplete or mistyped meta.json, and empty folders, LMDBs and episodes.

Each case must surface as a ``DataError`` naming the file, the key and the index/value, and
``KeystepDataset(..., skip_bad=True)`` must be able to skip it (counted in ``skipped``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from harness.data.dataset import KeystepDataset
from harness.data.errors import DataError
from harness.data.formats.lotus_lmdb import pack
from harness.data.transforms import TransformConfig

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    """Run ``mdh ARGS`` (or ``python -c CODE``) in a child: a SIGBUS there must not kill the test run."""
    cmd = [sys.executable, "-c", code] if code is not None else [sys.executable, "-m", "harness.cli", *args]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


# ------------------------------------------------------------------------------- LMDB truncation


@pytest.fixture(scope="module")
def truncated(tmp_path_factory, synth):
    """A dataset whose reach_red+0 voxel1cm data.mdb was cut to half its size."""
    d = synth.make_dataset(tmp_path_factory.mktemp("truncated"), kinds=("voxel1cm",))
    db = d.lmdb_path("voxel1cm", "reach_red+0") / "data.mdb"
    os.truncate(db, db.stat().st_size // 2)
    return d, db


@pytest.mark.parametrize("command", [("data", "inspect"), ("bench", "data", "--batches", "1")])
def test_truncated_lmdb_cli_is_a_clean_error_not_sigbus(truncated, command):
    d, db = truncated
    r = _run(*command[:2], str(d.root), *command[2:])
    assert r.returncode not in (135, -7), f"killed by SIGBUS: {r.returncode}"
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert str(db) in r.stderr and "truncated" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_truncated_lmdb_train_is_a_clean_error_not_sigbus(truncated, tmp_path):
    """`mdh train` on the same data: exit 2, one error line naming the file, no traceback, no checkpoint."""
    d, db = truncated
    run_dir = tmp_path / "run"
    r = _run("train", "model.preset=tiny", f"data.path={d.root}", "data.name=synthetic", "data.workers=0",
             "data.num_points=64", "data.eval_keysteps=2", f"hydra.run.dir={run_dir}", "train.B=2", "train.M=2",
             "train.steps=2", "train.eval_every=2", "train.ckpt_every=2", "train.progress=false")
    assert r.returncode not in (135, -7), f"killed by SIGBUS: {r.returncode}"
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("mdh train: error:")]
    assert len(lines) == 1, r.stderr[-3000:]
    assert "data.mdb" in lines[0] and str(db) in lines[0] and "truncated" in lines[0], lines[0]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert not (run_dir / "ckpt").exists()


def test_truncated_lmdb_dataset_raises_data_error_and_skip_bad_skips_it(truncated):
    d, db = truncated
    code = textwrap.dedent(f"""
        from harness.data.dataset import KeystepDataset
        from harness.data.errors import DataError
        try:
            KeystepDataset({str(d.root)!r})
        except DataError as e:
            print("ERROR", e)
        ds = KeystepDataset({str(d.root)!r}, skip_bad=True)
        print("SKIPPED", sum(ds.skipped.values()), sorted({{tv for tv, _, _ in ds.index}}))
        for i in range(len(ds)):
            ds[i]
        print("OK")
    """)
    r = _run(code=code)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    lines = r.stdout.splitlines()
    assert lines[0].startswith("ERROR") and str(db) in lines[0] and "truncated" in lines[0], lines
    assert lines[1] == "SKIPPED 1 ['push_box+0', 'reach_red+1']" and lines[2] == "OK", lines


@pytest.mark.parametrize("size", [0, 100, 4096])
def test_lmdb_shorter_than_its_meta_pages(tmp_path, synth, size):
    d = synth.make_dataset(tmp_path, kinds=("voxel1cm",))
    db = d.lmdb_path("voxel1cm", "push_box+0") / "data.mdb"
    os.truncate(db, size)
    with pytest.raises(DataError) as e:
        KeystepDataset(d.root)
    assert str(db) in str(e.value) and f"{size} bytes" in str(e.value)


def test_lmdb_truncated_after_it_was_opened(tmp_path, synth):
    """The shared read handle re-checks the file size on every use (a file may be cut while cached)."""
    d = synth.make_dataset(tmp_path, kinds=("voxel1cm",))
    db = d.lmdb_path("voxel1cm", "reach_red+1") / "data.mdb"
    code = textwrap.dedent(f"""
        import os
        from harness.data.dataset import KeystepDataset
        from harness.data.errors import DataError
        ds = KeystepDataset({str(d.root)!r})
        os.truncate({str(db)!r}, os.path.getsize({str(db)!r}) // 2)
        ds._episodes.clear()
        i = next(i for i, (tv, _, _) in enumerate(ds.index) if tv == "reach_red+1")
        try:
            ds[i]
        except DataError as e:
            print("ERROR", e)
    """)
    r = _run(code=code)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.startswith("ERROR") and str(db) in r.stdout and "truncated" in r.stdout, r.stdout


# ------------------------------------------------------------------------------ implausible values


def _put(d, synth, tv: str, key: str, mutate, kind: str = "voxel1cm"):
    """Store ``mutate(copy of the stored value)`` under ``key``; returns the LMDB folder."""
    value = dict((d.voxel if kind == "voxel1cm" else d.keysteps)[tv][key])
    value["action"] = value["action"].copy()
    mutate(value)
    synth.put_raw(d.lmdb_path(kind, tv), key, pack(value))
    return d.lmdb_path(kind, tv)


def _set_action(row: int, cols, values):
    def mutate(v):
        v["action"][row, cols] = values
    return mutate


def _move_cloud(t: int, offset):
    def mutate(v):
        v["xyz"] = [x.copy() for x in v["xyz"]]
        v["xyz"][t] = v["xyz"][t] + np.asarray(offset, np.float32)
    return mutate


def _onto_table(t: int):
    def mutate(v):
        v["xyz"] = [x.copy() for x in v["xyz"]]
        v["xyz"][t][:, 2] = 0.0  # inside the workspace (z > -0.05) but on the table (z <= 0 + 0.0005)
    return mutate


VALUE_CASES = {
    "zero quaternion": (_set_action(1, slice(3, 7), 0.0), "'action'[1] (keyframe 1) quaternion xyzw"),
    "quaternion norm 1.05": (_set_action(0, slice(3, 7), [0.0, 0.0, 0.0, 1.05]), "has norm 1.05"),
    "position 1e30": (_set_action(2, 0, 1e30), "'action'[2] (keyframe 2) position"),
    "position 2 m out": (_set_action(1, 2, 2.8), "grown by 1 m"),
    "gripper 2": (_set_action(0, 7, 2.0), "gripper open value 2 is outside [0, 1]"),
    "gripper -0.5": (_set_action(1, 7, -0.5), "gripper open value -0.5"),
    "cloud out of the workspace": (_move_cloud(1, [10.0, 0.0, 0.0]), "keystep 1 (keyframe 1"),
    "cloud on the table": (_onto_table(0), "keystep 0 (keyframe 0"),
}


@pytest.mark.parametrize("case", list(VALUE_CASES))
def test_implausible_values_raise_with_path_key_and_index_then_skip(tmp_path, synth, case):
    mutate, words = VALUE_CASES[case]
    d = synth.make_dataset(tmp_path, kinds=("voxel1cm",))
    tv, key = "reach_red+0", "episode1"  # T = 4
    db = _put(d, synth, tv, key, mutate)
    cfg = TransformConfig(num_points=64)
    with pytest.raises(DataError) as e:
        KeystepDataset(d.root, transform=cfg)
    msg = str(e.value)
    assert e.value.path == str(db) and e.value.key == key and words in msg, msg
    good = KeystepDataset(d.root, transform=cfg, skip_bad=True)
    assert sum(good.skipped.values()) == 1 and words in next(iter(good.skipped))
    assert (tv, key) not in {(t, k) for t, k, _ in good.index}
    assert len(good) == d.num_keysteps - (d.lengths[tv][key] - 1)
    for i in range(len(good)):
        assert np.isfinite(good[i]["target"]).all()


def test_values_within_tolerance_pass(tmp_path, synth):
    """float32 rounding of a unit quaternion, a gripper value of 1.0 + 1e-4, a pose just outside the box,
    and an empty cloud at the last keyframe (never an observation) are all fine."""
    d = synth.make_dataset(tmp_path, kinds=("voxel1cm",))

    def mutate(v):
        v["action"][0, 3:7] = np.array([0.0, 0.0, 0.0, 1.004], np.float32)
        v["action"][1, 7] = 1.0001
        v["action"][2, :3] = [0.9, -0.9, 1.5]  # workspace is (-0.5, -0.5, -0.05)..(0.5, 0.5, 0.7)
        v["xyz"] = [x.copy() for x in v["xyz"]]
        v["xyz"][-1] = v["xyz"][-1] + np.float32(10.0)

    _put(d, synth, "reach_red+0", "episode1", mutate)
    ds = KeystepDataset(d.root, transform=TransformConfig(num_points=64))
    assert len(ds) == d.num_keysteps and not ds.skipped


def test_cloud_check_follows_the_transform_switches(tmp_path, synth):
    d = synth.make_dataset(tmp_path, kinds=("voxel1cm",))
    _put(d, synth, "reach_red+0", "episode1", _move_cloud(1, [10.0, 0.0, 0.0]))
    assert len(KeystepDataset(d.root)) == d.num_keysteps  # raw keysteps: nothing is cropped
    no_crop = TransformConfig(num_points=64, crop=False)
    assert len(KeystepDataset(d.root, transform=no_crop)) == d.num_keysteps


def test_transform_failure_at_item_time_names_the_file(tmp_path, synth):
    """What the index-time count does not model (here: box-based robot removal with a link the data
    lacks) still fails as a DataError naming the LMDB, the episode and the keystep."""
    d = synth.make_dataset(tmp_path, kinds=("voxel1cm",))
    meta = synth.synthetic_meta()
    meta.robot_link_boxes = ["Panda_link9_visual"]
    ds = KeystepDataset(d.root, meta=meta, transform=TransformConfig(num_points=64, remove_robot="boxes"))
    tv, key, t = ds.index[-1]
    with pytest.raises(DataError) as e:
        ds[len(ds) - 1]
    assert e.value.path == str(d.lmdb_path("voxel1cm", tv)) and e.value.key == key
    assert f"keystep {t} of {tv}" in str(e.value) and "Panda_link9" in str(e.value)


def test_real_rlbench_fixture_passes_the_value_checks():
    fixture = REPO.parent / "shared" / "fixtures" / "rlbench"
    if not fixture.is_dir():
        pytest.skip(f"RLBench fixture not found at {fixture}")
    ds = KeystepDataset(fixture, require_text=False, transform=TransformConfig(num_points=256))
    assert len(ds) > 0 and not ds.skipped and ds.meta_source.startswith("preset:rlbench18")
    from harness.data.inspect import inspect_dataset

    s = inspect_dataset(fixture)
    assert s["problems"] == [] and s["keysteps"] == len(ds)


# ------------------------------------------------------------------------------------- meta.json


def _write_meta(d, **changes) -> Path:
    meta = d.meta.to_dict()
    for k, v in changes.items():
        if v is _DROP:
            meta.pop(k)
        else:
            meta[k] = v
    path = d.root / "meta.json"
    path.write_text(json.dumps(meta))
    return path


_DROP = object()

META_CASES = {
    "no workspace_bounds": ({"workspace_bounds": _DROP}, "workspace_bounds: required but missing"),
    "no table_height": ({"table_height": _DROP}, "table_height: required but missing"),
    "no robot_base": ({"robot_base": _DROP}, "robot_base: required but missing"),
    "no voxel_size": ({"voxel_size": _DROP}, "voxel_size: required but missing"),
    "no robot_labels": ({"robot_labels": _DROP}, "robot_labels: required but missing"),
    "table_height abc": ({"table_height": "abc"}, "table_height: must be a number, got 'abc'"),
    "table_height high": ({"table_height": "high"}, "table_height: must be a number, got 'high'"),
    "table_height true": ({"table_height": True}, "table_height: must be a number, got True (bool)"),
    "voxel_size string": ({"voxel_size": "0.01"}, "voxel_size: must be a number, got '0.01' (str)"),
    "voxel_size 0": ({"voxel_size": 0}, "voxel_size: must be > 0"),
    "robot_labels 5": ({"robot_labels": 5}, "robot_labels: must be a list, got 5"),
    "robot_labels strings": ({"robot_labels": [5, "6"]}, "robot_labels[1]: must be an integer, got '6'"),
    "bounds 2x2": ({"workspace_bounds": [[0, 0], [1, 1]]}, "workspace_bounds[0]: must have 3 entries"),
    "bounds lo > hi": ({"workspace_bounds": [[0, 0, 1], [1, 1, 0.5]]}, "z has min >= max"),
    "robot_base str": ({"robot_base": "origin"}, "robot_base: must be a list"),
    "image_size float": ({"image_size": [8.0, 12]}, "image_size[0]: must be an integer"),
    "cameras": ({"cameras": "front"}, "cameras: must be a list"),
}


@pytest.mark.parametrize("case", list(META_CASES))
def test_meta_json_schema_violations_are_refused_at_open(tmp_path, synth, case):
    changes, words = META_CASES[case]
    d = synth.make_dataset(tmp_path, kinds=("voxel1cm",))
    path = _write_meta(d, **changes)
    with pytest.raises(DataError) as e:
        KeystepDataset(d.root)
    assert e.value.path == str(path.resolve()) and words in str(e.value), str(e.value)
    assert e.value.key == next(iter(changes))


def test_meta_json_lists_every_problem_in_one_error(tmp_path, synth):
    d = synth.make_dataset(tmp_path, kinds=("voxel1cm",))
    path = _write_meta(d, workspace_bounds=_DROP, table_height="abc", robot_labels=5, voxel_size="0.01",
                       robot_base=[0, 0, False], tabel_margin=0.1)
    with pytest.raises(DataError) as e:
        KeystepDataset(d.root)
    keys = set(e.value.key.split(","))
    assert keys == {"workspace_bounds", "table_height", "robot_labels", "voxel_size", "robot_base",
                    "tabel_margin"}, e.value.key
    assert "(6 problems)" in str(e.value) and "robot_base[2]" in str(e.value) and str(path.resolve()) in str(e.value)


def test_meta_json_written_by_us_and_presets_pass(tmp_path, synth):
    from harness.data.meta import PRESETS, DatasetMeta

    for name, preset in PRESETS.items():
        assert DatasetMeta.from_dict(json.loads(json.dumps(preset.to_dict())), name) == preset
    d = synth.make_dataset(tmp_path, kinds=("voxel1cm",))
    meta = DatasetMeta.load(d.root)
    assert meta == d.meta and isinstance(meta.table_height, float) and meta.workspace_bounds[0] == (-0.5, -0.5, -0.05)
    # integers are numbers (JSON writes 0.0 as 0 in some tools); the result is float
    _write_meta(d, table_height=0, voxel_size=1)
    meta = DatasetMeta.load(d.root)
    assert meta.table_height == 0.0 and isinstance(meta.table_height, float) and meta.voxel_size == 1.0


# --------------------------------------------------------------------- empty folders, LMDBs, episodes


def _empty_folder(d):
    folder = d.root / "train" / "voxel1cm" / "push_box+1"
    folder.mkdir()
    return folder, "no data.mdb"


def _lock_only(d):
    folder = d.root / "train" / "voxel1cm" / "push_box+1"
    folder.mkdir()
    (folder / "lock.mdb").write_bytes(b"\0" * 64)
    return folder, "no data.mdb"


def _empty_lmdb(d):
    import lmdb

    folder = d.root / "train" / "voxel1cm" / "push_box+1"
    lmdb.open(str(folder), map_size=1 << 20).close()
    return folder, "holds no episodes"


EMPTY_CASES = {"empty folder": _empty_folder, "lock.mdb only": _lock_only, "empty LMDB": _empty_lmdb}


@pytest.mark.parametrize("case", list(EMPTY_CASES))
def test_empty_taskvar_folder_or_lmdb_is_reported(tmp_path, synth, capsys, case):
    from harness.cli import main

    d = synth.make_dataset(tmp_path, kinds=("voxel1cm",))
    folder, words = EMPTY_CASES[case](d)
    with pytest.raises(DataError) as e:
        KeystepDataset(d.root)
    assert e.value.path == str(folder) and words in str(e.value)
    good = KeystepDataset(d.root, skip_bad=True)
    assert len(good) == d.num_keysteps and sum(good.skipped.values()) == 1
    assert words in next(iter(good.skipped)) and good.summary()["skipped"] == dict(good.skipped)
    # selecting other task-variations does not trip over it; selecting it does
    assert len(KeystepDataset(d.root, taskvars=["push_box+0"])) > 0
    with pytest.raises(DataError, match=words):
        KeystepDataset(d.root, taskvars=["push_box+1"])

    assert main(["data", "inspect", str(d.root), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["variations"] == 3 and "push_box+1" not in json.dumps(s["tasks"])
    assert s["episodes"] == d.num_episodes and s["keysteps"] == d.num_keysteps
    assert [(p["taskvar"], p["path"]) for p in s["problems"]] == [("push_box+1", str(folder))]
    assert words in s["problems"][0]["problem"]
    assert main(["data", "inspect", str(d.root)]) == 0
    out = capsys.readouterr().out
    assert "problems (1):" in out and str(folder) in out and words in out


def test_only_empty_folders_is_an_error_naming_them(tmp_path, synth):
    root = tmp_path / "lmdbs"
    (root / "push_box+0").mkdir(parents=True)
    with pytest.raises(DataError) as e:
        KeystepDataset(root)
    assert str(root) in str(e.value) and "push_box+0" in str(e.value) and "without data.mdb" in str(e.value)


def _one_frame(v):
    for k in ("xyz", "rgb", "sem"):
        v[k] = v[k][:1]
    v["action"] = v["action"][:1]
    v["key_frameids"] = v["key_frameids"][:1]


def test_one_frame_episode_is_reported(tmp_path, synth, capsys):
    from harness.cli import main

    d = synth.make_dataset(tmp_path, kinds=("voxel1cm",))
    tv, key = "reach_red+1", "episode0"
    db = _put(d, synth, tv, key, _one_frame)
    with pytest.raises(DataError) as e:
        KeystepDataset(d.root)
    assert e.value.path == str(db) and e.value.key == key and "1 keyframe(s), so no keystep" in str(e.value)
    good = KeystepDataset(d.root, skip_bad=True)
    assert sum(good.skipped.values()) == 1 and "1 keyframe(s)" in next(iter(good.skipped))
    assert len(good) == d.num_keysteps - (d.lengths[tv][key] - 1)

    assert main(["data", "inspect", str(d.root), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["episodes"] == d.num_episodes - 1 and s["keysteps"] == len(good)
    assert [(p["path"], p["key"]) for p in s["problems"]] == [(str(db), key)]


def test_inspect_lists_skipped_bad_values_and_fails_without_skip_bad(tmp_path, synth, capsys):
    from harness.cli import main

    d = synth.make_dataset(tmp_path, kinds=("voxel1cm",))
    db = _put(d, synth, "push_box+0", "episode1", _set_action(1, slice(3, 7), 0.0))
    assert main(["data", "inspect", str(d.root)]) == 1
    err = capsys.readouterr().err
    assert str(db) in err and "key=episode1" in err and "quaternion" in err
    assert main(["data", "inspect", str(d.root), "--json", "--skip-bad"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert [(p["path"], p["key"]) for p in s["problems"]] == [(str(db), "episode1")]
    assert sum(s["skipped"].values()) == 1
