"""A data-parallel run through ``mdh sweep``'s launch path on the real local SLURM cluster: one job of 2 SLURM
tasks (``cluster.tasks_per_node=2``, CPU, Gloo), each task a torch.distributed rank exported by the job
itself (no torchrun). It runs to done, its record counts both processes, its losses are those of one
process at twice the batch (the tolerance of tests/harness/test_distributed.py), and a preemption signal
checkpoints, requeues the job once (rank 0 alone) and resumes to the losses of the uninterrupted run.

The toy plugin policy (tests/plugins/mdh_toy_policy) keeps the 2-process run comparable with one process at
2B (no BatchNorm, no dropout). The job occupies both CPUs of the node (2 tasks x 1 CPU); ~1 min in all.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from harness.launch import launch, load_sweep, plan_sweep, run_sweep, sweep_status
from tests.harness.test_distributed import REL_TOL, _max_rel_diff
from tests.plugins.toy_env import TOY_DIR, isolated_registry, subprocess_env

pytestmark = pytest.mark.slurm

STEPS = 300  # a few seconds of training: long enough for the signal to land between a checkpoint and the end
CLUSTER = ["cluster=slurm", "cluster.partition=debug", "cluster.cpus_per_task=1", "cluster.mem_gb=2",
           "cluster.timeout_min=30", "cluster.max_requeues=3"]
KEYS = ["loss", "noise_mse", "gripper_bce", "grad_norm"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, synth):
    root = tmp_path_factory.mktemp("slurm_dist_data")
    synth.make_dataset(root, episodes=3, kinds=("voxel1cm",))
    return root


@pytest.fixture(scope="module")
def toy_env():
    """The jobs inherit this environment (sbatch --export=ALL): the toy plugin on PYTHONPATH, one thread per
    process (the node has 2 CPUs; it also makes the floats those of tests/harness/test_distributed.py)."""
    env = subprocess_env(TOY_DIR)
    with pytest.MonkeyPatch.context() as mp, isolated_registry(TOY_DIR):
        for name in ("PYTHONPATH", "OMP_NUM_THREADS"):
            mp.setenv(name, env[name])
        for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            mp.delenv(name, raising=False)
        yield


def _sweep_file(folder: Path, data: Path, B: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "dist.yaml"
    common = ["model=toy", "model.preset=tiny", f"data.path={data}", "data.name=synthetic", "data.workers=0",
              "data.num_points=64", "data.eval_keysteps=4", f"train.B={B}", "train.M=16", f"train.steps={STEPS}", "train.seed=3",
              "train.eval_every=150", "train.ckpt_every=10", "train.warmup_steps=2", "train.progress=false"]
    path.write_text(f"overrides: {json.dumps(common)}\n")  # one cell
    return path


def _launch_two_tasks(path: Path, out: Path, wait: bool = True) -> tuple[Path, dict]:
    """``mdh sweep <path> cluster=slurm ... cluster.tasks_per_node=2``: plan, then launch with 2 tasks per run
    (set on the composed ClusterConfig, which reads it with getattr while the schema may not declare it)."""
    planned = plan_sweep(load_sweep(str(path)), out, CLUSTER)
    cluster = planned[0].composed[0].cluster
    cluster.tasks_per_node = 2
    out.mkdir(parents=True, exist_ok=True)
    return planned[0].run_dir, launch(planned, cluster, out, wait=wait)


def _rows(run_dir: Path, name: str = "steps.csv") -> list[dict]:
    with open(run_dir / name) as f:
        return list(csv.DictReader(f))


def _record(run_dir: Path) -> dict:
    return json.loads((run_dir / "record.json").read_text())


@pytest.fixture(scope="module")
def two_task_run(data, toy_env, tmp_path_factory):
    folder = tmp_path_factory.mktemp("slurm_dist")
    run_dir, outcomes = _launch_two_tasks(_sweep_file(folder, data), folder / "slurm")
    assert list(outcomes.values()) == ["done"], outcomes
    return run_dir


def test_two_task_job_is_one_run_of_two_processes(two_task_run):
    record = _record(two_task_run)
    assert record["status"] == "done" and record["steps_done"] == STEPS
    assert record["B"] == 2  # per process
    device = record["device"]
    assert device["count"] == 2 and device["world_size"] == 2 and device["backend"] == "gloo"
    assert record["cost"]["device_count"] == 2
    assert record["cost"]["cpu_hours"] == pytest.approx(2 * record["timing"]["wall_time_s"] / 3600, rel=1e-2)
    [started] = record["launches"]
    assert started["slurm_job_id"] and started["world_size"] == 2 and started["restart_count"] == 0
    # rank 0 alone wrote: one record, one step log, no temporaries
    assert sorted(p.name for p in two_task_run.iterdir() if p.name.startswith(".")) == [".lock"]
    assert [int(r["step"]) for r in _rows(two_task_run)] == list(range(1, STEPS + 1))


def test_two_tasks_at_B_equal_one_process_at_2B(data, toy_env, two_task_run, tmp_path):
    path = _sweep_file(tmp_path, data, B=4)
    planned, outcomes = run_sweep(str(path), [], out=str(tmp_path / "local"))  # cluster=local: one process
    assert list(outcomes.values()) == ["done"], outcomes
    one, two = _rows(planned[0].run_dir), _rows(two_task_run)
    assert [r["lr"] for r in one] == [r["lr"] for r in two]
    diff = _max_rel_diff(one, two, KEYS)
    print(f"max relative difference 2 SLURM tasks x B=2 vs 1 process x B=4 over {STEPS} steps: {diff:.3g}")
    assert diff <= REL_TOL


def test_preempted_two_task_job_requeues_once_and_resumes(data, toy_env, two_task_run, tmp_path):
    run_dir, outcomes = _launch_two_tasks(_sweep_file(tmp_path, data), tmp_path / "slurm", wait=False)
    job_id = next(iter(outcomes.values())).split()[-1]
    deadline = time.time() + 180
    while not (run_dir / "ckpt" / "last.pt").exists():
        assert time.time() < deadline, f"job {job_id} wrote no checkpoint in time"
        time.sleep(0.05)
    # the preemption / time-limit signal as SLURM sends it: to every task of the job step
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
    while (record := _record(run_dir)).get("status") != "done":
        assert time.time() < deadline + 120, f"job {job_id} did not finish: {record.get('status')}"
        time.sleep(0.5)
    # requeued exactly once (by rank 0 alone), then resumed by both ranks from rank 0's checkpoint
    assert [entry.get("restart_count") for entry in record["launches"]] == [0, 1], record["launches"]
    assert all(entry["world_size"] == 2 for entry in record["launches"])
    assert record["steps_done"] == STEPS and record["device"]["world_size"] == 2
    # same processes, same reduction order: the resumed run reproduces the uninterrupted one bit for bit
    strip = [{k: v for k, v in r.items() if k != "step_time_s"} for r in _rows(run_dir)]
    assert strip == [{k: v for k, v in r.items() if k != "step_time_s"} for r in _rows(two_task_run)]
    assert [r["state"] for r in sweep_status(run_dir.parent)] == ["done"]
    assert os.environ["OMP_NUM_THREADS"] == "1"
