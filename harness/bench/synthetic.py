"""Synthetic Level-1 batches with the collated keystep layout, for benchmarks and tests (no data files).

The cloud looks like a tabletop scene: half the points on a table plane, the rest on the faces of a few
boxes, so voxel neighbourhoods are as dense as on real surfaces (uniform noise would make the sparse
convolutions unrealistically cheap).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SYNTHETIC_CAMERAS = (4, 128, 128)  # image policies: the embedded Meta-World suite's cameras and size


def synthetic_batch(B: int, N: int, L: int = 7, D: int = 512, seed: int = 0, full: bool = False,
                    n_hist: int = 1, cameras: tuple[int, int, int] | None = None) -> dict:
    """Tensors shaped like ``collate_keysteps`` output: points/colors (B, N, 3), height (B, N, 1),
    point_mask (B, N), text_tokens (B, L, D), text_mask (B, L), target/pose (B, 8), history (B, n_hist, 8),
    offset (B, 3) zeros, rotation (B,) zeros. ``cameras`` (n_cam, H, W): also images (B, n_cam, 3, H, W) in
    [-1, 1] and point_maps, each camera's map a tilted plane over the table (for image policies).

    Unless ``full``, observation 0 has a quarter of its points masked and observation 1's instruction is
    two tokens shorter, so padding paths are exercised.
    """
    g = torch.Generator().manual_seed(seed)
    n_table = N // 2
    table = torch.rand(B, n_table, 3, generator=g) * torch.tensor([0.6, 0.6, 0.0]) - torch.tensor([0.3, 0.3, 0.0])
    table[..., 2] = -0.2 + 0.002 * torch.rand(B, n_table, generator=g)
    n_box = N - n_table
    u = torch.rand(B, n_box, 3, generator=g)
    face = torch.randint(0, 3, (B, n_box), generator=g)
    side = torch.randint(0, 2, (B, n_box), generator=g).float()
    u.scatter_(2, face[..., None], side[..., None])  # snap one coordinate to a face of the unit cube
    centre = torch.rand(B, 4, 3, generator=g) * torch.tensor([0.4, 0.4, 0.0]) - torch.tensor([0.2, 0.2, 0.0])
    which = torch.randint(0, 4, (B, n_box), generator=g)
    boxes = torch.gather(centre, 1, which[..., None].expand(-1, -1, 3)) + (u - 0.5) * 0.12
    boxes[..., 2] = boxes[..., 2] - 0.14
    pts = torch.cat([table, boxes], dim=1)
    mask = torch.ones(B, N, dtype=torch.bool)
    text_mask = torch.ones(B, L, dtype=torch.bool)
    if not full:
        mask[0, N - N // 4:] = False
        if B > 1:
            text_mask[1, L - 2:] = False
    pts = pts * mask[..., None]
    quat = F.normalize(torch.randn(B, 4, generator=g), dim=-1)
    target = torch.cat([torch.rand(B, 3, generator=g) * 0.3 - 0.15, quat,
                        torch.randint(0, 2, (B, 1), generator=g).float()], dim=1)
    extra = {}
    if cameras is not None:
        n_cam, H, W = cameras
        v, u = torch.meshgrid(torch.linspace(-0.3, 0.3, H), torch.linspace(-0.3, 0.3, W), indexing="ij")
        plane = torch.stack([u, v, -0.2 + 0.1 * v], dim=0)  # (3, H, W)
        shift = torch.rand(B, n_cam, 3, 1, 1, generator=g) * 0.05
        extra = {"images": torch.rand(B, n_cam, 3, H, W, generator=g) * 2 - 1,
                 "point_maps": plane.expand(B, n_cam, 3, H, W) + shift}
    return {
        **extra,
        "points": pts, "colors": (torch.rand(B, N, 3, generator=g) * 2 - 1) * mask[..., None],
        "height": (pts[..., 2:3] + 0.2) * mask[..., None], "point_mask": mask,
        "text_tokens": torch.randn(B, L, D, generator=g) * text_mask[..., None], "text_mask": text_mask,
        "target": target, "pose": target.clone(),
        "history": target.clone()[:, None].expand(B, n_hist, 8).contiguous(), "offset": torch.zeros(B, 3),
        "rotation": torch.zeros(B),
    }
