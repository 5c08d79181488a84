"""The embedded Meta-World suite: scripted-expert demonstrations rendered into the 3D-LOTUS LMDB formats.

``generate_suite(out, tasks="mt10", episodes=20, ...)`` (in ``generate.py``) writes a dataset that the
``lotus_lmdb`` source reads, with a ``meta.json`` describing it. One idea per module:

- ``tasks``: task names (``mt10``, ``mt50``), expert policies, split seeds;
- ``scene``: the environment with our cameras, seeded resets, table/workspace/robot facts, body labels;
- ``cameras``: camera placement, intrinsics/extrinsics, depth back-projection;
- ``render``: RGB, metric depth, body-id segmentation and world point maps at keyframes;
- ``rollout``: recording one expert demonstration (states, poses, physical gripper state) and keyframes;
- ``keysteps``: a demonstration's keyframes rendered into a 3D-LOTUS "keysteps" value;
- ``replay``: the move-then-actuate oracle that replays extracted keyposes;
- ``instructions``: templated instruction paraphrases for all 50 Meta-World v3 tasks;
- ``generate``: the resumable dataset writer.

Rendering back end: ``MUJOCO_GL`` defaults to ``egl`` (set here with ``os.environ.setdefault``, so it only
takes effect if nothing imported ``mujoco`` earlier). EGL works on stock Debian/Ubuntu images with
``libegl-mesa0`` + ``libgl1-mesa-dri`` (CPU llvmpipe) or with an NVIDIA driver. Fallback when EGL is not
available: ``apt-get install libosmesa6`` and run with ``MUJOCO_GL=osmesa PYOPENGL_PLATFORM=osmesa``
(same images, similar speed on CPU). ``scene.check_gl()`` renders one tiny frame and raises a
``RuntimeError`` that says which back end failed and how to switch.
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")

__all__ = ["MT10", "generate_suite", "resolve_tasks"]


def __getattr__(name: str):
    # Lazy: importing this package must not import metaworld/mujoco (optional extra, tests skip without it).
    if name == "generate_suite":
        from harness.data.metaworld.generate import generate_suite

        return generate_suite
    if name in ("resolve_tasks", "MT10"):
        from harness.data.metaworld import tasks

        return getattr(tasks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
