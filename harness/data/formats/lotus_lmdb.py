"""The 3D-LOTUS LMDB formats that the official Mini-Diffuser trains on (../shared/reference/minidiffuser.md §3).

One LMDB per ``<task>+<variation>``; keys ``episode<k>`` (ASCII); values msgpack with msgpack_numpy arrays,
encoded exactly as ``msgpack_numpy.patch(); msgpack.packb(value)`` in the original code, so either side can
read what the other wrote.

- "keysteps": ``rgb`` (T, n_cam, H, W, 3) uint8, ``pc`` (T, n_cam, H, W, 3) float32 world xyz, ``action``
  (T, 8) float32 [xyz, quat xyzw, open], ``key_frameids`` (list of T ints); optional ``depth``
  (T, n_cam, H, W), ``mask`` (T, n_cam, H, W), ``bbox_info`` / ``pose_info`` (dict name -> (T, 6)/(T, 7)).
- "voxel1cm": ``xyz`` list of T (N_t, 3) float32, ``rgb`` list of T (N_t, 3) uint8, optional ``sem`` list
  of T (N_t,), plus ``action``, ``key_frameids``, ``bbox_info``, ``pose_info``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import lmdb
import msgpack
import msgpack_numpy
import numpy as np

from harness import safe_pickle
from harness.data.episode import Episode
from harness.data.errors import DataError
from harness.data.formats import is_taskvar_name, natural_key, parse_taskvar, register_source
from harness.data.meta import DatasetMeta

KEYSTEPS = "keysteps"
VOXEL = "voxel1cm"
_DEFAULT_MAP_SIZE = 1 << 30  # grows on demand (see LmdbWriter.put)


def pack(value: dict) -> bytes:
    """Encode one episode value the way the 3D-LOTUS scripts do."""
    return msgpack.packb(value, default=msgpack_numpy.encode, use_bin_type=True)


def _decode_array(obj: dict, path: object = None, key: object = None):
    """``msgpack_numpy.decode`` without the two paths that trust the file: an object array (``kind`` b"O")
    is a pickle, given here to the restricted unpickler (``harness.safe_pickle``) instead of
    ``pickle.loads``; and a dtype that holds objects is refused before ``np.ndarray`` would read raw bytes
    from the file as object pointers."""
    if b"nd" not in obj:
        return msgpack_numpy.decode(obj)
    if obj.get(b"kind") == b"O":
        return safe_pickle.loads(obj[b"data"], path=path, key=key,
                                 hint="; LMDB values hold numeric numpy arrays only")
    descr = obj.get(b"type")
    if obj.get(b"kind") == b"V" and isinstance(descr, list):
        descr = [tuple(t.decode() if isinstance(t, bytes) else t for t in d) for d in descr]
    dtype = np.dtype(descr)
    if dtype.hasobject:
        raise DataError(f"array of dtype {dtype} holds Python objects; LMDB values hold numeric arrays only",
                        path, key)
    return msgpack_numpy.decode(obj)


def unpack(data: bytes, path: object = None, key: object = None) -> dict:
    """Decode one episode value; a corrupt record raises DataError naming the LMDB and key. Nothing in the
    value can run code (``_decode_array``)."""
    try:
        value = msgpack.unpackb(data, object_hook=lambda o: _decode_array(o, path, key), raw=False,
                                strict_map_key=False)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - msgpack raises several unrelated types for corrupt input
        raise DataError(f"cannot decode msgpack value ({type(e).__name__}: {e})", path, key) from None
    if not isinstance(value, dict):
        raise DataError(f"episode value is a {type(value).__name__}, expected a dict", path, key)
    return value


class LmdbWriter:
    """Write episode values into one LMDB (one ``<task>+<variation>``). Use as a context manager."""

    def __init__(self, path: str | os.PathLike, map_size: int = _DEFAULT_MAP_SIZE):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        close_readonly(self.path)  # py-lmdb refuses a second handle on an environment open for reading
        self.env = lmdb.open(str(self.path), map_size=map_size, subdir=True)

    def put(self, key: str, value: dict) -> None:
        data = pack(value)
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    txn.put(key.encode("ascii"), data)
                return
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)

    def close(self) -> None:
        self.env.sync()
        self.env.close()

    def __enter__(self) -> LmdbWriter:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# py-lmdb >= 3 refuses to open one environment twice in a process, and a forked DataLoader worker inherits
# the parent's record of open environments. So every reader in a process shares one read-only handle per
# LMDB (two datasets over one folder work), and a forked child closes the handles it inherited before
# opening its own.
_READ_ENVS: dict[str, tuple[tuple[int, int], lmdb.Environment, int]] = {}
_READ_ENVS_PID = os.getpid()


def _needed_size(env: lmdb.Environment) -> int:
    """Bytes a complete data file holds: pages 0 .. last_pgno (both read from the meta pages)."""
    return (int(env.info()["last_pgno"]) + 1) * int(env.stat()["psize"])


def _truncated(data: str, size: int, needed: int) -> DataError:
    return DataError(f"LMDB data file is truncated: {size} bytes, but its last page ends at byte {needed} "
                     "(an interrupted copy or download?); re-copy or regenerate this LMDB", data)


def open_readonly(path: str | os.PathLike) -> lmdb.Environment:
    """The process's shared read-only handle on the LMDB folder ``path`` (opened on first use).

    A ``data.mdb`` shorter than its last page raises ``DataError`` before any value is read: LMDB maps
    the file, and touching a page past its end kills the process with SIGBUS. The size is re-checked on
    every call (one ``stat``), so a file cut while its handle is cached is caught too.
    """
    global _READ_ENVS_PID
    if _READ_ENVS_PID != os.getpid():
        for _, env, _ in _READ_ENVS.values():
            env.close()
        _READ_ENVS.clear()
        _READ_ENVS_PID = os.getpid()
    real = os.path.realpath(path)
    data = os.path.join(real, "data.mdb")
    try:
        st = os.stat(data)
    except OSError:
        raise DataError("LMDB folder has no data.mdb file", data) from None
    ident = (st.st_dev, st.st_ino)  # a folder replaced since it was opened gets a fresh handle
    cached = _READ_ENVS.get(real)
    if cached is not None and cached[0] == ident:
        if st.st_size < cached[2]:
            close_readonly(real)
            raise _truncated(data, st.st_size, cached[2])
        return cached[1]
    if cached is not None:
        close_readonly(real)
    try:
        # lmdb reads its two meta pages with pread: a file shorter than that fails here, not with SIGBUS
        env = lmdb.open(real, readonly=True, lock=False, readahead=False)
    except lmdb.Error as e:
        raise DataError(f"cannot open LMDB ({st.st_size} bytes): {e}", data) from None
    needed = _needed_size(env)
    if st.st_size < needed:
        env.close()
        raise _truncated(data, st.st_size, needed)
    _READ_ENVS[real] = (ident, env, needed)
    return env


def close_readonly(path: str | os.PathLike) -> None:
    """Close the shared read-only handle on ``path`` if one is open (the next reader re-opens it)."""
    cached = _READ_ENVS.pop(os.path.realpath(path), None)
    if cached is not None:
        cached[1].close()


def read_lmdb(path: str | os.PathLike) -> dict[str, dict]:
    """All decoded values of one LMDB, keyed by episode name (for tests and small data)."""
    with open_readonly(path).begin() as txn:
        return {k.decode("ascii"): unpack(v, path, k.decode("ascii")) for k, v in txn.cursor()}


def _check_finite(arr: np.ndarray, what: str, path, key) -> None:
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0].tolist()
        raise DataError(f"{what} contains NaN or inf (first at index {bad})", path, key)


def _check_action(action, T: int | None, path, key) -> np.ndarray:
    action = np.asarray(action)
    if action.ndim != 2 or action.shape[1] != 8:
        raise DataError(f"'action' has shape {action.shape}, expected (T, 8) [xyz, quat xyzw, open]", path, key)
    if T is not None and action.shape[0] != T:
        raise DataError(f"inconsistent lengths: 'action' has T={action.shape[0]} but 'rgb'/'xyz' has T={T}",
                        path, key)
    _check_finite(action, "'action'", path, key)
    return action.astype(np.float32)


def _check_frameids(ids, T: int, path, key) -> list[int]:
    try:
        ids = [int(i) for i in ids]
    except (TypeError, ValueError):
        raise DataError(f"'key_frameids' must be a list of T={T} frame indices, got {ids!r:.80}",
                        path, key) from None
    if len(ids) != T:
        raise DataError(f"inconsistent lengths: 'key_frameids' has {len(ids)} entries, expected T={T}", path, key)
    return ids


def keysteps_value(rgb, pc, action, key_frameids, depth=None, mask=None, bbox_info=None, pose_info=None,
                   path=None, key=None) -> dict:
    """Validate and assemble a "keysteps" value (shapes in the module docstring)."""
    rgb = np.asarray(rgb)
    pc = np.asarray(pc)
    if rgb.ndim != 5 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise DataError(f"'rgb' has shape {rgb.shape} dtype {rgb.dtype}, expected (T, n_cam, H, W, 3) uint8",
                        path, key)
    if pc.shape != rgb.shape:
        raise DataError(f"'pc' has shape {pc.shape}, expected the shape of 'rgb' {rgb.shape}", path, key)
    _check_finite(pc, "'pc'", path, key)
    T = rgb.shape[0]
    value = {"rgb": rgb, "pc": pc.astype(np.float32), "action": _check_action(action, T, path, key),
             "key_frameids": _check_frameids(key_frameids, T, path, key)}
    if depth is not None:
        depth = np.asarray(depth, dtype=np.float32)
        if depth.shape != rgb.shape[:-1]:
            raise DataError(f"'depth' has shape {depth.shape}, expected {rgb.shape[:-1]}", path, key)
        value["depth"] = depth
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != rgb.shape[:-1]:
            raise DataError(f"'mask' has shape {mask.shape}, expected {rgb.shape[:-1]}", path, key)
        value["mask"] = mask
    if bbox_info is not None:
        value["bbox_info"] = {k: np.asarray(v, dtype=np.float32) for k, v in bbox_info.items()}
    if pose_info is not None:
        value["pose_info"] = {k: np.asarray(v, dtype=np.float32) for k, v in pose_info.items()}
    return value


def voxel_value(xyz, rgb, action, key_frameids, sem=None, bbox_info=None, pose_info=None,
                path=None, key=None) -> dict:
    """Validate and assemble a "voxel1cm" value (shapes in the module docstring)."""
    if len(xyz) != len(rgb):
        raise DataError(f"inconsistent lengths: 'xyz' has T={len(xyz)} but 'rgb' has T={len(rgb)}", path, key)
    T = len(xyz)
    xs, cs = [], []
    for t, (x, c) in enumerate(zip(xyz, rgb)):
        x = np.asarray(x)
        c = np.asarray(c)
        if x.ndim != 2 or x.shape[1] != 3:
            raise DataError(f"'xyz'[{t}] has shape {x.shape}, expected (N, 3)", path, key)
        if c.shape != x.shape:
            raise DataError(f"'rgb'[{t}] has shape {c.shape}, expected {x.shape} like 'xyz'[{t}]", path, key)
        _check_finite(x, f"'xyz'[{t}]", path, key)
        xs.append(x.astype(np.float32))
        cs.append(c.astype(np.uint8))
    value = {"xyz": xs, "rgb": cs, "action": _check_action(action, T, path, key),
             "key_frameids": _check_frameids(key_frameids, T, path, key)}
    if sem is not None:
        if len(sem) != T or any(len(s) != len(x) for s, x in zip(sem, xs)):
            raise DataError("'sem' must hold one label per point for every frame", path, key)
        value["sem"] = [np.asarray(s) for s in sem]
    value["bbox_info"] = {k: np.asarray(v, dtype=np.float32) for k, v in (bbox_info or {}).items()}
    value["pose_info"] = {k: np.asarray(v, dtype=np.float32) for k, v in (pose_info or {}).items()}
    return value


def keysteps_to_voxel_value(value: dict, meta: DatasetMeta, voxel_size: float | None = None) -> dict:
    """Convert a "keysteps" value into a "voxel1cm" value like 3D-LOTUS's gen_simple_policy_data.py.

    Per frame: flatten all cameras, keep points strictly inside the workspace box, voxel-downsample
    (mean xyz, colour and label of the first point in each voxel). ``sem`` comes from ``mask`` if present.
    """
    from harness.data.transforms import crop_to_workspace, voxelize

    voxel_size = meta.voxel_size if voxel_size is None else voxel_size
    xyz, rgb, sem = [], [], []
    for t in range(value["rgb"].shape[0]):
        pts = value["pc"][t].reshape(-1, 3)
        cols = value["rgb"][t].reshape(-1, 3)
        labels = value["mask"][t].reshape(-1) if "mask" in value else None
        keep = crop_to_workspace(pts, meta.workspace_bounds)
        pts, cols = pts[keep], cols[keep]
        labels = labels[keep] if labels is not None else None
        idx = voxelize(pts, voxel_size)
        xyz.append(idx.mean_xyz)
        rgb.append(cols[idx.first])
        if labels is not None:
            sem.append(labels[idx.first])
    return voxel_value(xyz, rgb, value["action"], value["key_frameids"], sem=sem if sem else None,
                       bbox_info=value.get("bbox_info"), pose_info=value.get("pose_info"))


def detect_lmdb_kind(value: dict, path=None, key=None) -> str:
    if "xyz" in value:
        return VOXEL
    if "pc" in value and "rgb" in value:
        return KEYSTEPS
    raise DataError(f"unrecognised LMDB value with keys {sorted(value)}; expected 'xyz' (voxel1cm) or "
                    "'pc' + 'rgb' (keysteps)", path, key)


def is_lmdb_dir(p: Path) -> bool:
    return (p / "data.mdb").is_file()


def _lmdb_leftovers_only(folder: Path) -> bool:
    """True for a folder holding nothing but what an empty or half-copied LMDB leaves: lock.mdb, hidden files."""
    try:
        return all(p.name == "lock.mdb" or p.name.startswith(".") for p in folder.iterdir())
    except OSError:
        return False


def _lmdb_candidates(path: Path) -> list[Path]:
    """Visible sub-folders that hold an LMDB or are named like one (an empty ``<task>+<var>`` folder)."""
    try:
        subdirs = [p for p in path.iterdir() if not p.name.startswith(".") and p.is_dir()]
    except OSError:
        return []
    return [p for p in subdirs if is_lmdb_dir(p) or is_taskvar_name(p.name)]


def episode_from_value(value: dict, taskvar: str, key: str, path=None) -> Episode:
    """Decode one value of either kind into an ``Episode``, validating shapes and finiteness."""
    task, var = parse_taskvar(taskvar, path)
    for required in ("action", "key_frameids"):
        if required not in value:
            raise DataError(f"missing key '{required}' in episode value (has {sorted(value)})", path, key)
    kind = detect_lmdb_kind(value, path, key)
    if kind == VOXEL:
        for required in ("rgb",):
            if required not in value:
                raise DataError(f"missing key '{required}' in voxel1cm value", path, key)
        v = voxel_value(value["xyz"], value["rgb"], value["action"], value["key_frameids"],
                        sem=value.get("sem"), bbox_info=value.get("bbox_info"),
                        pose_info=value.get("pose_info"), path=path, key=key)
        return Episode(task=task, variation=var, episode=key, actions=v["action"],
                       key_frameids=v["key_frameids"], xyz=v["xyz"], rgb=v["rgb"], sem=v.get("sem"),
                       bbox_info=v["bbox_info"] or None, pose_info=v["pose_info"] or None)
    v = keysteps_value(value["rgb"], value["pc"], value["action"], value["key_frameids"],
                       depth=value.get("depth"), mask=value.get("mask"), bbox_info=value.get("bbox_info"),
                       pose_info=value.get("pose_info"), path=path, key=key)
    return Episode(task=task, variation=var, episode=key, actions=v["action"], key_frameids=v["key_frameids"],
                   rgb_images=v["rgb"], point_maps=v["pc"], depth=v.get("depth"), mask=v.get("mask"),
                   bbox_info=v.get("bbox_info"), pose_info=v.get("pose_info"))


@register_source
class LotusLmdbSource:
    """A folder of ``<task>+<variation>`` LMDBs in either 3D-LOTUS format (detected from the first value).

    ``path`` may also be the root of a dataset written by ``mdh data metaworld``; then ``split`` and
    ``kind`` pick ``<root>/<split>/<kind>``.
    """

    name = "lotus_lmdb"

    def __init__(self, path: str | os.PathLike, split: str = "train", kind: str = VOXEL):
        path = Path(path)
        if not path.is_dir():
            raise DataError("data folder does not exist", path)
        if not _lmdb_candidates(path) and (path / split / kind).is_dir():
            path = path / split / kind
        self.path = path
        found = sorted(_lmdb_candidates(path), key=lambda p: natural_key(p.name))
        self._taskvars = [p.name for p in found if is_lmdb_dir(p)]
        # named like an LMDB but without data.mdb (an empty folder, an interrupted copy): reported, not listed
        self._bad: dict[str, DataError] = {
            p.name: DataError("task-variation folder has no data.mdb (empty, or not an LMDB)", p)
            for p in found if not is_lmdb_dir(p)}
        if not self._taskvars:
            empty = f"; folders without data.mdb: {sorted(self._bad)}" if self._bad else ""
            raise DataError(f"no <task>+<variation> LMDB folders (with data.mdb) found{empty}", path)
        for tv in self._taskvars:
            parse_taskvar(tv, path / tv)
        self._keys: dict[str, list[str]] = {}
        self.kind: str | None = None

    @classmethod
    def detect(cls, path: Path) -> bool:
        path = Path(path)
        if not path.is_dir():
            return False
        candidates = _lmdb_candidates(path)
        if any(is_lmdb_dir(p) for p in candidates):
            return True
        if candidates:  # <task>+<var> folders without data.mdb: ours (reported as empty LMDBs) when they hold
            # nothing an LMDB would not; folders of other files are another format's (3DDA's ep<N>.dat)
            return all(_lmdb_leftovers_only(p) for p in candidates)
        return (path / "train" / VOXEL).is_dir() or (path / "train" / KEYSTEPS).is_dir()

    def _env(self, taskvar: str) -> lmdb.Environment:
        # The process-wide read-only handle, opened lazily (DataLoader workers re-open after fork).
        if taskvar not in self._taskvars:
            if taskvar in self._bad:
                raise self._bad[taskvar]
            raise DataError(f"unknown task-variation {taskvar!r}; available: {self._taskvars}", self.path)
        return open_readonly(self.path / taskvar)

    def bad_taskvars(self) -> dict[str, DataError]:
        """Task-variation folders that hold no LMDB (not in ``taskvars()``), each with its problem."""
        return dict(self._bad)

    def taskvar_path(self, taskvar: str) -> Path:
        """The LMDB folder of ``taskvar`` (where its problems are reported)."""
        return self.path / taskvar

    def taskvars(self) -> list[str]:
        return list(self._taskvars)

    def episode_keys(self, taskvar: str) -> list[str]:
        if taskvar not in self._keys:
            try:
                with self._env(taskvar).begin() as txn:
                    keys = [k.decode("ascii") for k in txn.cursor().iternext(keys=True, values=False)]
            except (lmdb.Error, UnicodeDecodeError) as e:
                raise DataError(f"cannot list the LMDB's keys ({type(e).__name__}: {e})",
                                self.path / taskvar / "data.mdb") from None
            self._keys[taskvar] = sorted(keys, key=natural_key)
        return self._keys[taskvar]

    def read_value(self, taskvar: str, key: str) -> dict:
        try:
            with self._env(taskvar).begin() as txn:
                data = txn.get(key.encode("ascii"))
        except lmdb.Error as e:
            raise DataError(f"cannot read the LMDB value ({type(e).__name__}: {e})",
                            self.path / taskvar / "data.mdb", key) from None
        if data is None:
            raise DataError(f"episode key not found; available: {self.episode_keys(taskvar)[:10]}...",
                            self.path / taskvar, key)
        value = unpack(data, self.path / taskvar, key)
        if self.kind is None:
            self.kind = detect_lmdb_kind(value, self.path / taskvar, key)
        return value

    def read_episode(self, taskvar: str, key: str) -> Episode:
        return episode_from_value(self.read_value(taskvar, key), taskvar, key, self.path / taskvar)

    def close(self) -> None:
        """Close this folder's LMDB handles (shared in the process; the next read re-opens them)."""
        for tv in self._taskvars:
            close_readonly(self.path / tv)


def replace_dir_atomic(tmp: Path, final: Path) -> None:
    """Move a finished temporary folder into place (a reader sees either nothing or the whole LMDB)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
