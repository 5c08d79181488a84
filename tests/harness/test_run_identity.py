"""Run identity and ownership: fingerprints, refused resumes, the run lock, dead owners, a full disk,
stale temporaries, file modes, checkpoints that cannot run code or be half-written."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness import checkpoint as checkpoint_mod
from harness import record as record_mod
from harness.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from harness.config import ConfigError, DataConfig, ModelConfig, RunConfig, TrainConfig
from harness.fingerprint import config_differences, fingerprint, semantic_config
from harness.record import DiskFullError, RunRecord, atomic_path, write_text_atomic
from harness.report.runs import load_runs
from harness.runlock import RunFolderBusy, RunLock, lock_holder
from harness.train import run_training

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory, synth):
    root = tmp_path_factory.mktemp("identity_data")
    synth.make_dataset(root, episodes=3, kinds=("voxel1cm",))
    return root


def _cfg(data: Path, options: dict | None = None, preset: str = "tiny", **train) -> RunConfig:
    t = {"B": 2, "M": 4, "steps": 4, "eval_every": 2, "ckpt_every": 2, "warmup_steps": 1, "progress": False,
         **train}
    return RunConfig(model=ModelConfig(preset=preset, options=dict(options or {})),
                     data=DataConfig(name="synthetic", path=str(data), workers=0, num_points=64, eval_keysteps=2),
                     train=TrainConfig(**t))


# ------------------------------------------------------------------------------------------- fingerprint


def test_fingerprint_ignores_where_and_how_fast_but_not_what():
    base = RunConfig()
    same = dataclasses.replace(base, data=dataclasses.replace(base.data, path="/elsewhere", workers=7),
                               train=dataclasses.replace(base.train, progress=False, ckpt_every=5, device="cpu"))
    assert fingerprint(same) == fingerprint(base)
    # where a sweep runs is no part of the run: moving it between local and SLURM keeps every run id
    from harness.config import ClusterConfig
    from harness.launch import compose_run

    moved = dataclasses.replace(base, cluster=ClusterConfig(
        name="slurm", partition="gpu", account="lab", qos="high", gpus_per_task=1, cpus_per_task=8, mem_gb=64.0,
        timeout_min=1440, max_requeues=60, setup=["module load cuda"]))
    assert fingerprint(moved) == fingerprint(base)
    assert len({compose_run(o)[3] for o in ([], ["cluster=local_parallel", "cluster.max_parallel=4"],
                                            ["cluster=slurm", "cluster.partition=gpu", "cluster.timeout_min=1440"])}) == 1
    for changed in (dataclasses.replace(base, train=dataclasses.replace(base.train, lr=1e-2)),
                    dataclasses.replace(base, train=dataclasses.replace(base.train, M=1)),
                    dataclasses.replace(base, model=dataclasses.replace(base.model, options={"rope3d": False})),
                    dataclasses.replace(base, model=dataclasses.replace(base.model, preset="tiny"))):
        assert fingerprint(changed) != fingerprint(base)
    # a null option means "the preset's value": the same run as leaving it out
    nulled = dataclasses.replace(base, model=dataclasses.replace(base.model, options={"rope3d": None}))
    assert fingerprint(nulled) == fingerprint(base)
    diffs = config_differences(semantic_config(base), semantic_config(
        dataclasses.replace(base, train=dataclasses.replace(base.train, lr=1e-2, B=4))))
    assert diffs == ["train.B: 8 -> 4", "train.lr: 0.0003 -> 0.01"]


def test_default_run_folders_differ_per_configuration():
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    import harness.train_app  # noqa: F401  (registers the schema and the fingerprint resolver)

    def run_dir(*overrides: str) -> str:
        GlobalHydra.instance().clear()
        with initialize_config_module(config_module="harness.conf", version_base=None):
            cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
            OmegaConf.resolve(cfg)  # as Hydra does before it creates the folder
            assert fingerprint(OmegaConf.to_container(cfg, resolve=True)) in cfg.hydra.run.dir
            return cfg.hydra.run.dir

    default = run_dir()
    assert default.startswith("results/runs/minidiffuser-small-metaworld-B8-M64-s0-")
    assert run_dir("model.options.rope3d=false") != default
    assert run_dir("train.lr=0.01") != default
    assert run_dir("data.path=/scratch/elsewhere", "data.workers=0", "train.progress=false") == default


# ------------------------------------------------------------------------------------------- resume refusals


@pytest.mark.parametrize("change", [
    {"train": {"B": 4}}, {"train": {"M": 8}}, {"train": {"lr": 1e-2}},
    {"options": {"rope3d": False}}, {"preset": "small"},
])
def test_resume_with_another_configuration_is_refused(data, tmp_path, change):
    run_dir = tmp_path / "run"
    first = run_training(_cfg(data, steps=2), run_dir)
    assert first["fingerprint"] == fingerprint(_cfg(data, steps=2))
    before = (run_dir / "record.json").read_bytes()
    cfg = _cfg(data, change.get("options"), change.get("preset", "tiny"), steps=2, **change.get("train", {}))
    with pytest.raises(ConfigError, match="another configuration") as err:
        run_training(cfg, run_dir)
    key = {"B": "train.B", "M": "train.M", "lr": "train.lr"}.get(next(iter(change.get("train", {})), ""), None)
    key = key or ("model.options.rope3d" if "options" in change else "model.preset")
    assert key in str(err.value)
    assert (run_dir / "record.json").read_bytes() == before  # nothing written by the refused run


def test_checkpoint_alone_also_guards_the_configuration(data, tmp_path):
    run_dir = tmp_path / "run"
    run_training(_cfg(data, steps=2), run_dir)
    (run_dir / "record.json").unlink()  # e.g. a user deleted it to "restart"
    with pytest.raises(ConfigError, match=r"train\.lr: 0\.0003 -> 0\.01"):
        run_training(_cfg(data, steps=2, lr=1e-2), run_dir)


def test_resume_on_other_data_is_refused(data, tmp_path, synth):
    run_dir = tmp_path / "run"
    run_training(_cfg(data, steps=2), run_dir)
    (run_dir / "record.json").unlink()
    other = tmp_path / "other"
    synth.make_dataset(other, episodes=4, kinds=("voxel1cm",))  # paths are not semantic, content is
    with pytest.raises(ConfigError, match="other data"):
        run_training(_cfg(other, steps=2), run_dir)


def test_moved_data_resumes(data, tmp_path):
    """data.path is not part of the identity: the same data at another path resumes the run."""
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    run_dir = tmp_path / "run"
    run_training(_cfg(data, steps=2), run_dir)
    rec = json.loads((run_dir / "record.json").read_text())
    rec["status"] = "interrupted"
    (run_dir / "record.json").write_text(json.dumps(rec))
    out = run_training(_cfg(moved, steps=2), run_dir)
    assert out["status"] == "done" and out["data"]["path"] == str(moved)


# ------------------------------------------------------------------------------------------- ownership

_HOLD = """
import sys, time
from harness.runlock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("ready", flush=True)
time.sleep(600)
"""


def _hold_lock(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _takeovers(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "harness.runlock" and r.levelno == logging.WARNING and "took over the lock" in r.getMessage()]


def test_second_process_on_a_run_folder_is_refused_and_a_dead_holder_is_taken_over(data, tmp_path, caplog):
    run_dir = tmp_path / "run"
    holder = _hold_lock(run_dir)
    try:
        with pytest.raises(RunFolderBusy, match=f"in use by pid {holder.pid} on "):
            run_training(_cfg(data, steps=2), run_dir)
        assert lock_holder(run_dir)["pid"] == holder.pid
        assert not (run_dir / "record.json").exists()
    finally:
        holder.kill()
        holder.wait()
    assert lock_holder(run_dir) is None  # the kernel dropped the lock with the process
    # the dead holder never wrote a record: the takeover itself is what warns, naming the holder
    with caplog.at_level(logging.WARNING):
        assert run_training(_cfg(data, steps=2), run_dir)["status"] == "done"
    warned = _takeovers(caplog)
    assert len(warned) == 1 and f"pid {holder.pid} on {socket.gethostname()}" in warned[0], caplog.text
    assert str(run_dir) in warned[0]
    # a folder released cleanly is taken without a warning
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert run_training(_cfg(data, steps=2), run_dir)["status"] == "done"
    assert not _takeovers(caplog), caplog.text
    # the same through RunLock: the dead holder's note is found (lock.stale) and named in the warning
    second = _hold_lock(run_dir)
    second.kill()
    second.wait()
    caplog.clear()
    with caplog.at_level(logging.WARNING), RunLock(run_dir) as lock:
        assert lock.stale["pid"] == second.pid and lock.stale["host"] == socket.gethostname()
    warned = _takeovers(caplog)
    assert len(warned) == 1 and f"pid {second.pid} on " in warned[0], caplog.text


def test_the_same_process_cannot_take_a_folder_twice(tmp_path):
    with RunLock(tmp_path), pytest.raises(RunFolderBusy, match="this process"):
        RunLock(tmp_path).acquire()
    with RunLock(tmp_path) as again:  # released on exit, cleanly: no stale note
        assert again.stale is None


def test_disk_full_is_one_line_and_the_next_start_reports_died(data, tmp_path, monkeypatch, caplog):
    run_dir = tmp_path / "run"
    real_save, real_write = torch.save, record_mod.write_text_atomic
    state = {"saves": 0, "full": False}

    def save(obj, f, *a, **k):
        state["saves"] += 1
        if state["saves"] == 2:  # the second checkpoint (step 4) hits a full disk
            state["full"] = True
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    def write(path, text):
        if state["full"]:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(path, text)

    monkeypatch.setattr(checkpoint_mod.torch, "save", save)
    monkeypatch.setattr(record_mod, "write_text_atomic", write)
    with pytest.raises(DiskFullError) as err:
        run_training(_cfg(data, steps=4), run_dir)
    message = str(err.value)
    assert "\n" not in message
    assert f"while writing {run_dir / 'ckpt' / 'last.pt'}" in message
    assert f"last good checkpoint: {run_dir / 'ckpt' / 'last.pt'} (step 2)" in message
    rec = json.loads((run_dir / "record.json").read_text())
    assert rec["status"] == "running" and rec["checkpoint_step"] == 2  # the "failed" write failed too
    assert load_checkpoint(run_dir / "ckpt" / "last.pt")["step"] == 2  # step 2's checkpoint survived
    assert not [p for p in (run_dir / "ckpt").iterdir() if p.name != "last.pt"]
    # a reader sees that nobody runs it any more
    assert load_runs([str(run_dir)])[0]["status"] == "died"
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger="harness.train"):
        out = run_training(_cfg(data, steps=4), run_dir)
    assert "died" in caplog.text and "step 2" in caplog.text
    assert out["status"] == "done" and out["died"]["checkpoint_step"] == 2


def test_a_kill_between_checkpoint_and_record_reports_the_checkpoint_step(data, tmp_path):
    """SIGKILL after last.pt is renamed into place but before record.json names its step: the record says
    running with an older (here: no) checkpoint step. The resume reads the step from the checkpoint and
    the death note says where the run resumed from, not what the stale record said."""
    run_dir = tmp_path / "run"
    run_training(_cfg(data, steps=4), run_dir)
    rec = json.loads((run_dir / "record.json").read_text())
    rec.update(status="running", checkpoint_step=None, steps_done=3)
    (run_dir / "record.json").write_text(json.dumps(rec))
    assert load_checkpoint(run_dir / "ckpt" / "last.pt")["step"] == 4
    out = run_training(_cfg(data, steps=4), run_dir)
    assert out["status"] == "done"
    assert out["died"]["checkpoint_step"] == 4 and out["checkpoint_step"] == 4


def test_cli_disk_full_prints_one_line(data, tmp_path):
    """The same through `mdh train`: one line, exit 2, no traceback (ENOSPC injected by a wrapper)."""
    code = (
        "import errno, sys, torch\n"
        "import harness.checkpoint as c\n"
        "def save(obj, f, *a, **k):\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "c.torch.save = save\n"
        "from harness.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    run_dir = tmp_path / "cli"
    out = subprocess.run([sys.executable, "-c", code, "train", "model.preset=tiny", f"data.path={data}",
                          "data.workers=0", "data.num_points=64", "data.eval_keysteps=2", "data.name=synthetic",
                          f"hydra.run.dir={run_dir}", "train.B=2", "train.M=2", "train.steps=2",
                          "train.eval_every=2", "train.ckpt_every=2", "train.progress=false"],
                         check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    line = [ln for ln in out.stderr.splitlines() if ln.startswith("mdh train: error:")]
    assert line and "disk full (ENOSPC)" in line[0] and "last good checkpoint: none yet" in line[0]


_KILLED_MID_WRITE = """
import os, signal, sys
from pathlib import Path

run_dir, what = Path(sys.argv[1]), sys.argv[2]


def die(*args, **kwargs):  # some bytes of the file are out, then the process is killed
    f = args[1] if what == "checkpoint" else None
    if f is not None:
        f.write(b"half a checkpoint")
        f.flush()
    os.kill(os.getpid(), signal.SIGKILL)


if what == "checkpoint":
    import harness.checkpoint as c

    c.torch.save = die
    c.save_checkpoint(run_dir / "ckpt" / "last.pt", {"step": 99})
else:
    from harness.record import RunRecord

    os.fsync = die  # after the new text is written to the temporary, before it is renamed into place
    RunRecord(run_dir).update(steps_done=99)
"""


def _killed_mid_write(run_dir: Path, what: str) -> None:
    proc = subprocess.run([sys.executable, "-c", _KILLED_MID_WRITE, str(run_dir), what], cwd=REPO, check=False,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, (proc.returncode, proc.stderr[-2000:])


def test_stale_temporaries_are_removed_on_start(data, tmp_path, caplog):
    """Temporaries made by the real writers (checkpoint, record) in a process killed mid-write: whatever
    ``atomic_path`` names them, the next start of the run removes them and only them."""
    run_dir = tmp_path / "run"
    run_training(_cfg(data, steps=2), run_dir)
    ours = {p.name for p in run_dir.iterdir()} | {p.name for p in (run_dir / "ckpt").iterdir()}
    before = {p: p.read_bytes() for p in (run_dir / "ckpt" / "last.pt", run_dir / "record.json")}
    _killed_mid_write(run_dir, "checkpoint")
    _killed_mid_write(run_dir, "record")
    junk = [p for folder in (run_dir, run_dir / "ckpt") for p in folder.iterdir() if p.name not in ours]
    assert sorted(p.parent.name for p in junk) == ["ckpt", "run"], junk  # one leftover from each kill
    assert all(p.read_bytes() == b for p, b in before.items())  # the kills left the real files intact
    keep = run_dir / "ckpt" / "notes.tmp"  # not one of ours
    keep.write_text("mine")
    with caplog.at_level(logging.WARNING, logger="harness.train"):
        assert run_training(_cfg(data, steps=2), run_dir)["status"] == "done"
    assert not [p for p in junk if p.exists()], junk
    assert keep.exists()
    assert "removed 2 temporary files" in caplog.text and all(str(p) in caplog.text for p in junk), caplog.text


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "a.json", "{}")
        save_checkpoint(tmp_path / "ckpt" / "last.pt", {"step": 1})
        with atomic_path(tmp_path / "b.npy", suffix=".npy") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    for name in ("a.json", "ckpt/last.pt", "b.npy"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


# ------------------------------------------------------------------------------------------- checkpoints


def test_a_checkpoint_write_that_fails_half_way_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint(path, {"step": 1, "w": torch.arange(5.0)})
    real_save = torch.save

    def half_then_fail(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        if hasattr(f, "truncate"):
            f.truncate(100)  # half a file, then the "kill"
        else:  # a path: the planted bug of saving straight to the final file
            os.truncate(f, 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_mod.torch, "save", half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(5)})
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.arange(5.0))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]


class _Marker:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "rng": _Marker(marker)}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt.*system"):
        load_checkpoint(path)
    assert not marker.exists()
    pickle_path = tmp_path / "raw.pt"  # a plain pickle, not a torch zip
    pickle_path.write_bytes(pickle.dumps(_Marker(marker)))
    with pytest.raises(CheckpointError, match="raw.pt"):
        load_checkpoint(pickle_path)
    assert not marker.exists()


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    from harness.checkpoint import rng_state, set_rng_state

    random.random(), np.random.rand(), torch.rand(1)
    save_checkpoint(tmp_path / "c.pt", {"rng": rng_state()})
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    got = (random.random(), float(np.random.rand()), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])
    # checkpoints written before weights-only loading kept numpy's key as an ndarray: they still load
    legacy = tmp_path / "legacy.pt"
    torch.save({"rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                        "torch": torch.get_rng_state()}}, legacy)
    set_rng_state(load_checkpoint(legacy)["rng"])


def test_report_keeps_running_while_the_owner_lives(data, tmp_path):
    run_dir = tmp_path / "run"
    RunRecord(run_dir).update(status="running", steps_done=1)
    holder = _hold_lock(run_dir)
    try:
        assert load_runs([str(run_dir)])[0]["status"] == "running"
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.05)
    assert load_runs([str(run_dir)])[0]["status"] == "died"
