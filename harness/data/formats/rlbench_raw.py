"""Raw RLBench episode folders, read without RLBench, PyRep or CoppeliaSim.

Layouts (../shared/reference/rlbench_and_metaworld.md §1.1):

    <root>/<task>/variation<V>/variation_descriptions.pkl
    <root>/<task>/variation<V>/episodes/episode<k>/low_dim_obs.pkl
    <root>/<task>/variation<V>/episodes/episode<k>/<cam>_{rgb,depth[,mask]}/<i>.png
    <root>/<task>/all_variations/episodes/episode<k>/{variation_number.pkl, variation_descriptions.pkl, ...}

The second form is the PerAct fork's (``--all_variations=True``): the variation of each episode comes from
its ``variation_number.pkl``. When a task folder holds both forms (3DDA's rearranged symlinks beside the
originals), the ``variation<V>`` folders win and ``all_variations`` is ignored, so no episode is counted
twice. ``path`` may be the root holding task folders, one task folder, or one ``variation<V>`` (or
``all_variations``) folder.

Only the keyframes' PNGs are decoded: ``[0] + peract_keyposes(gripper_open, joint_velocities, rule=...)``
(``keyposes="lotus"`` by default: the Mini-Diffuser / 3D-LOTUS variant; ``"peract"``: PerAct's unclamped one).
Robot link boxes and poses are read from ``misc`` when the recording fork stored them (entries named
``<link>_bbox`` with 6 numbers and ``<link>_pose`` with 7, e.g. the GemBench fork 3D-LOTUS uses); upstream
RLBench records none, and the episode then has no ``bbox_info``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from harness.data.episode import Episode
from harness.data.errors import DataError
from harness.data.formats import natural_key, parse_taskvar, register_source, visible_dirs
from harness.data.keyposes import KEYPOSE_RULES, peract_keyposes
from harness.safe_pickle import SafeUnpickler, safe_load

PERACT_CAMERAS = ("left_shoulder", "right_shoulder", "wrist", "front")
LOW_DIM_FILE = "low_dim_obs.pkl"
DESCRIPTIONS_FILE = "variation_descriptions.pkl"
VARIATION_NUMBER_FILE = "variation_number.pkl"
ALL_VARIATIONS = "all_variations"
DEPTH_SCALE = 2**24 - 1  # RLBench's float_array_to_rgb_image scale factor

_VARIATION_RE = re.compile(r"variation(\d+)")
_EPISODE_RE = re.compile(r"episode(\d+)")


# --------------------------------------------------------------------------------------------- pickles


class Observation:
    """Stand-in for ``rlbench.backend.observation.Observation``: pickle restores its ``__dict__``."""


class Demo:
    """Stand-in for ``rlbench.demo.Demo``: a list of ``Observation`` in ``_observations``."""

    def __len__(self) -> int:
        return len(self._observations)

    def __getitem__(self, i: int) -> Observation:
        return self._observations[i]

    def __iter__(self):
        return iter(self._observations)


_STANDINS = {
    ("rlbench.backend.observation", "Observation"): Observation,
    ("rlbench.demo", "Demo"): Demo,
}
# RLBench pickles hold only numpy arrays/scalars, builtin containers and the two classes above; the project's
# restricted unpickler (harness.safe_pickle) refuses every other global, so a hostile pickle runs no code.
_REFUSAL_HINT = "; RLBench files hold numpy arrays, builtin containers and rlbench Observation/Demo only"


class RLBenchUnpickler(SafeUnpickler):
    """``SafeUnpickler`` that maps rlbench ``Observation``/``Demo`` to the local stand-ins.

    Any other global raises ``DataError`` naming ``path`` (and ``key``) and the refused ``module.name``.
    """

    def __init__(self, file, path: object = None, key: object = None):
        super().__init__(file, allowed_extra=_STANDINS, path=path, key=key, hint=_REFUSAL_HINT)


def load_pickle(path: str | os.PathLike, key: object = None) -> object:
    """Unpickle an RLBench file with the restricted unpickler (``harness.safe_pickle``) and the stand-ins.

    Missing, unreadable or unsafe file -> ``DataError``."""
    return safe_load(Path(path), allowed_extra=_STANDINS, key=key, hint=_REFUSAL_HINT)


def load_demo(path: str | os.PathLike, key: object = None) -> Demo:
    """Load ``low_dim_obs.pkl`` -> ``Demo`` of at least one ``Observation``; otherwise ``DataError``."""
    demo = load_pickle(path, key)
    obs = getattr(demo, "_observations", None) if isinstance(demo, Demo) else None
    if not isinstance(obs, (list, tuple)):
        raise DataError(f"expected a pickled rlbench Demo, got {type(demo).__name__}", path, key)
    if len(obs) == 0:
        raise DataError("demo has no observations", path, key)
    for i, o in enumerate(obs):
        if not isinstance(o, Observation):
            raise DataError(f"demo step {i} is a {type(o).__name__}, not an rlbench Observation", path, key)
    return demo


# --------------------------------------------------------------------------------------------- geometry


def decode_depth(rgb: np.ndarray, near: float, far: float) -> np.ndarray:
    """RGB-packed depth (H, W, 3) uint8 -> (H, W) float32 metres.

    ``d01 = (R*65536 + G*256 + B) / (2**24 - 1)``, ``metres = near + d01 * (far - near)``.
    """
    img = np.asarray(rgb, dtype=np.float64)
    d01 = (img[..., 0] * 65536.0 + img[..., 1] * 256.0 + img[..., 2]) / DEPTH_SCALE
    return (near + d01 * (far - near)).astype(np.float32)


def decode_mask(rgb: np.ndarray) -> np.ndarray:
    """RGB-packed object handles (H, W, 3) uint8 -> (H, W) int32, ``R + 256*G + 65536*B``."""
    img = np.asarray(rgb, dtype=np.int32)
    return img[..., 0] + img[..., 1] * 256 + img[..., 2] * 65536


def read_depth_png(path: str | os.PathLike, near: float, far: float, key: object = None) -> np.ndarray:
    """Read one RLBench depth PNG -> (H, W) float32 metres (see ``decode_depth``)."""
    return decode_depth(read_png(path, key, packed=True), near, far)


def backproject(depth: np.ndarray, intrinsics: np.ndarray, extrinsics: np.ndarray) -> np.ndarray:
    """Depth (H, W) metres -> world points (H, W, 3) float32, exactly as PyRep does it.

    ``X = E[:3, :3] @ (K^-1 [u, v, 1]^T * depth) + E[:3, 3]`` with ``u`` = column, ``v`` = row (integer
    pixel indices, no +0.5). ``intrinsics`` K (3, 3) has negative focal lengths in RLBench, which is
    intended; ``extrinsics`` E (4, 4) is camera-to-world.
    """
    depth = np.asarray(depth, dtype=np.float64)
    h, w = depth.shape
    u, v = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    pix = np.stack([u, v, np.ones_like(u)], axis=0).reshape(3, -1) * depth.reshape(1, -1)
    cam = np.linalg.inv(np.asarray(intrinsics, dtype=np.float64)) @ pix
    e = np.asarray(extrinsics, dtype=np.float64)
    world = e[:3, :3] @ cam + e[:3, 3:4]
    return world.T.reshape(h, w, 3).astype(np.float32)


def read_png(path: str | os.PathLike, key: object = None, packed: bool = False) -> np.ndarray:
    """Read a PNG -> (H, W, 3) uint8. ``packed`` (depth, mask): the file must be 8-bit RGB, not converted."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            if im.mode != "RGB":
                if packed:  # converting would scramble the 24-bit value packed in R, G, B
                    raise DataError(f"expected an 8-bit RGB PNG with a packed value, got mode {im.mode!r}",
                                    path, key)
                im = im.convert("RGB")
            return np.array(im, dtype=np.uint8)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError("image not found", path, key) from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"cannot read image ({type(e).__name__}: {e})", path, key) from None


# --------------------------------------------------------------------------------------------- layout


def _is_variation_dir(path: Path) -> bool:
    return (path.is_dir() and (_VARIATION_RE.fullmatch(path.name) is not None or path.name == ALL_VARIATIONS)
            and (path / "episodes").is_dir())


def _is_task_dir(path: Path) -> bool:
    return any(_is_variation_dir(p) for p in visible_dirs(path))


def _level(path: Path) -> str | None:
    """"variation", "task" or "root" for the three accepted path levels; None otherwise."""
    if _is_variation_dir(path):
        return "variation"
    if _is_task_dir(path):
        return "task"
    if any(_is_task_dir(p) for p in visible_dirs(path)):
        return "root"
    return None


def _episode_dirs(episodes: Path) -> dict[str, Path]:
    """``episodes/`` -> {"episode<k>": folder} in natural order."""
    eps = {p.name: p for p in visible_dirs(episodes) if _EPISODE_RE.fullmatch(p.name)}
    return {k: eps[k] for k in sorted(eps, key=natural_key)}


@dataclass
class _TaskVar:
    task: str
    variation: int
    folder: Path  # variation<V>, or all_variations for the PerAct layout
    episodes: dict[str, Path] = field(default_factory=dict)

    @property
    def all_variations(self) -> bool:
        return self.folder.name == ALL_VARIATIONS


# --------------------------------------------------------------------------------------------- source


@register_source
class RLBenchRawSource:
    """Episodes from raw RLBench folders.

    ``RLBenchRawSource(path, cameras=None)``: ``path`` is a dataset root, a task folder or a variation
    folder; ``cameras`` (sequence of names) defaults to the four PerAct cameras
    ``("left_shoulder", "right_shoulder", "wrist", "front")`` and fixes the camera axis of image arrays.
    ``keyposes`` (``KEYPOSE_RULES``) and ``stopping_delta`` select the keypose variant (module docstring).
    """

    name = "rlbench_raw"

    def __init__(self, path: str | os.PathLike, cameras: Sequence[str] | str | None = None,
                 keyposes: str = "lotus", stopping_delta: float = 0.1):
        self.path = Path(path)
        if keyposes not in KEYPOSE_RULES:
            raise DataError(f"unknown keypose rule {keyposes!r}; choices: {list(KEYPOSE_RULES)}", self.path)
        if not stopping_delta > 0:
            raise DataError(f"stopping_delta must be > 0 rad/s, got {stopping_delta!r}", self.path)
        self.keyposes, self.stopping_delta = keyposes, float(stopping_delta)
        if not self.path.is_dir():
            raise DataError("RLBench data folder does not exist", self.path)
        self.level = _level(self.path)
        if self.level is None:
            raise DataError("not a raw RLBench folder: expected <root>/<task>/variation<V>/episodes/"
                            "episode<k> (or all_variations/episodes/...), pointing at the root, a task or "
                            "a variation", self.path)
        if cameras is None:
            cameras = PERACT_CAMERAS
        elif isinstance(cameras, str):
            cameras = [cameras]
        self.cameras = [str(c) for c in cameras]
        if not self.cameras or any(not c for c in self.cameras):
            raise DataError(f"cameras must be a non-empty list of camera names, got {cameras!r}", self.path)
        self._index_cache: dict[str, _TaskVar] | None = None
        self._instr_cache: dict[str, tuple[list[str], bool]] = {}

    @classmethod
    def detect(cls, path: str | os.PathLike) -> bool:
        """True when ``path`` is a raw RLBench root, task folder or variation folder."""
        try:
            return _level(Path(path)) is not None
        except OSError:
            return False

    # -------------------------------------------------------------------------------- index

    def _task_dirs(self) -> list[Path]:
        if self.level == "root":
            tasks = [p for p in visible_dirs(self.path) if _is_task_dir(p)]
            return sorted(tasks, key=lambda p: natural_key(p.name))
        if self.level == "task":
            return [self.path]
        return [self.path.parent]

    def _index(self) -> dict[str, _TaskVar]:
        if self._index_cache is not None:
            return self._index_cache
        index: dict[str, _TaskVar] = {}
        for task_dir in self._task_dirs():
            task = task_dir.name
            if self.level == "variation":
                var_dirs = [self.path]
            else:
                var_dirs = [p for p in visible_dirs(task_dir) if _is_variation_dir(p)]
                if any(p.name != ALL_VARIATIONS for p in var_dirs):
                    var_dirs = [p for p in var_dirs if p.name != ALL_VARIATIONS]
            for vdir in sorted(var_dirs, key=lambda p: natural_key(p.name)):
                episodes = _episode_dirs(vdir / "episodes")
                if vdir.name != ALL_VARIATIONS:
                    var = int(_VARIATION_RE.fullmatch(vdir.name).group(1))
                    index[f"{task}+{var}"] = _TaskVar(task, var, vdir, episodes)
                    continue
                for key, ep_dir in episodes.items():
                    var = self._variation_number(ep_dir, f"{task}/{key}")
                    tv = index.setdefault(f"{task}+{var}", _TaskVar(task, var, vdir))
                    tv.episodes[key] = ep_dir
        self._index_cache = {k: index[k] for k in sorted(index, key=natural_key)}
        return self._index_cache

    @staticmethod
    def _variation_number(ep_dir: Path, key: str) -> int:
        path = ep_dir / VARIATION_NUMBER_FILE
        if not path.is_file():
            raise DataError("an all_variations episode needs variation_number.pkl", path, key)
        var = load_pickle(path, key)
        if isinstance(var, np.ndarray) and var.size == 1:
            var = var.item()
        if isinstance(var, (bool, np.bool_)) or not isinstance(var, (int, np.integer)) or var < 0:
            raise DataError(f"variation number must be a non-negative int, got {var!r}", path, key)
        return int(var)

    def _entry(self, taskvar: str) -> _TaskVar:
        parse_taskvar(taskvar, self.path)
        index = self._index()
        if taskvar not in index:
            raise DataError(f"unknown task-variation {taskvar!r}; choices: {list(index)}", self.path, taskvar)
        return index[taskvar]

    def taskvars(self) -> list[str]:
        """Task-variations found, "task+V", in natural order."""
        return list(self._index())

    def episode_keys(self, taskvar: str) -> list[str]:
        """Episode names ("episode<k>") of ``taskvar``, in natural order."""
        return list(self._entry(taskvar).episodes)

    def taskvar_path(self, taskvar: str) -> Path:
        """The ``variation<V>`` (or ``all_variations``) folder that holds ``taskvar``'s episodes."""
        return self._entry(taskvar).folder

    def episode_path(self, taskvar: str, key: str) -> Path:
        """Folder of one episode; unknown key -> ``DataError``."""
        entry = self._entry(taskvar)
        if key not in entry.episodes:
            keys = list(entry.episodes)
            raise DataError(f"unknown episode {key!r} for {taskvar}; {len(keys)} episodes: {keys[:10]}"
                            + (" ..." if len(keys) > 10 else ""), entry.folder / "episodes", key)
        return entry.episodes[key]

    # -------------------------------------------------------------------------------- instructions

    def _instructions(self, taskvar: str, ep_dir: Path | None = None) -> tuple[list[str], bool]:
        """(instructions, fell_back). Falls back to the task name when the file is absent or not list[str]."""
        entry = self._entry(taskvar)
        candidates = [entry.folder / DESCRIPTIONS_FILE]
        if entry.all_variations:  # the PerAct fork writes the descriptions into each episode folder
            first = ep_dir if ep_dir is not None else next(iter(entry.episodes.values()), None)
            candidates = ([first / DESCRIPTIONS_FILE] if first is not None else []) + candidates
        path = next((p for p in candidates if p.is_file()), None)
        cache_key = f"{taskvar}:{path}"
        if cache_key in self._instr_cache:
            return self._instr_cache[cache_key]
        texts = None
        if path is not None:
            obj = load_pickle(path, taskvar)
            if isinstance(obj, (list, tuple)) and obj and all(isinstance(s, str) for s in obj):
                texts = [str(s) for s in obj]
        result = (texts, False) if texts is not None else ([entry.task.replace("_", " ")], True)
        self._instr_cache[cache_key] = result
        return result

    def instructions(self, taskvar: str) -> list[str]:
        """Language instructions of ``taskvar`` (``variation_descriptions.pkl``), or ``[task with spaces]``
        when that file is missing or does not hold a list of strings (as in RLBench's own test asset)."""
        return list(self._instructions(taskvar)[0])

    # -------------------------------------------------------------------------------- episodes

    def _camera_dir(self, ep_dir: Path, cam: str, kind: str, n_steps: int, key: str,
                    required: bool = True) -> Path | None:
        """``<cam>_<kind>`` folder, checked to hold one PNG per demo step; None if optional and absent."""
        folder = ep_dir / f"{cam}_{kind}"
        if not folder.is_dir():
            if not required:
                return None
            raise DataError(f"camera folder {folder.name} is missing (cameras: {self.cameras})", folder, key)
        n = sum(1 for name in os.listdir(folder) if name.endswith(".png") and not name.startswith("."))
        if n != n_steps:
            raise DataError(f"camera folder has {n} PNG images but the demo has {n_steps} steps", folder, key)
        return folder

    def read_episode(self, taskvar: str, key: str) -> Episode:
        """Read one episode's keyframes.

        Returns an ``Episode`` with T keyframes (frame 0 + PerAct keyposes) and n_cam = len(cameras):
        ``actions`` (T, 8) float32 ``[x, y, z, qx, qy, qz, qw, open]``; ``key_frameids`` (T,) demo indices;
        ``rgb_images`` (T, n_cam, H, W, 3) uint8; ``depth`` (T, n_cam, H, W) float32 metres; ``point_maps``
        (T, n_cam, H, W, 3) float32 world xyz; ``mask`` (T, n_cam, H, W) int32 object handles when every
        camera has a ``<cam>_mask`` folder, else None. ``extra``: ``instructions`` (list[str]),
        ``instructions_fallback`` (bool), ``cameras``, ``demo_length``, ``path``.
        """
        task, var = parse_taskvar(taskvar, self.path)
        ep_dir = self.episode_path(taskvar, key)
        where = f"{taskvar}/{key}"
        low_dim = ep_dir / LOW_DIM_FILE
        demo = load_demo(low_dim, where)
        n = len(demo)

        gripper_open = np.array([_scalar(o, "gripper_open", i, low_dim, where) for i, o in enumerate(demo)])
        joint_vel = _stack(demo, "joint_velocities", None, low_dim, where)
        gripper_pose = _stack(demo, "gripper_pose", (7,), low_dim, where)
        bad = np.flatnonzero(~np.isfinite(gripper_pose).all(axis=1))
        if bad.size:
            raise DataError(f"non-finite gripper pose at step {bad[0]}: {gripper_pose[bad[0]].tolist()}",
                            low_dim, f"{where}/obs[{bad[0]}].gripper_pose")
        frames = [0] + [int(i) for i in peract_keyposes(gripper_open, joint_vel, self.stopping_delta,
                                                        rule=self.keyposes)]

        rgb_dirs = [self._camera_dir(ep_dir, c, "rgb", n, where) for c in self.cameras]
        depth_dirs = [self._camera_dir(ep_dir, c, "depth", n, where) for c in self.cameras]
        mask_dirs = [self._camera_dir(ep_dir, c, "mask", n, where, required=False) for c in self.cameras]
        with_mask = all(d is not None for d in mask_dirs)

        rgbs, depths, points, masks = [], [], [], []
        size = None
        for t in frames:
            misc = getattr(demo[t], "misc", None)
            if not isinstance(misc, dict):
                raise DataError(f"step {t} has no misc dict with camera parameters", low_dim,
                                f"{where}/obs[{t}].misc")
            row_rgb, row_depth, row_pts, row_mask = [], [], [], []
            for c, cam in enumerate(self.cameras):
                near, far, K, E = _camera_params(misc, cam, low_dim, f"{where}/obs[{t}].misc")
                rgb_path, depth_path = rgb_dirs[c] / f"{t}.png", depth_dirs[c] / f"{t}.png"
                rgb = read_png(rgb_path, where)
                depth = decode_depth(read_png(depth_path, where, packed=True), near, far)
                for p, shape in ((rgb_path, rgb.shape[:2]), (depth_path, depth.shape)):
                    size = size or shape
                    if shape != size:
                        raise DataError(f"image is {shape[0]}x{shape[1]}, other images of this episode are "
                                        f"{size[0]}x{size[1]}", p, where)
                row_rgb.append(rgb)
                row_depth.append(depth)
                row_pts.append(backproject(depth, K, E))
                if with_mask:
                    mask_path = mask_dirs[c] / f"{t}.png"
                    mask = decode_mask(read_png(mask_path, where, packed=True))
                    if mask.shape != size:
                        raise DataError(f"mask is {mask.shape}, images are {size}", mask_path, where)
                    row_mask.append(mask)
            rgbs.append(np.stack(row_rgb))
            depths.append(np.stack(row_depth))
            points.append(np.stack(row_pts))
            if with_mask:
                masks.append(np.stack(row_mask))

        bbox_info, pose_info = _link_boxes([demo[t].misc for t in frames], low_dim, where)
        actions = np.concatenate([gripper_pose[frames], gripper_open[frames, None]], axis=1)
        actions = actions.astype(np.float32)
        instructions, fallback = self._instructions(taskvar, ep_dir)
        return Episode(
            task=task, variation=var, episode=key, actions=actions, key_frameids=frames,
            rgb_images=np.stack(rgbs), point_maps=np.stack(points), depth=np.stack(depths),
            mask=np.stack(masks) if with_mask else None, bbox_info=bbox_info, pose_info=pose_info,
            extra={"instructions": list(instructions), "instructions_fallback": fallback,
                   "cameras": list(self.cameras), "demo_length": n, "path": str(ep_dir)},
        )


# --------------------------------------------------------------------------------------------- helpers


def _scalar(obs: Observation, name: str, i: int, path: Path, where: str) -> float:
    value = getattr(obs, name, None)
    try:
        return float(np.asarray(value, dtype=np.float64).reshape(()))
    except (TypeError, ValueError):
        raise DataError(f"expected a number, got {value!r}", path, f"{where}/obs[{i}].{name}") from None


def _stack(demo: Iterable[Observation], name: str, shape: tuple[int, ...] | None, path: Path,
           where: str) -> np.ndarray:
    """Stack ``obs.<name>`` over the demo -> (T, *shape) float64; missing or misshapen -> DataError."""
    rows = []
    for i, obs in enumerate(demo):
        value = getattr(obs, name, None)
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            arr = None
        if value is None or arr is None or arr.ndim != 1 or (shape is not None and arr.shape != shape) \
                or (rows and arr.shape != rows[0].shape):
            expected = shape if shape is not None else (rows[0].shape if rows else "a 1-D array")
            raise DataError(f"expected {expected}, got {value!r}", path, f"{where}/obs[{i}].{name}")
        rows.append(arr)
    return np.stack(rows)


def _link_boxes(miscs: list[dict], path: Path, where: str) -> tuple[dict | None, dict | None]:
    """({"<link>_bbox": (T, 6)}, {"<link>_pose": (T, 7)}) from the keyframes' ``misc``, or (None, None)
    when the recording stored no link boxes. An entry must be present with its size at every keyframe."""
    names = sorted(k for k in miscs[0] if isinstance(k, str) and k.endswith(("_bbox", "_pose")))
    if not names:
        return None, None
    out: dict[str, np.ndarray] = {}
    for name in names:
        size = 6 if name.endswith("_bbox") else 7
        rows = []
        for t, misc in enumerate(miscs):
            try:
                arr = np.asarray(misc.get(name), dtype=np.float64).reshape(-1)
            except (TypeError, ValueError):
                arr = None
            if arr is None or arr.shape != (size,) or not np.isfinite(arr).all():
                raise DataError(f"link box entry {name!r} must hold {size} finite numbers at every keyframe, "
                                f"got {misc.get(name)!r:.80} at keyframe {t}", path, f"{where}[{name}]")
            rows.append(arr)
        out[name] = np.stack(rows).astype(np.float32)
    return ({k: v for k, v in out.items() if k.endswith("_bbox")} or None,
            {k: v for k, v in out.items() if k.endswith("_pose")} or None)


def _camera_params(misc: dict, cam: str, path: Path,
                   where: str) -> tuple[float, float, np.ndarray, np.ndarray]:
    """(near, far, K (3, 3), E (4, 4)) of camera ``cam`` from one step's ``misc``."""
    out = []
    for suffix, shape in (("near", ()), ("far", ()), ("intrinsics", (3, 3)), ("extrinsics", (4, 4))):
        name = f"{cam}_camera_{suffix}"
        if name not in misc:
            raise DataError(f"misc has no {name!r} (camera {cam!r} not recorded?)", path, f"{where}[{name}]")
        try:
            arr = np.asarray(misc[name], dtype=np.float64)
        except (TypeError, ValueError):
            arr = None
        if arr is None or arr.shape != shape or not np.isfinite(arr).all():
            raise DataError(f"expected finite values of shape {shape}, got {misc[name]!r}", path,
                            f"{where}[{name}]")
        out.append(float(arr) if shape == () else arr)
    near, far, K, E = out
    if not far > near:
        raise DataError(f"far ({far}) must exceed near ({near})", path, f"{where}[{cam}_camera_far]")
    if abs(np.linalg.det(K)) < 1e-12:
        raise DataError(f"intrinsics are singular: {K.tolist()}", path, f"{where}[{cam}_camera_intrinsics]")
    return near, far, K, E
