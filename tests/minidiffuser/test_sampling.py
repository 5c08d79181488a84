"""Tests for minidiffuser.points.sampling.farthest_point_sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minidiffuser.points.sampling import farthest_point_sample


def naive_fps(points: np.ndarray, k: int, valid: np.ndarray) -> list[int]:
    """Reference greedy FPS for one item (first valid start, ties to the lowest index)."""
    idx = [int(np.flatnonzero(valid)[0])]
    dist = np.where(valid, np.inf, -np.inf)
    for _ in range(k - 1):
        dist = np.minimum(dist, ((points - points[idx[-1]]) ** 2).sum(1))
        dist[idx] = -1.0
        idx.append(int(np.argmax(dist)))
    return idx


def test_greedy_order_on_a_toy_line():
    pts = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [10, 0, 0], [5, 0, 0], [2, 0, 0]]])
    # 0 first; 10 is farthest; then 5 (5 from both); then 2 (distance 2); then 1.
    assert farthest_point_sample(pts, 5).tolist() == [[0, 2, 3, 4, 1]]
    assert farthest_point_sample(pts, 2).tolist() == [[0, 2]]


def test_matches_reference_and_is_distinct_and_valid():
    gen = torch.Generator().manual_seed(0)
    pts = torch.randn(4, 200, 3, generator=gen, dtype=torch.float64)
    mask = torch.rand(4, 200, generator=gen) < 0.6
    mask[2, :50] = False  # first valid point is not index 0
    idx = farthest_point_sample(pts, 32, mask)
    assert idx.shape == (4, 32) and idx.dtype == torch.int64
    for b in range(4):
        row = idx[b].tolist()
        assert len(set(row)) == 32
        assert bool(mask[b, idx[b]].all())
        assert row[0] == int(mask[b].nonzero()[0])
        assert row == naive_fps(pts[b].numpy(), 32, mask[b].numpy())


def test_masked_points_are_never_selected_even_if_far_or_nan():
    pts = torch.zeros(2, 6, 3)
    pts[:, :, 0] = torch.arange(6.0)
    pts[0, 5] = 1e6  # far away but masked out
    pts[1, 0] = float("nan")  # garbage padding, masked out
    mask = torch.tensor([[True, True, True, True, True, False], [False, True, True, True, True, True]])
    idx = farthest_point_sample(pts, 5, mask)
    assert sorted(idx[0].tolist()) == [0, 1, 2, 3, 4]
    assert sorted(idx[1].tolist()) == [1, 2, 3, 4, 5]
    assert idx[1, 0] == 1


def test_duplicate_coordinates_still_give_distinct_picks():
    pts = torch.zeros(1, 5, 3)  # all points coincide
    assert sorted(farthest_point_sample(pts, 5)[0].tolist()) == [0, 1, 2, 3, 4]


def test_fewer_valid_points_than_k_repeats_valid_ones():
    pts = torch.randn(2, 10, 3, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, [2, 7, 9]] = True
    mask[1, :] = True
    idx = farthest_point_sample(pts, 7, mask)
    first = idx[0, :3].tolist()
    assert sorted(first) == [2, 7, 9]
    assert idx[0].tolist() == first + first + first[:1]  # cyclic repetition
    assert len(set(idx[1].tolist())) == 7


def test_random_start_is_reproducible_and_valid():
    gen_pts = torch.Generator().manual_seed(2)
    pts = torch.randn(3, 50, 3, generator=gen_pts)
    mask = torch.rand(3, 50, generator=gen_pts) < 0.5
    a = farthest_point_sample(pts, 10, mask, start="random", generator=torch.Generator().manual_seed(5))
    b = farthest_point_sample(pts, 10, mask, start="random", generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert bool(mask.gather(1, a).all())
    assert all(len(set(r)) == 10 for r in a.tolist())
    starts = {
        int(
            farthest_point_sample(
                pts[:1], 1, mask[:1], start="random", generator=torch.Generator().manual_seed(s)
            )[0, 0]
        )
        for s in range(20)
    }
    assert len(starts) > 1


def test_argument_validation():
    pts = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="points"):
        farthest_point_sample(torch.randn(5, 3), 2)
    with pytest.raises(ValueError, match="points"):
        farthest_point_sample(pts.long(), 2)
    with pytest.raises(ValueError, match="k"):
        farthest_point_sample(pts, 0)
    with pytest.raises(ValueError, match="mask"):
        farthest_point_sample(pts, 2, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        farthest_point_sample(pts, 2, torch.tensor([[True] * 5, [False] * 5]))
    with pytest.raises(ValueError, match="start"):
        farthest_point_sample(pts, 2, start="last")
