"""Tests against the real local SLURM cluster started by ``scripts/slurm-local.sh up``.

Every test in this folder is marked ``slurm`` (added here at collection). A ``slurm`` test runs when
``scripts/slurm-local.sh status`` exits 0 and skips, with the reason, when the cluster cannot be used:
no ``sinfo`` on PATH (packages not installed), the cluster is not up, or CI could not start it (CI puts
its one-line reason in ``MDH_SLURM_SKIP_REASON``, which then leads the skip reason).

While the tests run, the variables printed by ``scripts/slurm-local.sh env`` (``SLURM_CONF`` pointing at
``$MDH_SLURM_DIR/etc/slurm.conf``, default ``/tmp/mdh-slurm/etc/slurm.conf``, and ``MDH_SLURM_DIR``) are set in
``os.environ``, so ``sbatch``/``sacct``/submitit started by a test, and the jobs they submit, find the cluster
even when pytest was started without ``eval "$(scripts/slurm-local.sh env)"``. Tests take the ``slurm``
fixture (a :class:`SlurmCluster`) for the env, ``executor(...)`` and ``wait(...)``.

Always pass ``cluster="slurm"`` to ``submitit.AutoExecutor``: without it submitit picks SLURM whenever ``srun``
is on PATH. Keep the per-job work tiny: the node has as many CPUs as the machine (2 in CI) and is shared.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "slurm-local.sh"
HERE = Path(__file__).resolve().parent
UP_HINT = "start it with: scripts/slurm-local.sh install && scripts/slurm-local.sh up"


@pytest.hookimpl(tryfirst=True)  # before `-m` deselection, so `-m "not slurm"` sees the marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.slurm)


def _run(
    cmd: list[str], env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env)


def _script_env() -> dict[str, str]:
    """The variables ``slurm-local.sh env`` exports (``export NAME=VALUE`` lines, shell-quoted)."""
    out = _run(["bash", str(SCRIPT), "env"]).stdout
    env = {}
    for line in out.splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            name, value = words[1].split("=", 1)
            env[name] = value
    return env


@dataclass(frozen=True)
class SlurmCluster:
    env: dict[str, str]  # what `slurm-local.sh env` exports; already set in os.environ during the session
    partition: str = "debug"

    @property
    def conf(self) -> Path:
        return Path(self.env["SLURM_CONF"])

    @property
    def state_dir(self) -> Path:
        return Path(self.env["MDH_SLURM_DIR"])

    def executor(self, folder, **params):
        """A submitit executor on this cluster (cluster passed explicitly), small default resources."""
        import submitit

        ex = submitit.AutoExecutor(folder=Path(folder) / "%j", cluster="slurm")
        # timeout_min > 10: submitit counts any USR2 as a timeout (not a preemption) when the signal comes after
        # min(0.8 * timeout, timeout - 10 min), which is negative for timeout_min <= 10
        defaults = {"timeout_min": 30, "slurm_partition": self.partition, "cpus_per_task": 1, "mem_gb": 1}
        ex.update_parameters(**{**defaults, **params})
        return ex

    def wait(self, job, timeout: float = 30):
        """``job.result()`` with a deadline; on timeout cancel the job and fail with what SLURM says."""
        end = time.monotonic() + timeout
        while not job.done():
            if time.monotonic() > end:
                info = _run(["sacct", "-D", "-n", "-P", "-j", str(job.job_id), "-o", "JobID,State,Reason"])
                job.cancel(check=False)
                pytest.fail(
                    f"job {job.job_id} not done after {timeout:.0f}s; sacct: {info.stdout.strip()!r}; "
                    f"stderr: {(job.stderr() or '')[-1500:]}"
                )
            time.sleep(0.5)
        return job.result()

    def sacct_states(self, job_id: str, duplicates: bool = False) -> list[str]:
        """States of the job's allocation records, oldest first (``duplicates``: include requeued runs)."""
        cmd = ["sacct", "-X", "-n", "-P", "-o", "State", "-j", str(job_id)] + (["-D"] if duplicates else [])
        res = _run(cmd)
        assert res.returncode == 0, f"sacct failed: {res.stderr.strip()}"
        return [s.split()[0] for s in res.stdout.split() if s]


def _probe() -> SlurmCluster | str:
    """The cluster, or the reason it cannot be used (led by CI's reason when CI could not start it)."""
    found = _probe_cluster()
    ci_reason = os.environ.get("MDH_SLURM_SKIP_REASON")
    if isinstance(found, str) and ci_reason:
        return f"{ci_reason} ({found})"
    return found


def _probe_cluster() -> SlurmCluster | str:
    if shutil.which("sinfo") is None:
        return f"SLURM client tools not installed (no `sinfo` on PATH); {UP_HINT}"
    env = _script_env()
    if "SLURM_CONF" not in env:
        return f"`{SCRIPT.relative_to(REPO)} env` printed no SLURM_CONF"
    try:
        st = _run(["bash", str(SCRIPT), "status"], env={**os.environ, **env})
    except subprocess.TimeoutExpired:
        return "`scripts/slurm-local.sh status` timed out after 30s"
    if st.returncode != 0:
        lines = [ln for ln in st.stdout.splitlines() if "stopped" in ln or "not" in ln or "node" in ln]
        detail = "; ".join(lines) or st.stderr.strip()
        return f"local SLURM cluster not up (`scripts/slurm-local.sh status` exit {st.returncode}: {detail}); {UP_HINT}"
    return SlurmCluster(env=env)


@pytest.fixture(scope="session")
def slurm():
    found = _probe()
    if isinstance(found, str):
        pytest.skip(found)
    with pytest.MonkeyPatch.context() as mp:
        for name, value in found.env.items():
            mp.setenv(name, value)
        yield found


@pytest.fixture(autouse=True)
def _needs_slurm(request):
    if request.node.get_closest_marker("slurm") is not None:
        request.getfixturevalue("slurm")
