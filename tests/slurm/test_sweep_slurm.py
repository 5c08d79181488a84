"""`mdh sweep` on the real local SLURM cluster: a tiny sweep runs as a job array, a re-run starts no job,
and a run preempted with the signal checkpoints, requeues itself, resumes and ends with the losses of an
uninterrupted run."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from harness.launch import run_sweep, sweep_status

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def data(tmp_path_factory, synth):
    root = tmp_path_factory.mktemp("slurm_sweep_data")
    synth.make_dataset(root, episodes=3, kinds=("voxel1cm",))
    return root


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    # the job inherits this environment (sbatch --export=ALL): one thread keeps the 2-core node free and
    # makes the SLURM run and the local reference run compute the same floats
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _sweep_file(tmp_path: Path, data: Path, cells: list[list[str]], steps: int) -> Path:
    path = tmp_path / "tiny.yaml"
    common = ["model.preset=tiny", "model.options.shuffle_orders=train", f"data.path={data}", "data.name=synthetic",
              "data.num_points=64", "data.eval_keysteps=2", "data.workers=0", "train.B=2", f"train.steps={steps}",
              "train.eval_every=4", "train.ckpt_every=2", "train.warmup_steps=1", "train.progress=false"]
    path.write_text(f"overrides: {json.dumps(common)}\ncells: {json.dumps(cells)}\n")
    return path


CLUSTER = ["cluster=slurm", "cluster.partition=debug", "cluster.cpus_per_task=1", "cluster.mem_gb=1",
           "cluster.timeout_min=30", "cluster.max_requeues=3"]


def _losses(run_dir: Path) -> list[tuple[str, str]]:
    with open(run_dir / "steps.csv") as f:
        return [(r["step"], r["loss"]) for r in csv.DictReader(f)]


def test_sweep_runs_as_slurm_jobs_and_rerun_submits_nothing(data, tmp_path):
    path = _sweep_file(tmp_path, data, [["train.M=1"], ["train.M=4"]], steps=2)
    out = tmp_path / "out"
    planned, outcomes = run_sweep(str(path), CLUSTER, out=str(out))
    assert sorted(outcomes.values()) == ["done", "done"], outcomes
    for p in planned:
        launches = json.loads((p.run_dir / "record.json").read_text())["launches"]
        assert launches[-1]["slurm_job_id"]  # it really ran inside a SLURM job
    assert len(list((out / ".submitit").iterdir())) >= 2
    t0 = time.perf_counter()
    planned, outcomes = run_sweep(str(path), CLUSTER, out=str(out))
    assert outcomes == {} and time.perf_counter() - t0 < 30


def test_preempted_run_requeues_resumes_and_matches_an_uninterrupted_run(data, tmp_path):
    path = _sweep_file(tmp_path, data, [["train.M=4"]], steps=24)
    reference, _ = run_sweep(str(path), [], out=str(tmp_path / "local"))  # cluster=local, uninterrupted
    out = tmp_path / "slurm"
    planned, outcomes = run_sweep(str(path), CLUSTER, out=str(out), wait=False)
    run_dir = planned[0].run_dir
    job_id = next(iter(outcomes.values())).split()[-1]
    deadline = time.time() + 180
    while not (run_dir / "ckpt" / "last.pt").exists():
        assert time.time() < deadline, f"job {job_id} wrote no checkpoint in time"
        time.sleep(0.2)
    # the preemption / time-limit signal, as SLURM sends it (to the job step, not --batch)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
    while True:
        record = json.loads((run_dir / "record.json").read_text())
        if record.get("status") == "done":
            break
        assert time.time() < deadline + 120, f"job {job_id} did not finish: {record.get('status')}"
        time.sleep(0.5)
    restarts = [launch.get("restart_count") for launch in record["launches"]]
    assert max(restarts) >= 1, record["launches"]  # it was requeued and started again
    assert record["steps_done"] == 24
    assert _losses(run_dir) == _losses(reference[0].run_dir)
    assert [r["state"] for r in sweep_status(out)] == ["done"]
    assert os.environ["OMP_NUM_THREADS"] == "1"
