"""One recorded demonstration -> one "keysteps" LMDB value (3D-LOTUS layout, see formats/lotus_lmdb.py).

Only the keyframes are rendered: each keyframe's recorded physics state is restored into the env and the
cameras render it (identical, pixel for pixel, to rendering during the rollout; checked in the tests).
"""

from __future__ import annotations

import numpy as np

from harness.data.formats.lotus_lmdb import keysteps_value
from harness.data.metaworld.render import Frame, KeyframeRenderer
from harness.data.metaworld.rollout import Demo, restore_state


def render_keyframes(env, renderer: KeyframeRenderer, demo: Demo, keyframes: list[int]) -> Frame:
    """Render ``keyframes`` of ``demo``; returns a ``Frame`` whose arrays gain a leading T axis:
    rgb (T, n_cam, H, W, 3) uint8, depth (T, n_cam, H, W) float32, mask (T, n_cam, H, W) int32,
    pc (T, n_cam, H, W, 3) float32. Leaves ``env.data`` at the last keyframe's state."""
    if not keyframes:
        raise ValueError(f"no keyframes to render for {demo.task} seed {demo.seed}")
    if keyframes[0] < 0 or keyframes[-1] >= len(demo):
        raise ValueError(f"keyframes {keyframes} outside the demo's {len(demo)} frames")
    frames = []
    for f in keyframes:
        restore_state(env, demo.states[f])
        frames.append(renderer.render(env.data))
    return Frame(*(np.stack([getattr(fr, k) for fr in frames]) for k in ("rgb", "depth", "mask", "pc")))


def demo_to_keysteps(env, renderer: KeyframeRenderer, demo: Demo, keyframes: list[int],
                     key: str | None = None) -> dict:
    """The "keysteps" value of ``demo`` at ``keyframes``: rgb, pc, depth, mask as rendered, ``action``
    (T, 8) float32 = demo poses [hand xyz, quat xyzw, physical open] at the keyframes, ``key_frameids``."""
    frame = render_keyframes(env, renderer, demo, keyframes)
    return keysteps_value(frame.rgb, frame.pc, demo.poses[keyframes].astype(np.float32), list(keyframes),
                          depth=frame.depth, mask=frame.mask, key=key)
