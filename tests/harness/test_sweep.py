"""mdh sweep: explicit cells, idempotent re-runs, resume after a killed sweep, status, local launchers."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from harness.cli import main
from harness.config import ConfigError
from harness.launch import load_sweep, plan_sweep, run_sweep, sweep_status
from harness.record import RunRecord

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory, synth):
    root = tmp_path_factory.mktemp("sweep_data")
    synth.make_dataset(root, episodes=3, kinds=("voxel1cm",))
    return root


def _sweep_file(tmp_path: Path, data: Path, cells: list[list[str]], steps: int = 4, extra: str = "") -> Path:
    path = tmp_path / "tiny.yaml"
    common = ["model.preset=tiny", "model.options.shuffle_orders=train", f"data.path={data}", "data.name=synthetic",
              "data.num_points=64", "data.eval_keysteps=2", "data.workers=0", "train.B=2", f"train.steps={steps}",
              "train.eval_every=2", "train.ckpt_every=2", "train.warmup_steps=1", "train.progress=false",
              "train.sampler=ddim", "train.sampler_steps=2"]  # the offline evaluation: 2 sampling steps
    path.write_text(f"description: a tiny test sweep\noverrides: {json.dumps(common)}\n{extra}"
                    f"cells: {json.dumps(cells)}\n")
    return path


def _mtimes(out: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/record.json")}


def _record(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "record.json").read_text())
    except (OSError, ValueError):
        return {}


def _live(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_sweep_runs_each_cell_once_and_rerun_starts_nothing(data, tmp_path, monkeypatch):
    path = _sweep_file(tmp_path, data, [["train.M=1"], ["train.M=4", "model.options.rope3d=false"]])
    out = tmp_path / "out"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    planned, outcomes = run_sweep(str(path), [], out=str(out))
    assert [p.state for p in planned] == ["pending", "pending"]
    assert sorted(outcomes.values()) == ["done", "done"]
    # cluster=local trains every run in a fresh process, so a run's RSS peak is its own and not what an
    # earlier run of the sweep left in the process
    pids = [_record(p.run_dir)["owner"]["pid"] for p in planned]
    assert len(set(pids)) == 2 and os.getpid() not in pids
    names = sorted(p.run_dir.name for p in planned)
    assert names[0] != names[1] and all("-B2-M" in n for n in names)
    first = _mtimes(out)
    t0 = time.perf_counter()
    planned, outcomes = run_sweep(str(path), [], out=str(out))
    assert outcomes == {} and [p.state for p in planned] == ["done", "done"]
    assert _mtimes(out) == first  # nothing was touched
    print(f"re-running a finished 2-run sweep took {time.perf_counter() - t0:.2f} s")
    rows = sweep_status(out)
    assert [r["state"] for r in rows] == ["done", "done"] and all(r["step"] == 4 for r in rows)
    manifest = json.loads((out / "sweep.json").read_text())
    assert [r["cell"] for r in manifest["runs"]] == [["train.M=1"], ["train.M=4", "model.options.rope3d=false"]]


def test_failed_runs_are_retried_only_when_asked_and_status_names_died(data, tmp_path, capsys):
    path = _sweep_file(tmp_path, data, [["train.M=1"], ["train.M=2"], ["train.M=3"]], steps=2)
    out = tmp_path / "out"
    planned = plan_sweep(load_sweep(str(path)), out, [])
    failed_dir, died_dir = planned[0].run_dir, planned[1].run_dir
    RunRecord(failed_dir).update(status="failed", error="CUDA out of memory\nmore", steps_done=1, steps_total=2)
    RunRecord(died_dir).update(status="running", steps_done=1, steps_total=2)  # no live lock holder
    assert main(["sweep", "status", str(out), "--json"]) == 0
    rows = {r["run"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[failed_dir.name]["state"] == "failed" and rows[failed_dir.name]["error"] == "CUDA out of memory"
    assert rows[died_dir.name]["state"] == "died"
    planned, outcomes = run_sweep(str(path), [], out=str(out))
    assert failed_dir.name not in outcomes and outcomes[died_dir.name] == "done"
    assert main(["sweep", "status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "failed" in text and "2 done" in text
    planned, outcomes = run_sweep(str(path), [], out=str(out), retry_failed=True)
    assert outcomes == {failed_dir.name: "done"}


def test_status_shows_the_steps_a_running_run_recorded_between_checkpoints(tmp_path, capsys):
    """A running run rewrites steps_done (and progress_at) every train.log_every_s: status shows that step,
    not the checkpoint's, and how old the note is."""
    from harness.runlock import RunLock

    out = tmp_path / "out"
    run_dir = out / "run-a"
    five_min_ago = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() - 300))
    with RunLock(run_dir):  # a live holder: the run is running, not died
        RunRecord(run_dir).update(status="running", steps_done=37, steps_total=200, checkpoint_step=20,
                                  progress_at=five_min_ago)
        [row] = sweep_status(out)
        assert row["state"] == "running" and (row["step"], row["steps"]) == (37, 200)
        assert row["progress_at"] == five_min_ago
        assert main(["sweep", "status", str(out)]) == 0
        assert "37/200 (5 min ago)" in capsys.readouterr().out


def test_runs_that_fail_for_real_end_failed_and_are_retried_only_when_asked(data, tmp_path, capsys):
    """Cell 1 fails in training (its record exists: a missing train.init_weights file is found at step 0);
    cell 2 fails before its record exists (data.path missing: `mdh train` exits 2 after its checks). Both
    end `failed` with their error in record.json, show so in `sweep status`, are skipped by a re-run and
    run again with --retry-failed (cell 2, which then finds its data, finishes)."""
    nodata = tmp_path / "nodata"
    path = _sweep_file(tmp_path, data, [["train.M=1", f"train.init_weights={tmp_path / 'missing.pt'}"],
                                        ["train.M=2", f"data.path={nodata}"]], steps=2)
    out = tmp_path / "out"
    planned, outcomes = run_sweep(str(path), [], out=str(out))
    in_training, early = (p.run_dir for p in planned)
    assert "no checkpoint file" in outcomes[in_training.name] and "does not exist" in outcomes[early.name]
    assert all(o.startswith("failed: ") for o in outcomes.values()), outcomes
    first, second = _record(in_training), _record(early)
    assert first["status"] == "failed" and "train.init_weights" in first["error"] and len(first["launches"]) == 1
    assert second["status"] == "failed" and second["error"].startswith(f"data.path '{nodata}' does not exist")
    assert main(["sweep", "status", str(out), "--json"]) == 0
    rows = {r["run"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[in_training.name]["state"] == rows[early.name]["state"] == "failed"
    assert "no checkpoint file" in rows[in_training.name]["error"] and "does not exist" in rows[early.name]["error"]
    planned, outcomes = run_sweep(str(path), [], out=str(out))
    assert outcomes == {} and [p.state for p in planned] == ["failed", "failed"]
    assert _record(in_training) == first and _record(early) == second
    nodata.symlink_to(data)
    path = _sweep_file(tmp_path, data, [["train.M=2", f"data.path={nodata}"]], steps=2)  # cell 2 alone: cheaper
    _, outcomes = run_sweep(str(path), [], out=str(out), retry_failed=True)
    assert outcomes == {early.name: "done"} and _record(early)["steps_done"] == 2


def test_killed_sweep_finishes_only_the_missing_runs(data, tmp_path):
    """cluster=local: Ctrl-C of `mdh sweep` stops its `mdh train` child with SIGTERM (it checkpoints: the run
    is `interrupted`, not `failed`); SIGKILL of the sweep takes the child with it (SIGTERM on its parent's
    death, no orphan finishing the run unseen); each re-run resumes that run and finishes only what is
    missing, leaving finished runs untouched."""
    middle_cell = ["train.M=2", "train.steps=30", "train.eval_every=30"]  # long enough to be stopped midway
    path = _sweep_file(tmp_path, data, [["train.M=1"], middle_cell, ["train.M=3"]], steps=4)
    out = tmp_path / "out"
    first, middle, last = (p.run_dir for p in plan_sweep(load_sweep(str(path)), out, []))
    cmd = [sys.executable, "-c", "import sys; from harness.cli import main; sys.exit(main(sys.argv[1:]))",
           "sweep", str(path), "--out", str(out)]

    def stop_sweep_midway(how, after_step: int) -> dict:
        """Start the sweep in a session of its own, stop it with ``how`` once the middle run has checkpointed
        past ``after_step``; the child must be gone soon after. Returns the middle run's record."""
        with open(tmp_path / "sweep.err", "w") as err:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not (
                _record(middle).get("status") == "running"
                and (_record(middle).get("checkpoint_step") or 0) > after_step):
            time.sleep(0.05)
        assert proc.poll() is None, (tmp_path / "sweep.err").read_text()[-2000:]
        child = _record(middle)["owner"]["pid"]
        how(proc)
        proc.wait(timeout=60)
        deadline = time.time() + 20
        while _live(child) and time.time() < deadline:
            time.sleep(0.05)
        assert not _live(child), "the sweep's `mdh train` child outlived it"
        return _record(middle)

    ctrl_c = stop_sweep_midway(lambda proc: os.killpg(proc.pid, signal.SIGINT), 0)  # the terminal's Ctrl-C
    assert ctrl_c["status"] == "interrupted" and len(ctrl_c["launches"]) == 1, ctrl_c["error"]
    assert _record(first)["status"] == "done" and not (last / "record.json").exists()
    done_before = _mtimes(out)[first.name]
    killed = stop_sweep_midway(lambda proc: proc.send_signal(signal.SIGKILL), ctrl_c["checkpoint_step"])
    assert killed["status"] == "interrupted" and len(killed["launches"]) == 2, killed["error"]
    assert killed["checkpoint_step"] < killed["steps_total"]
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "skipped (done)" in again.stdout and f"resumed {middle} at step {killed['checkpoint_step']}" in again.stdout
    assert [r["state"] for r in sweep_status(out)] == ["done"] * 3
    assert _mtimes(out)[first.name] == done_before  # finished runs untouched
    assert len(_record(middle)["launches"]) == 3 and _record(middle)["steps_done"] == 30


def test_sweep_files_are_checked_before_anything_runs(data, tmp_path):
    bad_key = _sweep_file(tmp_path, data, [["train.MM=1"]])
    with pytest.raises(ConfigError, match=r"train\.MM"):
        run_sweep(str(bad_key), [], out=str(tmp_path / "o1"))
    assert not (tmp_path / "o1").exists()
    same = _sweep_file(tmp_path, data, [["train.M=1"], ["train.M=1", "data.workers=1"]])
    with pytest.raises(ConfigError, match="are the same run"):
        run_sweep(str(same), [], out=str(tmp_path / "o2"))
    (tmp_path / "odd.yaml").write_text("cells: [[train.M=1]]\nsteps: 3\n")
    with pytest.raises(ConfigError, match="unknown keys"):
        load_sweep(str(tmp_path / "odd.yaml"))
    with pytest.raises(ConfigError, match="no sweep 'nope'"):
        load_sweep("nope")
    assert main(["sweep", "nope"]) == 2


def test_grid_crosses_every_cell(data, tmp_path):
    path = _sweep_file(tmp_path, data, [["train.M=1"], ["train.M=4"]], extra="grid: {train.seed: [0, 1, 2]}\n")
    sweep = load_sweep(str(path))
    assert len(sweep.cells) == 6 and ["train.M=4", "train.seed=2"] in sweep.cells


@pytest.mark.parametrize("name", ["quick", "table3", "convergence_m", "profile", "table2"])
def test_shipped_sweeps_compose(name, data, tmp_path, monkeypatch):
    """Every sweep in sweeps/ composes against the schemas (paths overridden as a user would)."""
    monkeypatch.setenv("MDH_KEYSTEPS_PATH", str(data))  # table3's 3DDA cells read camera data from here
    sweep = load_sweep(name)
    assert sweep.description and sweep.path.read_text().startswith("#")  # header says what and how much
    planned = plan_sweep(sweep, tmp_path / name, [f"data.path={data}"])
    assert len({p.run_dir.name for p in planned}) == len(sweep.cells) >= 1


def test_local_parallel_runs_through_submitit_at_most_max_parallel_at_once(data, tmp_path, monkeypatch):
    """cluster=local_parallel with 3 runs and max_parallel=2: the submitit job processes (this process's
    children) never number more than 2 at once, and 2 do run together."""
    path = _sweep_file(tmp_path, data, [["train.M=1"], ["train.M=2"], ["train.M=3"]], steps=2)
    out = tmp_path / "out"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    peak, stop = [0], threading.Event()
    # children that predate the sweep (e.g. multiprocessing's resource tracker, left by an earlier test's
    # spawn pool) are not jobs of this sweep
    before = {c.pid for c in psutil.Process().children()}

    def watch() -> None:
        me = psutil.Process()
        while not stop.is_set():
            peak[0] = max(peak[0], sum(_live(c.pid) for c in me.children() if c.pid not in before))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        _, outcomes = run_sweep(str(path), ["cluster=local_parallel", "cluster.max_parallel=2"], out=str(out))
    finally:
        stop.set()
        watcher.join()
    assert sorted(outcomes.values()) == ["done"] * 3, outcomes
    assert (out / ".submitit").is_dir()
    assert peak[0] == 2


def test_command_line_overrides_that_cells_set_again_are_refused_or_named(data, tmp_path, caplog, capsys):
    """A cell's own value wins over the command line's: an override every cell sets is refused (it would
    change no run), one some cells set is applied to the others with a warning naming those cells."""
    path = _sweep_file(tmp_path, data, [["train.M=1", "train.seed=1"], ["train.M=2"]])
    out = tmp_path / "out"
    assert main(["sweep", str(path), "train.M=8", "--dry-run", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "'train.M=8'" in err and "every cell sets train.M" in err and "[train.M=1 train.seed=1]; [train.M=2]" in err
    with caplog.at_level(logging.WARNING, logger="harness.launch"):
        planned, _ = run_sweep(str(path), ["train.seed=5"], out=str(out), dry_run=True)
    assert "'train.seed=5'" in caplog.text and "1 of 2 cells" in caplog.text and "[train.M=1 train.seed=1]" in caplog.text
    assert [p.composed[0].train.seed for p in planned] == [1, 5]
    assert not out.exists()


def test_a_plugin_registered_after_the_first_compose_composes_too():
    """compose_run stores the model schemas again on every call: a policy registered after harness.train_app
    was first imported (a plugin put on sys.path later, as the toy is in tests) is found by `model=<name>`.
    A fresh process, so the first import certainly happens without the plugin."""
    code = textwrap.dedent("""
        import harness.train_app  # the schemas of the policies known now: no toy
        from harness.launch import compose_run
        from tests.plugins.toy_env import TOY_DIR, isolated_registry
        with isolated_registry(TOY_DIR):
            cfg, *_ = compose_run(["model=toy", "model.preset=tiny", "data.path=."])
        print("composed", cfg.model.name)
    """)
    out = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "composed toy" in out.stdout, out.stderr[-2000:]
