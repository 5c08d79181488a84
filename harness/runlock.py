"""One process per run folder: an exclusive lock on ``<run>/.lock`` holding the owner's host and pid.

POSIX record locks (``fcntl.lockf``) are used rather than ``flock``: they are released by the kernel the
moment the owning process dies (also on kill -9, also while forked DataLoader workers still hold a copy
of the descriptor) and they work on NFS. The file's content only names the holder; the lock itself is the
kernel's. A lock file that names another process but is not locked was left by a process that died: it is
taken over with a warning (``RunLock.stale``).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from harness.config import ConfigError

LOCK_NAME = ".lock"
log = logging.getLogger(__name__)
_HELD_IN_THIS_PROCESS: set[str] = set()  # POSIX locks do not exclude the process that holds them


class RunFolderBusy(ConfigError):
    """Another live process owns the run folder."""


def _describe(holder: dict | None) -> str:
    if not holder:
        return "another process (holder not yet written)"
    if "raw" in holder and "pid" not in holder:
        return f"an unknown process (unreadable lock note {holder['raw']!r})"
    return f"pid {holder.get('pid')} on {holder.get('host')} (since {holder.get('since', '?')})"


def _read_holder(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode(errors="replace").strip()
    if not text:
        return None
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return {"raw": text[:200]}
    return holder if isinstance(holder, dict) else {"raw": text[:200]}


class RunLock:
    """``with RunLock(run_dir) as lock:`` owns ``run_dir`` or raises ``RunFolderBusy`` naming the holder.

    ``lock.stale``: the holder recorded by a process that died without releasing (None otherwise); taking
    such a lock over logs a WARNING naming that holder (host, pid), whether or not it left a run record.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.dir = Path(run_dir)
        self.path = self.dir / LOCK_NAME
        self.fd: int | None = None
        self.stale: dict | None = None

    def acquire(self) -> RunLock:
        self.dir.mkdir(parents=True, exist_ok=True)
        key = str(self.path.resolve())
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            if key in _HELD_IN_THIS_PROCESS:
                raise RunFolderBusy(f"run folder {self.dir} is in use by this process "
                                    f"({_describe(_read_holder(fd))}); lock file {self.path}")
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                raise RunFolderBusy(f"run folder {self.dir} is in use by {_describe(_read_holder(fd))}; "
                                    f"lock file {self.path}") from None
            self.stale = _read_holder(fd)  # a clean release empties the note: one left here is a dead holder's
            me = {"host": socket.gethostname(), "pid": os.getpid(),
                  "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(me) + "\n").encode())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        _HELD_IN_THIS_PROCESS.add(key)
        if self.stale is not None:
            log.warning("run folder %s: took over the lock left by %s, which died without releasing it; "
                        "lock file %s", self.dir, _describe(self.stale), self.path)
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # an empty lock file = released cleanly, not stale
        except OSError:
            pass
        finally:
            _HELD_IN_THIS_PROCESS.discard(str(self.path.resolve()))
            os.close(self.fd)  # closing drops the POSIX lock
            self.fd = None

    def __enter__(self) -> RunLock:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def observed_status(run_dir: str | os.PathLike, record_status: str | None) -> str:
    """The state a reader should report for a run folder: a record that says ``running`` while no live
    process holds the folder's lock is ``died``; a folder without a record is ``running`` when someone holds
    its lock (starting up) and ``pending`` otherwise; any other recorded status stands."""
    if record_status is None:
        return "running" if lock_holder(run_dir) is not None else "pending"
    if record_status == "running" and lock_holder(run_dir) is None:
        return "died"
    return record_status


def lock_holder(run_dir: str | os.PathLike) -> dict | None:
    """The live holder of ``run_dir``'s lock, or None when no live process holds it (reporting only).

    Probes with a shared lock on a read-only descriptor, so a colleague without write access can ask too;
    an unreadable lock file answers ``{}`` (unknown holder: not reported as dead)."""
    path = Path(run_dir) / LOCK_NAME
    if not path.exists():
        return None
    if str(path.resolve()) in _HELD_IN_THIS_PROCESS:
        return {"host": socket.gethostname(), "pid": os.getpid()}
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return {}
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_holder(fd) or {}
        fcntl.lockf(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
