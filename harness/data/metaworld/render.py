"""RGB, metric depth, body-label segmentation and world point maps from our fixed cameras.

Fast settings (../shared/reference/rlbench_and_metaworld.md §3.2): shadows, reflections and multisampling
off (``offsamples = 0`` must be set before the GL context is made), about 10 ms per 128 px image on CPU.

Segmentation: each pixel gets the label (``scene.body_labels``) of the body that owns the rendered geom or
site; pixels that show no geometry get ``scene.BACKGROUND`` (-1). Visible sites are the goal markers
(attached to the world body, label 0) and the Sawyer's red fingertip markers (their finger bodies).
Background pixels read as the far plane (``zfar * extent``, about 113 m); their point-map entries are left
there (finite, far outside the workspace box, so the workspace crop drops them) and ``mask`` marks them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from harness.data.metaworld.cameras import CameraSpec, camera_to_world, depth_to_world, intrinsics
from harness.data.metaworld.scene import BACKGROUND, body_labels


@dataclass
class Frame:
    """One rendered time step. ``rgb`` (n_cam, H, W, 3) uint8; ``depth`` (n_cam, H, W) float32 metres;
    ``mask`` (n_cam, H, W) int32 body labels (-1 background); ``pc`` (n_cam, H, W, 3) float32 world xyz."""

    rgb: np.ndarray
    depth: np.ndarray
    mask: np.ndarray
    pc: np.ndarray


class KeyframeRenderer:
    """Renders an env's ``model``/``data`` from ``cameras`` at ``size`` x ``size`` px. A context manager.

    The env's data is read, never changed: ``render(data)`` renders the state ``data`` holds now (its
    kinematics must be current, e.g. after ``mj_forward``).
    """

    def __init__(self, model, cameras: tuple[CameraSpec, ...], size: int):
        import mujoco

        if size < 8:
            raise ValueError(f"image size must be >= 8 px, got {size}")
        if size > min(model.vis.global_.offwidth, model.vis.global_.offheight):
            buf = f"{model.vis.global_.offwidth}x{model.vis.global_.offheight}"
            raise ValueError(f"image size {size} exceeds the offscreen buffer {buf}; "
                             f"build the env with make_env(max_image_size={size})")
        self._mujoco = mujoco
        self.model = model
        self.cameras = tuple(cameras)
        self.size = int(size)
        self.cam_ids = []
        for cam in self.cameras:
            cid = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, cam.name)
            if cid < 0:
                raise ValueError(f"camera {cam.name!r} is not in the model; "
                                 "build the env with scene.make_env")
            self.cam_ids.append(cid)
        self.K = [intrinsics(float(model.cam_fovy[c]), self.size, self.size) for c in self.cam_ids]
        model.vis.quality.offsamples = 0  # no MSAA: read by the GL context created just below
        try:
            self._renderer = mujoco.Renderer(model, self.size, self.size)
        except Exception as e:  # mujoco.FatalError, EGL/OSMesa errors
            raise RuntimeError(
                f"cannot create an offscreen MuJoCo renderer ({type(e).__name__}: {e}). MuJoCo picks its GL "
                f"back end when first imported (MUJOCO_GL is now {os.environ.get('MUJOCO_GL')!r}): import "
                "harness.data.metaworld before mujoco, or export MUJOCO_GL=egl (fallback: apt-get install "
                "libosmesa6; MUJOCO_GL=osmesa PYOPENGL_PLATFORM=osmesa)") from e
        flags = self._renderer.scene.flags
        flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        self._labels = body_labels(model)
        # Segmentation ids -> labels: geoms and sites map to their body's label; anything else is background.
        self._geom_label = self._labels[model.geom_bodyid]
        self._site_label = self._labels[model.site_bodyid]

    def render(self, data) -> Frame:
        """Render every camera from the current state of ``data``."""
        n, s = len(self.cameras), self.size
        rgb = np.empty((n, s, s, 3), dtype=np.uint8)
        depth = np.empty((n, s, s), dtype=np.float32)
        mask = np.empty((n, s, s), dtype=np.int32)
        pc = np.empty((n, s, s, 3), dtype=np.float32)
        r = self._renderer
        for i, cid in enumerate(self.cam_ids):
            r.update_scene(data, camera=cid)
            r.disable_depth_rendering()
            r.disable_segmentation_rendering()
            rgb[i] = r.render()
            r.enable_depth_rendering()
            depth[i] = r.render()
            r.disable_depth_rendering()
            r.enable_segmentation_rendering()
            mask[i] = self._seg_to_labels(r.render())
            r.disable_segmentation_rendering()
            T = camera_to_world(data.cam_xpos[cid], data.cam_xmat[cid])
            pc[i] = depth_to_world(depth[i], self.K[i], T)
        return Frame(rgb=rgb, depth=depth, mask=mask, pc=pc)

    def render_rgb(self, data, index: int = 0) -> np.ndarray:
        """(H, W, 3) uint8 RGB of camera ``index`` only (videos: one camera per env step)."""
        r = self._renderer
        r.update_scene(data, camera=self.cam_ids[index])
        r.disable_depth_rendering()
        r.disable_segmentation_rendering()
        return r.render().copy()

    def _seg_to_labels(self, seg: np.ndarray) -> np.ndarray:
        # seg (H, W, 2) int32 [object id, object type]; (-1, -1) where nothing was drawn.
        mj = self._mujoco
        objid, objtype = seg[..., 0], seg[..., 1]
        out = np.full(objid.shape, BACKGROUND, dtype=np.int32)
        geom = objtype == int(mj.mjtObj.mjOBJ_GEOM)
        site = objtype == int(mj.mjtObj.mjOBJ_SITE)
        other = ~(geom | site) & (objid != -1)
        if other.any():  # e.g. tendons or flexes, which metaworld models do not have
            kinds = sorted({mj.mjtObj(int(t)).name for t in np.unique(objtype[other])})
            raise ValueError(f"segmentation shows objects of type {kinds}; "
                             "only geoms and sites have body labels")
        out[geom] = self._geom_label[objid[geom]]
        out[site] = self._site_label[objid[site]]
        return out

    def camera_poses(self, data) -> np.ndarray:
        """(n_cam, 4, 4) camera-to-world transforms (OpenCV axes) at the state in ``data``."""
        return np.stack([camera_to_world(data.cam_xpos[c], data.cam_xmat[c]) for c in self.cam_ids])

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None

    def __enter__(self) -> KeyframeRenderer:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc) -> None:
        self.close()
