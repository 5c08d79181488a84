"""The run record (../shared/DESIGN.md "Run record"): one folder per run, every file written atomically
(temporary file + ``os.replace``), so a reader never sees half a file, also while the run is going.

    record.json   run id, status (running/done/failed/interrupted), config, git commit, device, B, M,
                  model and ablation switches, parameter count, steps, timing, memory, cost, final metrics
    metrics.csv   one row per evaluation: step, loss (mean training total since the previous row), then
                  wall time, lr, loss terms, offline metrics
    steps.csv     one row per training step: step, loss, loss terms, lr, grad norm, step time; appended
                  as the run goes (at each progress note and checkpoint) and rewritten atomically from the
                  checkpoint's step log when a run resumes, so it never holds a step twice
    config.yaml   the resolved configuration
    ckpt/         checkpoints (last.pt; step_<step>.pt kept with train.keep_ckpt_every)
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import io
import json
import os
import re
import tempfile
import threading
from pathlib import Path


class DiskFullError(RuntimeError):
    """The disk filled up (ENOSPC) while a run wrote its files; the message names the file and the last
    good checkpoint."""


def disk_full_path(error: BaseException) -> str | None:
    """The file whose write hit ENOSPC somewhere in ``error``'s chain, or None if the disk was not full."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return error.filename or "?"
        error = error.__cause__ or error.__context__
    return None


# Fixed leading columns; every loss term a policy returns follows under its own name (sorted), so a
# policy's own terms ("pos", "rot", "open" for Mini-Diffuser; anything for a plugin) are never dropped.
METRIC_COLUMNS = ["step", "loss", "wall_time_s", "lr", "pos_err_cm", "pct_within_1cm", "rot_err_deg",
                  "pct_within_3deg", "gripper_acc", "pct_all"]
STEP_COLUMNS = ["step", "loss", "lr", "grad_norm", "step_time_s"]
NON_LOSS_STEP_COLUMNS = frozenset(STEP_COLUMNS) - {"loss"}

SCHEMA_VERSION = 2
RUN_STATUSES = ("running", "done", "failed", "interrupted", "died")


@dataclasses.dataclass
class RecordSchema:
    """Every field of record.json, documented one by one in docs/record.md. ``schema_version`` 2 (records
    without a version are version 1 and load: they lack the fields added since, which read as None)."""

    schema_version: int = SCHEMA_VERSION
    run_id: str | None = None
    status: str | None = None
    error: str | None = None
    traceback: str | None = None
    fingerprint: str | None = None
    semantic_config: dict | None = None
    config: dict | None = None
    overrides: list | None = None
    git_commit: str | None = None
    device: dict | None = None
    B: int | None = None
    M: int | None = None
    model: str | None = None
    preset: str | None = None
    ablation: dict | None = None
    model_config: dict | None = None
    params: int | None = None
    loss_terms: list | None = None
    steps_total: int | None = None
    steps_done: int | None = None
    progress_at: str | None = None  # when steps_done was last written (every train.log_every_s while running)
    step_time_recent_s: float | None = None  # median step time over the most recent steps
    checkpoint_step: int | None = None
    data: dict | None = None
    loader: dict | None = None
    owner: dict | None = None
    versions: dict | None = None
    started_at: str | None = None
    finished_at: str | None = None
    died: dict | None = None
    launches: list | None = None
    timing: dict | None = None
    memory: dict | None = None
    cost: dict | None = None
    final_metrics: dict | None = None
    weights_source: dict | None = None  # where the initial weights came from (train.init_weights, an import)
    success_curve: dict | None = None  # closed-loop success of the kept checkpoints (mdh eval --checkpoints)
    keypose_bounds: dict | None = None  # the box a normalised position space scales by (low, high, source)


RECORD_FIELDS = frozenset(f.name for f in dataclasses.fields(RecordSchema))


class RecordError(ValueError):
    """record.json does not match the schema; the message names the file and the keys."""


def upgrade_record(d: dict, path: object = None) -> dict:
    """A record dict of any known version -> the current schema's dict (unknown versions or keys refused)."""
    if not isinstance(d, dict):
        raise RecordError(f"{path}: record.json must hold a JSON object, got {type(d).__name__}")
    version = d.get("schema_version", 1)
    if not isinstance(version, int) or version > SCHEMA_VERSION or version < 1:
        raise RecordError(f"{path}: record.json schema_version {version!r} is not one this mdh reads "
                          f"(1..{SCHEMA_VERSION}); upgrade mdh")
    unknown = sorted(set(d) - RECORD_FIELDS)
    if unknown and version == SCHEMA_VERSION:
        raise RecordError(f"{path}: record.json has keys outside schema {SCHEMA_VERSION}: {unknown}")
    out = dataclasses.asdict(RecordSchema())
    out.update({k: v for k, v in d.items() if k in RECORD_FIELDS})
    out["schema_version"] = SCHEMA_VERSION
    return out


_UMASK_LOCK = threading.Lock()
# Names of atomic_path's temporaries: "." + final name + "." + mkstemp's 8 random characters + suffix.
_TEMPORARY_RE = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.(tmp|npy)$")


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else set-and-restore."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: Path, suffix: str = ".tmp"):
    """Yield a temporary path beside ``path``; when the block ends, move it onto ``path`` with
    ``os.replace`` (a reader sees the old file or the new one, never half of one). On error the temporary
    file is removed and ``path`` is untouched. The file gets the mode a plain ``open`` would give it
    (0666 minus the umask), not mkstemp's private 0600, so colleagues on a shared cluster can read results."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:  # f.write() names no file; say which one
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporaries ``atomic_path`` leaves when its process is killed mid-write (e.g.
    ``ckpt/.last.pt.abcd1234.tmp``) in ``folder``. Call only while holding the folder's run lock, so no
    live writer's file is removed. Returns the removed paths."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if entry.is_file() and _TEMPORARY_RE.match(entry.name):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def rows_to_csv(rows: list[dict], columns: list[str]) -> str:
    """CSV text with ``columns`` first (in order) and any other keys after them, sorted; empty cells for
    missing values."""
    extra = sorted({k for r in rows for k in r} - set(columns))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns + extra, restval="", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return buf.getvalue()


class RunRecord:
    """The files of one run folder. ``data`` is record.json as a dict of ``RecordSchema`` fields;
    ``update(**fields)`` accepts schema fields only and rewrites the file atomically."""

    def __init__(self, run_dir: str | os.PathLike):
        self.dir = Path(run_dir)
        self.ckpt_dir = self.dir / "ckpt"
        self.data: dict = dataclasses.asdict(RecordSchema())

    @property
    def record_path(self) -> Path:
        return self.dir / "record.json"

    def load(self) -> dict | None:
        """record.json upgraded to the current schema, or None when there is none yet."""
        if not self.record_path.exists():
            return None
        try:
            raw = json.loads(self.record_path.read_text())
        except json.JSONDecodeError as e:
            raise RecordError(f"{self.record_path} is not valid JSON ({e}); move it away to start over") from None
        self.data = upgrade_record(raw, self.record_path)
        return self.data

    def update(self, **fields) -> None:
        unknown = sorted(set(fields) - RECORD_FIELDS)
        if unknown:
            raise RecordError(f"{unknown} are not RecordSchema fields (harness/record.py, docs/record.md)")
        if "status" in fields and fields["status"] not in RUN_STATUSES:
            raise RecordError(f"status {fields['status']!r} is not one of {RUN_STATUSES}")
        self.data.update(fields)
        write_text_atomic(self.record_path, json.dumps(self.data, indent=2, default=str) + "\n")

    def write_metrics(self, rows: list[dict]) -> None:
        write_text_atomic(self.dir / "metrics.csv", rows_to_csv(rows, METRIC_COLUMNS))

    def write_steps(self, rows: list[dict]) -> None:
        write_text_atomic(self.dir / "steps.csv", rows_to_csv(rows, STEP_COLUMNS))

    def append_steps(self, rows: list[dict], all_rows: list[dict]) -> None:
        """Add ``rows`` (the newest of ``all_rows``, the whole step log) to the end of steps.csv in one write.
        Rewrites the file atomically from ``all_rows`` instead when it is missing or its header lacks a
        column of ``rows``. A kill mid-append can leave a torn last line; a resume rewrites the file from
        the checkpoint's step log (``write_steps``), so no row past the checkpoint survives."""
        if not rows:
            return
        path = self.dir / "steps.csv"
        try:
            with open(path, newline="") as f:
                header = next(csv.reader(f), None)
        except FileNotFoundError:
            header = None
        if not header or {k for r in rows for k in r} - set(header):
            return self.write_steps(all_rows)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=header, restval="", lineterminator="\n")
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
        try:
            with open(path, "a") as f:
                f.write(buf.getvalue())
        except OSError as e:
            if e.filename is None:  # f.write() names no file; say which one (a full disk, DiskFullError)
                raise OSError(e.errno, e.strerror or str(e), str(path)) from e
            raise

    def write_config(self, yaml_text: str) -> None:
        write_text_atomic(self.dir / "config.yaml", yaml_text)
