"""Registered episode sources. Each reads one on-disk format into ``Episode`` objects.

A source is a class with:
- ``name`` (str) and ``detect(path) -> bool`` (classmethod: does this folder hold this format?);
- ``__init__(path)``; ``taskvars() -> list[str]`` ("task+variation");
- ``episode_keys(taskvar) -> list[str]``; ``read_episode(taskvar, key) -> Episode``.
Optional: ``taskvar_path(taskvar)`` (named in errors), ``instructions(taskvar)`` (the format's own
paraphrases), ``instruction_embeddings()`` ({instruction: (L, D)} when the format stores embeddings, not
text), a ``split`` constructor argument and ``has_split(path, split)`` (classmethod) for formats that hold
several splits under one root.
``open_source(path, fmt=None)`` picks the source by name or by detection.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Sequence
from pathlib import Path

from harness.data.errors import DataError

_SOURCES: dict[str, type] = {}


def register_source(cls: type) -> type:
    """Class decorator: make a source findable by ``cls.name``."""
    _SOURCES[cls.name] = cls
    return cls


def source_names() -> list[str]:
    _load_builtin()
    return sorted(_SOURCES)


def get_source(name: str) -> type:
    _load_builtin()
    if name not in _SOURCES:
        raise DataError(f"unknown data format {name!r}; choices: {sorted(_SOURCES)}")
    return _SOURCES[name]


def _accepted(cls: type, options: dict) -> dict:
    """The entries of ``options`` that ``cls.__init__`` takes (``split`` means nothing to a raw folder)."""
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in options.items() if k in params}


def open_source(path: str | os.PathLike, fmt: str | None = None, **options):
    """Open the episode source at ``path``: by format name, or the first registered format that detects.
    ``options`` (e.g. ``split="val"``) go to the source when its constructor takes them."""
    _load_builtin()
    path = Path(path)
    if not path.exists():
        raise DataError("data folder does not exist", path)
    if fmt is not None:
        cls = get_source(fmt)
        return cls(path, **_accepted(cls, options))
    for name in sorted(_SOURCES):
        if _SOURCES[name].detect(path):
            return _SOURCES[name](path, **_accepted(_SOURCES[name], options))
    raise DataError(f"no registered format recognises this folder; formats: {sorted(_SOURCES)} "
                    "(point at a folder of <task>+<var> LMDBs, a raw RLBench task folder, a 3DDA "
                    "Peract_packaged split folder, a 3DFA .zarr store, or the root of a dataset written by "
                    "`mdh data metaworld` / `mdh data convert-rlbench`)", path)


def has_split(path: str | os.PathLike, split: str, kind: str) -> bool:
    """Does the dataset at ``path`` hold ``split``: ``<path>/<split>/<kind>`` for our LMDB datasets, or what
    the detected format's ``has_split`` says (3DDA's ``train/`` ``val/``, 3DFA's ``train.zarr``)."""
    _load_builtin()
    path = Path(path)
    if (path / split / kind).is_dir():
        return True
    for name in sorted(_SOURCES):
        cls = _SOURCES[name]
        if hasattr(cls, "has_split") and cls.detect(path):
            return bool(cls.has_split(path, split))
    return False


def visible_dirs(path: Path) -> list[Path]:
    """Sub-folders of ``path``, skipping hidden entries (the PerAct zips carry macOS .DS_Store files)."""
    try:
        return [p for p in path.iterdir() if not p.name.startswith(".") and p.is_dir()]
    except OSError:
        return []


def camera_names(cameras, path: object, among: Sequence[str] | None = None) -> list[str] | None:
    """A reader's ``cameras=`` argument as a list of distinct, non-empty names (one name may be given as a
    string); None stays None (the format's own order). ``among``: the names the format holds."""
    if cameras is None:
        return None
    names = [str(c) for c in ([cameras] if isinstance(cameras, str) else cameras)]
    if among is not None:
        if not names or any(c not in among for c in names) or len(set(names)) != len(names):
            raise DataError(f"cameras must be distinct names among {list(among)}, got {list(names)!r}", path)
    elif not names or not all(names) or len(set(names)) != len(names):
        raise DataError(f"cameras must be a non-empty list of distinct camera names, got {cameras!r}", path)
    return names


def is_taskvar_name(name: str) -> bool:
    """True for names of the form ``<task>+<variation>`` (what per-task-variation folders are called)."""
    task, sep, var = name.rpartition("+")
    return bool(sep and task and var.isdigit())


def find_upwards(path: str | os.PathLike, names: tuple[str, ...], max_up: int = 3) -> Path | None:
    """The first of ``names`` (relative paths) that is a file in ``path`` or up to ``max_up`` parents,
    the nearest folder first; None when there is none. Data folders nest split and format folders."""
    p = Path(path).resolve()
    for _ in range(max_up + 1):
        for name in names:
            if (p / name).is_file():
                return p / name
        if p.parent == p:
            break
        p = p.parent
    return None


def natural_key(s: str) -> list:
    """Sort key that orders episode2 before episode10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def parse_taskvar(taskvar: str, path: object = None) -> tuple[str, int]:
    """'close_jar+3' -> ('close_jar', 3); also accepts the GemBench 'close_jar_peract+3'."""
    task, sep, var = taskvar.rpartition("+")
    if not sep or not var.isdigit() or not task:
        raise DataError(f"task-variation name {taskvar!r} is not of the form '<task>+<variation>'", path)
    return task, int(var)


def _load_builtin() -> None:
    # Import for the side effect of registration; kept lazy so `import harness.data` stays cheap.
    from harness.data.formats import dda_dat, flowmatch_zarr, lotus_lmdb, rlbench_raw  # noqa: F401
