"""Batched farthest point sampling (FPS), pure PyTorch.

Written by hand: the usual FPS kernels (pointnet2_ops, pytorch3d, torch_cluster) are CUDA extensions or need
compiling against the installed torch, and there is no CPU-capable library among the project's
dependencies. This version is vectorised over the batch and loops only over the ``k`` selections
(O(k * B * N) work), which is fine for the point counts used here.
"""

from __future__ import annotations

import torch


def farthest_point_sample(
    points: torch.Tensor,
    k: int,
    mask: torch.Tensor | None = None,
    start: str = "first",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Greedy farthest point sampling.

    Each step picks the valid point with the largest (squared Euclidean) distance to the points picked so
    far; ties go to the lowest index. Already-picked points are never picked again while unpicked valid
    points remain (even when they coincide in space).

    Args:
        points: (B, N, D) float coordinates: xyz (D = 3), or features (3D Diffuser Actor samples its scene
            tokens in their 120-d feature space).
        k: number of points to pick per batch item, >= 1.
        mask: optional (B, N) bool, True = valid. Masked-out points are never picked. Every item needs at
            least one valid point.
        start: ``"first"``: start from the first valid point (deterministic); ``"random"``: a uniformly
            random valid point (drawn with ``generator``).
        generator: optional ``torch.Generator`` for ``start="random"``.

    Returns:
        int64 (B, k) indices into N. If an item has ``n_valid < k`` valid points, its first ``n_valid``
        picks are all of them in FPS order and the rest repeat that sequence cyclically.
    """
    if not isinstance(points, torch.Tensor) or points.dim() != 3 or points.shape[2] < 1:
        shape = tuple(points.shape) if isinstance(points, torch.Tensor) else type(points).__name__
        raise ValueError(f"points must have shape (B, N, D) with D >= 1, got {shape}")
    if not points.is_floating_point():
        raise ValueError(f"points must be a floating-point tensor, got dtype {points.dtype}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if start not in ("first", "random"):
        raise ValueError(f"start must be 'first' or 'random', got {start!r}")
    b, n, _ = points.shape
    device = points.device
    if mask is None:
        mask = torch.ones(b, n, dtype=torch.bool, device=device)
    elif not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (b, n):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a bool tensor of shape ({b}, {n}), got {shape}")
    n_valid = mask.sum(1)
    if b and int(n_valid.min()) == 0:
        raise ValueError("mask leaves a batch item with no valid point")
    if b == 0:
        return torch.zeros(0, k, dtype=torch.long, device=device)

    if start == "first":
        cur = mask.int().argmax(1)  # first True (argmax returns the first maximal index)
    else:
        cur = torch.multinomial(mask.float(), 1, generator=generator).squeeze(1)

    pts = points.detach().masked_fill(~mask.unsqueeze(-1), 0.0)  # garbage/NaN padding must not leak in
    rows = torch.arange(b, device=device)
    # Distance to the picked set; masked-out points sit at -inf, picked points at -1 (below any distance).
    dist = torch.full((b, n), float("inf"), dtype=pts.dtype, device=device)
    dist.masked_fill_(~mask, float("-inf"))
    picked = torch.empty(b, k, dtype=torch.long, device=device)
    steps = min(k, int(n_valid.max()))
    for i in range(steps):
        picked[:, i] = cur
        d = (pts - pts[rows, cur].unsqueeze(1)).square().sum(-1)
        dist = torch.minimum(dist, d)
        dist[rows, cur] = -1.0
        if i + 1 < steps:
            cur = dist.argmax(1)
    if steps < k or int(n_valid.min()) < k:
        # Items with fewer than k valid points: repeat their valid picks cyclically.
        j = torch.arange(k, device=device).unsqueeze(0)
        src = torch.where(j < n_valid.unsqueeze(1), j, j % n_valid.clamp(max=k).unsqueeze(1))
        src = src.clamp(max=steps - 1)
        picked = picked[:, :steps].gather(1, src)
    return picked
