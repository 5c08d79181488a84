"""Rotation conversions at the model boundary. Quaternions are xyzw everywhere (RLBench's order).

- Euler bins (Mini-Diffuser's rotation head): scipy 'xyz' (extrinsic) Euler angles in degrees, the RVT-2
  "gimbal fix" (pitch within 1 degree of +-90 snapped to +-90 and re-converted), +180, divided by the
  resolution and rounded; the top bin wraps to 0 (reference §3.5.2).
- 6D rotation (3D Diffuser Actor's diffused rotation): the first two columns of the rotation matrix.
- ``geodesic_deg``: the angle of the relative rotation, in degrees.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy.spatial.transform import Rotation


def _np(x) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float64)


def quat_to_euler_bins(quat, resolution: float = 5.0) -> torch.Tensor:
    """(B, 4) xyzw -> (B, 3) long bins in [0, 360 / resolution)."""
    q = _np(quat).reshape(-1, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # scipy warns on gimbal lock; the fix below handles it
        euler = Rotation.from_quat(q).as_euler("xyz", degrees=True)
        for sign in (1.0, -1.0):
            near = (euler[:, 1] * sign > 89.0) & (euler[:, 1] * sign < 91.0)
            if near.any():
                fixed = euler[near].copy()
                fixed[:, 1] = 90.0 * sign
                euler[near] = Rotation.from_euler("xyz", fixed, degrees=True).as_euler("xyz", degrees=True)
    n_bins = round(360.0 / resolution)
    bins = np.round((euler + 180.0) / resolution).astype(np.int64) % n_bins
    return torch.from_numpy(bins)


def euler_bins_to_quat(bins, resolution: float = 5.0) -> torch.Tensor:
    """(B, 3) bins -> (B, 4) xyzw float32 (the centre angle of each bin)."""
    euler = _np(bins).reshape(-1, 3) * resolution - 180.0
    return torch.from_numpy(Rotation.from_euler("xyz", euler, degrees=True).as_quat().astype(np.float32))


def quat_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """(..., 4) xyzw (normalised here) -> (..., 3, 3), differentiable torch."""
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    x, y, z, w = q.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    ], dim=-1).reshape(*q.shape[:-1], 3, 3)


def quat_to_6d(q: torch.Tensor) -> torch.Tensor:
    """(..., 4) xyzw -> (..., 6): the first two columns of the rotation matrix, concatenated."""
    m = quat_to_matrix(q)
    return torch.cat([m[..., :, 0], m[..., :, 1]], dim=-1)


def sixd_to_matrix(r6: torch.Tensor) -> torch.Tensor:
    """(..., 6) -> (..., 3, 3) by Gram-Schmidt (Zhou et al. 2019)."""
    a, b = r6[..., :3], r6[..., 3:]
    c1 = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    b = b - (c1 * b).sum(-1, keepdim=True) * c1
    c2 = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    c3 = torch.cross(c1, c2, dim=-1)
    return torch.stack([c1, c2, c3], dim=-1)


def sixd_to_quat(r6: torch.Tensor) -> torch.Tensor:
    """(B, 6) -> (B, 4) xyzw float32."""
    m = sixd_to_matrix(r6.detach().double()).cpu().numpy().reshape(-1, 3, 3)
    return torch.from_numpy(Rotation.from_matrix(m).as_quat().astype(np.float32)).to(r6.device)


def geodesic_deg(q1, q2) -> torch.Tensor:
    """(B, 4), (B, 4) xyzw -> (B,) angle of q1^-1 q2 in degrees (sign-invariant)."""
    a, b = _np(q1).reshape(-1, 4), _np(q2).reshape(-1, 4)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    dot = np.clip(np.abs((a * b).sum(1)), 0.0, 1.0)
    return torch.from_numpy(np.degrees(2.0 * np.arccos(dot)))
