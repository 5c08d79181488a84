"""Keypose bounds: the box that holds every training target position, plus a margin.

3D Diffuser Actor and 3D FlowMatch Actor normalise the diffused position to [-1, 1] by these bounds (the
union over tasks of the training keyposes' positions, widened by 0.04 m); Mini-Diffuser does with
``position_norm="keypose_bounds"``. Computed from the episodes' actions alone, in the world frame.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from harness.data.errors import DataError

DEFAULT_MARGIN = 0.04  # metres, as 3DDA's gripper_loc_bounds


def keypose_bounds(path: str | os.PathLike, split: str = "train", kind: str = "voxel1cm",
                   taskvars: list[str] | None = None, margin: float = DEFAULT_MARGIN) -> tuple[list, list]:
    """(low (3,), high (3,)) in metres: min / max over every training target (keyframes 1.., the actions
    the policy learns to predict) of the source at ``path``, widened by ``margin``. Raises ``DataError``
    naming the folder when it holds no targets."""
    from harness.data.formats import open_source
    from harness.data.formats.lotus_lmdb import LotusLmdbSource

    path = Path(path)
    source = (LotusLmdbSource(path, split=split, kind=kind) if LotusLmdbSource.detect(path)
              else open_source(path, split=split))
    wanted = source.taskvars() if taskvars is None else [tv for tv in source.taskvars() if tv in set(taskvars)]
    lows, highs = [], []
    for tv in wanted:
        for key in source.episode_keys(tv):
            targets = np.asarray(source.read_episode(tv, key).actions, np.float64)[1:, :3]
            if len(targets):
                lows.append(targets.min(0))
                highs.append(targets.max(0))
    if not lows:
        raise DataError(f"no training targets to compute keypose bounds from (split {split!r})", path)
    low, high = np.min(lows, 0) - margin, np.max(highs, 0) + margin
    return [round(float(v), 6) for v in low], [round(float(v), 6) for v in high]
