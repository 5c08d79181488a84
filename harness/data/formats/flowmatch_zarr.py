"""3D FlowMatch Actor (3DFA) zarr stores of PerAct RLBench data, read as episodes.

Layout, as 3DFA's ``data_processing/peract_to_zarr.py`` writes it (checked against
OlivierLessard/3d_flowmatch_actor@eb0df2c94e2b4e9af12c8fd4bf6e7e1c2e3fe1f2, identical in substance to
amburger66/3d_flowmatch_actor@2af3376f640956142e07d1bb03caa99d4858b713)::

    <root>/train.zarr, <root>/val.zarr        zarr format v2 groups (zarr 2.x), flat arrays,
                                              one row per keystep, chunks of one row, Blosc lz4 clevel 1
        rgb             (N, 4, 3, H, W) uint8     cameras left_shoulder, right_shoulder, wrist, front
        pcd             (N, 4, 3, H, W) float16   world xyz, metres
        proprioception  (N, 3, 1, 8)    float32   [prev2, prev1, current] gripper pose of the row
        action          (N, 1, 1, 8)    float32   the next keypose [x, y, z, qx, qy, qz, qw, open]
        task_id         (N,)            uint8     index into the converter's task list
        variation       (N,)            uint8
    <repo>/instructions/peract/instructions.json  {task: {"<var>": [instruction, ...]}}

The rows of all episodes of all tasks are concatenated (tasks in list order, then variations, then the
episodes of a variation in file order). The history is clamped at the episode start: the first row of an
episode repeats its current pose three times, the second one repeats the first row's pose twice.

Episode boundaries are not stored. Within an episode the converter writes, for row ``i`` (3DDA's packaged
``.dat`` keeps ``gripper[i] = keypose[i]`` and ``action[i] = keypose[i + 1]``, the same tensors, cast to
float32 the same way, nickgkan/3d_diffuser_actor@d2e47a568f648858a655fd611d40c6d052dda7b0
``data_preprocessing/package_rlbench.py``), so consecutive rows of one episode are tied bit for bit:

    action[i-1] == current[i],  prev1[i] == current[i-1],  prev2[i] == prev1[i-1].

**Boundary rule**: row ``i`` starts a new episode iff ``i == 0``, or ``task_id`` or ``variation`` changes,
or any of those three equalities fails (exact float32 equality; the values are copies of the same numbers,
so no tolerance is needed, and a tolerance could only merge more). The rule can only fail by *merging*: an
episode B that directly follows an episode A of the same task-variation is glued onto A iff A's last target
equals B's first pose and A's last two poses equal it too (``a[K-2] == a[K-1] == a[K] == b[0]`` bit for
bit, with ``a[K]`` the last target): A would have to end with two keysteps that do not move the gripper at
all, onto the exact pose where B starts. PerAct keyposes are gripper changes or stops along a motion, so
this does not happen in RLBench demos; a store built otherwise could hit it (then two episodes read as one).

Episode mapping, for an episode on rows ``r0 .. r1-1`` (K rows): ``actions`` (K + 1, 8) float32 are the K
current poses and the last row's target; ``rgb_images`` (K, n_cam, H, W, 3) uint8 and ``point_maps``
(K, n_cam, H, W, 3) float32 are the K observations (there is no observation at the final keypose, which
no keystep needs: keystep t pairs observation t with action t + 1); ``key_frameids`` is
``list(range(K + 1))`` because the store keeps no demo frame indices (3DDA's packaged data keep none
either). ``extra``: ``cameras``, ``path`` (the store), ``rows`` ``(r0, r1)`` (a half-open slice),
``history`` (K, 3, 8) float32 as stored.

Point maps are float16 in the store: 11 significant bits, so a coordinate ``x`` comes back within
``max(|x| * 2**-11, 2**-25)`` (under 0.5 mm for |x| < 1 m, under 1 mm for |x| < 2 m; the 2**-25 m floor is
float16's subnormal spacing, for |x| < 6e-5 m). ``write_flowmatch_zarr`` rounds the same way, so a round
trip returns ``point_maps.astype(float16).astype(float32)`` exactly.

Task names are not in the store: ``tasks=`` gives the list that ``task_id`` indexes. Default: the store's
``tasks`` attribute when it has one (``write_flowmatch_zarr`` records it; 3DFA's converter does not),
else ``PERACT_TASKS``, the PerAct-18 order 3DFA uses (forks that edit the converter's list need
``tasks=``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from harness.data.episode import ACTION_DIM, Episode
from harness.data.errors import DataError
from harness.data.formats import camera_names, find_upwards, natural_key, parse_taskvar, register_source

# 3DFA's PerAct-18 list: PERACT_TASKS in pairlab/3d_flowmatch_actor@4e901b0efda25c36cb546b66c082e375b383e067
# datasets/rlbench.py (what PeractDataset maps task_id with), the same list and order as the `tasks` that
# build task2id in OlivierLessard/3d_flowmatch_actor@eb0df2c94e2b4e9af12c8fd4bf6e7e1c2e3fe1f2
# data_processing/peract_to_zarr.py.
PERACT_TASKS = (
    "place_cups", "close_jar", "insert_onto_square_peg",
    "light_bulb_in", "meat_off_grill", "open_drawer",
    "place_shape_in_shape_sorter", "place_wine_at_rack_location",
    "push_buttons", "put_groceries_in_cupboard",
    "put_item_in_drawer", "put_money_in_safe", "reach_and_drag",
    "slide_block_to_color_target", "stack_blocks", "stack_cups",
    "sweep_to_dustpan_of_size", "turn_tap",
)
CAMERAS = ("left_shoulder", "right_shoulder", "wrist", "front")  # the store's camera axis
ARRAYS = ("rgb", "pcd", "proprioception", "action", "task_id", "variation")
SPLITS = ("train", "val")
INSTRUCTIONS_FILES = (Path("instructions") / "peract" / "instructions.json", Path("instructions.json"))
N_HISTORY = 3  # proprioception rows: prev2, prev1, current
_INSTALL_HINT = "pip install 'mdh[zarr]'"


# --------------------------------------------------------------------------------------------- detection


def _is_zarr_node(p: Path, v2_marker: str) -> bool:
    return (p / v2_marker).is_file() or (p / "zarr.json").is_file()


def is_store(path: Path) -> bool:
    """A zarr group folder (``.zgroup`` or ``zarr.json``) with ``action`` and ``proprioception`` arrays.

    Looks at files only (zarr is not imported), so it is cheap and works without the zarr extra.
    """
    try:
        return (path.is_dir() and _is_zarr_node(path, ".zgroup")
                and all(_is_zarr_node(path / a, ".zarray") for a in ("action", "proprioception")))
    except OSError:
        return False


def import_zarr(path: object = None):
    """``import zarr``, or ``DataError`` telling the user to install the extra."""
    try:
        import zarr
    except ImportError:
        raise DataError(f"3D FlowMatch Actor zarr stores need the zarr package: {_INSTALL_HINT}", path) from None
    return zarr


def _where(store: Path, name: str) -> str:
    """``train.zarr/pcd``-style names for errors (the store folder and the array)."""
    return str(store / name)


# --------------------------------------------------------------------------------------------- source


@register_source
class FlowMatchZarrSource:
    """Episodes of a 3DFA PerAct zarr store (see the module docstring for the layout and mapping).

    ``FlowMatchZarrSource(path, split="train", tasks=None, cameras=None, instructions=None)``:
    ``path`` is a store folder (``*.zarr``; ``split`` is then ignored) or a root holding
    ``<split>.zarr``. ``tasks``: names indexed by ``task_id`` (default: the store's ``tasks`` attribute,
    else ``PERACT_TASKS``). ``cameras``: names among ``CAMERAS`` that select and order the camera axis
    (default all four). ``instructions``: 3DFA's instructions JSON (default: found beside the data, see
    ``instructions``).
    """

    name = "flowmatch_zarr"

    def __init__(self, path: str | os.PathLike, split: str = "train", tasks: Sequence[str] | None = None,
                 cameras: Sequence[str] | str | None = None,
                 instructions: str | os.PathLike | None = None):
        path = Path(path)
        if not path.is_dir():
            raise DataError("data folder does not exist", path)
        if is_store(path):
            self.path = path
        elif is_store(path / f"{split}.zarr"):
            self.path = path / f"{split}.zarr"
        else:
            stores = sorted(p.name for p in path.glob("*.zarr") if is_store(p))
            raise DataError(f"no 3D FlowMatch Actor zarr store for split {split!r}: expected a zarr group "
                            f"with rgb/pcd/proprioception/action/task_id/variation arrays at {split}.zarr"
                            + (f"; stores here: {stores}" if stores else ""), path)
        self.split = split
        self.cameras = camera_names(CAMERAS if cameras is None else cameras, self.path, among=CAMERAS)
        self._cam_idx = [CAMERAS.index(c) for c in self.cameras]
        self._instructions_arg = Path(instructions) if instructions is not None else None
        self._instr_table: dict | None = None
        self._instr_path: Path | None = None
        self._instr_loaded = False
        self._handles: dict | None = None
        self._pid: int | None = None
        handles = self._arrays()
        self.tasks = self._task_list(tasks)
        self._build_index(handles)

    @classmethod
    def detect(cls, path: str | os.PathLike) -> bool:
        """True for a store folder or a root holding ``train.zarr`` or ``val.zarr`` (no zarr import)."""
        path = Path(path)
        return is_store(path) or any(is_store(path / f"{s}.zarr") for s in SPLITS)

    @classmethod
    def has_split(cls, path: str | os.PathLike, split: str) -> bool:
        """Does ``path`` hold ``split``: a root with a ``<split>.zarr`` store, or that store itself."""
        path = Path(path)
        if is_store(path):
            return path.name == f"{split}.zarr"
        return is_store(path / f"{split}.zarr")

    # -------------------------------------------------------------------------------- store

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"], state["_pid"] = None, None  # DataLoader workers re-open the store
        return state

    def _open(self) -> dict:
        zarr = import_zarr(self.path)
        try:
            group = zarr.open_group(str(self.path), mode="r")
            names = set(group.array_keys())
        except Exception as e:  # noqa: BLE001 - zarr raises many unrelated types for a bad store
            raise DataError(f"cannot open the zarr store ({type(e).__name__}: {e})", self.path) from None
        handles = {"_group": group}
        for name in ARRAYS:
            if name not in names:
                raise DataError(f"array {name!r} is missing from the store (has {sorted(names)}); a 3DFA "
                                f"PerAct store holds {list(ARRAYS)}", _where(self.path, name))
            try:
                handles[name] = group[name]
            except Exception as e:  # noqa: BLE001
                raise DataError(f"cannot open the array ({type(e).__name__}: {e})",
                                _where(self.path, name)) from None
        self._check_arrays(handles)
        return handles

    def _arrays(self) -> dict:
        """The store's arrays, opened once per process."""
        if self._handles is None or self._pid != os.getpid():
            self._handles, self._pid = self._open(), os.getpid()
        return self._handles

    def _check_arrays(self, h: dict) -> None:
        """Rank, shape, dtype and length of every array (metadata only; nothing is read)."""
        n_cam = len(CAMERAS)
        expect = {
            "rgb": ("(N, 4, 3, H, W) uint8", lambda s: len(s) == 5 and s[1] == n_cam and s[2] == 3, "u1"),
            "pcd": ("(N, 4, 3, H, W) float16", lambda s: len(s) == 5 and s[1] == n_cam and s[2] == 3, "f"),
            "proprioception": ("(N, 3, 1, 8) float32",
                               lambda s: len(s) == 4 and s[1] == N_HISTORY and s[2:] == (1, ACTION_DIM), "f"),
            "action": ("(N, 1, 1, 8) float32 (one next keypose per row, one arm)",
                       lambda s: len(s) == 4 and s[1:] == (1, 1, ACTION_DIM), "f"),
            "task_id": ("(N,) uint8", lambda s: len(s) == 1, "iu"),
            "variation": ("(N,) uint8", lambda s: len(s) == 1, "iu"),
        }
        for name, (text, shape_ok, kinds) in expect.items():
            arr = h[name]
            shape, dtype = tuple(int(d) for d in arr.shape), np.dtype(arr.dtype)
            dtype_ok = dtype == np.uint8 if kinds == "u1" else dtype.kind in kinds
            if not shape_ok(shape) or not dtype_ok:
                raise DataError(f"array has shape {shape} and dtype {dtype}, expected {text}",
                                _where(self.path, name))
        if h["rgb"].shape[3:] != h["pcd"].shape[3:]:
            raise DataError(f"pcd images are {tuple(h['pcd'].shape[3:])} but rgb images are "
                            f"{tuple(h['rgb'].shape[3:])}", _where(self.path, "pcd"))
        lengths = {name: int(h[name].shape[0]) for name in ARRAYS}
        n = lengths["action"]
        for name, length in lengths.items():
            if length != n:
                raise DataError(f"array has {length} rows but 'action' has {n}; every array holds one row per "
                                f"keystep (lengths: {lengths})", _where(self.path, name))
        if n == 0:
            raise DataError("the store holds no rows", self.path)

    def _read(self, name: str, rows: slice, key: object = None) -> np.ndarray:
        try:
            return np.asarray(self._arrays()[name][rows])
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - a corrupt chunk surfaces as codec or JSON errors
            raise DataError(f"cannot read rows {rows.start}..{rows.stop} ({type(e).__name__}: {e})",
                            _where(self.path, name), key) from None

    def _task_list(self, tasks: Sequence[str] | None) -> list[str]:
        if tasks is None:
            try:
                attr = dict(self._arrays()["_group"].attrs).get("tasks")
            except Exception as e:  # noqa: BLE001
                raise DataError(f"cannot read the store's attributes ({type(e).__name__}: {e})",
                                self.path) from None
            if attr is None:
                return list(PERACT_TASKS)
            if not isinstance(attr, list) or not all(isinstance(t, str) and t for t in attr):
                raise DataError(f"the store's 'tasks' attribute must be a list of task names, got {attr!r}",
                                self.path / ".zattrs")
            tasks = attr
        if isinstance(tasks, str) or not all(isinstance(t, str) and t for t in tasks) or not tasks:
            raise DataError(f"tasks must be a non-empty list of task names, got {tasks!r}", self.path)
        if len(set(tasks)) != len(tasks):
            raise DataError(f"tasks has duplicate names: {list(tasks)}", self.path)
        return list(tasks)

    # -------------------------------------------------------------------------------- index

    def _build_index(self, h: dict) -> None:
        """Split the rows into episodes (the boundary rule of the module docstring) from the small arrays."""
        everything = slice(0, int(h["action"].shape[0]))
        tid = self._read("task_id", everything).astype(np.int64)
        var = self._read("variation", everything).astype(np.int64)
        prop = self._read("proprioception", everything)[:, :, 0].astype(np.float32)  # (N, 3, 8)
        target = self._read("action", everything)[:, 0, 0].astype(np.float32)  # (N, 8)
        for name, values in (("proprioception", prop), ("action", target)):
            bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise DataError(f"row {i} holds a non-finite value: {values[i].tolist()}",
                                _where(self.path, name), f"row {i}")
        out = tid >= len(self.tasks)
        if out.any():
            i = int(np.flatnonzero(out)[0])
            raise DataError(f"task_id {int(tid[i])} at row {i} is outside the task list ({len(self.tasks)} "
                            f"tasks: {self.tasks}); pass tasks= with the converter's task list",
                            _where(self.path, "task_id"), f"row {i}")
        current, prev1, prev2 = prop[:, 2], prop[:, 1], prop[:, 0]
        start = np.zeros(len(tid), dtype=bool)
        start[0] = True
        start[1:] |= (tid[1:] != tid[:-1]) | (var[1:] != var[:-1])
        start[1:] |= (target[:-1] != current[1:]).any(axis=1)
        start[1:] |= (prev1[1:] != current[:-1]).any(axis=1)
        start[1:] |= (prev2[1:] != prev1[:-1]).any(axis=1)
        bounds = np.append(np.flatnonzero(start), len(tid))
        index: dict[str, dict[str, tuple[int, int]]] = {}
        for r0, r1 in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            tv = f"{self.tasks[tid[r0]]}+{var[r0]}"
            eps = index.setdefault(tv, {})
            eps[f"episode{len(eps)}"] = (r0, r1)
        self._index = {tv: index[tv] for tv in sorted(index, key=natural_key)}
        self._history = prop
        self._target = target

    def _rows(self, taskvar: str, key: str) -> tuple[int, int]:
        parse_taskvar(taskvar, self.path)
        if taskvar not in self._index:
            raise DataError(f"unknown task-variation {taskvar!r}; choices: {list(self._index)}", self.path,
                            taskvar)
        eps = self._index[taskvar]
        if key not in eps:
            keys = list(eps)
            raise DataError(f"unknown episode {key!r} for {taskvar}; {len(keys)} episodes: {keys[:10]}"
                            + (" ..." if len(keys) > 10 else ""), self.path, key)
        return eps[key]

    def taskvars(self) -> list[str]:
        """Task-variations in the store, "task+V", in natural order."""
        return list(self._index)

    def episode_keys(self, taskvar: str) -> list[str]:
        """``episode0``, ``episode1``, ... of ``taskvar`` in store order."""
        parse_taskvar(taskvar, self.path)
        if taskvar not in self._index:
            raise DataError(f"unknown task-variation {taskvar!r}; choices: {list(self._index)}", self.path,
                            taskvar)
        return list(self._index[taskvar])

    def episode_rows(self, taskvar: str, key: str) -> tuple[int, int]:
        """The half-open row slice ``(r0, r1)`` of one episode."""
        return self._rows(taskvar, key)

    def taskvar_path(self, taskvar: str) -> Path:
        """The store folder (all task-variations share it; errors name it)."""
        return self.path

    # -------------------------------------------------------------------------------- episodes

    def read_episode(self, taskvar: str, key: str) -> Episode:
        """One episode (see the module docstring for the mapping)."""
        r0, r1 = self._rows(taskvar, key)
        task, var = parse_taskvar(taskvar, self.path)
        where = f"{taskvar}/{key}"
        rows = slice(r0, r1)
        rgb = self._read("rgb", rows, where)[:, self._cam_idx].transpose(0, 1, 3, 4, 2)
        pcd = self._read("pcd", rows, where)[:, self._cam_idx]
        finite = np.isfinite(pcd).all(axis=(2, 3, 4))  # (K, n_cam)
        if not finite.all():
            k, c = (int(i) for i in np.argwhere(~finite)[0])
            raise DataError(f"row {r0 + k} (keystep {k}) camera {self.cameras[c]}: the point map holds "
                            "non-finite values", _where(self.path, "pcd"), f"{where} (row {r0 + k})")
        point_maps = pcd.astype(np.float32).transpose(0, 1, 3, 4, 2)
        history = self._history[r0:r1]
        actions = np.concatenate([history[:, -1], self._target[r1 - 1:r1]], axis=0).astype(np.float32)
        return Episode(
            task=task, variation=var, episode=key, actions=actions, key_frameids=list(range(r1 - r0 + 1)),
            rgb_images=np.ascontiguousarray(rgb, dtype=np.uint8), point_maps=np.ascontiguousarray(point_maps),
            extra={"cameras": list(self.cameras), "path": str(self.path), "rows": (r0, r1),
                   "history": history.copy()},
        )

    # -------------------------------------------------------------------------------- instructions

    def instructions_path(self) -> Path | None:
        """The instructions JSON in use: the ``instructions`` argument, else the first of
        ``instructions/peract/instructions.json`` and ``instructions.json`` found in the store folder or
        up to 3 parents (nearest first); None when there is none."""
        if self._instructions_arg is not None:
            return self._instructions_arg
        return find_upwards(self.path, INSTRUCTIONS_FILES)

    def _table(self) -> dict | None:
        if self._instr_loaded:
            return self._instr_table
        path = self.instructions_path()
        table = None
        if path is not None:
            try:
                table = json.loads(Path(path).read_text())
            except FileNotFoundError:
                raise DataError("instructions file not found", path) from None
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise DataError(f"cannot read the instructions JSON ({type(e).__name__}: {e})", path) from None
            if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
                raise DataError("3DFA instructions JSON must map task -> {variation: [instruction, ...]}; "
                                "pass instructions= with the right file", path)
        self._instr_table, self._instr_path, self._instr_loaded = table, path, True
        return table

    def instructions(self, taskvar: str) -> list[str]:
        """Instructions of ``taskvar`` from 3DFA's JSON (``{task: {"<var>": [str, ...]}}``).

        Without a JSON (none given, none found): ``[task name with spaces]``. With one, a task-variation
        it lacks, or an entry that is not a non-empty list of strings, raises ``DataError`` (a JSON that
        does not match the store usually means the wrong file or task list).
        """
        self.episode_keys(taskvar)  # a known task-variation
        task, var = parse_taskvar(taskvar, self.path)
        table = self._table()
        if table is None:
            return [task.replace("_", " ")]
        entry = table.get(task, {}).get(str(var))
        if not isinstance(entry, list) or not entry or not all(isinstance(s, str) for s in entry):
            problem = ("has no entry" if entry is None
                       else f"holds {entry!r}, not a non-empty list of strings")
            raise DataError(f"the instructions JSON {problem} for task {task!r} variation {var}",
                            self._instr_path, f"{task}/{var}")
        return list(entry)


# --------------------------------------------------------------------------------------------- writer


def _history(currents: np.ndarray) -> np.ndarray:
    """(K, 8) current poses -> (K, 3, 1, 8) [prev2, prev1, current], clamped at the start like 3DFA."""
    prop = currents.astype(np.float32)
    prop_1 = np.concatenate([prop[:1], prop[:-1]])
    prop_2 = np.concatenate([prop_1[:1], prop_1[:-1]])
    return np.stack([prop_2, prop_1, prop], axis=1).reshape(len(prop), N_HISTORY, 1, ACTION_DIM)


def _episode_rows(i: int, ep: dict, task2id: dict[str, int], path: Path) -> dict[str, np.ndarray]:
    where = f"episodes[{i}]"
    missing = [k for k in ("task", "variation", "rgb", "point_maps", "currents", "targets") if k not in ep]
    if missing:
        raise DataError(f"episode dict lacks {missing}", path, where)
    if ep["task"] not in task2id:
        raise DataError(f"task {ep['task']!r} is not in tasks {list(task2id)}", path, where)
    var = ep["variation"]
    if isinstance(var, bool) or not isinstance(var, (int, np.integer)) or not 0 <= int(var) <= 255:
        raise DataError(f"variation must be an int in 0..255 (stored as uint8), got {var!r}", path, where)
    rgb, pts = np.asarray(ep["rgb"]), np.asarray(ep["point_maps"])
    cur = np.asarray(ep["currents"], dtype=np.float32)
    tgt = np.asarray(ep["targets"], dtype=np.float32)
    k = len(cur)
    if k == 0 or cur.shape != (k, ACTION_DIM) or tgt.shape != (k, ACTION_DIM):
        raise DataError(f"currents {cur.shape} and targets {tgt.shape} must both be (K, 8) with K >= 1",
                        path, where)
    if rgb.dtype != np.uint8 or rgb.ndim != 5 or rgb.shape[:2] != (k, len(CAMERAS)) or rgb.shape[4] != 3:
        raise DataError(f"rgb is {rgb.shape} {rgb.dtype}, expected (K={k}, {len(CAMERAS)}, H, W, 3) uint8 "
                        f"(cameras {list(CAMERAS)})", path, where)
    if pts.shape != rgb.shape:
        raise DataError(f"point_maps is {pts.shape}, expected {rgb.shape} like rgb", path, where)
    pcd = pts.astype(np.float16)
    if not (np.isfinite(pcd).all() and np.isfinite(cur).all() and np.isfinite(tgt).all()):
        raise DataError("non-finite values in point_maps (after the float16 cast), currents or targets",
                        path, where)
    return {
        "rgb": rgb.transpose(0, 1, 4, 2, 3),
        "pcd": pcd.transpose(0, 1, 4, 2, 3),
        "proprioception": _history(cur),
        "action": tgt.reshape(k, 1, 1, ACTION_DIM),
        "task_id": np.full(k, task2id[ep["task"]], dtype=np.uint8),
        "variation": np.full(k, int(var), dtype=np.uint8),
    }


def write_flowmatch_zarr(path: str | os.PathLike, episodes: Sequence[dict],
                         tasks: Sequence[str] = PERACT_TASKS) -> Path:
    """Write a 3DFA PerAct store (zarr format v2, Blosc lz4 clevel 1 shuffle, chunks of one row) at ``path``.

    ``episodes``: dicts with ``task`` (a name in ``tasks``), ``variation`` (int), ``rgb``
    (K, 4, H, W, 3) uint8 and ``point_maps`` (K, 4, H, W, 3) float (cameras in ``CAMERAS`` order; stored
    as float16), ``currents`` (K, 8) the pose at each keystep and ``targets`` (K, 8) the next keypose.
    Rows are written in the given order (3DFA's converter orders them by task list, variation, episode);
    the history is built as the converter builds it. ``tasks`` is also recorded as the group attribute
    ``tasks`` (3DFA ignores it; ``FlowMatchZarrSource`` uses it when not given ``tasks=``). Atomic: the
    store is built in a temporary folder beside ``path`` and moved into place (replacing ``path``).
    """
    from harness.data.formats.lotus_lmdb import replace_dir_atomic

    path = Path(path)
    zarr = import_zarr(path)
    import numcodecs

    tasks = list(tasks)
    if not tasks or len(set(tasks)) != len(tasks) or len(tasks) > 256:
        raise DataError(f"tasks must be 1..256 distinct names (task_id is uint8), got {tasks!r}", path)
    if not episodes:
        raise DataError("no episodes to write", path)
    task2id = {t: i for i, t in enumerate(tasks)}
    parts = [_episode_rows(i, ep, task2id, path) for i, ep in enumerate(episodes)]
    hw = {p["rgb"].shape[3:] for p in parts}
    if len(hw) != 1:
        raise DataError(f"episodes have different image sizes {sorted(hw)}; one store holds one size", path)
    data = {name: np.concatenate([p[name] for p in parts]) for name in ARRAYS}

    compressor = numcodecs.Blosc(cname="lz4", clevel=1, shuffle=numcodecs.Blosc.SHUFFLE)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        if int(zarr.__version__.split(".")[0]) >= 3:
            group = zarr.open_group(str(tmp), mode="w", zarr_format=2)
            for name in ARRAYS:
                arr = data[name]
                z = group.create_array(name, shape=arr.shape, chunks=(1,) + arr.shape[1:], dtype=arr.dtype,
                                       compressors=compressor)
                z[...] = arr
        else:  # zarr 2.x, as 3DFA's converter
            group = zarr.open_group(str(tmp), mode="w")
            for name in ARRAYS:
                arr = data[name]
                group.create_dataset(name, data=arr, shape=arr.shape, chunks=(1,) + arr.shape[1:],
                                     dtype=arr.dtype, compressor=compressor)
        group.attrs["tasks"] = tasks
        group.attrs["cameras"] = list(CAMERAS)
        replace_dir_atomic(tmp, path)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def write_flowmatch_instructions(path: str | os.PathLike, table: dict[str, dict[int | str, list[str]]]) -> Path:
    """Write 3DFA's instructions JSON ``{task: {"<var>": [instruction, ...]}}`` atomically."""
    from harness.data.meta import write_json_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {task: {str(v): [str(s) for s in texts] for v, texts in vars_.items()}
                             for task, vars_ in table.items()})
    return path
