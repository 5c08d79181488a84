"""Our four fixed cameras around the Meta-World table, and the pinhole geometry that turns depth into points.

The built-in ``corner*`` cameras render upside down or rotated (inverted up-vectors in metaworld's
``xyz_base.xml``, Metaworld issues #505/#516), so we add our own to the model spec before compiling
(``scene.make_env``). Each is placed by an eye point and a look-at target with the world z axis as "up",
which keeps images upright (checked by eye on rendered PNGs).

World frame (metaworld): the Sawyer's base is at the origin, the table top is the plane z = 0 spanning
x in [-0.7, 0.7], y in [0.2, 1.0]; the robot reaches along +y. "left"/"right" are the robot's left (-x)
and right (+x).

Conventions:
- ``K`` (3, 3) is the OpenCV intrinsic matrix for continuous pixel coordinates in which the centre of pixel
  (row v, column u) is at (u + 0.5, v + 0.5): ``f = 0.5 * H / tan(fovy / 2)``, ``cx = W / 2``, ``cy = H / 2``.
- ``T`` (4, 4) is camera-to-world for the OpenCV camera axes (x right, y down, z forward):
  ``T[:3, :3] = cam_xmat @ diag(1, -1, -1)`` (MuJoCo cameras look down -z with +y up),
  ``T[:3, 3] = cam_xpos``.
- Depth is MuJoCo's metric depth: distance along the optical axis (eye-space z), not along the ray.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_MJ_TO_CV = np.diag([1.0, -1.0, -1.0])


@dataclass(frozen=True)
class CameraSpec:
    """A fixed world camera: ``eye`` and ``target`` (x, y, z) metres, vertical field of view in degrees."""

    name: str
    eye: tuple[float, float, float]
    target: tuple[float, float, float]
    fovy: float = 50.0


# Order = the camera axis of every image array (DatasetMeta.cameras). Chosen so that every point of the
# table workspace (|x| < 0.5, 0.4 < y < 1.0, z < 0.4) is seen by at least two cameras and the arm rarely
# hides the object in all of them: a view facing the robot, two from behind its shoulders, one from above.
CAMERAS: tuple[CameraSpec, ...] = (
    CameraSpec("front", eye=(0.0, 1.55, 0.65), target=(0.0, 0.6, 0.1)),
    CameraSpec("left_shoulder", eye=(-0.8, 0.2, 0.65), target=(0.0, 0.7, 0.05)),
    CameraSpec("right_shoulder", eye=(0.8, 0.2, 0.65), target=(0.0, 0.7, 0.05)),
    CameraSpec("overhead", eye=(0.0, 0.95, 1.25), target=(0.0, 0.62, 0.0)),
)


def look_at_quat(eye, target, up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """(4,) wxyz quaternion of a MuJoCo camera at ``eye`` looking at ``target`` with ``up`` up in the image.

    MuJoCo cameras look along their -z axis with +y up, so the camera frame columns are
    x = forward x up (image right), y = z x x (image up), z = -forward.
    """
    eye, target, up = (np.asarray(v, dtype=np.float64) for v in (eye, target, up))
    forward = target - eye
    norm = np.linalg.norm(forward)
    if norm < 1e-9:
        raise ValueError(f"camera eye {eye.tolist()} and target {target.tolist()} coincide")
    forward /= norm
    x = np.cross(forward, up)
    if np.linalg.norm(x) < 1e-6:
        raise ValueError(f"camera looks along its up vector {up.tolist()}; pick another up or target")
    x /= np.linalg.norm(x)
    z = -forward
    y = np.cross(z, x)
    return _mat_to_quat_wxyz(np.stack([x, y, z], axis=1))


def _mat_to_quat_wxyz(rot: np.ndarray) -> np.ndarray:
    import mujoco

    quat = np.zeros(4)
    mujoco.mju_mat2Quat(quat, np.ascontiguousarray(rot, dtype=np.float64).reshape(-1))
    return quat


def add_cameras(spec, cameras: tuple[CameraSpec, ...] = CAMERAS) -> None:
    """Add ``cameras`` as fixed world cameras to a ``mujoco.MjSpec`` (before ``spec.compile()``)."""
    existing = {c.name for c in spec.cameras}
    for cam in cameras:
        if cam.name in existing:
            raise ValueError(f"camera name {cam.name!r} already exists in the model "
                             f"(cameras: {sorted(existing)})")
        quat = look_at_quat(cam.eye, cam.target)
        spec.worldbody.add_camera(name=cam.name, pos=list(cam.eye), quat=list(quat), fovy=float(cam.fovy))


def intrinsics(fovy_deg: float, height: int, width: int) -> np.ndarray:
    """(3, 3) float64 OpenCV K of a MuJoCo camera with vertical field of view ``fovy_deg`` (square pixels)."""
    f = 0.5 * height / np.tan(np.deg2rad(fovy_deg) / 2.0)
    return np.array([[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]])


def camera_to_world(cam_xpos: np.ndarray, cam_xmat: np.ndarray) -> np.ndarray:
    """(4, 4) float64 camera-to-world transform (OpenCV axes) from MuJoCo's ``data.cam_xpos[i]`` (3,) and
    ``data.cam_xmat[i]`` (9,)."""
    T = np.eye(4)
    T[:3, :3] = np.asarray(cam_xmat, dtype=np.float64).reshape(3, 3) @ _MJ_TO_CV
    T[:3, 3] = cam_xpos
    return T


def depth_to_world(depth: np.ndarray, K: np.ndarray, T: np.ndarray) -> np.ndarray:
    """Back-project a depth image (H, W) metres into world points (H, W, 3) float32.

    Pixel (v, u) maps to the ray through (u + 0.5, v + 0.5); ``K`` (3, 3), ``T`` (4, 4) as in the module
    docstring. Every pixel gets a point, background ones included (they land at the far plane, far
    outside any workspace box); the caller masks them.
    """
    depth = np.asarray(depth, dtype=np.float64)
    if depth.ndim != 2:
        raise ValueError(f"depth has shape {depth.shape}, expected (H, W)")
    h, w = depth.shape
    u = np.arange(w, dtype=np.float64) + 0.5
    v = np.arange(h, dtype=np.float64) + 0.5
    x = (u[None, :] - K[0, 2]) / K[0, 0] * depth
    y = (v[:, None] - K[1, 2]) / K[1, 1] * depth
    cam = np.stack([x, y, depth], axis=-1)
    world = cam @ T[:3, :3].T + T[:3, 3]
    return world.astype(np.float32)


def project_to_pixel(point: np.ndarray, K: np.ndarray, T: np.ndarray) -> tuple[float, float, float]:
    """World point (3,) -> (u, v, depth) in the continuous pixel coordinates of ``K`` (inverse of
    ``depth_to_world``; pixel index = floor of u, v)."""
    cam = np.linalg.inv(T) @ np.append(np.asarray(point, dtype=np.float64), 1.0)
    z = cam[2]
    return float(K[0, 0] * cam[0] / z + K[0, 2]), float(K[1, 1] * cam[1] / z + K[1, 2]), float(z)
