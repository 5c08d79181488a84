"""Smoke test of the local SLURM cluster with submitit: submit, sacct, preemption -> checkpoint -> requeue.

~20 s in all, most of it the requeue (the old job credential must expire: cred_expire=10 s).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit

# The jobs unpickle these functions in a fresh interpreter that cannot import this test module by name.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.slurm


def add(a, b):
    return a + b, socket.gethostname(), os.environ.get("SLURM_JOB_ID")


class Counter(submitit.helpers.Checkpointable):
    """Counts to n, writing its progress to a file; on USR2 submitit pickles it (with its progress) and requeues."""

    def __init__(self, progress_file: str):
        self.progress_file = progress_file
        self.progress = 0
        self.starts: list[tuple[int, int]] = []  # (SLURM_RESTART_COUNT, progress) at each start

    def __call__(self, n: int, step_s: float):
        self.starts.append((int(os.environ.get("SLURM_RESTART_COUNT", "0")), self.progress))
        while self.progress < n:
            time.sleep(step_s)
            self.progress += 1
            Path(self.progress_file).write_text(str(self.progress))
        return self.progress, self.starts


def _wait_for(what: str, pred, timeout: float):
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.25)


def test_submit_and_sacct(slurm, tmp_path):
    job = slurm.executor(tmp_path).submit(add, 2, 3)
    assert slurm.wait(job, timeout=30) == (5, socket.gethostname(), job.job_id)
    # accounting works (submitit polls job states through sacct); it lags slurmctld by up to a few seconds
    _wait_for("sacct to report COMPLETED", lambda: slurm.sacct_states(job.job_id) == ["COMPLETED"], 15)


def test_preempted_checkpointable_is_requeued(slurm, tmp_path):
    progress = tmp_path / "progress"
    job = slurm.executor(tmp_path).submit(Counter(str(progress)), 16, 0.25)
    # the file appears only after submitit's signal handlers are installed in the job
    _wait_for(
        "the job to make progress", lambda: progress.exists() and int(progress.read_text() or 0) >= 4, 30
    )
    # USR2 to the job steps, i.e. submitit's process; `--batch` would kill the batch shell instead (job FAILED)
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True, timeout=10)
    count, starts = slurm.wait(job, timeout=45)
    assert count == 16
    assert len(starts) == 2, starts
    assert starts[0] == (0, 0)
    restart_count, resumed_at = starts[1]
    assert restart_count >= 1  # SLURM_RESTART_COUNT in the requeued run
    assert resumed_at >= 4  # resumed from the checkpoint, not from scratch
    assert "this job is preempted" in (job.stderr() or ""), job.stderr()
    _wait_for(
        "sacct to show the requeue",
        lambda: {"REQUEUED", "COMPLETED"} <= set(slurm.sacct_states(job.job_id, duplicates=True)),
        15,
    )
