"""The SLURM settings of ``mdh sweep`` (``cluster.*``) -> the sbatch file submitit submits, and what a job
of several tasks does inside (harness/launch.py ``_executor``, ``tasks_per_run``, ``TrainJob``,
``export_torch_distributed_env``). No SLURM needed: a fake ``sbatch`` on PATH keeps the file it is given
and answers a job id (a fake ``srun`` on PATH makes submitit accept the cluster).
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from harness import launch as launch_mod
from harness.config import ClusterConfig, ConfigError
from harness.distributed import Distributed
from harness.launch import PlannedRun, TrainJob, export_torch_distributed_env, launch, tasks_per_run

FAKE_SBATCH = """#!/bin/sh
n=$(ls "$MDH_FAKE_SBATCH_DIR" | wc -l)
cp "$1" "$MDH_FAKE_SBATCH_DIR/$n.sh"
echo "Submitted batch job $((4242 + n))"
"""


@pytest.fixture(autouse=True)
def _environment_restored():
    """``export_torch_distributed_env`` writes os.environ (RANK, WORLD_SIZE, ...), which monkeypatch does not
    undo: a later test in this process must not see a distributed launch."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def sbatch_files(tmp_path, monkeypatch):
    """Fake ``srun``/``sbatch`` first on PATH; returns a function listing the submitted sbatch texts."""
    bin_dir, kept = tmp_path / "bin", tmp_path / "submitted"
    bin_dir.mkdir()
    kept.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("srun", "#!/bin/sh\nexit 0\n")):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("MDH_FAKE_SBATCH_DIR", str(kept))
    return lambda: [p.read_text() for p in sorted(kept.iterdir(), key=lambda p: int(p.stem))]


def _planned(tmp_path: Path, n: int) -> list[PlannedRun]:
    return [PlannedRun(cell=[f"train.seed={i}"], overrides=[f"train.seed={i}"], run_dir=tmp_path / "out" / f"run{i}",
                       state="pending") for i in range(n)]


def _directives(text: str) -> dict[str, str]:
    """``#SBATCH --key=value`` lines -> {key: value}."""
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(.*)$", text, flags=re.MULTILINE))


def _srun_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.startswith("srun ")]
    assert len(lines) == 1, text
    return lines[0]


GPU_CLUSTER = {"name": "slurm", "partition": "gpu", "account": "myproj", "qos": "high", "gpus_per_task": 2,
               "cpus_per_task": 3, "mem_gb": 12, "timeout_min": 90, "array_parallelism": 2, "signal_delay_s": 77,
               "max_requeues": 5, "setup": ["module load cuda/12.1"]}


def test_gpu_sweep_is_one_array_of_one_process_per_gpu(sbatch_files, tmp_path):
    outcomes = launch(_planned(tmp_path, 3), ClusterConfig(**GPU_CLUSTER), tmp_path / "out", wait=False)
    assert outcomes == {f"run{i}": f"submitted as job 4242_{i}" for i in range(3)}
    [text] = sbatch_files()  # one sbatch: a job array
    d = _directives(text)
    assert d["partition"] == "gpu" and d["account"] == "myproj" and d["qos"] == "high"
    assert d["gpus-per-node"] == "2"  # cluster.gpus_per_task: the GPUs of one run
    assert d["ntasks-per-node"] == "2" and d["nodes"] == "1"  # one process (torch.distributed rank) per GPU
    assert d["cpus-per-task"] == "3"  # per process
    assert d["mem"] == "12GB"
    assert d["time"] == "90"
    assert d["array"] == "0-2%2"  # 3 runs, at most array_parallelism=2 at a time
    assert d["signal"] == "USR2@77"
    assert "module load cuda/12.1" in text.split("# command")[0]
    # a rank that dies ends the others (torchrun's behaviour), not a collective's hour-long timeout
    assert "--kill-on-bad-exit=1" in _srun_line(text)


def test_cpu_run_defaults_to_one_task_and_leaves_unset_keys_out(sbatch_files, tmp_path):
    launch(_planned(tmp_path, 1), ClusterConfig(name="slurm"), tmp_path / "out", wait=False)
    [text] = sbatch_files()
    d = _directives(text)
    assert d["ntasks-per-node"] == "1" and d["cpus-per-task"] == "2" and d["time"] == "60"
    assert d["signal"] == "USR2@120"
    for key in ("partition", "account", "qos", "mem", "array", "gpus-per-node"):
        assert key not in d, (key, text)
    assert "--kill-on-bad-exit" not in text


def test_tasks_per_node_runs_several_cpu_processes(sbatch_files, tmp_path):
    cluster = ClusterConfig(name="slurm", partition="debug")
    cluster.tasks_per_node = 2  # the explicit setting (read with getattr: ClusterConfig may not declare it yet)
    launch(_planned(tmp_path, 2), cluster, tmp_path / "out", wait=False)
    d = _directives(sbatch_files()[0])
    assert d["ntasks-per-node"] == "2" and "gpus-per-node" not in d and d["array"] == "0-1%2"


def test_tasks_per_run():
    assert tasks_per_run(ClusterConfig(name="slurm")) == 1
    assert tasks_per_run(ClusterConfig(name="slurm", gpus_per_task=1)) == 1
    assert tasks_per_run(ClusterConfig(name="slurm", gpus_per_task=4)) == 4
    for tasks, gpus, ok in ((3, 0, 3), (None, 4, 4), (4, 4, 4), (1, 4, None), (0, 0, None), (True, 0, None)):
        cluster = ClusterConfig(name="slurm", gpus_per_task=gpus)
        cluster.tasks_per_node = tasks
        if ok is None:
            with pytest.raises(ConfigError, match="cluster.tasks_per_node"):
                tasks_per_run(cluster)
        else:
            assert tasks_per_run(cluster) == ok


def _slurm_task(monkeypatch, job_id: str, procid: int, ntasks: int) -> None:
    """The environment srun gives task ``procid`` of a one-node job with ``ntasks`` tasks."""
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    for name, value in (("SLURM_JOB_ID", job_id), ("SLURM_NTASKS", ntasks), ("SLURM_PROCID", procid),
                        ("SLURM_LOCALID", procid), ("SLURM_JOB_NUM_NODES", 1), ("SLURM_NODEID", 0),
                        ("SLURM_JOB_NODELIST", "gpu7")):
        monkeypatch.setenv(name, str(value))


TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def test_each_task_exports_its_rank_for_harness_distributed(monkeypatch):
    # what the job inherits from the submitting shell (sbatch --export=ALL) must not survive
    for name, value in (("WORLD_SIZE", "8"), ("RANK", "5"), ("MASTER_PORT", "1234"), ("MASTER_ADDR", "elsewhere"),
                        ("CUDA_VISIBLE_DEVICES", "2,3")):
        monkeypatch.setenv(name, value)
    seen = {}
    for procid in (0, 1):
        _slurm_task(monkeypatch, "777", procid, 2)
        assert export_torch_distributed_env() == procid
        seen[procid] = {k: os.environ[k] for k in TORCH_VARS}
        d = Distributed.from_env()
        assert (d.rank, d.world_size, d.local_rank, d.local_world_size, d.enabled) == (procid, 2, procid, 2, True)
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"  # every task sees the job's GPUs, takes cuda:LOCAL_RANK
    assert seen[0]["MASTER_ADDR"] == seen[1]["MASTER_ADDR"] == "gpu7"
    assert seen[0]["MASTER_PORT"] == seen[1]["MASTER_PORT"] != "1234"  # one rendezvous per job
    _slurm_task(monkeypatch, "778", 0, 2)
    export_torch_distributed_env()
    assert os.environ["MASTER_PORT"] != seen[0]["MASTER_PORT"]  # another job (e.g. of the array) on the node

    _slurm_task(monkeypatch, "779", 0, 1)  # one task: not distributed, whatever was inherited
    monkeypatch.setenv("WORLD_SIZE", "8")
    export_torch_distributed_env()
    assert os.environ["WORLD_SIZE"] == "1" and not Distributed.from_env().enabled


def test_outside_a_job_nothing_is_exported(monkeypatch):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    for name in TORCH_VARS:
        monkeypatch.delenv(name, raising=False)
    assert export_torch_distributed_env() == 0
    assert not any(name in os.environ for name in TORCH_VARS)


@pytest.mark.parametrize("procid", [0, 1])
def test_only_rank_0_requeues_after_the_signal(monkeypatch, tmp_path, procid):
    """Every rank leaves run_training with 128 + signal after the same step; rank 0 alone requeues the job (or
    records why not), the others exit 0 so that srun --kill-on-bad-exit does not end rank 0 first."""
    import harness.train

    _slurm_task(monkeypatch, "880", procid, 2)
    monkeypatch.setattr(launch_mod, "compose_run", lambda overrides: (None, {}, "", "run"))

    def stopped(*args, **kwargs):
        raise SystemExit(128 + 12)  # SIGUSR2

    monkeypatch.setattr(harness.train, "run_training", stopped)
    requeued = []
    monkeypatch.setattr(TrainJob, "_requeue_or_give_up", lambda self, signum: requeued.append(signum))
    with pytest.raises(SystemExit) as exit_info:
        TrainJob([], str(tmp_path / "run"), max_requeues=3)()
    if procid == 0:
        assert requeued == [12] and exit_info.value.code == 140
    else:
        assert requeued == [] and exit_info.value.code == 0
