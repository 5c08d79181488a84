"""Tests for minidiffuser.points.serialization (z-order / Hilbert codes, batched serialization)."""

from __future__ import annotations

import pytest
import torch

from minidiffuser.points.serialization import (
    ORDERS,
    encode,
    hilbert_decode,
    hilbert_encode,
    serialize,
    z_order_decode,
    z_order_encode,
)

CURVES = {"z": (z_order_encode, z_order_decode), "hilbert": (hilbert_encode, hilbert_decode)}


def cube(depth: int) -> torch.Tensor:
    """All voxel coordinates of a 2**depth cube, (8**depth, 3) int64."""
    a = torch.arange(2**depth)
    return torch.stack(torch.meshgrid(a, a, a, indexing="ij"), dim=-1).reshape(-1, 3)


@pytest.mark.parametrize("curve", ["z", "hilbert"])
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_codes_are_a_bijection_of_the_cube(curve, depth):
    enc, dec = CURVES[curve]
    grid = cube(depth)
    code = enc(grid, depth)
    assert code.dtype == torch.int64
    assert torch.equal(torch.sort(code).values, torch.arange(8**depth))
    assert torch.equal(dec(code, depth), grid)
    assert torch.equal(enc(dec(torch.arange(8**depth), depth), depth), torch.arange(8**depth))


@pytest.mark.parametrize("curve", ["z", "hilbert"])
def test_round_trip_at_large_depths(curve):
    enc, dec = CURVES[curve]
    gen = torch.Generator().manual_seed(0)
    for depth in (10, 16):
        grid = torch.randint(0, 2**depth, (2000, 3), generator=gen)
        grid[0] = 2**depth - 1  # extreme corner
        grid[1] = 0
        code = enc(grid, depth)
        assert int(code.min()) >= 0 and int(code.max()) < 2 ** (3 * depth)
        assert torch.equal(dec(code, depth), grid)


def test_known_values():
    # Morton: bit i of x/y/z -> bit 3i+2/3i+1/3i (Pointcept/OCNN xyz2key).
    assert z_order_encode(torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [3, 0, 0]]), 2).tolist() == [
        4,
        2,
        1,
        36,
    ]
    # Hilbert (Skilling, x most significant): the depth-1 tour and a few deeper codes. These values were
    # cross-checked against the bit-array algorithm of numpy-hilbert-curve as used by Pointcept.
    assert hilbert_decode(torch.arange(8), 1).tolist() == [
        [0, 0, 0],
        [0, 0, 1],
        [0, 1, 1],
        [0, 1, 0],
        [1, 1, 0],
        [1, 1, 1],
        [1, 0, 1],
        [1, 0, 0],
    ]
    grid = torch.tensor([[1, 2, 3], [3, 0, 1], [0, 3, 3], [2, 2, 0]])
    assert hilbert_encode(grid, 2).tolist() == [22, 56, 18, 32]
    assert hilbert_encode(torch.tensor([[5, 900, 17], [1023, 0, 511]]), 10).tolist() == [498799904, 939524096]


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
def test_hilbert_consecutive_cells_are_face_adjacent(depth):
    xyz = hilbert_decode(torch.arange(8**depth), depth)
    step = (xyz[1:] - xyz[:-1]).abs()
    assert torch.equal(step.sum(1), torch.ones(8**depth - 1, dtype=torch.long))


def test_z_order_keeps_neighbours_close():
    depth = 4
    xyz = z_order_decode(torch.arange(8**depth), depth).double()
    mean_step = (xyz[1:] - xyz[:-1]).norm(dim=1).mean().item()
    shuffled = cube(depth)[torch.randperm(8**depth, generator=torch.Generator().manual_seed(0))].double()
    random_step = (shuffled[1:] - shuffled[:-1]).norm(dim=1).mean().item()
    assert mean_step < 1.6  # 1.457 for a full cube
    assert random_step > 5 * mean_step


@pytest.mark.parametrize("curve", ["z", "hilbert"])
def test_trans_orders_swap_x_and_y(curve):
    gen = torch.Generator().manual_seed(1)
    grid = torch.randint(0, 64, (500, 3), generator=gen)
    batch = torch.randint(0, 3, (500,), generator=gen)
    swapped = grid[:, [1, 0, 2]]
    assert torch.equal(encode(grid, batch, 6, f"{curve}-trans"), encode(swapped, batch, 6, curve))
    assert not torch.equal(encode(grid, batch, 6, f"{curve}-trans"), encode(grid, batch, 6, curve))


@pytest.mark.parametrize("order", ORDERS)
def test_batch_bits_are_above_the_curve_bits(order):
    gen = torch.Generator().manual_seed(2)
    grid = torch.randint(0, 32, (300, 3), generator=gen)
    batch = torch.randint(0, 5, (300,), generator=gen)
    code = encode(grid, batch, 5, order)
    assert torch.equal(code >> 15, batch)
    assert torch.equal(code & (2**15 - 1), encode(grid, None, 5, order))


def test_serialize_keeps_samples_contiguous_and_inverts():
    gen = torch.Generator().manual_seed(3)
    grid = torch.randint(0, 100, (1000, 3), generator=gen)
    batch = torch.randint(0, 4, (1000,), generator=gen)
    s = serialize(grid, batch, ORDERS)
    assert s.depth == 7  # bit length of grid.max() (<= 99)
    assert s.orders == ORDERS
    assert s.code.shape == s.order.shape == s.inverse.shape == (4, 1000)
    x = torch.randn(1000, 5, generator=gen)
    arange = torch.arange(1000)
    for k, name in enumerate(ORDERS):
        assert torch.equal(s.code[k], encode(grid, batch, 7, name))
        assert bool((s.code[k][s.order[k]].diff() >= 0).all())
        assert bool((batch[s.order[k]].diff() >= 0).all())  # each sample is one contiguous block
        assert torch.equal(x[s.order[k]][s.inverse[k]], x)
        assert torch.equal(s.order[k][s.inverse[k]], arange)
        assert torch.equal(s.inverse[k][s.order[k]], arange)


def test_serialize_default_depth_and_explicit_depth():
    grid = torch.zeros(4, 3, dtype=torch.long)
    assert serialize(grid, None, ("z",)).depth == 1  # bit length 0 -> at least 1
    grid = torch.tensor([[8, 0, 1], [0, 2, 3]])
    assert serialize(grid, None, ("hilbert",)).depth == 4
    assert serialize(grid, None, ("hilbert",), depth=6).depth == 6


def test_encode_validates_arguments():
    grid = torch.tensor([[1, 2, 3]])
    batch = torch.tensor([0])
    with pytest.raises(ValueError, match="order"):
        encode(grid, batch, 4, "peano")
    with pytest.raises(ValueError, match="depth"):
        encode(grid, batch, 17, "z")
    with pytest.raises(ValueError, match="depth"):
        encode(grid, batch, 0, "z")
    with pytest.raises(ValueError, match="62"):
        encode(grid, torch.tensor([2**15]), 16, "z")  # 48 + 16 bits
    assert int(encode(grid, torch.tensor([2**14 - 1]), 16, "z")) >> 48 == 2**14 - 1  # 48 + 14 = 62 bits: ok
    with pytest.raises(ValueError, match="grid"):
        encode(torch.tensor([[-1, 0, 0]]), batch, 4, "z")
    with pytest.raises(ValueError, match="grid"):
        encode(torch.tensor([[16, 0, 0]]), batch, 4, "hilbert")
    with pytest.raises(ValueError, match="grid"):
        encode(grid.float(), batch, 4, "z")
    with pytest.raises(ValueError, match="grid"):
        encode(torch.tensor([1, 2, 3]), batch, 4, "z")
    with pytest.raises(ValueError, match="batch"):
        encode(grid, torch.tensor([0, 1]), 4, "z")
    with pytest.raises(ValueError, match="batch"):
        encode(grid, torch.tensor([-1]), 4, "z")
    with pytest.raises(ValueError, match="code"):
        hilbert_decode(torch.tensor([8]), 1)
    with pytest.raises(ValueError, match="orders"):
        serialize(grid, batch, "z")
