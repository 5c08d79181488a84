"""Shared test fixtures: a tiny synthetic 3D-LOTUS dataset written in code, and helpers to corrupt it.

Layout written by ``make_dataset(root)`` (the layout of a dataset written by ``mdh data metaworld``):

    root/meta.json  root/taskvars.json  root/taskvars_instructions.json  root/instr_embeds_hash.npy
    root/train/keysteps/<task>+<var>/   (LMDB, "keysteps" values)
    root/train/voxel1cm/<task>+<var>/   (LMDB, "voxel1cm" values made by keysteps_to_voxel_value)

Helpers are reached through the ``synth`` fixture (``synth.make_dataset(...)``, ``synth.put_raw(...)``) so
test modules need no imports from the tests folder.
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass, field
from pathlib import Path

import lmdb
import numpy as np
import pytest

from harness.data.formats.instructions import write_instr_embeds, write_taskvar_instructions, write_taskvars
from harness.data.formats.lotus_lmdb import (
    LmdbWriter,
    close_readonly,
    keysteps_to_voxel_value,
    keysteps_value,
)
from harness.data.meta import DatasetMeta
from harness.data.text import HashTextEncoder

# Semantic ids used in the synthetic masks: 0/1/2 objects, 5 an arm link, 6 the gripper.
ROBOT_LABELS = [5, 6]
GRIPPER_LABELS = [6]
LABEL_CHOICES = np.array([0, 1, 2, 5, 6])

TASKVARS = ["push_box+0", "reach_red+0", "reach_red+1"]
INSTRUCTIONS = {
    "push_box+0": ["push the box", "slide the box forward to the goal"],
    "reach_red+0": ["reach the red target", "touch red"],
    "reach_red+1": ["reach the blue target", "move the gripper to the blue ball now"],
}


def synthetic_meta(n_cam: int = 2, image_size: tuple[int, int] = (8, 12)) -> DatasetMeta:
    return DatasetMeta(
        source="synthetic",
        generator_version="tests",
        workspace_bounds=((-0.5, -0.5, -0.05), (0.5, 0.5, 0.7)),
        table_height=0.0,
        table_margin=0.0005,
        robot_base=(0.0, 0.0, 0.0),
        cameras=[f"cam{i}" for i in range(n_cam)],
        image_size=image_size,
        voxel_size=0.01,
        robot_labels=list(ROBOT_LABELS),
        gripper_labels=list(GRIPPER_LABELS),
        keypose_method="peract",
    )


def random_quats(rng: np.random.Generator, n: int) -> np.ndarray:
    q = rng.standard_normal((n, 4))
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def make_actions(rng: np.random.Generator, T: int) -> np.ndarray:
    """(T, 8) float32 [xyz in the workspace, unit quat xyzw, open 0/1]."""
    pos = rng.uniform([-0.3, -0.3, 0.1], [0.3, 0.3, 0.5], size=(T, 3))
    opened = (np.arange(T) % 2 == 0).astype(np.float64)[:, None]
    return np.concatenate([pos, random_quats(rng, T), opened], axis=1).astype(np.float32)


def make_keysteps_value(rng: np.random.Generator, T: int, n_cam: int = 2, H: int = 8, W: int = 12,
                        with_mask: bool = True, with_boxes: bool = True) -> dict:
    """A valid "keysteps" value: some points fall outside the workspace and some on/below the table."""
    rgb = rng.integers(0, 256, size=(T, n_cam, H, W, 3), dtype=np.uint8)
    pc = rng.uniform([-0.6, -0.6, -0.1], [0.6, 0.6, 0.8], size=(T, n_cam, H, W, 3)).astype(np.float32)
    depth = rng.uniform(0.0, 1.0, size=(T, n_cam, H, W)).astype(np.float32)
    mask = rng.choice(LABEL_CHOICES, size=(T, n_cam, H, W)).astype(np.int32) if with_mask else None
    bbox = pose = None
    if with_boxes:
        bbox = {f"Panda_link{i}_visual_bbox": np.tile([-0.05, 0.05, -0.05, 0.05, 0.0, 0.1], (T, 1))
                for i in range(2)}
        pose = {f"Panda_link{i}_visual_pose": np.tile([0.0, 0.0, 0.1 * i, 0, 0, 0, 1], (T, 1))
                for i in range(2)}
    return keysteps_value(rgb, pc, make_actions(rng, T), list(range(0, 10 * T, 10)), depth=depth, mask=mask,
                          bbox_info=bbox, pose_info=pose)


def episode_lengths(taskvars=TASKVARS, episodes: int = 2) -> dict[str, dict[str, int]]:
    """T of every episode: 3, 4, 3, 4, ... so the keystep count is not a multiple of anything."""
    out, k = {}, 0
    for tv in taskvars:
        out[tv] = {}
        for e in range(episodes):
            out[tv][f"episode{e}"] = 3 + (k % 2)
            k += 1
    return out


@dataclass
class SyntheticDataset:
    root: Path
    meta: DatasetMeta
    lengths: dict[str, dict[str, int]]
    keysteps: dict[str, dict[str, dict]] = field(default_factory=dict)
    voxel: dict[str, dict[str, dict]] = field(default_factory=dict)
    instructions: dict[str, list[str]] = field(default_factory=dict)
    embeds: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def taskvars(self) -> list[str]:
        return sorted(self.lengths)

    @property
    def num_episodes(self) -> int:
        return sum(len(v) for v in self.lengths.values())

    @property
    def num_keysteps(self) -> int:
        return sum(T - 1 for v in self.lengths.values() for T in v.values())

    def lmdb_path(self, kind: str, taskvar: str) -> Path:
        return self.root / "train" / kind / taskvar


def make_dataset(root: Path, taskvars=TASKVARS, episodes: int = 2, seed: int = 0, n_cam: int = 2,
                 H: int = 8, W: int = 12, kinds=("keysteps", "voxel1cm"),
                 text: bool = True) -> SyntheticDataset:
    """Write a tiny dataset under ``root`` (layout in the module docstring) and return what was written."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    meta = synthetic_meta(n_cam, (H, W))
    meta.save(root)
    ds = SyntheticDataset(root=root, meta=meta, lengths=episode_lengths(taskvars, episodes))
    for tv, eps in ds.lengths.items():
        ds.keysteps[tv], ds.voxel[tv] = {}, {}
        for key, T in eps.items():
            ds.keysteps[tv][key] = make_keysteps_value(rng, T, n_cam, H, W)
            ds.voxel[tv][key] = keysteps_to_voxel_value(ds.keysteps[tv][key], meta)
        for kind, values in (("keysteps", ds.keysteps[tv]), ("voxel1cm", ds.voxel[tv])):
            if kind in kinds:
                with LmdbWriter(ds.lmdb_path(kind, tv)) as w:
                    for key, value in values.items():
                        w.put(key, value)
    if text:
        ds.instructions = {tv: list(INSTRUCTIONS.get(tv, [tv.split("+")[0].replace("_", " ")]))
                           for tv in ds.lengths}
        write_taskvars(root / "taskvars.json", list(ds.lengths))
        write_taskvar_instructions(root / "taskvars_instructions.json", ds.instructions)
        texts = sorted({s for v in ds.instructions.values() for s in v})
        ds.embeds = dict(zip(texts, HashTextEncoder().encode(texts)))
        write_instr_embeds(root / "instr_embeds_hash.npy", ds.embeds)
    return ds


def put_raw(lmdb_dir: Path, key: str, data: bytes) -> None:
    """Write raw bytes under ``key`` (bypassing every check), creating the LMDB if needed."""
    lmdb_dir.mkdir(parents=True, exist_ok=True)
    close_readonly(lmdb_dir)  # py-lmdb refuses a second handle while our readers hold one
    with lmdb.open(str(lmdb_dir), map_size=1 << 26) as env, env.begin(write=True) as txn:
        txn.put(key.encode("ascii"), data)


@pytest.fixture(scope="session")
def synth():
    """Namespace of the factory helpers above."""
    return types.SimpleNamespace(
        make_dataset=make_dataset, make_keysteps_value=make_keysteps_value, make_actions=make_actions,
        synthetic_meta=synthetic_meta, put_raw=put_raw, original_msgpack=original_msgpack,
        random_quats=random_quats, TASKVARS=TASKVARS, INSTRUCTIONS=INSTRUCTIONS, ROBOT_LABELS=ROBOT_LABELS,
        GRIPPER_LABELS=GRIPPER_LABELS,
    )


@pytest.fixture(scope="session")
def dataset_root(tmp_path_factory) -> SyntheticDataset:
    """One good synthetic dataset shared (read-only) by the whole session."""
    return make_dataset(tmp_path_factory.mktemp("synthetic"))


@contextlib.contextmanager
def original_msgpack():
    """``msgpack_numpy.patch()`` as the original code calls it, undone on exit (msgpack_numpy has no unpatch,
    and the patch is global: left in place it would change what every later test encodes)."""
    import msgpack
    import msgpack_numpy

    names = ("Packer", "Unpacker", "load", "loads", "dump", "dumps", "pack", "packb", "unpack", "unpackb")
    saved = {n: getattr(msgpack, n) for n in names}
    msgpack_numpy.patch()
    try:
        yield msgpack
    finally:
        for n, v in saved.items():
            setattr(msgpack, n, v)


@pytest.fixture
def msgpack_patched():
    with original_msgpack() as msgpack:
        yield msgpack


@pytest.fixture
def fake_rlbench(monkeypatch) -> types.SimpleNamespace:
    """Importable stand-in rlbench modules, so a test can pickle Demo/Observation under their real names.
    Returns a namespace: ``Observation``, ``Demo`` and ``copy_demo(loaded_demo)``; the modules leave
    sys.modules after the test."""
    import sys

    obs_cls = type("Observation", (), {"__module__": "rlbench.backend.observation"})
    demo_cls = type("Demo", (), {"__module__": "rlbench.demo"})
    mods = {n: types.ModuleType(n) for n in ("rlbench", "rlbench.backend", "rlbench.backend.observation",
                                             "rlbench.demo")}
    mods["rlbench.backend.observation"].Observation = obs_cls
    mods["rlbench.demo"].Demo = demo_cls
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)

    def copy_demo(real):
        """A loaded (stand-in) demo rebuilt with these classes, so it pickles under RLBench's names."""
        demo = demo_cls()
        demo._observations = []
        for o in real:
            new = obs_cls()
            new.__dict__.update(vars(o))
            demo._observations.append(new)
        return demo

    return types.SimpleNamespace(Observation=obs_cls, Demo=demo_cls, copy_demo=copy_demo)


@pytest.fixture
def one_thread():
    """One intra-op torch thread for the test (restored after): tiny models run faster, and exactly, so."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def generate_metaworld_suite(out: Path, tasks: list[str], episodes: int = 2, image_size: int = 32,
                             **kwargs) -> Path:
    """A small embedded Meta-World suite at ``out`` (skips the test when no offscreen GL back end works)."""
    from harness.data.metaworld import scene
    from harness.data.metaworld.generate import generate_suite

    try:
        scene.check_gl()
    except RuntimeError as e:
        pytest.skip(str(e))
    generate_suite(out, tasks=tasks, episodes=episodes, image_size=image_size, seed=0, progress=False, **kwargs)
    return out


@pytest.fixture(scope="session")
def metaworld():
    """Namespace of the Meta-World helpers above (``metaworld.generate_suite(out, tasks)``)."""
    return types.SimpleNamespace(generate_suite=generate_metaworld_suite)
