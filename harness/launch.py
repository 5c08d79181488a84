"""Sweeps: many training runs, launched locally or on SLURM through submitit, resumable and idempotent.

A sweep file (``sweeps/<name>.yaml``) lists CELLS explicitly (paired settings, e.g. the rows of Table 3),
optionally crossed with a ``grid`` (e.g. seeds):

    description: what it reproduces            # also in a header comment, with the expected cost
    overrides: [model.preset=small, train.steps=300]       # every cell
    grid: {train.seed: [0, 1, 2]}                           # optional: each cell x each combination
    cells:
      - [train.M=1]
      - [train.M=64, model.options.rope3d=false]

Each cell is composed with Hydra's compose API over the same typed schemas as ``mdh train`` (sweep
overrides, then the command line's, then the cell's own), so a typo fails before anything is submitted.
Its run folder is ``<out>/<prefix>-<fingerprint>`` (the name ``mdh train`` would choose), so a run's
identity is its semantic configuration: finished runs are skipped, interrupted or dead ones resume from
their checkpoint, failed ones are retried only with ``retry_failed``.

Why submitit directly rather than Hydra's submitit launcher: Hydra cannot resume a sweep, only runs
cartesian products, and its launcher cannot run our checkpoint logic on preemption. Here a job that gets
the preemption/time-limit signal (SIGUSR2 from ``--signal``, or SIGTERM) finishes its step, checkpoints,
and requeues itself (``scontrol requeue``) at most ``cluster.max_requeues`` times; any other failure is
not requeued and its error lands in the run's record.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from harness.config import ConfigError, RunConfig
from harness.record import RecordError, RunRecord, write_text_atomic
from harness.runlock import observed_status

log = logging.getLogger(__name__)

SWEEPS_DIR = Path(__file__).resolve().parents[1] / "sweeps"
MANIFEST = "sweep.json"
CLUSTERS = ("local", "local_parallel", "slurm")


# --------------------------------------------------------------------------------------------- sweep files


@dataclass
class Sweep:
    name: str
    path: Path
    description: str = ""
    overrides: list[str] = field(default_factory=list)
    cells: list[list[str]] = field(default_factory=list)
    eval: dict | None = None  # closed-loop evaluation after training (keys: EVAL_KEYS)

    def cell_overrides(self, extra: list[str]) -> list[list[str]]:
        """Per cell: the sweep's overrides, then ``extra`` (the command line), then the cell's own."""
        return [[*self.overrides, *extra, *cell] for cell in self.cells]


EVAL_KEYS = ("env", "tasks", "episodes", "seed_offset", "max_keyposes", "sampler", "sampler_steps", "workers",
             "oracle", "checkpoints")


def find_sweep(name: str) -> Path:
    """``name`` as a path to a YAML file, or ``sweeps/<name>.yaml`` of this repository."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    candidate = SWEEPS_DIR / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(q.stem for q in SWEEPS_DIR.glob("*.yaml")) if SWEEPS_DIR.is_dir() else []
    raise ConfigError(f"no sweep {name!r}: not a YAML file and not one of {known} in {SWEEPS_DIR}")


def load_sweep(name: str) -> Sweep:
    path = find_sweep(name)
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"sweep file {path} is not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"sweep file {path} must hold a mapping with 'cells'")
    unknown = sorted(set(doc) - {"description", "overrides", "grid", "cells", "eval"})
    if unknown:
        raise ConfigError(f"sweep file {path}: unknown keys {unknown}; expected description, overrides, grid, cells, "
                          "eval")
    evaluation = doc.get("eval")
    if evaluation is not None and (not isinstance(evaluation, dict) or set(evaluation) - set(EVAL_KEYS)):
        raise ConfigError(f"sweep file {path}: eval must map some of {list(EVAL_KEYS)} to values, got {evaluation!r}")

    def str_list(value, where: str) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
            raise ConfigError(f"sweep file {path}: {where} must be a list of 'key=value' strings, got {value!r}")
        return list(value)

    overrides = str_list(doc.get("overrides", []), "overrides")
    cells = [str_list(c, f"cells[{i}]") for i, c in enumerate(doc.get("cells") or [[]])]
    grid = doc.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"sweep file {path}: grid must map keys to non-empty lists, got {grid!r}")
    if grid:
        combos = [[f"{k}={v}" for k, v in zip(grid, values)] for values in itertools.product(*grid.values())]
        cells = [[*cell, *combo] for cell in cells for combo in combos]
    return Sweep(name=path.stem, path=path, description=str(doc.get("description", "")), overrides=overrides,
                 cells=cells, eval=evaluation)


# --------------------------------------------------------------------------------------------- composition


def compose_run(overrides: list[str]) -> tuple[RunConfig, dict, str, str]:
    """Overrides -> (RunConfig, resolved dict, resolved YAML, default run-folder name) exactly as
    ``mdh train`` composes them. Bad keys or values -> ``ConfigError``."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    import harness.train_app  # noqa: F401  (schemas, per-policy model nodes, the fingerprint resolver)
    from harness.model_schemas import register_model_schemas

    register_model_schemas()  # again: a policy registered after the first import (a plugin loaded later)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="harness.conf", version_base=None):
            cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
            run_name = Path(str(cfg.hydra.run.dir)).name
            with open_dict(cfg):
                del cfg["hydra"]
            resolved = OmegaConf.to_container(cfg, resolve=True)
            return OmegaConf.to_object(cfg), resolved, OmegaConf.to_yaml(cfg, resolve=True), run_name
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        raise ConfigError(f"overrides {overrides}: {str(e).splitlines()[0]}") from None
    finally:
        GlobalHydra.instance().clear()


@dataclass
class PlannedRun:
    cell: list[str]
    overrides: list[str]
    run_dir: Path
    state: str          # done | running | failed | pending (new, interrupted or died: resumes)
    error: str | None = None
    composed: tuple | None = None  # compose_run(overrides), kept so a local launch does not compose again


def run_state(run_dir: Path) -> tuple[str, dict | None]:
    """(done | running | failed | interrupted | died | pending, record) of one run folder."""
    try:
        record = RunRecord(run_dir).load()
    except RecordError as e:
        return "failed", {"error": str(e)}
    if record is None:
        return observed_status(run_dir, None), None
    return observed_status(run_dir, record.get("status") or "pending"), record


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].strip().lstrip("+~")


def check_shadowed(sweep: Sweep, extra: list[str]) -> None:
    """Command-line overrides that cells set again: the cell's own value wins (it comes last). An override
    that EVERY cell sets changes no run at all, so it is refused naming the key and the cells; one that some
    cells set is applied to the others with a warning (shipped workflows rely on that: docs/reproduce.md's
    data.path beside table2/table3's 3DDA cells, `make quick`'s train.steps beside its 50-step cost cells)."""
    def cells_text(cells: list[list[str]]) -> str:
        shown = "; ".join(f"[{' '.join(c)}]" for c in cells[:6])
        return shown + (f"; ... ({len(cells) - 6} more)" if len(cells) > 6 else "")

    for key in dict.fromkeys(_override_key(o) for o in extra):
        given = [o for o in extra if _override_key(o) == key][-1]
        cells = [c for c in sweep.cells if any(_override_key(o) == key for o in c)]
        if cells and len(cells) == len(sweep.cells):
            raise ConfigError(f"sweep {sweep.name}: {given!r} from the command line would change no run: every "
                              f"cell sets {key} itself ({cells_text(cells)}); edit or copy {sweep.path} instead")
        if cells:
            log.warning("sweep %s: %r from the command line is NOT applied to %d of %d cells, which set %s "
                        "themselves: %s", sweep.name, given, len(cells), len(sweep.cells), key, cells_text(cells))


def plan_sweep(sweep: Sweep, out_dir: Path, extra: list[str], retry_failed: bool = False) -> list[PlannedRun]:
    """Compose every cell, name its run folder and decide what to do with it."""
    check_shadowed(sweep, extra)
    planned, seen = [], {}
    for cell, overrides in zip(sweep.cells, sweep.cell_overrides(extra)):
        composed = compose_run(overrides)
        name = composed[3]
        if name in seen:
            raise ConfigError(f"sweep {sweep.name}: cells {seen[name]} and {cell} are the same run ({name})")
        seen[name] = cell
        run_dir = out_dir / name
        state, record = run_state(run_dir)
        error = (record or {}).get("error")
        if state in ("interrupted", "died") or (state == "failed" and retry_failed):
            state = "pending"
        planned.append(PlannedRun(cell, overrides, run_dir, state, error, composed))
    return planned


def write_manifest(sweep: Sweep, out_dir: Path, planned: list[PlannedRun], extra: list[str]) -> None:
    """``<out>/sweep.json``: what the sweep holds, so ``status`` can list runs that have not started."""
    write_text_atomic(out_dir / MANIFEST, json.dumps({
        "sweep": sweep.name, "file": str(sweep.path), "description": sweep.description, "overrides": extra,
        "runs": [{"run": p.run_dir.name, "cell": p.cell, "overrides": p.overrides} for p in planned]},
        indent=2) + "\n")


# --------------------------------------------------------------------------------------------- jobs


class TrainJob:
    """One run as a submitit job: compose, train (resuming), and on the preemption / time-limit signal
    checkpoint and requeue itself, at most ``max_requeues`` times.

    A job of several SLURM tasks (``tasks_per_run``) is one data-parallel run: every task is one
    torch.distributed rank (``export_torch_distributed_env``); rank 0 alone holds the run folder, writes the
    record and checkpoints (harness/train.py), and alone requeues the job or records why it does not."""

    def __init__(self, overrides: list[str], run_dir: str, max_requeues: int = 3):
        self.overrides = list(overrides)
        self.run_dir = str(run_dir)
        self.max_requeues = max_requeues

    def __call__(self) -> dict:
        from harness.train import run_training

        rank = export_torch_distributed_env()
        cfg, resolved, yaml_text, _ = compose_run(self.overrides)
        try:
            return run_training(cfg, self.run_dir, resolved=resolved, config_yaml=yaml_text,
                                overrides=self.overrides, launcher=launcher_info())
        except SystemExit as stop:  # StopRequested: the checkpoint is written; the run is resumable
            if os.environ.get("SLURM_JOB_ID") and isinstance(stop.code, int) and stop.code > 128:
                if rank != 0:
                    # every rank stopped after the same step and rank 0 has written the record and the
                    # checkpoint; rank 0 requeues the whole job. Exit status 0: a failed task would make srun
                    # (--kill-on-bad-exit) end rank 0 before it has requeued
                    log.info("%s: rank %d stopped by signal %d; rank 0 requeues the job", self.run_dir, rank,
                             stop.code - 128)
                    sys.exit(0)
                self._requeue_or_give_up(stop.code - 128)
            raise

    def checkpoint(self, *args, **kwargs):
        """submitit calls this when the signal arrives outside the training loop (while loading data):
        nothing to save yet; run the same job again."""
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob(self.overrides, self.run_dir, self.max_requeues))

    def _requeue_or_give_up(self, signum: int) -> None:
        import signal as _signal

        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        name = _signal.Signals(signum).name
        if restarts >= self.max_requeues:
            reason = (f"stopped by {name} after {restarts} requeues (cluster.max_requeues={self.max_requeues}); "
                      "not requeued again: re-run the sweep to resume")
            record = RunRecord(self.run_dir)
            if record.load() is not None:
                record.update(error=reason)
            raise RuntimeError(f"{self.run_dir}: {reason}")
        import submitit

        job_id = submitit.JobEnvironment().job_id
        subprocess.run(["scontrol", "requeue", job_id], check=False, timeout=60)
        log.warning("%s: checkpointed on %s and requeued job %s (restart %d of at most %d)", self.run_dir, name,
                    job_id, restarts + 1, self.max_requeues)
        sys.exit(-1)  # as submitit does after a requeue: no result file, the requeued job writes it


def launcher_info() -> dict:
    """Where this process runs: cluster job id and restart count (None outside SLURM)."""
    env = os.environ
    return {"slurm_job_id": env.get("SLURM_JOB_ID"), "slurm_array_job_id": env.get("SLURM_ARRAY_JOB_ID"),
            "slurm_array_task_id": env.get("SLURM_ARRAY_TASK_ID"),
            "restart_count": int(env.get("SLURM_RESTART_COUNT", "0") or 0) if env.get("SLURM_JOB_ID") else None,
            "host": os.uname().nodename}


def export_torch_distributed_env() -> int:
    """Inside a submitit job: torch.distributed's ``env://`` variables for this task, which
    ``harness.distributed.Distributed.from_env`` reads: ``RANK`` (the task's global rank), ``WORLD_SIZE`` (the
    job's tasks), ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` (the job's first node) and
    ``MASTER_PORT`` (drawn from the job id: the same in every task of a job, another in each job of an
    array). Values the job inherited from the submitting shell (``sbatch --export=ALL``) are replaced; one
    task exports ``WORLD_SIZE=1`` (not distributed). ``CUDA_VISIBLE_DEVICES`` is left alone: every task sees
    the job's GPUs and takes ``cuda:LOCAL_RANK``. Returns this task's rank (0 outside a submitit job, where
    nothing is exported)."""
    import submitit

    try:
        submitit.JobEnvironment()
    except RuntimeError:  # called outside a submitit job
        return 0
    os.environ.pop("MASTER_PORT", None)  # an inherited port would be shared by every job on the node
    env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return env.rank


def tasks_per_run(cluster) -> int:
    """Processes of one run on SLURM (SLURM tasks, each a torch.distributed rank on one device):
    ``cluster.tasks_per_node`` when set, else one per GPU (``cluster.gpus_per_task``), else 1."""
    gpus = cluster.gpus_per_task or 0
    tasks = getattr(cluster, "tasks_per_node", None)
    if tasks is None:
        return max(1, gpus)
    if isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 1:
        raise ConfigError(f"cluster.tasks_per_node must be an integer >= 1 or null, got {tasks!r}")
    if gpus and tasks != gpus:
        raise ConfigError(f"cluster.tasks_per_node={tasks} but cluster.gpus_per_task={gpus}: a run trains one "
                          f"process per GPU; set cluster.tasks_per_node={gpus} or null")
    return tasks


def _executor(cluster, out_dir: Path):
    import submitit

    folder = out_dir / ".submitit" / "%j"
    if cluster.name == "slurm":
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm")  # explicit: an installed client changes the default
        params = {"timeout_min": cluster.timeout_min, "cpus_per_task": cluster.cpus_per_task,
                  "tasks_per_node": 1, "nodes": 1, "slurm_signal_delay_s": cluster.signal_delay_s,
                  "slurm_array_parallelism": cluster.array_parallelism, "name": "mdh"}
        tasks = tasks_per_run(cluster)
        if tasks > 1:
            # One process per GPU (or per cluster.tasks_per_node), each a rank of one data-parallel run
            # (TrainJob exports the torch.distributed variables). sbatch gets --ntasks-per-node through
            # additional_parameters while submitit's own task count stays 1: every rank returns rank 0's
            # record, so a job's result is task 0's, and launch() reads it with job.result() (a job of N
            # submitit tasks would answer only job.results()). --kill-on-bad-exit: a rank that dies ends
            # the others at once, as torchrun does, rather than leaving them in a collective until its timeout
            params["slurm_additional_parameters"] = {"ntasks_per_node": tasks}
            params["slurm_srun_args"] = ["--kill-on-bad-exit=1"]
        if cluster.gpus_per_task:
            params["gpus_per_node"] = cluster.gpus_per_task
        if cluster.mem_gb:
            params["mem_gb"] = cluster.mem_gb
        for key in ("partition", "account", "qos"):
            if getattr(cluster, key):
                params[f"slurm_{key}"] = getattr(cluster, key)
        if cluster.setup:
            params["slurm_setup"] = list(cluster.setup)
        ex.update_parameters(**params)
        return ex
    ex = submitit.AutoExecutor(folder=folder, cluster="local")
    ex.update_parameters(timeout_min=cluster.timeout_min)
    return ex


def _child_setup():
    """The ``preexec_fn`` of a local run's ``mdh train`` (runs in the child between fork and exec; Linux,
    else None). SIGTERM when the sweep dies (``PR_SET_PDEATHSIG``, kept across exec): a killed sweep leaves
    no orphan that finishes its run unseen, the run checkpoints and stops as on preemption, and the next
    sweep resumes it. SIGINT ignored: Ctrl-C reaches the sweep alone, which stops the run with SIGTERM (a
    run hit by SIGINT itself would end ``failed``, which a re-run skips)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    set_handler = libc.signal
    set_handler.restype, set_handler.argtypes = ctypes.c_void_p, [ctypes.c_int, ctypes.c_void_p]
    prctl, parent = libc.prctl, os.getpid()
    sigint, sigterm, sig_ign, pr_set_pdeathsig = int(signal.SIGINT), int(signal.SIGTERM), 1, 1

    def setup() -> None:  # libc calls only, no imports: this runs in a fork of a possibly threaded process
        set_handler(sigint, sig_ign)  # an ignored signal stays ignored across exec
        prctl(pr_set_pdeathsig, sigterm)
        if os.getppid() != parent:  # the sweep died before the prctl: no signal would come
            os.kill(os.getpid(), sigterm)

    return setup


def _tee_stderr(proc: subprocess.Popen, keep: int = 16384):
    """Copy ``proc``'s stderr to ours as it comes (progress bars included) and keep its last ``keep``
    characters. Returns (thread, tail list of one string)."""
    import codecs
    import contextlib
    import threading

    tail = [""]
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def pump() -> None:  # closes the pipe itself at EOF (a grandchild may hold it open past the child's exit)
        with proc.stderr:
            while chunk := os.read(proc.stderr.fileno(), 65536):
                text = decoder.decode(chunk)
                tail[0] = (tail[0] + text)[-keep:]
                with contextlib.suppress(OSError, ValueError):  # our stderr closed: keep the tail anyway
                    sys.stderr.write(text)
                    sys.stderr.flush()

    thread = threading.Thread(target=pump, name=f"stderr of pid {proc.pid}", daemon=True)
    thread.start()
    return thread, tail


def _last_error_line(stderr: str) -> str | None:
    """The line of a failed ``mdh train``'s stderr that says why (Hydra's trailing hint skipped)."""
    import re

    lines = [ln.strip() for ln in re.split(r"[\r\n]+", stderr) if ln.strip()
             and not ln.startswith("Set the environment variable HYDRA_FULL_ERROR")]
    return lines[-1].removeprefix("mdh train: error: ") if lines else None


def _record_text(run_dir: Path) -> str | None:
    try:
        return (run_dir / "record.json").read_text()
    except OSError:
        return None


def _record_early_failure(p: PlannedRun, returncode: int, stderr: str, before: str | None) -> str:
    """A child that exited with an error without writing its record (refused before the run started, e.g.
    data.path missing): record ``failed`` with the error line of its stderr, so ``sweep status`` shows it
    and re-runs skip it unless ``--retry-failed``. Returns the error line."""
    from harness.runlock import RunFolderBusy, RunLock

    line = _last_error_line(stderr) or f"mdh train exited with status {returncode}"
    try:
        with RunLock(p.run_dir):
            if _record_text(p.run_dir) != before:  # someone else ran it meanwhile and wrote its outcome
                return line
            record = RunRecord(p.run_dir)
            previous = record.load() or {}
            record.update(status="failed", error=line, traceback=stderr[-4000:],
                          run_id=previous.get("run_id") or p.run_dir.name,
                          overrides=previous.get("overrides") or p.overrides,
                          finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    except (RunFolderBusy, RecordError, OSError) as e:
        log.error("run %s: could not record its failure: %s", p.run_dir, e)
    return line


def _train_in_subprocess(p: PlannedRun) -> str:
    """``mdh train <overrides> hydra.run.dir=<run dir>`` in a child process; its outcome from the record.

    The child dies with the sweep (``_child_setup``); Ctrl-C stops it with SIGTERM (it checkpoints; the run is
    left ``interrupted``). A child that fails before writing its record gets one (``_record_early_failure``)."""
    import signal

    before = _record_text(p.run_dir)
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "train", *p.overrides, f"hydra.run.dir={p.run_dir}"],
                            stderr=subprocess.PIPE, preexec_fn=_child_setup())  # noqa: PLW1509 - C calls only
    reader, tail = _tee_stderr(proc)
    try:
        try:
            returncode = proc.wait()
        except BaseException:  # Ctrl-C of the sweep: stop the run as a preemption does, then stop
            log.warning("stopping %s: SIGTERM sent, it checkpoints at the end of its step (Ctrl-C again kills it)",
                        p.run_dir)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait()
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            raise
    finally:
        reader.join(timeout=10)
    try:
        record = RunRecord(p.run_dir).load() or {}
    except RecordError:
        record = {}
    if returncode == 0:
        return record.get("status") or "?"
    if 0 < returncode < 128 and _record_text(p.run_dir) == before:  # an error exit before the record: not a kill
        line = _record_early_failure(p, returncode, tail[0], before)
        log.error("run %s failed before it started (exit status %d): %s", p.run_dir, returncode, line)
        return f"failed: {line}"
    error = (record.get("error") or "").strip()
    first = error.splitlines()[0] if error else f"exit status {returncode}"
    if record.get("status") == "interrupted":
        log.warning("run %s interrupted (exit status %d): %s", p.run_dir, returncode, first)
        return f"interrupted: {first}"
    log.error("run %s failed (exit status %d): %s", p.run_dir, returncode, first)
    return f"failed: {first}"


def launch(planned: list[PlannedRun], cluster, out_dir: Path, wait: bool = True) -> dict[str, str]:
    """Run every pending run of ``planned`` on ``cluster`` (a ``ClusterConfig``); returns {run: outcome}."""
    todo = [p for p in planned if p.state == "pending"]
    outcomes: dict[str, str] = {}
    if not todo:
        return outcomes
    if cluster.name == "local":
        # one after another, each in a fresh `mdh train` process: a process's RSS holds what earlier runs left
        # (allocator caches, freed-but-kept heap), which measured a 50-step 3DDA run at 3.55 GB after two
        # Mini-Diffuser runs in one process against 1.73 GB alone
        for p in todo:
            outcomes[p.run_dir.name] = _train_in_subprocess(p)
        return outcomes
    executor = _executor(cluster, out_dir)
    jobs = []
    if cluster.name == "slurm":
        with executor.batch():
            for p in todo:
                jobs.append((p, executor.submit(TrainJob(p.overrides, str(p.run_dir), cluster.max_requeues))))
    else:  # local_parallel: at most max_parallel subprocesses at a time
        queue = list(todo)
        running: list = []
        while queue or running:
            while queue and len(running) < cluster.max_parallel:
                p = queue.pop(0)
                job = executor.submit(TrainJob(p.overrides, str(p.run_dir), 0))
                running.append((p, job))
                jobs.append((p, job))
            time.sleep(0.5)
            running = [(p, j) for p, j in running if not j.done()]
    for p, job in jobs:
        log.info("run %s: job %s", p.run_dir.name, job.job_id)
    if not wait:
        return {p.run_dir.name: f"submitted as job {job.job_id}" for p, job in jobs}
    for p, job in jobs:
        try:
            outcomes[p.run_dir.name] = (job.result() or {}).get("status") or "?"
        except Exception as e:  # noqa: BLE001 - report every run; the record holds the details
            outcomes[p.run_dir.name] = f"failed: {str(e).strip().splitlines()[-1] if str(e).strip() else e!r}"
    return outcomes


def run_sweep(name: str, extra: list[str], out: str | None = None, retry_failed: bool = False,
              dry_run: bool = False, wait: bool = True) -> tuple[list[PlannedRun], dict[str, str]]:
    """``mdh sweep NAME``: plan, write the manifest, launch what is pending."""
    sweep = load_sweep(name)
    out_dir = Path(out) if out else Path("results") / sweep.name
    planned = plan_sweep(sweep, out_dir, extra, retry_failed)
    if dry_run:
        return planned, {}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(sweep, out_dir, planned, extra)
    # the cluster group comes from the sweep and the command line, never from a cell: reuse the first cell's
    # composition unless that cell itself sets a cluster key
    first = planned[0]
    cluster = (first.composed[0].cluster if not any(o.startswith("cluster") for o in first.cell)
               else compose_run([*sweep.overrides, *extra])[0].cluster)
    outcomes = launch(planned, cluster, out_dir, wait=wait)
    if sweep.eval is not None and wait:
        for run, text in evaluate_done_runs(planned, sweep.eval).items():
            outcomes[run] = f"{outcomes[run]}; {text}" if run in outcomes else text
    return planned, outcomes


def curve_is_complete(run_dir: Path, settings: dict) -> bool:
    """Every kept checkpoint of the run has its point in record.json ``success_curve`` for ``settings``."""
    from harness.checkpoint import kept_checkpoints

    try:
        curve = json.loads((run_dir / "record.json").read_text()).get("success_curve") or {}
    except (OSError, ValueError):
        return False
    steps = {p.get("step") for p in curve.get("points") or []}
    return curve.get("config") == settings and {k for k, _ in kept_checkpoints(run_dir)} <= steps


def evaluate_done_runs(planned: list[PlannedRun], options: dict) -> dict[str, str]:
    """The sweep's eval stage: closed-loop evaluation (``mdh eval``) of every done run whose record has no
    success for these settings yet; the oracle is evaluated once per data folder and reused. ``checkpoints:
    true`` also evaluates every kept checkpoint (``evaluate_checkpoints``: success against steps) of runs
    whose curve is not complete. A failed evaluation is logged and reported, never stops the sweep. Returns
    {run: "success X % (n episodes)[; success by step: ...]"}."""
    from harness.evaluate.metaworld_eval import MetaWorldEvalConfig
    from harness.evaluate.run_eval import evaluate, evaluate_checkpoints

    opts = dict(options)
    env, workers, oracle = opts.pop("env", "metaworld"), int(opts.pop("workers", 1)), opts.pop("oracle", True)
    checkpoints = bool(opts.pop("checkpoints", False))  # also every kept checkpoint (success against steps)
    if env != "metaworld":
        raise ConfigError(f"sweep eval: env {env!r} is not available (only metaworld)")
    if isinstance(opts.get("tasks"), str):
        opts["tasks"] = [t for t in opts["tasks"].split(",") if t]
    cfg = MetaWorldEvalConfig(**opts)
    oracles: dict[tuple, list] = {}
    results = {}
    for p in planned:
        state, record = run_state(p.run_dir)
        if state != "done":
            continue
        name = p.run_dir.name
        data = ((record or {}).get("config") or {}).get("data", {})
        data_key = json.dumps([data.get("path"), data.get("taskvars")])  # same episodes -> same oracle
        done_before = ((record or {}).get("final_metrics") or {}).get("success") or {}
        wanted = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "servo"}
        if done_before.get("config") != wanted:
            try:
                summary = evaluate(p.run_dir, cfg, workers=workers,
                                   oracle=oracles.get(data_key, oracle) if oracle else False)
            except Exception as e:  # noqa: BLE001 - one failed evaluation must not stop the others
                log.error("eval of %s failed: %s", p.run_dir, e)
                results[name] = f"eval failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                continue
            if oracle and data_key not in oracles:
                from harness.evaluate.closed_loop import EpisodeResult

                oracles[data_key] = [EpisodeResult(**r) for r in summary["oracle_episodes"]]
            s = summary["success"]
            results[name] = f"success {'-' if s is None else f'{100 * s:.1f}'} % ({summary['episodes']} episodes)"
        if checkpoints and not curve_is_complete(p.run_dir, wanted):
            try:
                curve = evaluate_checkpoints(p.run_dir, cfg, workers=workers,
                                             oracle=oracles.get(data_key, oracle) if oracle else False)
            except Exception as e:  # noqa: BLE001
                log.error("eval of the kept checkpoints of %s failed: %s", p.run_dir, e)
                results[name] = f"{results.get(name, '')}; kept checkpoints: eval failed: {e}".lstrip("; ")
                continue
            text = "success by step: " + ", ".join(f"{r['step']}: {r['success_pct']:.0f} %" for r in curve)
            results[name] = f"{results[name]}; {text}" if name in results else text
    return results


# --------------------------------------------------------------------------------------------- status


def sweep_status(out_dir: str | os.PathLike) -> list[dict]:
    """One row per run of a sweep folder: run, state, step, steps, key figures, error line. ``step`` is the
    record's ``steps_done``, which a running run rewrites every ``train.log_every_s`` (``progress_at``: when),
    not only at its checkpoints."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ConfigError(f"sweep folder {out_dir} does not exist")
    names: list[str] = []
    manifest = out_dir / MANIFEST
    if manifest.is_file():
        names = [r["run"] for r in json.loads(manifest.read_text()).get("runs", [])]
    names += sorted(p.name for p in out_dir.iterdir()
                    if p.is_dir() and (p / "record.json").is_file() and p.name not in names)
    rows = []
    for name in names:
        state, record = run_state(out_dir / name)
        record = record or {}
        overall = ((record.get("final_metrics") or {}).get("overall")) or {}
        timing = record.get("timing") or {}
        error = record.get("error")
        rows.append({"run": name, "state": state, "step": record.get("steps_done"),
                     "steps": record.get("steps_total"), "progress_at": record.get("progress_at"),
                     "B": record.get("B"), "M": record.get("M"),
                     "pos_err_cm": overall.get("pos_err_cm"), "pct_within_1cm": overall.get("pct_within_1cm"),
                     "step_time_median_s": timing.get("step_time_median_s"),
                     "error": error.splitlines()[0] if isinstance(error, str) and error else None})
    return rows


def _age(iso: str | None, now: float | None = None) -> str | None:
    """``"42 s ago"``, ``"12 min ago"``, ``"3.5 h ago"`` for a record time stamp (None when absent or unreadable)."""
    import datetime

    try:
        then = datetime.datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except (TypeError, ValueError):
        return None
    age = max(0.0, (time.time() if now is None else now) - then)
    return f"{age:.0f} s ago" if age < 120 else f"{age / 60:.0f} min ago" if age < 7200 else f"{age / 3600:.1f} h ago"


def format_status(rows: list[dict]) -> str:
    from tabulate import tabulate

    def fmt(v, d):
        return "-" if v is None else f"{v:.{d}f}"

    def step(r):
        text = f"{r['step'] or 0}/{r['steps'] or '?'}"
        age = _age(r.get("progress_at")) if r["state"] == "running" else None
        return f"{text} ({age})" if age else text

    table = [[r["run"], r["state"], step(r), fmt(r["pos_err_cm"], 2),
              fmt(r["pct_within_1cm"], 1), fmt(r["step_time_median_s"], 3), r["error"] or ""] for r in rows]
    counts = {s: sum(r["state"] == s for r in rows) for s in ("done", "running", "pending", "failed", "died",
                                                              "interrupted")}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    return tabulate(table, ["run", "state", "step", "pos err cm", "% 1 cm", "median step s", "error"],
                    tablefmt="github") + f"\n{len(rows)} runs: {summary}"
