"""3D Diffuser Actor (3DDA) packaged episodes, ``ep<N>.dat`` (../shared/reference/diffuser_actor.md §4.3-4.4).

Layout::

    <root>/{train,val}/<task>+<variation>/ep<N>.dat
    <root or up to 3 parents>/instructions.pkl  or  .../instructions/peract/instructions.pkl

Each ``.dat`` is ``blosc.compress(pickle.dumps(obj))`` (python-blosc defaults), ``obj`` a 6-element list over
K states (keyframes 0 .. K-1 of the demo; keyframe K is only a target):

- ``[0]`` frame ids, list of K ints (3DDA writes ``range(K)``: keyframe indices, not demo steps);
- ``[1]`` numpy float32 (K, n_cam, 2, 3, H, W): axis 2 ``[0]`` RGB in [-1, 1] (``pixel / 255 * 2 - 1``),
  ``[1]`` world-frame xyz point map in metres;
- ``[2]`` K torch float32 (1, 8) targets ``[x, y, z, qx, qy, qz, qw, open]``: the gripper at keyframe k+1;
- ``[3]`` K+1 dicts camera name -> (u, v) gripper pixel; only the first dict's key order is used: it names
  the cameras of axis 1;
- ``[4]`` K torch (1, 8) current gripper states (at keyframe k);
- ``[5]`` K torch (N_k, 8): every demo step from keyframe k to keyframe k+1, both included (empty list when
  packaged with ``--store_intermediate_actions 0``).

``instructions.pkl`` is a plain pickle ``{task: {variation (int): torch float32 (n, 53, 512)}}`` of CLIP
token embeddings; it holds no instruction strings.

Nothing here executes code from the files: pickles go through ``DdaUnpickler``, the project's restricted
unpickler (``harness.safe_pickle``) plus three torch globals, each replaced by a checked stand-in (see
``DdaUnpickler``). Every problem raises ``DataError`` naming the file and the episode (or task/variation).
"""

from __future__ import annotations

import io
import math
import os
import pickle
import re
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import ClassVar

import blosc
import numpy as np
import torch

from harness.data.episode import ACTION_DIM, Episode
from harness.data.errors import DataError
from harness.data.formats import (
    camera_names,
    find_upwards,
    is_taskvar_name,
    natural_key,
    parse_taskvar,
    register_source,
    visible_dirs,
)
from harness.safe_pickle import _UNPICKLE_ERRORS, SafeUnpickler, _Refused

__all__ = [
    "PERACT_CAMERAS",
    "DdaDatSource",
    "DdaUnpickler",
    "episode_from_dat",
    "instruction_key",
    "loads",
    "read_dat",
    "read_dda_instructions",
    "write_dat",
    "write_dda_episode",
    "write_dda_instructions",
]

PERACT_CAMERAS = ("left_shoulder", "right_shoulder", "wrist", "front")  # package_rlbench.py's default order
INSTRUCTION_FILES = ("instructions.pkl", "instructions/peract/instructions.pkl")
TARGET_TOL = 1e-5  # |target[k] - current[k+1]|: both are the same float32 gripper state in 3DDA's packaging
RGB_TOL = 1e-3  # stored RGB must lie in [-1 - tol, 1 + tol]
_EP_RE = re.compile(r"ep(\d+)\.dat")
_ELEMENTS = "[frame_ids, observations, target_actions, camera_pixels, current_states, trajectories]"
_REFUSAL_HINT = ("; 3DDA files hold numpy arrays, plain CPU torch tensors (torch._utils._rebuild_tensor_v2, "
                 "torch.storage._load_from_bytes, collections.OrderedDict) and builtin containers only")
_STORAGE_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8,
                             torch.int8, torch.int16, torch.int32, torch.int64, torch.bool})
_MAX_DIMS = 64


# --------------------------------------------------------------------------------------------- pickles


class DdaUnpickler(SafeUnpickler):
    """``SafeUnpickler`` that also rebuilds plain CPU torch tensors as ``pickle.dumps(tensor)`` writes them.

    ``pickle.dumps`` of a dense tensor (torch 1.x-2.x) reduces through exactly three globals; each is answered
    by a stand-in that checks its arguments (anything else raises ``DataError`` naming the global):

    - ``torch.storage._load_from_bytes(b)`` (torch's own calls ``torch.load(weights_only=False)``, i.e. runs
      any pickle inside ``b``): here ``b`` must be ``bytes`` and goes to ``torch.load(..., weights_only=True,
      map_location="cpu")``, torch's restricted loader; the result must be a ``TypedStorage`` of a plain
      numeric dtype. Refusals by torch (e.g. "unsupported GLOBAL posix.system") are reported.
    - ``collections.OrderedDict()``: the empty ``backward_hooks`` argument; only without arguments (the
      restricted unpickler never fills anything but a plain ``dict``, so it stays empty).
    - ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])``:
      ``storage`` must come from the ``_load_from_bytes`` stand-in of this same load, ``hooks`` from the
      ``OrderedDict`` stand-in (empty), ``metadata`` empty; offset/size/stride non-negative ints that stay
      inside the storage. Builds the tensor with ``Tensor.set_`` (as torch does), never with grad or hooks.
    """

    checked_calls: ClassVar[dict[tuple[str, str], str]] = {
        ("torch._utils", "_rebuild_tensor_v2"): "_rebuild_tensor_v2",
        ("torch.storage", "_load_from_bytes"): "_load_from_bytes",
        ("collections", "OrderedDict"): "_ordered_dict",
    }

    def __init__(self, file, path: object = None, key: object = None, hint: str = _REFUSAL_HINT):
        super().__init__(file, path=path, key=key, hint=hint)
        self._storages: dict[int, torch.storage.TypedStorage] = {}
        self._hooks: dict[int, OrderedDict] = {}

    def _load_from_bytes(self, data):
        if type(data) not in (bytes, bytearray):
            raise _Refused(f"torch.storage._load_from_bytes called with {self._name(data)}, not bytes")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TypedStorage deprecation
                storage = torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            lines = [ln.strip() for ln in str(e).splitlines() if "global" in ln.lower() and ln.strip()]
            reason = lines[-1] if lines else (str(e).splitlines() or [""])[0]
            raise _Refused(f"the torch.save data in torch.storage._load_from_bytes was refused by "
                           f"torch.load(weights_only=True): {reason}") from None
        except Exception as e:  # noqa: BLE001 - corrupt torch.save data raises many unrelated types
            raise ValueError(f"torch.storage._load_from_bytes: cannot load the torch.save data "
                             f"({type(e).__name__}: {str(e)[:200]})") from None
        if type(storage) is not torch.storage.TypedStorage:
            raise _Refused(f"torch.storage._load_from_bytes gave a {type(storage).__module__}."
                           f"{type(storage).__qualname__}, not a torch TypedStorage")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dtype, device = storage.dtype, storage._untyped_storage.device
        if dtype not in _STORAGE_DTYPES or device.type != "cpu":
            raise _Refused(f"torch storage of dtype {dtype} on {device} is not a plain numeric CPU storage")
        self._storages[id(storage)] = storage
        self._keep.append(storage)
        return storage

    def _ordered_dict(self, *args):
        if args:
            raise _Refused("collections.OrderedDict called with arguments (only the empty backward_hooks "
                           "of a tensor is allowed)")
        d = OrderedDict()
        self._hooks[id(d)] = d
        self._keep.append(d)
        return d

    def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad, backward_hooks,
                           metadata=None, *rest):
        what = "torch._utils._rebuild_tensor_v2"
        if rest:
            raise _Refused(f"{what} called with {7 + len(rest)} arguments, at most 7 allowed")
        if self._storages.get(id(storage)) is not storage:
            raise _Refused(f"{what} with storage {self._name(storage)}, not one made by "
                           "torch.storage._load_from_bytes")
        if self._hooks.get(id(backward_hooks)) is not backward_hooks or backward_hooks:
            raise _Refused(f"{what} with backward_hooks {self._name(backward_hooks)}; only an empty "
                           "collections.OrderedDict() is allowed")
        if metadata is not None and not (type(metadata) is dict and not metadata):
            raise _Refused(f"{what} with tensor metadata {metadata!r:.80}; only none is allowed")
        if type(requires_grad) is not bool:
            raise _Refused(f"{what} with requires_grad {self._name(requires_grad)}, not a bool")

        def ints(v, name):
            if (type(v) is not tuple or len(v) > _MAX_DIMS
                    or not all(type(i) is int and i >= 0 for i in v)):
                raise _Refused(f"{what}: {name} {v!r:.80} is not a tuple of at most {_MAX_DIMS} "
                               "non-negative ints")
            return v

        size, stride = ints(size, "size"), ints(stride, "stride")
        if len(size) != len(stride):
            raise _Refused(f"{what}: size {size} and stride {stride} differ in length")
        if type(storage_offset) is not int or storage_offset < 0:
            raise _Refused(f"{what}: storage offset {storage_offset!r:.40} is not a non-negative int")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TypedStorage deprecation
            dtype, untyped = storage.dtype, storage._untyped_storage
            n_elements = untyped.nbytes() // dtype.itemsize
            if math.prod(size) > 0:
                last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
                if last >= n_elements:
                    raise _Refused(f"{what}: size {size}, stride {stride} and offset {storage_offset} reach "
                                   f"element {last} of a storage of {n_elements}")
            return torch.empty((0,), dtype=dtype).set_(untyped, storage_offset, size, stride)


def loads(data: bytes, path: object = None, key: object = None) -> object:
    """Unpickle 3DDA pickle bytes with ``DdaUnpickler``; refused global or corrupt data -> ``DataError``."""
    try:
        return DdaUnpickler(io.BytesIO(data), path=path, key=key).load()
    except DataError:
        raise
    except _UNPICKLE_ERRORS as e:
        raise DataError(f"cannot unpickle ({type(e).__name__}: {e})", path, key) from None


def _read_bytes(path: Path, key: object, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{what} not found", path, key) from None
    except IsADirectoryError:
        raise DataError(f"expected a {what}, found a folder", path, key) from None
    except OSError as e:
        raise DataError(f"cannot read the {what} ({type(e).__name__}: {e})", path, key) from None


def read_dat(path: str | os.PathLike, key: object = None) -> object:
    """Read one ``.dat``: blosc-decompress, then unpickle with ``DdaUnpickler``. Any problem -> DataError."""
    path = Path(path)
    data = _read_bytes(path, key, "3DDA episode file")
    if not data:
        raise DataError("3DDA episode file is empty", path, key)
    try:
        raw = blosc.decompress(data)
    except Exception as e:  # noqa: BLE001 - blosc_extension.error, ValueError, TypeError, MemoryError
        raise DataError(f"not a blosc-compressed buffer ({type(e).__name__}: {e}); a 3DDA .dat file is "
                        "blosc.compress(pickle.dumps(episode))", path, key) from None
    return loads(raw, path, key)


# --------------------------------------------------------------------------------------------- episodes


def _array(value, what: str, path, key) -> np.ndarray:
    """A torch tensor or numpy array -> numpy (never an object array)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "fiub":
        raise DataError(f"{what} is a {type(value).__name__}"
                        + (f" of dtype {value.dtype}" if isinstance(value, np.ndarray) else "")
                        + ", expected a numeric torch tensor or numpy array", path, key)
    return value


def _finite(a: np.ndarray, what: str, path, key) -> None:
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        idx = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
        raise DataError(f"{what} holds a non-finite value at index {idx}", path, key)


def _poses(value, idx: int, name: str, K: int, path, key) -> np.ndarray:
    """Element ``idx``: a list of K (1, 8) tensors -> (K, 8) float32."""
    if not isinstance(value, (list, tuple)):
        raise DataError(f"element [{idx}] ({name}) is a {type(value).__name__}, expected a list of K={K} "
                        f"(1, {ACTION_DIM}) tensors", path, key)
    if len(value) != K:
        raise DataError(f"element [{idx}] ({name}) has {len(value)} entries but element [0] has K={K} frame "
                        "ids (one per state)", path, key)
    rows = []
    for k, v in enumerate(value):
        a = _array(v, f"element [{idx}] ({name}) entry {k}", path, key)
        if a.shape not in ((1, ACTION_DIM), (ACTION_DIM,)):
            raise DataError(f"element [{idx}] ({name}) entry {k} has shape {a.shape}, expected "
                            f"(1, {ACTION_DIM}) [x, y, z, qx, qy, qz, qw, open]", path, key)
        rows.append(a.reshape(ACTION_DIM).astype(np.float32))
    out = np.stack(rows) if rows else np.zeros((0, ACTION_DIM), np.float32)
    _finite(out, f"element [{idx}] ({name})", path, key)
    return out


def _frame_ids(value, path, key) -> list[int]:
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(f"element [0] (frame ids) is {type(value).__name__} "
                        f"{'of length 0' if isinstance(value, (list, tuple)) else ''}, expected a non-empty "
                        "list of K ints", path, key)
    if not all(isinstance(i, (int, np.integer)) and not isinstance(i, (bool, np.bool_)) for i in value):
        raise DataError(f"element [0] (frame ids) must hold ints, got {list(value)[:10]!r:.120}", path, key)
    ids = [int(i) for i in value]
    if ids[0] < 0 or any(b <= a for a, b in pairwise(ids)):
        raise DataError(f"element [0] (frame ids) {ids[:20]} is not a strictly increasing list of "
                        "non-negative ints", path, key)
    return ids


def _key_frameids(ids: list[int], currents: np.ndarray, targets: np.ndarray,
                  trajectories: list[np.ndarray]) -> tuple[list[int], str]:
    """Demo step of each of the K+1 keyframes, and where it came from (see ``episode_from_dat``)."""
    K = len(ids)
    if len(trajectories) == K and all(len(tr) >= 2 for tr in trajectories) and all(
            np.allclose(tr[0], currents[k], rtol=0, atol=TARGET_TOL)
            and np.allclose(tr[-1], targets[k], rtol=0, atol=TARGET_TOL)
            for k, tr in enumerate(trajectories)):
        steps = [0]
        for tr in trajectories:
            steps.append(steps[-1] + len(tr) - 1)
        return steps, "trajectories"
    return ids + [ids[-1] + 1], "frame_ids"


def episode_from_dat(obj, taskvar: str, key: str, path: object = None,
                     cameras: Sequence[str] | None = None) -> Episode:
    """Check one unpickled 3DDA episode list and map it to an ``Episode`` (K states, K+1 actions).

    - ``actions`` (K+1, 8) float32: the K current states (element [4]) then the last target (element [2][K-1]);
      ``target[k] == current[k+1]`` (within ``TARGET_TOL``) is checked for k < K-1, as 3DDA packages them.
    - ``rgb_images`` (K, n_cam, H, W, 3) uint8 = ``round((x + 1) / 2 * 255)``, exact for 3DDA's float32 RGB;
      ``point_maps`` (K, n_cam, H, W, 3) float32. Observations exist for the K states only; the last
      keyframe has an action but no observation (``Episode.keystep(t)`` reads observations t < K only).
    - ``key_frameids`` (K+1 ints): demo steps ``0, 0 + N_0 - 1, ...`` derived from the trajectory lengths
      (element [5] runs from keyframe k to k+1 inclusive; 3DDA's first state is always demo step 0), when all
      K trajectories are present and start/end at the current/target poses; otherwise the stored frame ids
      (3DDA's are keyframe indices 0..K-1) plus ``ids[-1] + 1``. ``extra["key_frameids_from"]`` says which.
    - ``cameras``: names (from the first dict of element [3]) to select/reorder; default all, as stored.
    - ``extra``: ``cameras``, ``path``, ``frame_ids`` (element [0]), ``trajectory`` (list of (N_k, 8) float32),
      ``camera_pixels`` (element [3]), ``key_frameids_from``.
    """
    task, var = parse_taskvar(taskvar, path)
    if not isinstance(obj, (list, tuple)) or len(obj) != 6:
        got = f"a {len(obj)}-element {type(obj).__name__}" if isinstance(obj, (list, tuple)) \
            else f"a {type(obj).__name__}"
        raise DataError(f"expected the 3DDA 6-element list {_ELEMENTS}, got {got}", path, key)
    ids = _frame_ids(obj[0], path, key)
    K = len(ids)

    obs = _array(obj[1], "element [1] (observations)", path, key)
    if obs.ndim != 6 or obs.shape[0] != K or obs.shape[2:4] != (2, 3) or obs.shape[1] < 1 \
            or min(obs.shape[4:]) < 1:
        raise DataError(f"element [1] (observations) has shape {obs.shape}, expected (K={K}, n_cam, 2, 3, H, W) "
                        "(axis 2: RGB in [-1, 1], world xyz)", path, key)
    if obs.dtype.kind != "f":
        raise DataError(f"element [1] (observations) has dtype {obs.dtype}, expected float32", path, key)
    _finite(obs, "element [1] (observations)", path, key)

    targets = _poses(obj[2], 2, "target actions", K, path, key)
    currents = _poses(obj[4], 4, "current gripper states", K, path, key)
    for k in range(K - 1):
        diff = float(np.abs(targets[k] - currents[k + 1]).max())
        if diff > TARGET_TOL:
            raise DataError(f"element [2] (target actions) entry {k} {targets[k].tolist()} differs from element "
                            f"[4] (current gripper states) entry {k + 1} {currents[k + 1].tolist()} by {diff:.3g}"
                            f" (> {TARGET_TOL:g}); 3DDA's target of state k is the gripper at keyframe k+1, so "
                            "this file was packaged differently", path, key)

    pixels = obj[3]
    if not isinstance(pixels, (list, tuple)) or len(pixels) != K + 1 \
            or not all(isinstance(d, dict) for d in pixels):
        n = len(pixels) if isinstance(pixels, (list, tuple)) else type(pixels).__name__
        raise DataError(f"element [3] (camera pixels) must be a list of K+1={K + 1} dicts camera -> (u, v), "
                        f"got {n}", path, key)
    stored = list(pixels[0])
    if not all(isinstance(c, str) for c in stored) or len(stored) != obs.shape[1]:
        raise DataError(f"element [3] (camera pixels): the first dict names cameras {stored!r:.200} but element "
                        f"[1] has {obs.shape[1]} cameras on axis 1", path, key)
    if cameras is None:
        names, idx = stored, list(range(len(stored)))
    else:
        unknown = [c for c in cameras if c not in stored]
        if unknown:
            raise DataError(f"camera(s) {unknown} not in this episode; available: {stored}", path, key)
        names, idx = list(cameras), [stored.index(c) for c in cameras]

    traj_in = obj[5]
    if not isinstance(traj_in, (list, tuple)) or len(traj_in) not in (0, K):
        n = len(traj_in) if isinstance(traj_in, (list, tuple)) else type(traj_in).__name__
        raise DataError(f"element [5] (trajectories) must be a list of K={K} (N_k, {ACTION_DIM}) tensors (or "
                        f"empty), got {n}", path, key)
    trajectories = []
    for k, tr in enumerate(traj_in):
        a = _array(tr, f"element [5] (trajectories) entry {k}", path, key)
        if a.ndim != 2 or a.shape[1] != ACTION_DIM or a.shape[0] < 1:
            raise DataError(f"element [5] (trajectories) entry {k} has shape {a.shape}, expected "
                            f"(N_k, {ACTION_DIM})", path, key)
        a = a.astype(np.float32)
        _finite(a, f"element [5] (trajectories) entry {k}", path, key)
        trajectories.append(a)

    sel = obs[:, idx]
    rgb_unit = sel[:, :, 0].astype(np.float32, copy=False)
    lo, hi = float(rgb_unit.min()), float(rgb_unit.max())
    if lo < -1 - RGB_TOL or hi > 1 + RGB_TOL:
        raise DataError(f"element [1] (observations) RGB channel spans [{lo:.4g}, {hi:.4g}], expected [-1, 1] "
                        "(pixel / 255 * 2 - 1)", path, key)
    rgb = np.clip(np.rint((rgb_unit + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(0, 1, 3, 4, 2)
    points = np.ascontiguousarray(sel[:, :, 1].transpose(0, 1, 3, 4, 2), dtype=np.float32)
    actions = np.concatenate([currents, targets[-1:]], axis=0).astype(np.float32)
    key_frameids, source = _key_frameids(ids, currents, targets, trajectories)
    return Episode(task=task, variation=var, episode=key, actions=actions, key_frameids=key_frameids,
                   rgb_images=np.ascontiguousarray(rgb), point_maps=points,
                   extra={"cameras": names, "path": str(path) if path is not None else None,
                          "frame_ids": ids, "trajectory": trajectories, "camera_pixels": list(pixels),
                          "key_frameids_from": source})


# --------------------------------------------------------------------------------------------- instructions


def instruction_key(taskvar: str, i: int) -> str:
    """Placeholder text of the i-th instruction embedding of ``taskvar``: ``"<task>+<var> #<i>"``."""
    return f"{taskvar} #{i}"


def read_dda_instructions(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read ``instructions.pkl`` -> {"task+var": (n, L, D) float32 (CLIP: L=53, D=512)}, in natural order.

    Unpickled with ``DdaUnpickler``; a refused global, a wrong structure or shape, or non-finite values raise
    ``DataError`` naming the file and "task/variation"."""
    path = Path(path)
    obj = loads(_read_bytes(path, None, "instructions file"), path)
    if not isinstance(obj, dict):
        raise DataError(f"expected a dict task -> {{variation: (n, 53, 512) tensor}}, got {type(obj).__name__}",
                        path)
    out: dict[str, np.ndarray] = {}
    for task, per_var in obj.items():
        if not isinstance(task, str) or not task or not isinstance(per_var, dict):
            raise DataError(f"expected task name -> dict of variations, got {type(task).__name__} -> "
                            f"{type(per_var).__name__}", path, task)
        for var, emb in per_var.items():
            where = f"{task}/{var}"
            if not isinstance(var, (int, np.integer)) or isinstance(var, (bool, np.bool_)) or var < 0:
                raise DataError(f"variation id {var!r:.40} is not a non-negative int", path, where)
            a = _array(emb, "instruction embeddings", path, where)
            if a.ndim != 3 or min(a.shape) < 1:
                raise DataError(f"instruction embeddings have shape {a.shape}, expected (n_descriptions, 53, 512)",
                                path, where)
            a = a.astype(np.float32, copy=False)
            _finite(a, "instruction embeddings", path, where)
            out[f"{task}+{int(var)}"] = a
    return {k: out[k] for k in sorted(out, key=natural_key)}


def find_dda_instructions(path: str | os.PathLike, max_up: int = 3) -> Path | None:
    """``instructions.pkl`` or ``instructions/peract/instructions.pkl`` in ``path`` or up to ``max_up``
    parents (the nearest folder wins); None when there is none."""
    return find_upwards(path, INSTRUCTION_FILES, max_up)


# --------------------------------------------------------------------------------------------- layout


def _dat_files(folder: Path) -> dict[str, Path]:
    """{"ep<N>": path} of the ``ep<N>.dat`` files in ``folder``, natural order."""
    try:
        found = {m.group(0)[:-4]: p for p in folder.iterdir()
                 if (m := _EP_RE.fullmatch(p.name)) is not None and p.is_file()}
    except OSError:
        return {}
    return {k: found[k] for k in sorted(found, key=natural_key)}


def _is_split_dir(path: Path) -> bool:
    """A folder with at least one ``<task>+<var>`` sub-folder holding ``ep<N>.dat`` files."""
    return any(is_taskvar_name(p.name) and _dat_files(p) for p in visible_dirs(path))


# --------------------------------------------------------------------------------------------- source


@register_source
class DdaDatSource:
    """Episodes from 3DDA's ``Peract_packaged`` folders.

    ``DdaDatSource(path, split="train", cameras=None, instructions=None)``: ``path`` is a split folder (holding
    ``<task>+<var>/ep<N>.dat``; ``split`` is then ignored) or a root holding split folders, then ``split`` picks
    one. ``cameras``
    (names from the files) selects/reorders cameras; default: all, in the stored order. ``instructions``:
    path of ``instructions.pkl``; default: found automatically (``find_dda_instructions`` from the split
    folder). A ``<task>+<var>`` folder without ``ep<N>.dat`` files is reported by ``bad_taskvars()``, not
    listed.

    Text: 3DDA stores CLIP token embeddings, not strings. ``instructions(taskvar)`` returns placeholder keys
    ``"<task>+<var> #<i>"`` (``instruction_key``), one per stored description, and
    ``instruction_embeddings()`` maps the same keys to (53, 512) float32 arrays. Without an instructions file
    (or for a task-variation it lacks), ``instructions`` falls back to the task name with spaces, which has no
    embedding (a dataset with ``require_text`` then refuses it).
    """

    name = "dda_dat"

    def __init__(self, path: str | os.PathLike, split: str = "train", cameras: Sequence[str] | str | None = None,
                 instructions: str | os.PathLike | None = None):
        root = Path(path)
        if not root.is_dir():
            raise DataError("3DDA data folder does not exist", root)
        if _is_split_dir(root):
            self.path = root
        elif _is_split_dir(root / split):
            self.path = root / split
        else:
            splits = [p.name for p in visible_dirs(root) if _is_split_dir(p)]
            raise DataError(f"no 3DDA split {split!r} here: expected <split>/<task>+<variation>/ep<N>.dat"
                            + (f"; splits found: {splits}" if splits else
                               " (point at Peract_packaged/ or Peract_packaged/train/)"), root)
        self.root, self.split = root, split
        self.cameras = camera_names(cameras, self.path)
        self._explicit_instructions = Path(instructions) if instructions is not None else None
        self._embeds: dict[str, np.ndarray] | None = None
        found = sorted((p for p in visible_dirs(self.path) if is_taskvar_name(p.name)),
                       key=lambda p: natural_key(p.name))
        self._episodes: dict[str, dict[str, Path]] = {}
        self._bad: dict[str, DataError] = {}
        for p in found:
            parse_taskvar(p.name, p)
            files = _dat_files(p)
            if files:
                self._episodes[p.name] = files
            else:
                self._bad[p.name] = DataError("task-variation folder holds no ep<N>.dat files", p, p.name)

    @classmethod
    def detect(cls, path: str | os.PathLike) -> bool:
        """True for a split folder of ``<task>+<var>/ep<N>.dat`` or a root whose ``train/`` is one."""
        path = Path(path)
        try:
            return path.is_dir() and (_is_split_dir(path) or _is_split_dir(path / "train"))
        except OSError:
            return False

    @classmethod
    def has_split(cls, path: str | os.PathLike, split: str) -> bool:
        """True when ``path`` is a root whose ``<split>/`` holds episodes. A split folder holds no other split
        (``DdaDatSource(split_folder, split=...)`` ignores ``split``)."""
        path = Path(path)
        try:
            return path.is_dir() and not _is_split_dir(path) and _is_split_dir(path / split)
        except OSError:
            return False

    # -------------------------------------------------------------------------------- index

    def taskvars(self) -> list[str]:
        """Task-variations with at least one episode, "task+V", in natural order."""
        return list(self._episodes)

    def bad_taskvars(self) -> dict[str, DataError]:
        """``<task>+<var>`` folders without episode files (not in ``taskvars()``), each with its problem."""
        return dict(self._bad)

    def taskvar_path(self, taskvar: str) -> Path:
        """The ``<task>+<var>`` folder (where its problems are reported)."""
        return self.path / taskvar

    def _entry(self, taskvar: str) -> dict[str, Path]:
        if taskvar not in self._episodes:
            if taskvar in self._bad:
                raise self._bad[taskvar]
            raise DataError(f"unknown task-variation {taskvar!r}; available: {self.taskvars()}", self.path,
                            taskvar)
        return self._episodes[taskvar]

    def episode_keys(self, taskvar: str) -> list[str]:
        """Episode keys ("ep<N>", from ``ep<N>.dat``) of ``taskvar``, in natural order."""
        return list(self._entry(taskvar))

    def episode_path(self, taskvar: str, key: str) -> Path:
        """The ``.dat`` file of one episode; unknown key -> ``DataError``."""
        files = self._entry(taskvar)
        if key not in files:
            keys = list(files)
            raise DataError(f"unknown episode {key!r} for {taskvar}; {len(keys)} episodes: {keys[:10]}"
                            + (" ..." if len(keys) > 10 else ""), self.path / taskvar, key)
        return files[key]

    def read_episode(self, taskvar: str, key: str) -> Episode:
        """Read and check one episode (see ``episode_from_dat``)."""
        path = self.episode_path(taskvar, key)
        return episode_from_dat(read_dat(path, key), taskvar, key, path, self.cameras)

    # -------------------------------------------------------------------------------- text

    @property
    def instructions_path(self) -> Path | None:
        """The instructions file in use: the ``instructions=`` argument, or the one found; None if none."""
        if self._explicit_instructions is not None:
            return self._explicit_instructions
        return find_dda_instructions(self.path)

    def _embeddings(self) -> dict[str, np.ndarray]:
        """{"task+var": (n, 53, 512)}, read once; {} when no file is found (an explicit missing one raises)."""
        if self._embeds is None:
            path = self.instructions_path
            self._embeds = read_dda_instructions(path) if path is not None else {}
        return self._embeds

    def instructions(self, taskvar: str) -> list[str]:
        """Placeholder keys ``"<task>+<var> #<i>"`` for the stored embeddings of ``taskvar``; without an
        instructions file or an entry for ``taskvar``: ``[task name with spaces]`` (no embedding)."""
        task, _ = parse_taskvar(taskvar, self.path)
        emb = self._embeddings().get(taskvar)
        if emb is None:
            return [task.replace("_", " ")]
        return [instruction_key(taskvar, i) for i in range(emb.shape[0])]

    def instruction_embeddings(self) -> dict[str, np.ndarray]:
        """{``"<task>+<var> #<i>"``: (53, 512) float32} for every description in the instructions file (all
        its task-variations, not only this split's); {} without a file."""
        return {instruction_key(tv, i): e[i] for tv, e in self._embeddings().items() for i in range(e.shape[0])}


# --------------------------------------------------------------------------------------------- writers


def write_dat(path: str | os.PathLike, obj: object) -> Path:
    """Write ``blosc.compress(pickle.dumps(obj))`` to ``path`` atomically (temporary file, then os.replace)."""
    from harness.record import atomic_path

    path = Path(path)
    data = pickle.dumps(obj)
    try:
        packed = blosc.compress(data)
    except (ValueError, OverflowError) as e:  # over python-blosc's 2 GB limit
        raise DataError(f"cannot blosc-compress {len(data)} bytes ({e})", path) from None
    with atomic_path(path) as tmp:
        tmp.write_bytes(packed)
    return path


def _rows(value, K: int, name: str, path) -> np.ndarray:
    a = np.asarray(value, dtype=np.float32)
    if a.shape != (K, ACTION_DIM):
        raise DataError(f"{name} has shape {a.shape}, expected (K={K}, {ACTION_DIM})", path)
    if not np.isfinite(a).all():
        raise DataError(f"{name} holds non-finite values", path)
    return a


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32, order="C", copy=True))


def write_dda_episode(path: str | os.PathLike, rgb, point_maps, currents, targets, cameras: Sequence[str],
                      frame_ids: Sequence[int] | None = None,
                      trajectories: Sequence[np.ndarray] | None = None) -> Path:
    """Write one episode in 3DDA's exact ``.dat`` format (atomically).

    ``rgb`` (K, n_cam, H, W, 3) uint8; ``point_maps`` (K, n_cam, H, W, 3) world xyz metres; ``currents`` /
    ``targets`` (K, 8) gripper ``[x, y, z, qx, qy, qz, qw, open]`` at keyframe k / k+1 (so ``targets[k]`` must
    equal ``currents[k+1]``); ``cameras`` the n_cam names; ``frame_ids`` default ``range(K)`` as 3DDA;
    ``trajectories``: K (N_k, 8) arrays from keyframe k to k+1 inclusive, default none (an empty element [5],
    as ``--store_intermediate_actions 0`` writes). Element [3] gets K+1 dicts camera -> (-1, -1): the gripper
    pixel is unknown here, and 3DDA uses only the key order.
    """
    path = Path(path)
    rgb = np.asarray(rgb)
    if rgb.ndim != 5 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise DataError(f"rgb has shape {rgb.shape} and dtype {rgb.dtype}, expected (K, n_cam, H, W, 3) uint8",
                        path)
    K, n_cam = rgb.shape[:2]
    pts = np.asarray(point_maps, dtype=np.float32)
    if pts.shape != rgb.shape:
        raise DataError(f"point_maps has shape {pts.shape}, expected {rgb.shape} like rgb", path)
    if not np.isfinite(pts).all():
        raise DataError("point_maps holds non-finite values", path)
    cameras = [str(c) for c in cameras]
    if len(cameras) != n_cam or len(set(cameras)) != n_cam:
        raise DataError(f"cameras {cameras} must be {n_cam} distinct names (axis 1 of rgb)", path)
    currents = _rows(currents, K, "currents", path)
    targets = _rows(targets, K, "targets", path)
    bad = [k for k in range(K - 1) if np.abs(targets[k] - currents[k + 1]).max() > TARGET_TOL]
    if bad:
        raise DataError(f"targets[{bad[0]}] differs from currents[{bad[0] + 1}]: 3DDA's target of state k is "
                        "the gripper at keyframe k+1", path)
    ids = list(range(K)) if frame_ids is None else [int(i) for i in frame_ids]
    if len(ids) != K:
        raise DataError(f"frame_ids has {len(ids)} entries, expected K={K}", path)
    trajs = []
    for k, tr in enumerate(trajectories or []):
        a = np.asarray(tr, dtype=np.float32)
        if a.ndim != 2 or a.shape[1] != ACTION_DIM or len(a) < 1:
            raise DataError(f"trajectories[{k}] has shape {a.shape}, expected (N_k, {ACTION_DIM})", path)
        trajs.append(_tensor(a))
    if trajectories is not None and len(trajs) != K:
        raise DataError(f"trajectories has {len(trajs)} entries, expected K={K}", path)

    obs = np.empty((K, n_cam, 2, 3) + rgb.shape[2:4], dtype=np.float32)
    obs[:, :, 0] = (rgb.transpose(0, 1, 4, 2, 3).astype(np.float32) / np.float32(255.0)) * np.float32(2.0) \
        - np.float32(1.0)
    obs[:, :, 1] = pts.transpose(0, 1, 4, 2, 3)
    episode = [
        ids,
        obs,
        [_tensor(targets[k : k + 1]) for k in range(K)],
        [{c: (-1, -1) for c in cameras} for _ in range(K + 1)],
        [_tensor(currents[k : k + 1]) for k in range(K)],
        trajs,
    ]
    return write_dat(path, episode)


def write_dda_instructions(path: str | os.PathLike, embeddings: Mapping[str, Mapping[int, np.ndarray]]) -> Path:
    """Write ``instructions.pkl`` as 3DDA does: ``pickle.dump({task: {variation: torch float32 (n, 53, 512)}})``
    (atomically)."""
    from harness.record import atomic_path

    path = Path(path)
    obj: dict[str, dict[int, torch.Tensor]] = {}
    for task, per_var in embeddings.items():
        obj[str(task)] = {}
        for var, emb in per_var.items():
            a = np.asarray(emb, dtype=np.float32)
            if a.ndim != 3:
                raise DataError(f"embeddings of {task}/{var} have shape {a.shape}, expected (n, 53, 512)", path)
            obj[str(task)][int(var)] = _tensor(a)
    with atomic_path(path) as tmp:
        tmp.write_bytes(pickle.dumps(obj))
    return path
