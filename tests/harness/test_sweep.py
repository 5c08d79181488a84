"""mdh sweep: explicit cells, idempotent re-runs, resume after a killed sweep, status, local launchers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
              "train.eval_every=2", "train.ckpt_every=2", "train.warmup_steps=1", "train.progress=false"]
    path.write_text(f"description: a tiny test sweep\noverrides: {json.dumps(common)}\n{extra}"
                    f"cells: {json.dumps(cells)}\n")
    return path


def _mtimes(out: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/record.json")}


def test_sweep_runs_each_cell_once_and_rerun_starts_nothing(data, tmp_path):
    path = _sweep_file(tmp_path, data, [["train.M=1"], ["train.M=4", "model.options.rope3d=false"]])
    out = tmp_path / "out"
    planned, outcomes = run_sweep(str(path), [], out=str(out))
    assert [p.state for p in planned] == ["pending", "pending"]
    assert sorted(outcomes.values()) == ["done", "done"]
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


def test_killed_sweep_finishes_only_the_missing_runs(data, tmp_path):
    path = _sweep_file(tmp_path, data, [["train.M=1"], ["train.M=2"], ["train.M=3"]], steps=6)
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", "import sys; from harness.cli import main; sys.exit(main(sys.argv[1:]))",
           "sweep", str(path), "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        done = [r for r in out.glob("*/record.json") if json.loads(r.read_text() or "{}").get("status") == "done"]
        if done and any((p / "ckpt" / "last.pt").exists() for p in out.iterdir() if p.is_dir()
                        and p.name != done[0].parent.name):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {k: v for k, v in _mtimes(out).items()
              if json.loads((out / k / "record.json").read_text()).get("status") == "done"}
    assert before
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "skipped (done)" in again.stdout
    rows = sweep_status(out)
    assert [r["state"] for r in rows] == ["done"] * 3
    assert all(_mtimes(out)[k] == v for k, v in before.items())  # finished runs untouched


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


def test_local_parallel_runs_through_submitit(data, tmp_path):
    path = _sweep_file(tmp_path, data, [["train.M=1"], ["train.M=2"]], steps=2)
    out = tmp_path / "out"
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        _, outcomes = run_sweep(str(path), ["cluster=local_parallel", "cluster.max_parallel=2"], out=str(out))
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
    assert sorted(outcomes.values()) == ["done", "done"], outcomes
    assert (out / ".submitit").is_dir()


def test_local_runs_each_run_in_a_process_of_its_own(data, tmp_path, monkeypatch):
    """The `local` cluster trains every run in a fresh process, so a run's RSS peak is its own and not what
    an earlier run of the sweep left in the process."""
    path = _sweep_file(tmp_path, data, [["train.M=1"], ["train.M=2"]], steps=2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    planned, outcomes = run_sweep(str(path), [], out=str(tmp_path / "out"))
    assert sorted(outcomes.values()) == ["done", "done"], outcomes
    pids = [json.loads((p.run_dir / "record.json").read_text())["owner"]["pid"] for p in planned]
    assert len(set(pids)) == 2 and os.getpid() not in pids
