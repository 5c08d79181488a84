"""Atomic checkpoints with every RNG state, so a resumed run continues exactly where it stopped.

Checkpoints are read with ``torch.load(weights_only=True)``: tensors, plain containers and numbers only,
so a checkpoint file cannot run code. RNG states are therefore stored as plain Python values (numpy's
MT19937 key as a list of ints, not an ndarray). Checkpoints written before this change hold a numpy
uint32 array; those four numpy globals are allowed by exact name so such files still load.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from harness.record import atomic_path


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely; the message names the file."""


def rng_state() -> dict:
    """Every RNG the training loop draws from, as plain Python values and tensors."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (str(kind), [int(k) for k in keys], int(pos), int(has_gauss), float(cached)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value):
    """random.setstate needs (version, tuple of ints, gauss) with tuples, whatever the container read back."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save through a temporary file in the same folder, then ``os.replace``: a kill or a full disk
    mid-write leaves the previous checkpoint intact."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)  # through a Python file, so a full disk raises OSError(ENOSPC), not a bare RuntimeError
        f.flush()
        os.fsync(f.fileno())


KEPT_NAME = "step_{step:07d}.pt"
_KEPT_RE = re.compile(r"^step_(\d+)\.pt$")


def keep_checkpoint(path: Path, step: int) -> Path:
    """Keep the checkpoint ``path`` (``ckpt/last.pt``, just written at ``step``) as ``ckpt/step_<step>.pt``
    beside it (``train.keep_ckpt_every``): a hard link made under a temporary name and moved into place
    with ``os.replace``, or a copy where the file system has no hard links. Sharing last.pt's bytes is safe
    because last.pt is only ever replaced by a new file, never rewritten in place. Returns the kept path."""
    path = Path(path)
    kept = path.parent / KEPT_NAME.format(step=step)
    with atomic_path(kept) as tmp:
        os.unlink(tmp)  # atomic_path made an empty file; the link takes its (random, unused) name
        try:
            os.link(path, tmp)
        except OSError:  # no hard links here (some network or FUSE file systems): copy
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 24)
                dst.flush()
                os.fsync(dst.fileno())
    return kept


def kept_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``[(step, path), ...]`` of the checkpoints a run kept (``ckpt/step_<step>.pt``), by step; last.pt is
    not among them. Load one with ``load_checkpoint``."""
    folder = Path(run_dir) / "ckpt"
    if not folder.is_dir():
        return []
    found = ((_KEPT_RE.match(p.name), p) for p in folder.iterdir())
    return sorted((int(m.group(1)), p) for m, p in found if m and p.is_file())


def _legacy_numpy_globals() -> list:
    """The exact numpy globals a pre-weights-only checkpoint's numpy RNG key (uint32 ndarray) needs."""
    from numpy.dtypes import UInt32DType

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, UInt32DType]


def _reason(error: Exception) -> str:
    """The informative line of torch's long weights-only message (the refused global), else its first."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    for line in lines:
        if "GLOBAL" in line or "Unsupported" in line:
            return line[:300]
    first = lines[0] if lines else type(error).__name__
    return first.split(". If you are seeing")[0][:300]


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint with ``weights_only=True``; anything else in it -> ``CheckpointError`` naming the
    file and the refused global."""
    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"cannot load checkpoint {path} safely (weights only): {_reason(e)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    return state
