"""One training run, resumable: ``run_training(cfg, run_dir)``.

The loop draws every Level-2 batch through ``harness.level2.sample_level2``; nothing else here knows
about M. Re-running with the same run folder resumes from ``ckpt/last.pt`` (model, optimizer, LR
schedule, EMA, every RNG state, the batch order, the step log); a finished run is not run again.
SIGTERM and SIGUSR1 checkpoint at the end of the current step and exit with 128 + the signal number.

Data parallel (launched by torchrun, see harness/distributed.py): ``train.B`` is the batch of each of the W
processes. Every rank draws global batch k of ``B * W`` keysteps from the one-process batch order and keeps
its own contiguous slice, draws the Level-2 noise of the whole global batch and keeps its slice, and the
gradients are averaged, so the run computes what one process at ``B * W`` computes (up to the order of
floating-point sums). Rank 0 alone holds the run lock and writes the record, the logs and the checkpoints
and runs the offline evaluation; every rank resumes from the same checkpoint; a signal to any rank stops
all of them after the same step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import platform
import random
import signal
import subprocess
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from harness.checkpoint import keep_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from harness.config import ConfigError, RunConfig, validate_config
from harness.data.collate import batch_to, collate_keysteps
from harness.data.dataset import KeystepDataset
from harness.data.errors import DataError
from harness.data.formats import has_split, open_source
from harness.data.formats.instructions import find_instruction_files, read_instr_embeds
from harness.data.formats.lotus_lmdb import LotusLmdbSource
from harness.data.meta import resolve_meta
from harness.data.sampler import ResumableBatchSampler
from harness.diffusion import SamplerConfig, make_sampler
from harness.distributed import Distributed, DistributedError
from harness.evaluate.offline import evaluate_policy
from harness.fingerprint import config_differences, fingerprint, record_semantic_config, semantic_config
from harness.measure.cost import cost_summary
from harness.measure.memory import MemoryMonitor
from harness.measure.timing import StepTimer
from harness.policy import DataInfo, build_policy, get_policy, options_to_overrides
from harness.record import (
    NON_LOSS_STEP_COLUMNS,
    RECORD_FIELDS,
    DiskFullError,
    RecordError,
    RunRecord,
    disk_full_path,
    remove_stale_temporaries,
)
from harness.runlock import LOCK_NAME, RunFolderBusy, RunLock
from harness.train_step import TrainStep

log = logging.getLogger(__name__)


class StopRequested(Exception):
    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"signal {signal.Signals(signum).name}")


def resolve_device(name: str | torch.device) -> torch.device:
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but no CUDA device is available")
    return torch.device(name)


def device_info(device: torch.device, dist: Distributed | None = None) -> dict:
    """What the run trains on; ``count`` = devices used (the W processes of a data-parallel run, one device
    each), which the cost multiplies by."""
    world = dist.world_size if dist is not None else 1
    extra = {"world_size": world, "backend": dist.backend} if world > 1 else {}
    if device.type == "cuda":
        return {"kind": "cuda", "name": torch.cuda.get_device_name(device), "count": world, **extra}
    return {"kind": "cpu", "name": platform.processor() or platform.machine(), "count": world,
            "threads": torch.get_num_threads(), **extra}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], check=False, capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def model_options(cfg: RunConfig) -> dict:
    """``model.options`` without the null entries (null = keep the preset's value), nested."""
    return options_to_overrides(cfg.model.options)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def dataset_info(cfg: RunConfig) -> DataInfo:
    """Facts of the dataset at ``data.path`` that a policy is built with, read before the policy exists:
    the metadata, the instruction embedding width, whether camera images are stored."""
    d = cfg.data
    path = Path(d.path).expanduser()
    try:
        meta, _ = resolve_meta(path, d.meta_preset)
        embeds = Path(d.embeds) if d.embeds else find_instruction_files(path).get("embeds")
        widths = {int(v.shape[1]) for v in read_instr_embeds(embeds).values()} if embeds else set()
        if not embeds and not LotusLmdbSource.detect(path):  # a format that stores embeddings itself (3DDA)
            source = open_source(path, split=d.split)
            if hasattr(source, "instruction_embeddings"):
                embeds = f"{path} (the format's own instruction embeddings)"
                widths = {int(v.shape[1]) for v in source.instruction_embeddings().values()}
    except DataError as e:
        raise ConfigError(f"data.path={d.path!r}: {e}") from None
    if len(widths) > 1:
        raise ConfigError(f"instruction embeddings in {embeds} have several widths {sorted(widths)}")
    def bounds():
        from harness.data.bounds import keypose_bounds

        try:
            return keypose_bounds(path, d.split, d.kind, d.taskvars)
        except DataError as e:
            raise ConfigError(f"data.path={d.path!r}: {e}") from None

    return DataInfo(meta=meta, text_dim=widths.pop() if widths else None, has_images=d.kind == "keysteps",
                    bounds_fn=bounds)


def build_run_policy(cfg: RunConfig, info: DataInfo | None = None):
    """The policy of ``cfg.model`` built with the dataset facts ``info``; bad names, presets, options or a
    mismatch with the data -> ``ConfigError``."""
    try:
        entry = get_policy(cfg.model.name)
        config = entry.make_config(cfg.model.preset, **model_options(cfg))
        return build_policy(cfg.model.name, config, info)
    except (KeyError, ValueError, TypeError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise ConfigError(f"model={cfg.model.name} model.preset={cfg.model.preset} "
                          f"model.options={model_options(cfg)}: {message}") from None


def build_datasets(cfg: RunConfig, policy, world_size: int = 1) -> tuple[KeystepDataset, KeystepDataset, str]:
    """(train dataset, evaluation dataset, name of the evaluated split), transformed as the policy's input
    spec asks."""
    d = cfg.data
    spec = policy.input_spec
    if spec.modality == "images" and d.kind != "keysteps":
        raise ConfigError(f"model {cfg.model.name} reads camera images but data.kind={d.kind!r} holds point "
                          "clouds only; use data.kind=keysteps")
    common = {"kind": d.kind, "meta_preset": d.meta_preset, "instructions": d.instructions, "embeds": d.embeds,
                  "taskvars": d.taskvars, "skip_bad": d.skip_bad, "seed": cfg.train.seed, "n_hist": spec.n_hist,
                  "require_text": spec.text_dim is not None}
    path = Path(d.path).expanduser()
    train = KeystepDataset(path, split=d.split, transform=spec.transform(True, d.num_points), **common)
    eval_split = d.val_split if has_split(path, d.val_split, d.kind) else d.split
    if eval_split == d.split:
        log.warning("no held-out split %r under %s: evaluating on %r without augmentation", d.val_split, path,
                    d.split)
    evalset = KeystepDataset(path, split=eval_split, transform=spec.transform(False, d.num_points), **common)
    check_dataset_fits_policy(train, policy, cfg, world_size)
    return train, evalset, eval_split


def check_dataset_fits_policy(ds: KeystepDataset, policy, cfg: RunConfig, world_size: int = 1) -> None:
    """The data must deliver what the policy's input spec names (keys, shapes, dtypes, text width)."""
    if len(ds) == 0:
        raise ConfigError(f"data.path={cfg.data.path!r} holds no keysteps")
    if len(ds) < cfg.train.B * world_size:
        batch = f"train.B={cfg.train.B}" + (f" x {world_size} processes" if world_size > 1 else "")
        raise ConfigError(f"{batch} but data.path={cfg.data.path!r} (split {cfg.data.split!r}) "
                          f"holds {len(ds)} training keysteps, fewer than one batch; lower train.B")
    spec = policy.input_spec
    if spec.text_dim is not None and ds[0].get("text_tokens") is None:
        raise ConfigError(f"model {cfg.model.name} needs instruction embeddings; none found beside "
                          f"{cfg.data.path!r} (set data.embeds)")
    batch = collate_keysteps([ds[0], ds[min(1, len(ds) - 1)]])
    spec = dataclasses.replace(spec, num_points=batch["points"].shape[1]) if spec.modality == "points" else spec
    try:
        spec.check_batch(batch, where=f"a batch of data.path={cfg.data.path!r}")
    except ValueError as e:
        raise ConfigError(f"model {cfg.model.name}: {e}") from None


def mean_losses_since(step_rows: list[dict], after_step: int) -> dict[str, float]:
    """Mean of every loss column over the steps after ``after_step`` (the previous evaluation). Computed
    from the step log, which the checkpoint holds, so a resumed run averages exactly what an uninterrupted
    one would."""
    rows = [r for r in step_rows if r["step"] > after_step]
    keys = sorted({k for r in rows for k in r} - NON_LOSS_STEP_COLUMNS - {"step"})
    return {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask: a SLURM allocation, a container), not the host's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def loader_plan(workers: int | None, cpus: int | None = None) -> dict:
    """DataLoader workers and torch threads from the CPUs available. ``workers`` None: leave two CPUs to the
    training step and give loading the rest, at most 4 (on 2 cores: 0 workers; measured there, 2 workers
    made a step 1.43 s against 0.82 s with 0). Torch gets the CPUs the workers leave (at least 1), unless
    OMP_NUM_THREADS says otherwise."""
    cpus = cpus or available_cpus()
    auto = workers is None
    workers = max(0, min(4, cpus - 2)) if auto else workers
    threads = int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS", "").isdigit() \
        else max(1, cpus - workers)
    return {"workers": workers, "workers_auto": auto, "torch_threads": threads, "cpus_available": cpus}


def eval_batches(ds: KeystepDataset, n: int, batch_size: int) -> list[dict]:
    """A fixed, evenly spaced subset of ``n`` keysteps, collated once."""
    idx = np.unique(np.linspace(0, len(ds) - 1, num=min(n, len(ds))).round().astype(int))
    items = [ds[int(i)] for i in idx]
    return [collate_keysteps(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]


def data_identity(train_ds: KeystepDataset, eval_ds: KeystepDataset, eval_split: str) -> dict:
    """What a resumed run must find again in the data (the batch order is a function of the keystep count):
    task-variations, episodes and keysteps of the training set, and the evaluated split's size."""
    episodes = sorted({f"{tv}/{key}" for tv, key, _ in train_ds.index})
    return {"taskvars": sorted({tv for tv, _, _ in train_ds.index}), "train_episodes": len(episodes),
            "train_keysteps": len(train_ds), "eval_split": eval_split, "eval_keysteps": len(eval_ds)}


def refuse_other_configuration(run_dir: Path, old: dict | None, new: dict, what: str) -> None:
    """One line naming every differing key when ``run_dir`` was written under another configuration."""
    if old is None or old == new:
        return
    diffs = config_differences(old, new)
    raise ConfigError(f"run folder {run_dir} holds a run with another configuration ({what}): "
                      f"{'; '.join(diffs)}. Re-run with the original values, or choose another run folder "
                      "(hydra.run.dir=...; the default folder name already differs per configuration)")


def run_training(cfg: RunConfig, run_dir: str | Path, resolved: dict | None = None,
                 config_yaml: str | None = None, overrides: list[str] | None = None,
                 launcher: dict | None = None, new_folder: bool | None = None) -> dict:
    """Train (or resume, or skip if done) the run in ``run_dir``; returns the final record dict.

    Owns ``run_dir`` for its whole duration (``RunLock``); refuses a folder written under another
    semantic configuration (``harness.fingerprint``) or other data; a full disk ends in ``DiskFullError``
    naming the file and the last good checkpoint. Launched by torchrun (``WORLD_SIZE`` > 1), this process is
    one rank of a data-parallel run: rank 0 owns the folder, the others train beside it.

    ``new_folder``: whether ``run_dir`` did not exist before this launch (None: whether it does not exist
    now; ``mdh train`` passes what it saw before Hydra made the folder). A new folder refused at start
    (``ConfigError`` or ``DataError`` before the record is written) is removed again
    (``remove_refused_folder``), so a refused configuration leaves nothing behind.
    """
    run_dir = Path(run_dir)
    new_folder = (not run_dir.exists()) if new_folder is None else new_folder
    try:
        return _run_training(cfg, run_dir, resolved, config_yaml, overrides, launcher)
    except (ConfigError, DataError) as e:
        if new_folder and not isinstance(e, RunFolderBusy) and int(os.environ.get("RANK", "0") or 0) == 0:
            remove_refused_folder(run_dir)
        raise


def remove_refused_folder(run_dir: Path) -> bool:
    """Remove ``run_dir``, which this launch created and then refused before training: only while no other
    process holds its lock, only when it holds neither a record nor a checkpoint, and only the files this
    process put there (the run lock, the log files this process's logging writes into it, e.g. Hydra's
    train_app.log); the folder itself goes only if that leaves it empty. Returns whether it went."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return False
    try:
        lock = RunLock(run_dir).acquire()
    except (RunFolderBusy, OSError):
        return False
    try:
        if (run_dir / "record.json").exists() or (run_dir / "ckpt").exists():
            return False
        where = run_dir.resolve()
        loggers = [logging.getLogger(), *(x for x in logging.Logger.manager.loggerDict.values()
                                          if isinstance(x, logging.Logger))]
        for logger in loggers:
            for handler in list(logger.handlers):
                if isinstance(handler, logging.FileHandler) and \
                        Path(handler.baseFilename).resolve().parent == where:
                    logger.removeHandler(handler)
                    handler.close()
                    Path(handler.baseFilename).unlink(missing_ok=True)
        (run_dir / LOCK_NAME).unlink(missing_ok=True)
    finally:
        lock.release()
    try:
        run_dir.rmdir()
    except OSError:  # something else is in it (or came in meanwhile): not ours to remove
        log.warning("run folder %s was refused at start but holds other files; left in place", run_dir)
        return False
    log.info("removed run folder %s: its configuration was refused before training", run_dir)
    return True


def _run_training(cfg: RunConfig, run_dir: Path, resolved: dict | None, config_yaml: str | None,
                  overrides: list[str] | None, launcher: dict | None) -> dict:
    validate_config(cfg)
    if cfg.model.preset is None:  # one spelling of "the default preset", so both fingerprint alike
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, preset=get_policy(cfg.model.name).default_preset))
    try:
        dist = Distributed.from_env()
        # one process: the device is resolved after the folder checks, as always (a done run is not refused)
        device = resolve_device(dist.device_for(cfg.train.device)) if dist.enabled else None
    except DistributedError as e:
        raise ConfigError(str(e)) from None
    dist.init(device)
    try:
        with contextlib.ExitStack() as owned:
            def take_folder() -> RunLock:
                return owned.enter_context(RunLock(run_dir))

            lock = on_main(dist, take_folder)  # rank 0 alone holds the lock; a busy folder stops every rank
            record = _run_owned(cfg, run_dir, lock, resolved, config_yaml, overrides, launcher, device, dist)
        return dist.broadcast_object(record)  # every rank reports rank 0's record
    finally:
        dist.close()


def _picklable(error: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001  (whatever does not travel is described instead)
        return RuntimeError(f"rank 0: {type(error).__name__}: {error}")


def on_main(dist: Distributed, fn):
    """``fn()`` on rank 0 only (every rank of a one-process run); an exception it raises is raised on
    every rank, so a refused folder or configuration stops the whole launch with the same message. The
    other ranks return None."""
    if not dist.enabled:
        return fn()
    result, error = None, None
    if dist.is_main:
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001  (shared, then raised again below)
            error = e
    shared = dist.broadcast_object(_picklable(error) if error is not None else None)
    if error is not None:
        raise error
    if shared is not None:
        raise shared
    return result


class RankRecord(RunRecord):
    """A ``RunRecord`` that writes files only on rank 0; the other ranks keep the dict in memory."""

    def __init__(self, run_dir, writes: bool = True):
        super().__init__(run_dir)
        self.writes = writes

    def update(self, **fields) -> None:
        if self.writes:
            return super().update(**fields)
        unknown = sorted(set(fields) - RECORD_FIELDS)
        if unknown:
            raise RecordError(f"{unknown} are not RecordSchema fields (harness/record.py, docs/record.md)")
        self.data.update(fields)

    def write_metrics(self, rows: list[dict]) -> None:
        if self.writes:
            super().write_metrics(rows)

    def write_steps(self, rows: list[dict]) -> None:
        if self.writes:
            super().write_steps(rows)

    def append_steps(self, rows: list[dict], all_rows: list[dict]) -> None:
        if self.writes:
            super().append_steps(rows, all_rows)

    def write_config(self, yaml_text: str) -> None:
        if self.writes:
            super().write_config(yaml_text)


def refuse_other_world_size(run_dir: Path, old: int, new: int, B: int) -> None:
    """A run's effective batch is train.B x the number of processes, which the fingerprint does not see (it
    is not a setting): a folder trained by ``old`` processes is resumed by ``old`` processes only."""
    if old == new:
        return
    def procs(n):
        return f"{n} process{'es' if n > 1 else ''}"
    raise ConfigError(f"run folder {run_dir} was trained by {procs(old)} (train.B={B} each, {old * B} keysteps "
                      f"per step) but this launch has {new}; relaunch with {procs(old)} (torchrun "
                      "--nproc_per_node) or choose another run folder")


def _open_folder(run_dir: Path, record: RunRecord, lock: RunLock, semantic: dict,
                 world_size: int = 1, B: int = 0) -> tuple[dict | None, bool]:
    """Rank 0, holding the lock: clean up, read the previous record, refuse another configuration or
    another number of processes, record a dead owner. Returns (previous record, whether it is done)."""
    removed = remove_stale_temporaries(run_dir) + remove_stale_temporaries(record.ckpt_dir)
    if removed:
        log.warning("removed %d temporary files left by an interrupted write: %s", len(removed),
                    ", ".join(str(p) for p in removed))
    previous = record.load()
    refuse_other_configuration(run_dir, record_semantic_config(previous), semantic, "record.json")
    ckpt_path = record.ckpt_dir / "last.pt"
    done = bool(previous and previous.get("status") == "done" and ckpt_path.exists())
    if not done and previous and previous.get("device") and ckpt_path.exists():
        # refused here, before anything is written (the checkpoint's own world_size is checked again in _train)
        refuse_other_world_size(run_dir, previous["device"].get("world_size", 1), world_size, B)
    if previous and previous.get("status") == "running":  # we hold the lock, so its owner is gone
        holder = lock.stale or {}
        log.warning("run %s: the process that ran it (pid %s on %s) died without a word; last checkpoint at "
                    "step %s; resuming from it", run_dir, holder.get("pid", "?"), holder.get("host", "?"),
                    previous.get("checkpoint_step", 0 if not ckpt_path.exists() else "?"))
        record.data = previous
        record.update(status="died", error="the training process died (killed, out of memory, node lost)",
                      died={"holder": holder, "checkpoint_step": previous.get("checkpoint_step"),
                            "detected_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        previous = record.data
    if done:
        log.info("run %s is already done; nothing to do", run_dir)
    return previous, done


def _run_owned(cfg: RunConfig, run_dir: Path, lock: RunLock | None, resolved: dict | None,
               config_yaml: str | None, overrides: list[str] | None, launcher: dict | None = None,
               device: torch.device | None = None, dist: Distributed | None = None) -> dict:
    dist = dist or Distributed()
    record = RankRecord(run_dir, writes=dist.is_main)
    semantic, fp = semantic_config(cfg), fingerprint(cfg)
    previous, done = dist.broadcast_object(on_main(dist, lambda: _open_folder(
        run_dir, record, lock, semantic, dist.world_size, cfg.train.B)))
    ckpt_path = record.ckpt_dir / "last.pt"
    if done:
        return previous
    device = device or resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)  # the initial weights are a function of the seed
    policy = build_run_policy(cfg, dataset_info(cfg)).to(device)
    train_ds, eval_ds, eval_split = build_datasets(cfg, policy, dist.world_size)
    identity = data_identity(train_ds, eval_ds, eval_split)
    if cfg.data.name == "metaworld" and train_ds.meta.source != "metaworld":
        log.warning("data=%s but %s holds %r data (%s): reports label this run data=%s; pass data=<its "
                    "config> (e.g. data=rlbench for `mdh data convert-rlbench` output)", cfg.data.name,
                    cfg.data.path, train_ds.meta.source, train_ds.meta_source, cfg.data.name)
    if config_yaml is not None:
        record.write_config(config_yaml)
    t = cfg.train
    after_death = bool(previous and previous.get("status") == "died")  # read before the update below
    record.data = previous or record.data
    plan = loader_plan(cfg.data.workers)
    torch.set_num_threads(plan["torch_threads"])
    record.update(
        run_id=run_dir.name, status="running", error=None, fingerprint=fp, semantic_config=semantic,
        config=resolved or dataclasses.asdict(cfg), overrides=overrides,
        git_commit=git_commit(), device=device_info(device, dist), B=t.B, M=t.M, model=cfg.model.name,
        preset=cfg.model.preset, ablation=model_options(cfg),
        model_config=dataclasses.asdict(policy.config) if dataclasses.is_dataclass(policy.config) else None,
        params=sum(p.numel() for p in policy.parameters()), steps_total=t.steps,
        data={"path": str(cfg.data.path), "train_keysteps": len(train_ds), "eval_split": eval_split,
              "eval_keysteps": min(cfg.data.eval_keysteps, len(eval_ds)), "meta": train_ds.meta_source,
              "skipped": dict(train_ds.skipped), "identity": identity},
        owner=lock_owner_fields(), loader=plan,
        launches=[*((previous or {}).get("launches") or []),
                  {**(launcher or {}), **({"world_size": dist.world_size} if dist.enabled else {}),
                   "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}],
        checkpoint_step=(previous or {}).get("checkpoint_step"),
        versions={"torch": torch.__version__, "python": platform.python_version()},
        started_at=(previous or {}).get("started_at") or time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    bounds = getattr(policy, "position_bounds", None)  # optional contract: the box a policy normalises by
    if callable(bounds) and bounds() is not None:
        record.update(keypose_bounds=bounds())
    # a kill between writing last.pt and recording its step leaves the record one checkpoint behind: the
    # death note takes the step the run actually resumes from (read from the checkpoint in _train)
    last_good = {"step": (previous or {}).get("checkpoint_step"), "path": ckpt_path, "after_death": after_death}
    try:
        return _train(cfg, policy, train_ds, eval_ds, record, ckpt_path, device, fp, semantic, identity,
                      last_good, dist)
    except StopRequested as stop:
        record.update(status="interrupted", error=f"stopped by {stop}; re-run the same command to resume")
        dist.barrier()  # no rank exits (which makes torchrun stop the others) before rank 0 has written
        raise SystemExit(128 + stop.signum) from None
    except BaseException as e:
        full = disk_full_path(e)
        try:
            record.update(status="failed", error="".join(traceback.format_exception_only(type(e), e)).strip(),
                          traceback=traceback.format_exc()[-4000:])
        except OSError as write_error:  # e.g. the disk is still full; the next start reports "died"
            log.error("could not record the failure in %s: %s", record.record_path, write_error)
        if full is not None:
            good = (f"{last_good['path']} (step {last_good['step']})" if last_good["step"] is not None
                    else "none yet")
            raise DiskFullError(f"disk full (ENOSPC) while writing {full}; last good checkpoint: {good}. "
                                "Free space and re-run the same command to resume") from None
        raise


def lock_owner_fields() -> dict:
    return {"host": platform.node(), "pid": os.getpid()}


class ShardedBatchSampler(torch.utils.data.Sampler):
    """Slice ``rank`` of ``world`` of every global batch of ``base`` (whose ``batch_size`` is B * world):
    keystep indices ``rank*B:(rank+1)*B``, so the W ranks together read the batches of one process at
    B * W, in the same order, and a resume at step k reads the same slices again."""

    def __init__(self, base: ResumableBatchSampler, rank: int, world: int):
        if base.batch_size % world:
            raise ValueError(f"global batch {base.batch_size} does not split into {world} equal slices")
        self.base, self.rank, self.per_rank = base, rank, base.batch_size // world

    def __iter__(self):
        for batch in self.base:
            yield batch[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]

    def __len__(self) -> int:
        return len(self.base)


def batch_sampler_for(n: int, B: int, seed: int, start: int, dist: Distributed):
    """The training batch order: ``ResumableBatchSampler`` at B, or this rank's slices of it at B * W."""
    if not dist.enabled:
        return ResumableBatchSampler(n, B, seed, start=start)
    return ShardedBatchSampler(ResumableBatchSampler(n, B * dist.world_size, seed, start=start), dist.rank,
                               dist.world_size)


def _rng_state_to_save(device: torch.device, dist: Distributed) -> dict:
    """``rng_state()``; in a data-parallel CUDA run every rank draws from the generator of its OWN GPU (all in
    the same state), so rank 0's current GPU state is stored for every GPU and each rank restores it to its
    own (rank 0's other GPU generators were never used)."""
    state = rng_state()
    if dist.enabled and device.type == "cuda" and "cuda" in state:
        current = torch.cuda.get_rng_state(device)
        state["cuda"] = [current for _ in state["cuda"]]
    return state


def load_initial_weights(policy, source: str) -> dict:
    """``train.init_weights``: the model weights of a checkpoint file (or of a run folder's ckpt/last.pt) into
    ``policy`` before step 0 of a new run (fine-tuning, e.g. from an imported official checkpoint); strict:
    a checkpoint of another architecture or preset is refused naming the keys. Returns the provenance."""
    import hashlib

    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "ckpt" / "last.pt"
    if not path.is_file():
        raise ConfigError(f"train.init_weights={source!r}: no checkpoint file {path}")
    state = load_checkpoint(path)
    weights = state.get("model")
    if not isinstance(weights, dict):
        raise ConfigError(f"train.init_weights={source!r}: {path} has no 'model' state dict")
    try:
        policy.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise ConfigError(f"train.init_weights={source!r}: the weights in {path} do not fit this model: "
                          f"{str(e).splitlines()[0]}") from None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    log.info("initial weights from %s (sha256 %s)", path, digest[:12])
    return {"path": str(path.resolve()), "sha256": digest, "step": state.get("step"),
            "imported_from": state.get("imported_from")}


RECENT_STEPS = 50  # steps behind step_time_recent_s and the s/step of the progress line


def recent_step_time(step_rows: list[dict], n: int = RECENT_STEPS) -> float | None:
    """Median step time (``step_time_s``) of the last ``n`` steps of the step log; None before the first."""
    times = [r["step_time_s"] for r in step_rows[-n:] if r.get("step_time_s") is not None]
    return float(np.median(times)) if times else None


def hms(seconds: float | None) -> str:
    """``h:mm:ss`` (``?`` when unknown)."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = max(0, round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def progress_line(step: int, total: int, loss: float, recent_s: float | None, eta_s: float | None,
                  last_eval: dict | None) -> str:
    """The progress note logged every ``train.log_every_s`` when the bar is off (``train.progress=false``):
    ``step 120/2000 (6.0%)  loss 0.4321  0.812 s/step  ETA 0:25:26  eval@100: pos 3.21 cm, 12.5% within 1 cm``."""
    parts = [f"step {step}/{total} ({100.0 * step / total:.1f}%)", f"loss {loss:.4f}",
             f"{recent_s:.3f} s/step" if recent_s is not None else "? s/step", f"ETA {hms(eta_s)}"]
    if last_eval:
        parts.append(f"eval@{last_eval['step']}: pos {last_eval.get('pos_err_cm', float('nan')):.2f} cm, "
                     f"{last_eval.get('pct_within_1cm', float('nan')):.1f}% within 1 cm")
    return "  ".join(parts)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _train(cfg: RunConfig, policy, train_ds, eval_ds, record: RunRecord, ckpt_path: Path, device,
           fp: str, semantic: dict, identity: dict, last_good: dict, dist: Distributed | None = None) -> dict:
    t = cfg.train
    dist = dist or Distributed()
    W = dist.world_size
    trainer = TrainStep(policy, t, device, dist)
    timer = StepTimer(warmup_steps=min(5, max(0, t.steps - 1)), device=device)
    step, step_rows, metric_rows, wall_before = 0, [], [], 0.0
    seed_everything(t.seed + 1)  # training draws (Level-2 noise, dropout) independent of how the model was built
    if not ckpt_path.exists() and t.init_weights:
        record.update(weights_source=load_initial_weights(policy, t.init_weights))
    if ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        refuse_other_configuration(record.dir, state.get("semantic_config"), semantic, str(ckpt_path))
        refuse_other_world_size(record.dir, state.get("world_size", 1), W, t.B)
        if state.get("data_identity") not in (None, identity):
            raise ConfigError(f"run folder {record.dir} was trained on other data than data.path="
                              f"{cfg.data.path!r} holds now ({ckpt_path}): "
                              f"{'; '.join(config_differences(state['data_identity'], identity))}")
        policy.load_state_dict(state["model"])
        trainer.load_state_dict(state)
        timer.load_state_dict(state["timer"])
        step, step_rows, metric_rows = state["step"], state["step_rows"], state["metric_rows"]
        wall_before = state["wall_time_s"]
        set_rng_state(state["rng"])
        last_good["step"] = step
        if last_good.get("after_death") and record.data.get("died"):
            record.update(died={**record.data["died"], "checkpoint_step": step}, checkpoint_step=step)
        log.info("resumed %s at step %d", record.dir, step)
    # steps.csv = the step log up to where this launch starts: rows a dead or stopped session appended past
    # its last checkpoint go (a new run starts from the header alone)
    record.write_steps(step_rows)
    flushed = {"rows": len(step_rows)}  # steps.csv holds step_rows[:flushed["rows"]]

    def flush_steps() -> None:
        record.append_steps(step_rows[flushed["rows"]:], step_rows)
        flushed["rows"] = len(step_rows)

    def keep_due(at: int) -> bool:
        return bool(t.keep_ckpt_every) and (at % t.keep_ckpt_every == 0 or at == t.steps)

    if dist.is_main and step and keep_due(step) and ckpt_path.exists() and \
            not (ckpt_path.parent / f"step_{step:07d}.pt").exists():
        keep_checkpoint(ckpt_path, step)  # killed between writing last.pt and keeping it
    sampler = make_sampler(policy.noise_scheduler, SamplerConfig(t.sampler, t.sampler_steps))
    # rank 0 evaluates, in batches of the global size, so the metrics are those of one process at B * W
    evals = eval_batches(eval_ds, cfg.data.eval_keysteps, t.B * W) if dist.is_main else []
    loader = DataLoader(train_ds, batch_sampler=batch_sampler_for(len(train_ds), t.B, t.seed, step, dist),
                        num_workers=record.data["loader"]["workers"], collate_fn=collate_keysteps,
                        generator=torch.Generator().manual_seed(t.seed),  # keeps the global RNG untouched
                        pin_memory=device.type == "cuda")
    stop = {"signum": None}

    def on_signal(signum, frame):
        stop["signum"] = signum

    # SIGUSR2: SLURM's --signal before a time limit / preemption (submitit's choice); SIGTERM: preemption
    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    session_start = time.perf_counter()

    def wall() -> float:
        return wall_before + time.perf_counter() - session_start

    def checkpoint() -> None:
        save_checkpoint(ckpt_path, {
            "model": policy.state_dict(), **trainer.state_dict(), "timer": timer.state_dict(), "step": step,
            "step_rows": step_rows, "metric_rows": metric_rows, "wall_time_s": wall(),
            "rng": _rng_state_to_save(device, dist), "fingerprint": fp, "semantic_config": semantic,
            "data_identity": identity, **({"world_size": W} if W > 1 else {})})
        last_good["step"] = step
        if keep_due(step):
            keep_checkpoint(ckpt_path, step)
        flush_steps()

    def summaries(mem) -> dict:
        timing = timer.summary()
        median = timing.get("step_time_median_s")
        timing.update(wall_time_s=wall(), samples_per_s=(t.B * W * t.M / median) if median else None,
                      keysteps_per_s=(t.B * W / median) if median else None)
        info = record.data["device"]
        cost = cost_summary(info["kind"], info["name"], info["count"], wall(), median, t.recipe_steps or t.steps)
        terms = sorted({k for r in step_rows[-1:] for k in r} - NON_LOSS_STEP_COLUMNS - {"step", "loss"})
        return {"timing": timing, "memory": mem.summary(), "cost": cost, "steps_done": step,
                "progress_at": now_iso(), "step_time_recent_s": recent_step_time(step_rows),
                "loss_terms": terms or record.data.get("loss_terms")}

    # progress notes, every train.log_every_s of wall clock and after this session's first step: steps.csv
    # appended, record.json's steps_done / progress_at / step_time_recent_s, and (bar off) one log line
    first_done: dict = {}
    last_note = {"at": None}

    def progress_note(dt: float) -> None:
        now = time.perf_counter()
        if not first_done:
            first_done.update(at=now, step=step, dt=dt)
        elif last_note["at"] is not None and now - last_note["at"] < t.log_every_s:
            return
        last_note["at"] = now
        flush_steps()
        recent = recent_step_time(step_rows)
        record.update(steps_done=step, progress_at=now_iso(), step_time_recent_s=recent)
        if not t.progress:
            done_here = step - first_done["step"]  # wall clock per step after the first (warm-up) one
            per_step = (now - first_done["at"]) / done_here if done_here else first_done["dt"]
            log.info("%s", progress_line(step, t.steps, step_rows[-1]["loss"], recent, per_step * (t.steps - step),
                                         metric_rows[-1] if metric_rows else None))

    from tqdm.auto import tqdm

    data_iter = iter(loader)
    try:
        with MemoryMonitor(device) as mem, tqdm(total=t.steps, initial=step,
                                                 disable=not (t.progress and dist.is_main),
                                                 unit="step", dynamic_ncols=True) as bar:
            while step < t.steps:
                batch = batch_to(next(data_iter), device)
                timer.start()
                losses, grad_norm, lr = trainer.step(batch, t.M)
                dt = timer.stop()
                step += 1
                row = {"step": step, "loss": float(losses["total"].detach()), "lr": lr, "grad_norm": float(grad_norm),
                       "step_time_s": dt, **{k: float(v.detach()) for k, v in losses.items() if k != "total"}}
                if not math.isfinite(row["loss"]):  # the mean over ranks: every rank stops here together
                    raise FloatingPointError(f"loss is {row['loss']} at step {step}")
                step_rows.append(row)
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
                signum = stop["signum"]  # read once: a signal arriving later counts at the next step
                if dist.enabled:  # a signal to any rank stops every rank after this same step
                    signum = dist.all_reduce_max(signum or 0) or None
                evaluate = step % t.eval_every == 0 or step == t.steps
                save = step % t.ckpt_every == 0 or step == t.steps or signum is not None or keep_due(step)
                if evaluate and dist.is_main:
                    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                        gen = torch.Generator(device=device).manual_seed(t.seed)
                        metrics = evaluate_policy(trainer.eval_model, evals, sampler,
                                                  device, generator=gen)
                    means = mean_losses_since(step_rows, metric_rows[-1]["step"] if metric_rows else 0)
                    metric_rows.append({"step": step, **means, "wall_time_s": wall(), "lr": lr,
                                        **{k: v for k, v in metrics["overall"].items() if k != "n"}})
                    record.write_metrics(metric_rows)
                    record.update(final_metrics=metrics, **summaries(mem))
                    bar.write(f"step {step}: loss {means.get('loss', float('nan')):.4f}  "
                              f"pos {metrics['overall']['pos_err_cm']:.2f} cm  "
                              f"within 1 cm {metrics['overall']['pct_within_1cm']:.1f}%  "
                              f"rot {metrics['overall']['rot_err_deg']:.1f} deg  "
                              f"all {metrics['overall']['pct_all']:.1f}%")
                if save and dist.is_main:
                    checkpoint()
                    record.update(checkpoint_step=step, **summaries(mem))
                elif save:
                    last_good["step"] = step
                if (evaluate or save) and dist.enabled:
                    dist.barrier()  # the others wait while rank 0 evaluates and writes
                if signum is not None:
                    raise StopRequested(signum)
                if dist.is_main:
                    progress_note(dt)
            record.update(status="done", finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **summaries(mem))
            dist.barrier()
    except Exception:
        if dist.is_main:  # the failed run's steps.csv keeps the steps up to the failure (a NaN's approach)
            with contextlib.suppress(OSError):
                flush_steps()
        raise
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        del data_iter
    return record.data


__all__ = ["ConfigError", "DataError", "DiskFullError", "run_training"]
