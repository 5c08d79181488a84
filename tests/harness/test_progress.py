"""Long runs say where they are: progress notes (log line with the bar off, steps.csv appended, record.json's
steps_done), steps.csv truncated to the checkpoint on resume, kept checkpoints (train.keep_ckpt_every), and
a configuration refused at start leaving no run folder behind."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import harness.train as train_mod
from harness.checkpoint import kept_checkpoints, load_checkpoint
from harness.config import ConfigError, DataConfig, ModelConfig, RunConfig, TrainConfig, validate_config
from harness.fingerprint import fingerprint
from harness.train import run_training

REPO = Path(__file__).resolve().parents[2]
_REAL_TRAIN_STEP = train_mod.TrainStep


@pytest.fixture(scope="module")
def train_data(tmp_path_factory, synth):
    root = tmp_path_factory.mktemp("progress_data")
    synth.make_dataset(root, episodes=3, kinds=("voxel1cm",))
    return root


def _cfg(data: Path, **train) -> RunConfig:
    t = {"B": 2, "M": 4, "steps": 6, "eval_every": 100, "ckpt_every": 100, "warmup_steps": 1, "progress": False,
         "sampler": "ddim", "sampler_steps": 2, **train}
    return RunConfig(model=ModelConfig(preset="tiny"),
                     data=DataConfig(name="synthetic", path=str(data), workers=0, num_points=64, eval_keysteps=2),
                     train=TrainConfig(**t))


def _overrides(data: Path, run_dir: Path, *extra: str, **train) -> list[str]:
    t = {"B": 2, "M": 4, "steps": 14, "seed": 3, "eval_every": 4, "ckpt_every": 4, "warmup_steps": 2,
         "progress": False, "sampler": "ddim", "sampler_steps": 2, **train}
    return ["model.preset=tiny", f"data.path={data}", "data.workers=0", "data.num_points=64", "data.eval_keysteps=2",
            "data.name=synthetic", f"hydra.run.dir={run_dir}", *[f"train.{k}={v}" for k, v in t.items()], *extra]


def _train_cmd(overrides: list[str]) -> list[str]:
    return [sys.executable, "-c", "import sys; from harness.cli import main; sys.exit(main(sys.argv[1:]))",
            "train", *overrides]


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: one torch thread is fastest, also on a busy host


@pytest.fixture(autouse=True)
def _one_torch_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # loader_plan gives torch the threads OMP_NUM_THREADS names


def _run(overrides: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(_train_cmd(overrides), check=False, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=ONE_THREAD)


def _csv_steps(run_dir: Path) -> list[int]:
    try:
        with open(run_dir / "steps.csv") as f:
            return [int(r["step"]) for r in csv.DictReader(f) if r.get("step", "").isdigit()]
    except FileNotFoundError:
        return []


class _Stop(Exception):
    """Stands in for a process dying in the middle of step ``at`` (raised from inside the training step)."""


def _spy_steps(monkeypatch, run_dir: Path, seen: list, stop_at: int | None = None) -> None:
    """Before every training step, note what a reader of ``run_dir`` sees (steps.csv's steps, record.json);
    raise ``_Stop`` inside step ``stop_at``."""
    base = train_mod.TrainStep

    class Spy(base):
        calls = 0

        def step(self, batch, M):
            Spy.calls += 1
            record = json.loads((run_dir / "record.json").read_text())
            seen.append({"call": Spy.calls, "csv": _csv_steps(run_dir), **{
                k: record.get(k) for k in ("steps_done", "progress_at", "step_time_recent_s", "checkpoint_step")}})
            if Spy.calls == stop_at:
                raise _Stop
            return super().step(batch, M)

    monkeypatch.setattr(train_mod, "TrainStep", Spy)


def _progress_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "harness.train" and re.match(r"step \d+/\d+ ", r.getMessage())]


def test_new_settings_are_validated_and_leave_the_fingerprint_alone(train_data):
    base = _cfg(train_data)
    for change, message in (({"log_every_s": 0}, "train.log_every_s must be > 0"),
                            ({"log_every_s": float("nan")}, "train.log_every_s must be a finite number"),
                            ({"keep_ckpt_every": 0}, "train.keep_ckpt_every must be an integer >= 1")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            validate_config(_cfg(train_data, **change))
    assert fingerprint(_cfg(train_data, log_every_s=5.0, keep_ckpt_every=3)) == fingerprint(base)


def test_progress_notes_between_checkpoints(train_data, tmp_path, monkeypatch, caplog):
    """Bar off, no checkpoint before the end: after every step (log_every_s tiny) steps.csv has that step's row,
    record.json its steps_done, and the log one line with step/total, loss, s/step, ETA and the last
    evaluation. A long interval leaves one line, right after the first step; the bar on leaves none."""
    caplog.set_level(logging.INFO, logger="harness.train")
    run_dir, seen = tmp_path / "run", []
    _spy_steps(monkeypatch, run_dir, seen)
    record = run_training(_cfg(train_data, steps=6, eval_every=3, log_every_s=1e-9), run_dir)
    assert record["status"] == "done" and record["steps_done"] == 6 and record["checkpoint_step"] == 6
    for s in seen[1:]:  # before step k+1: rows 1..k on disk and steps_done k, with no checkpoint yet
        k = s["call"] - 1
        assert s["csv"] == list(range(1, k + 1)) and s["steps_done"] == k, s
        assert s["checkpoint_step"] is None and s["progress_at"] and s["step_time_recent_s"] > 0, s
    assert seen[0]["csv"] == [] and seen[0]["steps_done"] is None  # a new run starts with a header-only steps.csv
    lines = _progress_lines(caplog)
    assert [int(re.match(r"step (\d+)/6 ", x).group(1)) for x in lines] == [1, 2, 3, 4, 5, 6], lines
    assert all(re.search(r"loss \d+\.\d{4}  \d+\.\d{3} s/step  ETA \d+:\d\d:\d\d", x) for x in lines), lines
    assert "eval@" not in lines[1] and re.search(r"eval@3: pos \d+\.\d\d cm, \d+\.\d% within 1 cm", lines[3])
    assert lines[-1].startswith("step 6/6 (100.0%)") and "ETA 0:00:00" in lines[-1]
    assert _csv_steps(run_dir) == list(range(1, 7))

    caplog.clear()
    monkeypatch.setattr(train_mod, "TrainStep", _REAL_TRAIN_STEP)
    run_training(_cfg(train_data, steps=3, log_every_s=3600.0), tmp_path / "quiet")
    assert [x.split(" (")[0] for x in _progress_lines(caplog)] == ["step 1/3"]  # the first step, then the interval
    caplog.clear()
    run_training(_cfg(train_data, steps=2, log_every_s=1e-9, progress=True), tmp_path / "bar")
    assert _progress_lines(caplog) == []  # the tqdm bar says it


def test_killed_run_shows_progress_and_resume_keeps_one_row_per_step(train_data, tmp_path):
    """`mdh train` (bar off) killed with SIGKILL between checkpoints: its train_app.log holds the progress lines,
    steps.csv rows past the checkpoint and record.json a steps_done past checkpoint_step; the resumed run's
    steps.csv has exactly one row per step 1..N (the rows past the checkpoint were written again, not twice)."""
    run_dir = tmp_path / "run"
    overrides = _overrides(train_data, run_dir, log_every_s=0.000001)
    proc = subprocess.Popen(_train_cmd(overrides), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=ONE_THREAD)
    deadline = time.time() + 400
    while proc.poll() is None and time.time() < deadline and max(_csv_steps(run_dir), default=0) < 6:
        time.sleep(0.005)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    killed_at = max(_csv_steps(run_dir))
    ckpt_step = load_checkpoint(run_dir / "ckpt" / "last.pt")["step"]
    assert ckpt_step < killed_at, (ckpt_step, killed_at)  # rows past the checkpoint are on disk
    record = json.loads((run_dir / "record.json").read_text())
    assert record["status"] == "running" and record["steps_done"] > ckpt_step and record["progress_at"]
    log_text = (run_dir / "train_app.log").read_text()
    assert re.search(r"\[harness\.train\]\[INFO\] - step 1/14 \(7\.1%\)  loss \S+  \S+ s/step  ETA \d+:\d\d:\d\d",
                     log_text), log_text[-2000:]
    assert re.search(r"step 5/14 .* eval@4: pos \S+ cm, \S+% within 1 cm", log_text), log_text[-2000:]

    again = _run(overrides)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _csv_steps(run_dir) == list(range(1, 15))
    record = json.loads((run_dir / "record.json").read_text())
    assert record["status"] == "done" and record["steps_done"] == 14


def test_kept_checkpoints_survive_resume_and_load(train_data, tmp_path, monkeypatch):
    """keep_ckpt_every=3 over 7 steps keeps steps 3, 6 and 7 (a checkpoint is written at each), each
    weights-only loadable at its own step. A run stopped in step 5 (checkpoint at 3) whose kept step-3 file
    was never made (killed between last.pt and keeping it) keeps it on resume, and ends with one steps.csv row
    per step."""
    run_dir = tmp_path / "run"
    _spy_steps(monkeypatch, run_dir, [], stop_at=5)
    with pytest.raises(_Stop):
        run_training(_cfg(train_data, steps=7, keep_ckpt_every=3), run_dir)
    assert [s for s, _ in kept_checkpoints(run_dir)] == [3]
    assert _csv_steps(run_dir) == [1, 2, 3, 4]  # the failure flushed step 4, past the checkpoint
    (run_dir / "ckpt" / "step_0000003.pt").unlink()
    monkeypatch.setattr(train_mod, "TrainStep", _REAL_TRAIN_STEP)
    record = run_training(_cfg(train_data, steps=7, keep_ckpt_every=3), run_dir)
    assert record["status"] == "done"
    kept = kept_checkpoints(run_dir)
    assert [(s, p.name) for s, p in kept] == [(3, "step_0000003.pt"), (6, "step_0000006.pt"), (7, "step_0000007.pt")]
    states = {s: load_checkpoint(p) for s, p in kept}
    assert all(state["step"] == s for s, state in states.items())
    last = load_checkpoint(run_dir / "ckpt" / "last.pt")
    assert last["step"] == 7 and all(last["model"][k].equal(v) for k, v in states[7]["model"].items())
    assert not all(states[3]["model"][k].equal(v) for k, v in states[6]["model"].items())
    assert _csv_steps(run_dir) == list(range(1, 8))
    assert sorted(p.name for p in (run_dir / "ckpt").iterdir()) == [
        "last.pt", "step_0000003.pt", "step_0000006.pt", "step_0000007.pt"]  # no temporaries left


def test_refused_configuration_leaves_no_new_run_folder(train_data, tmp_path):
    """An option the policy's own validate refuses, through the real `mdh train`: exit 2 with one line and
    no run folder; a folder that existed before the launch stays. The Python entry does the same, and keeps
    a folder that holds a record."""
    bad = ["model.options.pos_loss=l3"]
    fresh = tmp_path / "runs" / "fresh"
    out = _run(_overrides(train_data, fresh, *bad))
    assert out.returncode == 2 and "mdh train: error: " in out.stderr and "pos_loss must be l1 or l2" in out.stderr
    assert "Traceback" not in out.stderr
    assert not fresh.exists() and (tmp_path / "runs").is_dir()
    mine = tmp_path / "mine"
    mine.mkdir()
    out = _run(_overrides(train_data, mine, *bad))
    assert out.returncode == 2 and mine.is_dir()

    cfg = _cfg(train_data)
    cfg.model.options = {"pos_loss": "l3"}
    with pytest.raises(ConfigError, match="pos_loss"):
        run_training(cfg, tmp_path / "api")
    assert not (tmp_path / "api").exists()
    cfg.train.M = 0  # refused by validate_config, before the lock
    with pytest.raises(ConfigError, match="train.M"):
        run_training(cfg, tmp_path / "api")
    assert not (tmp_path / "api").exists()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "record.json").write_text("{}")
    with pytest.raises(ConfigError):
        run_training(cfg, tmp_path / "kept", new_folder=True)
    assert (tmp_path / "kept" / "record.json").read_text() == "{}"
