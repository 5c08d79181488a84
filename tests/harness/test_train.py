"""mdh train: resume equals an uninterrupted run (real kills), records, bad configurations, learning."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness.config import ConfigError, DataConfig, ModelConfig, RunConfig, TrainConfig
from harness.record import METRIC_COLUMNS, RunRecord, write_text_atomic
from harness.train import run_training

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def train_data(tmp_path_factory, synth):
    root = tmp_path_factory.mktemp("train_data")
    synth.make_dataset(root, episodes=3, kinds=("voxel1cm",))
    return root


def _overrides(data: Path, run_dir: Path, **train) -> list[str]:
    t = {"B": 2, "M": 4, "steps": 20, "seed": 3, "eval_every": 10, "ckpt_every": 10, "warmup_steps": 2,
         "progress": False, "sampler": "ddim", "sampler_steps": 2, **train}  # evaluation: 2 sampling steps
    return ["model.preset=tiny", "model.options.shuffle_orders=train", f"data.path={data}", "data.workers=1",
            "data.num_points=64", "data.eval_keysteps=4", "data.name=synthetic", f"hydra.run.dir={run_dir}",
            *[f"train.{k}={v}" for k, v in t.items()]]


def _train_cmd(overrides: list[str]) -> list[str]:
    return [sys.executable, "-c", "import sys; from harness.cli import main; sys.exit(main(sys.argv[1:]))",
            "train", *overrides]


def _losses(run_dir: Path) -> list[tuple[str, str]]:
    with open(run_dir / "steps.csv") as f:
        return [(r["step"], r["loss"]) for r in csv.DictReader(f)]


def _run(overrides, **kw):
    return subprocess.run(_train_cmd(overrides), check=False, cwd=REPO, capture_output=True, text=True, timeout=600, **kw)


def _kill_after_checkpoint(overrides, run_dir: Path, sig: int) -> int:
    """Start a run, wait for its first checkpoint, send ``sig``; returns the exit code."""
    proc = subprocess.Popen(_train_cmd(overrides), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpt = run_dir / "ckpt" / "last.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(sig)
    proc.communicate(timeout=300)
    return proc.returncode


def _metric_rows(run_dir: Path) -> list[dict]:
    """metrics.csv without the wall-clock column (the only one a resume may change)."""
    with open(run_dir / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in csv.DictReader(f)]


# Evaluations (every 8) and checkpoints (every 5) out of step: a resume always lands between two
# evaluations, so metrics.csv's loss means must come from the checkpointed step log, not the session.
@pytest.mark.parametrize("sig, extra", [(signal.SIGKILL, {"eval_every": 8, "ckpt_every": 5}),
                                        (signal.SIGTERM, {"ema_decay": 0.9})])
def test_resume_after_kill_equals_uninterrupted_run(train_data, tmp_path, sig, extra):
    straight = tmp_path / "straight"
    done = _run(_overrides(train_data, straight, **extra))
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = tmp_path / "resumed"
    code = _kill_after_checkpoint(_overrides(train_data, resumed, **extra), resumed, sig)
    assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 128 + signal.SIGTERM)
    record = json.loads((resumed / "record.json").read_text())
    assert record["status"] == ("running" if sig == signal.SIGKILL else "interrupted")
    assert (record.get("steps_done") or 0) < 20  # null when killed between the first checkpoint and its record
    again = _run(_overrides(train_data, resumed, **extra))
    assert again.returncode == 0, again.stderr[-3000:]
    assert _losses(resumed) == _losses(straight)
    assert len(_losses(straight)) == 20
    a = json.loads((straight / "record.json").read_text())
    b = json.loads((resumed / "record.json").read_text())
    assert b["status"] == "done" and b["final_metrics"] == a["final_metrics"]
    assert _metric_rows(resumed) == _metric_rows(straight)
    assert [int(r["step"]) for r in _metric_rows(straight)] == ([8, 16, 20] if sig == signal.SIGKILL else [10, 20])


def _cfg(data: Path, **train) -> RunConfig:
    t = {"B": 2, "M": 4, "steps": 6, "eval_every": 3, "ckpt_every": 3, "warmup_steps": 1, "progress": False,
         **train}
    return RunConfig(model=ModelConfig(preset="tiny"),
                     data=DataConfig(name="synthetic", path=str(data), workers=0, num_points=64, eval_keysteps=4),
                     train=TrainConfig(**t))


def test_record_schema_metrics_and_idempotent_rerun(train_data, tmp_path):
    run_dir = tmp_path / "run"
    record = run_training(_cfg(train_data), run_dir)
    for key in ("run_id", "status", "config", "git_commit", "device", "B", "M", "model", "ablation", "params",
                "steps_done", "timing", "memory", "cost", "final_metrics"):
        assert key in record, key
    assert record["status"] == "done" and record["steps_done"] == 6
    assert record["device"]["kind"] == "cpu"
    assert record["cost"]["cpu_hours"] > 0 and record["cost"]["v100_days"] is None  # never invent GPU figures
    assert record["memory"]["memory_source"] == "process_rss"
    assert record["timing"]["step_time_median_s"] > 0
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:2] == ["step", "loss"] and set(METRIC_COLUMNS) | {"pos", "rot", "open"} <= set(header)
    steps_header = (run_dir / "steps.csv").read_text().splitlines()[0].split(",")
    assert {"pos", "rot", "open"} <= set(steps_header)  # the policy's own loss terms, by name
    assert record["loss_terms"] == ["open", "pos", "rot"] and record["schema_version"] == 2
    assert record["loader"]["workers"] == 0 and record["loader"]["torch_threads"] >= 1
    with open(run_dir / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [3, 6]
    assert (run_dir / "ckpt" / "last.pt").exists()
    mtime = (run_dir / "record.json").stat().st_mtime_ns
    assert run_training(_cfg(train_data), run_dir)["status"] == "done"  # done runs are not run again
    assert (run_dir / "record.json").stat().st_mtime_ns == mtime


def test_short_run_lowers_the_loss(train_data, tmp_path):
    record = run_training(_cfg(train_data, B=4, M=32, steps=60, eval_every=60, ckpt_every=60, lr=2e-3,
                               warmup_steps=5), tmp_path / "learn")
    with open(tmp_path / "learn" / "steps.csv") as f:
        rows = list(csv.DictReader(f))
    assert record["status"] == "done" and len(rows) == 60

    def mean(key, part):
        return sum(float(r[key]) for r in part) / len(part)

    # the noise-prediction term (x20 in the total) falls by 8-10 % in 60 steps on this tiny data
    assert mean("pos", rows[-10:]) < 0.95 * mean("pos", rows[:10])
    assert mean("loss", rows[-10:]) < 0.95 * mean("loss", rows[:10])


@pytest.mark.parametrize("change, message", [
    ({"M": 0}, "train.M must be an integer >= 1"),
    ({"B": 0}, "train.B must be an integer >= 1"),
    ({"model": "no-such-model"}, "unknown model 'no-such-model'"),
    ({"preset": "huge"}, "unknown preset 'huge'"),
    ({"option": {"rope": True}}, "unknown MiniDiffuserConfig fields"),
    ({"path": "/no/such/folder"}, "data.path '/no/such/folder' does not exist"),
    ({"B": 1000}, "fewer than one batch"),
])
def test_bad_configuration_fails_before_work(train_data, tmp_path, change, message):
    cfg = _cfg(train_data)
    for k, v in change.items():
        if k in ("M", "B"):
            setattr(cfg.train, k, v)
        elif k == "model":
            cfg.model.name = v
        elif k == "preset":
            cfg.model.preset = v
        elif k == "option":
            cfg.model.options = v
        elif k == "path":
            cfg.data.path = v
    with pytest.raises((ConfigError, ValueError), match=message):
        run_training(cfg, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # refused at start: the new run folder is removed again


def test_data_without_instruction_embeddings_is_refused(tmp_path, synth):
    root = tmp_path / "notext"
    synth.make_dataset(root, kinds=("voxel1cm",), text=False)
    cfg = _cfg(root)
    with pytest.raises(Exception, match="embedding"):
        run_training(cfg, tmp_path / "run")


def test_skip_bad_counts_bad_input_in_the_record(tmp_path, synth):
    """An empty task-variation folder and a one-frame episode: refused by default (nothing trained or
    written), skipped with data.skip_bad=True and counted, problem by problem, in record.json."""
    from harness.data.errors import DataError
    from harness.data.formats.lotus_lmdb import pack

    d = synth.make_dataset(tmp_path / "data", episodes=3, kinds=("voxel1cm",))
    empty = d.root / "train" / "voxel1cm" / "push_box+1"
    empty.mkdir()
    tv, key = "reach_red+1", "episode0"
    one_frame = dict(d.voxel[tv][key])
    for k in ("xyz", "rgb", "sem"):
        one_frame[k] = one_frame[k][:1]
    one_frame["action"], one_frame["key_frameids"] = one_frame["action"][:1], one_frame["key_frameids"][:1]
    synth.put_raw(d.lmdb_path("voxel1cm", tv), key, pack(one_frame))
    problems = {str(empty): "no data.mdb", str(d.lmdb_path("voxel1cm", tv)): "1 keyframe(s), so no keystep"}

    # without skip_bad: refused at the first problem, whichever task-variations are selected
    named = set()
    for i, taskvars in enumerate((None, ["push_box+1", "push_box+0"], [tv])):
        cfg = _cfg(d.root, steps=2, eval_every=2, ckpt_every=2)
        cfg.data.taskvars = taskvars
        strict = tmp_path / f"strict{i}"
        with pytest.raises(DataError) as e:
            run_training(cfg, strict)
        assert e.value.path in problems and problems[e.value.path] in str(e.value), str(e.value)
        assert not (strict / "ckpt").exists() and not (strict / "record.json").exists()
        named.add(e.value.path)
    assert named == set(problems)

    cfg = _cfg(d.root, steps=2, eval_every=2, ckpt_every=2)
    cfg.data.skip_bad = True
    run_dir = tmp_path / "skip"
    record = run_training(cfg, run_dir)
    assert record["status"] == "done" and (run_dir / "ckpt" / "last.pt").exists()
    on_disk = json.loads((run_dir / "record.json").read_text())
    skipped = on_disk["data"]["skipped"]
    assert sum(skipped.values()) == 2, skipped
    for words in problems.values():
        assert sum(n for text, n in skipped.items() if words in text) == 1, (words, skipped)
    assert on_disk["data"]["train_keysteps"] == d.num_keysteps - (d.lengths[tv][key] - 1)


def test_cli_batch_larger_than_the_data_is_one_clear_line(train_data, tmp_path):
    out = _run(_overrides(train_data, tmp_path / "r", B=1000))
    assert out.returncode == 2, out.stderr[-2000:]
    assert "mdh train: error: train.B=1000 but data.path=" in out.stderr and "fewer than one batch" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "r").exists()  # no run folder (lock, train_app.log) left by the refused launch


def test_cli_bad_override_is_one_clear_line(train_data, tmp_path):
    out = _run(_overrides(train_data, tmp_path / "r", M=0))
    assert out.returncode == 2
    assert "mdh train: error: train.M must be an integer >= 1, got 0" in out.stderr
    assert "Traceback" not in out.stderr


def test_atomic_writes_never_show_half_a_file(tmp_path):
    record = RunRecord(tmp_path)
    record.update(status="running", error="x" * 200_000)
    seen_bad = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            try:
                json.loads((tmp_path / "record.json").read_text())
            except json.JSONDecodeError as e:
                seen_bad.append(str(e))

    th = threading.Thread(target=reader)
    th.start()
    for i in range(200):
        record.update(steps_done=i, error=str(i) * (100_000 + i))
    stop.set()
    th.join()
    assert not seen_bad
    write_text_atomic(tmp_path / "x.txt", "done")
    assert sorted(os.listdir(tmp_path)) == ["record.json", "x.txt"]  # no temporary files left behind
