"""The ``mdh`` command, called in-process through ``harness.cli.main``."""

from __future__ import annotations

import json

import pytest

from harness.cli import main


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("data", "train", "sweep", "report", "bench", "eval"):
        assert cmd in out, cmd


@pytest.mark.parametrize("argv, message", [
    (["eval", "no/such/run"], "no record.json"),
    (["eval", "x", "--env", "rlbench"], "--env rlbench needs --test-data"),
    (["eval", "compare", "a"], "usage: mdh eval compare RUN_A RUN_B"),
])
def test_eval_input_errors_are_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err


def test_data_inspect_json(capsys, dataset_root):
    assert main(["data", "inspect", str(dataset_root.root), "--json"]) == 0
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1
    s = json.loads(out)
    assert {"tasks", "variations", "episodes", "keysteps", "format"} <= set(s)
    assert s["tasks"] == ["push_box", "reach_red"]
    assert s["variations"] == 3
    assert s["episodes"] == dataset_root.num_episodes == 6
    assert s["keysteps"] == dataset_root.num_keysteps == 15
    assert s["format"] == "lotus_lmdb:voxel1cm"
    assert s["meta"].startswith("file:") and s["source"] == "synthetic"
    want = [len(x) for v in dataset_root.voxel.values() for e in v.values() for x in e["xyz"]]
    assert s["points_per_cloud"]["min"] == min(want) and s["points_per_cloud"]["max"] == max(want)


def test_data_inspect_keysteps_kind_text(capsys, dataset_root):
    assert main(["data", "inspect", str(dataset_root.root), "--kind", "keysteps", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["format"] == "lotus_lmdb:keysteps" and s["num_cameras"] == 2 and s["image_size"] == [8, 12]
    assert s["keysteps"] == 15
    assert main(["data", "inspect", str(dataset_root.root)]) == 0
    out = capsys.readouterr().out
    assert "episodes 6" in out and "keysteps 15" in out and "push_box" in out


def test_data_inspect_render_writes_a_png(capsys, dataset_root, tmp_path):
    out = tmp_path / "pics" / "keystep.png"
    rc = main(["data", "inspect", str(dataset_root.root), "--json", "--render", str(out),
               "--taskvar", "reach_red+1", "--episode", "episode1", "--keystep", "1"])
    assert rc == 0
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000
    json.loads(capsys.readouterr().out)  # stdout still holds exactly the JSON object


def test_data_inspect_missing_path(capsys, tmp_path):
    missing = tmp_path / "nonexistent"
    rc = main(["data", "inspect", str(missing)])
    assert rc != 0
    cap = capsys.readouterr()
    assert str(missing) in cap.err and "Traceback" not in cap.err + cap.out
    assert main(["data", "inspect", "/nonexistent"]) != 0
    assert "/nonexistent" in capsys.readouterr().err


def test_data_inspect_bad_episode_and_skip_bad(capsys, tmp_path, synth):
    d = synth.make_dataset(tmp_path)
    synth.put_raw(d.lmdb_path("voxel1cm", "reach_red+0"), "episode0", b"\xc1garbage")
    assert main(["data", "inspect", str(d.root), "--json"]) == 1
    err = capsys.readouterr().err
    assert "reach_red+0" in err and "episode0" in err and "cannot decode" in err
    assert main(["data", "inspect", str(d.root), "--json", "--skip-bad"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["episodes"] == 5 and sum(s["skipped"].values()) == 1


def test_bench_data_json(capsys, dataset_root):
    rc = main(["bench", "data", str(dataset_root.root), "--json", "--workers", "0", "--batches", "2",
               "--batch-size", "4", "--num-points", "512"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out.strip())
    assert r["keysteps_per_s_median"] > 0 and r["workers"] == 0 and r["keysteps"] == 15
    assert len(r["keysteps_per_s"]) == r["passes"]


def test_bench_data_defaults(capsys, dataset_root):
    """The exact invocation of the acceptance test (default batch size and 4000 points)."""
    assert main(["bench", "data", str(dataset_root.root), "--json", "--workers", "0", "--batches", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["keysteps_per_s_median"] > 0


def test_bench_data_missing_path(capsys, tmp_path):
    assert main(["bench", "data", str(tmp_path / "nope"), "--workers", "0"]) == 1
    assert str(tmp_path / "nope") in capsys.readouterr().err


def test_report_runs_side_by_side(capsys, tmp_path):
    for name, M in (("a", 1), ("b", 64)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "record.json").write_text(json.dumps({
            "status": "done", "model": "minidiffuser", "preset": "small", "B": 8, "M": M, "steps_done": 10,
            "steps_total": 10, "timing": {"step_time_median_s": 0.5}, "memory": {"peak_memory_bytes": 2**30},
            "final_metrics": {"overall": {"pct_within_1cm": 12.5}}}))
    assert main(["report", "runs", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "8 x 64" in out and "12.5" in out and "1024" in out
    assert main(["report", "runs", str(tmp_path / "missing")]) == 1
    assert "no record.json" in capsys.readouterr().err


def test_metaworld_unknown_task_is_one_line(capsys, tmp_path):
    from harness.cli import main

    assert main(["data", "metaworld", "--tasks", "reach", "--out", str(tmp_path / "mw")]) == 2
    err = capsys.readouterr().err
    assert "mdh data metaworld: error: unknown Meta-World task(s) ['reach']" in err and "Traceback" not in err
