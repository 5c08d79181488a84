"""Tests for minidiffuser.points.sparse_conv: neighbour maps, SubMConv3d vs dense conv3d, lookup."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from minidiffuser.points.sparse_conv import (
    SubMConv3d,
    build_neighbor_map,
    dense_to_sparse_weight,
    kernel_offsets,
    lookup,
    sparse_to_dense_weight,
)

SIZE = 6  # side of the dense test volume


def random_sites(seed: int, n_batch: int = 2, density: float = 0.3, shift=(0, 0, 0)):
    """Unique active sites of a random sparse volume, in shuffled order.

    Returns grid (N, 3) (shifted by ``shift``), batch (N,) and the unshifted grid for the dense reference.
    """
    gen = torch.Generator().manual_seed(seed)
    occ = torch.rand(n_batch, SIZE, SIZE, SIZE, generator=gen) < density
    b, x, y, z = occ.nonzero(as_tuple=True)
    perm = torch.randperm(b.numel(), generator=gen)
    dense_grid = torch.stack([x, y, z], dim=1)[perm]
    return dense_grid + torch.tensor(shift), b[perm], dense_grid


def dense_reference(feat, grid, batch, weight, bias, n_batch=2):
    """torch conv3d (padding k//2) on the dense volume, read at the active sites. feat (N, C)."""
    k = weight.shape[-1]
    vol = feat.new_zeros(n_batch, SIZE, SIZE, SIZE, feat.shape[1])
    vol = vol.index_put((batch, grid[:, 0], grid[:, 1], grid[:, 2]), feat)
    out = F.conv3d(vol.permute(0, 4, 1, 2, 3), weight, bias, padding=k // 2)
    return out.permute(0, 2, 3, 4, 1)[batch, grid[:, 0], grid[:, 1], grid[:, 2]]


@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_backward_match_dense_conv3d(kernel_size, bias):
    torch.manual_seed(kernel_size + 10 * bias)
    # Shifted (incl. negative) coordinates: the hash must not care about the absolute position.
    grid, batch, dense_grid = random_sites(seed=kernel_size, shift=(-3, 7, 100))
    n = grid.shape[0]
    conv = SubMConv3d(4, 5, kernel_size, bias=bias).double()
    feat = torch.randn(n, 4, dtype=torch.float64, requires_grad=True)
    nmap = build_neighbor_map(grid, batch, kernel_size)
    out = conv(feat, nmap)

    feat_ref = feat.detach().clone().requires_grad_(True)
    w_ref = conv.to_dense_weight().detach().clone().requires_grad_(True)
    b_ref = conv.bias.detach().clone().requires_grad_(True) if bias else None
    out_ref = dense_reference(feat_ref, dense_grid, batch, w_ref, b_ref)

    assert out.shape == (n, 5)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()
    (out_ref * grad_out).sum().backward()
    torch.testing.assert_close(feat.grad, feat_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse_to_dense_weight(conv.weight.grad), w_ref.grad, rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(conv.bias.grad, b_ref.grad, rtol=1e-5, atol=1e-5)


def test_batch_items_never_interact():
    torch.manual_seed(0)
    grid, batch, _ = random_sites(seed=5, density=0.5)
    # Same coordinates in both items: item 1 is a copy of item 0's sites.
    grid = torch.cat([grid[batch == 0], grid[batch == 0]])
    batch = torch.cat([torch.zeros_like(batch[batch == 0]), torch.ones_like(batch[batch == 0])])
    n0 = int((batch == 0).sum())
    conv = SubMConv3d(3, 4, 3).double()
    nmap = build_neighbor_map(grid, batch, 3)
    feat = torch.randn(grid.shape[0], 3, dtype=torch.float64)
    out = conv(feat, nmap)
    feat2 = feat.clone()
    feat2[n0:] = torch.randn(grid.shape[0] - n0, 3, dtype=torch.float64)
    assert torch.equal(conv(feat2, nmap)[:n0], out[:n0])
    alone = conv(feat[:n0], build_neighbor_map(grid[:n0], batch[:n0], 3))
    torch.testing.assert_close(alone, out[:n0])
    for o in range(27):
        i, j = nmap.pairs(o)
        assert torch.equal(batch[i], batch[j])


def test_neighbor_map_structure():
    grid, batch, _ = random_sites(seed=7)
    for k in (1, 3, 5):
        nmap = build_neighbor_map(grid, batch, k)
        offsets = kernel_offsets(k)
        assert nmap.kernel_volume == k**3 and nmap.num_sites == grid.shape[0]
        assert len(nmap.offset_ptr) == k**3 + 1 and nmap.offset_ptr[-1] == nmap.in_idx.numel()
        counts = nmap.counts()
        assert counts == counts[::-1]  # offset d and -d have the same number of pairs
        i, j = nmap.pairs(nmap.center)
        assert torch.equal(i, j) and torch.equal(torch.sort(j).values, torch.arange(grid.shape[0]))
        for o in range(k**3):
            i, j = nmap.pairs(o)
            assert torch.equal(grid[i] - grid[j], offsets[o].expand(i.numel(), 3))
    # Conv3d weight order: offset o = i*k*k + j*k + l is (i - r, j - r, l - r).
    assert kernel_offsets(3)[0].tolist() == [-1, -1, -1]
    assert kernel_offsets(3)[1].tolist() == [-1, -1, 0]
    assert kernel_offsets(3)[3].tolist() == [-1, 0, -1]
    assert kernel_offsets(3)[9].tolist() == [0, -1, -1]
    assert kernel_offsets(3)[13].tolist() == [0, 0, 0]


def test_dense_weight_conversion_round_trip_and_conv3d_module():
    torch.manual_seed(1)
    dense = torch.nn.Conv3d(3, 4, 3, padding=1).double()
    layer = SubMConv3d(3, 4, 3).double().from_dense_weight(dense.weight, dense.bias)
    assert torch.equal(layer.to_dense_weight(), dense.weight)
    assert torch.equal(dense_to_sparse_weight(sparse_to_dense_weight(layer.weight)), layer.weight)
    grid, batch, dense_grid = random_sites(seed=9)
    feat = torch.randn(grid.shape[0], 3, dtype=torch.float64)
    out = layer(feat, build_neighbor_map(grid, batch, 3))
    vol = feat.new_zeros(2, SIZE, SIZE, SIZE, 3).index_put((batch, *dense_grid.unbind(1)), feat)
    ref = dense(vol.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)[(batch, *dense_grid.unbind(1))]
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="weight"):
        SubMConv3d(3, 4, 5).from_dense_weight(dense.weight)


def test_duplicate_sites_opt_in():
    torch.manual_seed(3)
    grid, batch, dense_grid = random_sites(seed=14)
    n = grid.shape[0]
    dup = torch.tensor([0, 5])  # sites 0 and 5 get a second copy at indices n and n + 1
    grid2, batch2 = torch.cat([grid, grid[dup]]), torch.cat([batch, batch[dup]])
    with pytest.raises(ValueError, match="duplicate"):
        build_neighbor_map(grid2, batch2, 3)
    with pytest.raises(ValueError, match="duplicate"):
        lookup(grid2, batch2, grid2, batch2, torch.zeros(n + 2, 1))
    layer = SubMConv3d(3, 4, 3).double()
    feat = torch.randn(n, 3, dtype=torch.float64)
    feat2 = torch.cat([feat, torch.randn(2, 3, dtype=torch.float64)])
    out = layer(feat2, build_neighbor_map(grid2, batch2, 3, allow_duplicates=True))
    ref = dense_reference(feat, dense_grid, batch, layer.to_dense_weight(), layer.bias)
    # Unique sites see only the first copy as a neighbour; each copy sees its own feature at the centre.
    torch.testing.assert_close(out[:n], ref)
    w_center = layer.weight[13]
    torch.testing.assert_close(out[n:], ref[dup] + (feat2[n:] - feat[dup]) @ w_center)
    rows = lookup(grid2, batch2, grid2, batch2, feat2, allow_duplicates=True)
    torch.testing.assert_close(rows, torch.cat([feat, feat[dup]]))


def test_initialisation_bounds():
    torch.manual_seed(2)
    layer = SubMConv3d(7, 36, 5)
    bound = 1 / math.sqrt(7 * 125)
    assert layer.weight.shape == (125, 7, 36) and layer.bias.shape == (36,)
    w, b = layer.weight.detach(), layer.bias.detach()
    assert float(w.abs().max()) <= bound and float(b.abs().max()) <= bound
    assert float(w.std()) > 0.5 * bound / math.sqrt(3)
    assert SubMConv3d(7, 36, 5, bias=False).bias is None


def test_float32_and_empty_inputs():
    grid, batch, dense_grid = random_sites(seed=11)
    layer = SubMConv3d(2, 3, 3)
    feat = torch.randn(grid.shape[0], 2)
    out = layer(feat, build_neighbor_map(grid, batch, 3))
    ref = dense_reference(feat, dense_grid, batch, layer.to_dense_weight(), layer.bias)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    empty = torch.zeros(0, 3, dtype=torch.long)
    nmap = build_neighbor_map(empty, torch.zeros(0, dtype=torch.long), 3)
    assert layer(torch.zeros(0, 2), nmap).shape == (0, 3)


def test_argument_validation():
    grid, batch, _ = random_sites(seed=12)
    with pytest.raises(ValueError, match="kernel_size"):
        build_neighbor_map(grid, batch, 4)
    with pytest.raises(ValueError, match="grid"):
        build_neighbor_map(grid.float(), batch, 3)
    with pytest.raises(ValueError, match="batch"):
        build_neighbor_map(grid, batch[:-1], 3)
    with pytest.raises(ValueError, match="batch"):
        build_neighbor_map(grid, -batch - 1, 3)
    with pytest.raises(ValueError, match="duplicate"):
        build_neighbor_map(torch.cat([grid, grid[:1]]), torch.cat([batch, batch[:1]]), 3)
    with pytest.raises(ValueError, match="bits"):
        build_neighbor_map(torch.tensor([[0, 0, 0], [2**21, 2**21, 2**21]]), torch.tensor([0, 0]), 3)
    nmap = build_neighbor_map(grid, batch, 3)
    with pytest.raises(ValueError, match="feat"):
        SubMConv3d(4, 5, 3)(torch.randn(grid.shape[0] + 1, 4), nmap)
    with pytest.raises(ValueError, match="kernel_size"):
        SubMConv3d(4, 5, 5)(torch.randn(grid.shape[0], 4), nmap)
    with pytest.raises(ValueError, match="weight"):
        SubMConv3d(4, 5, 3)(torch.randn(grid.shape[0], 3), nmap)
    with pytest.raises(ValueError, match="in_channels"):
        SubMConv3d(0, 5, 3)


def test_lookup_returns_rows_at_exact_voxels_and_zeros_elsewhere():
    grid = torch.tensor([[0, 0, 0], [2, 3, 4], [2, 3, 4], [5, 1, 0]])
    batch = torch.tensor([0, 0, 1, 1])
    feat = torch.arange(1.0, 9.0).reshape(4, 2).requires_grad_(True)
    query = torch.tensor(
        [
            [2, 3, 4],  # batch 1 -> row 2
            [2, 3, 4],  # batch 0 -> row 1
            [0, 0, 0],  # batch 0 -> row 0
            [0, 0, 0],  # batch 1 -> empty voxel
            [1, 1, 1],  # batch 0 -> empty voxel inside the range
            [-1, 0, 0],  # negative coordinate
            [6, 1, 0],  # beyond the max coordinate
            [5, 1, 0],  # batch 2 does not exist
            [5, 1, 0],  # negative batch
            [5, 1, 0],  # batch 1 -> row 3
        ]
    )
    qbatch = torch.tensor([1, 0, 0, 1, 0, 0, 1, 2, -1, 1])
    out = lookup(query, qbatch, grid, batch, feat)
    expected = torch.zeros(10, 2)
    expected[0], expected[1], expected[2], expected[9] = feat[2], feat[1], feat[0], feat[3]
    assert torch.equal(out, expected.detach())
    out.sum().backward()
    assert feat.grad.tolist() == [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]


def test_lookup_matches_a_python_dictionary():
    gen = torch.Generator().manual_seed(13)
    grid, batch, _ = random_sites(seed=13, n_batch=3, shift=(-2, 0, 5))
    feat = torch.randn(grid.shape[0], 3, generator=gen)
    # Half random voxels around the active range, half active voxels with a random (possibly wrong) batch.
    shift = torch.tensor([-2, 0, 5])
    pick = torch.randint(0, grid.shape[0], (250,), generator=gen)
    query = torch.cat([torch.randint(-2, SIZE + 2, (250, 3), generator=gen) + shift, grid[pick]])
    qbatch = torch.cat([torch.randint(-1, 4, (250,), generator=gen), batch[pick]])
    qbatch[torch.rand(500, generator=gen) < 0.3] = torch.randint(-1, 4, (1,), generator=gen)
    table = {(int(b), *g.tolist()): feat[i] for i, (g, b) in enumerate(zip(grid, batch))}
    expected = torch.stack([table.get((int(b), *q.tolist()), torch.zeros(3)) for q, b in zip(query, qbatch)])
    assert torch.equal(lookup(query, qbatch, grid, batch, feat), expected)
    hits = int((expected.abs().sum(1) > 0).sum())
    assert 100 < hits < 450  # both hits and misses are exercised
    assert lookup(query, qbatch, grid[:0], batch[:0], feat[:0]).shape == (500, 3)
    with pytest.raises(ValueError, match="feat"):
        lookup(query, qbatch, grid, batch, feat[:-1])
    with pytest.raises(ValueError, match="query_batch"):
        lookup(query, qbatch[:-1], grid, batch, feat)


# ------------------------------------------------------------------ grouped execution (one plan per map)


def _per_offset_reference(feat, weight, bias, nmap):
    """The plain definition: out = bias + sum over offsets o of (pairs of o) feat[in] @ W[o], one offset at
    a time (the implementation before the grouped plan)."""
    out = feat @ weight[nmap.center]
    for o in range(nmap.kernel_volume):
        i, j = nmap.pairs(o)
        if o != nmap.center and len(i):
            out = out.index_add(0, j, feat[i] @ weight[o])
    return out if bias is None else out + bias


@pytest.mark.parametrize("duplicates", [False, True])
@pytest.mark.parametrize("path", ["cpu-csr", "autograd"])
def test_grouped_convolution_equals_the_per_offset_sum(duplicates, path):
    from minidiffuser.points.sparse_conv import _grouped_conv, _SubMConvFunction

    grid, batch, _ = random_sites(seed=3, n_batch=3, density=0.35)
    if duplicates:  # repeat a few sites: their neighbours read the first copy, their own output is their own
        grid, batch = torch.cat([grid, grid[:5]]), torch.cat([batch, batch[:5]])
    nmap = build_neighbor_map(grid, batch, 3, allow_duplicates=duplicates)
    assert 1 <= len(nmap.plan().groups) <= 2
    g = torch.Generator().manual_seed(4)
    feat = torch.randn(len(grid), 5, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(27, 5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    fn = _SubMConvFunction.apply if path == "cpu-csr" else _grouped_conv
    conv = lambda f, w, b, m: fn(f, w, b, m.center, m.plan())
    out, ref = conv(feat, weight, bias, nmap), _per_offset_reference(feat, weight, bias, nmap)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    grad_out = torch.randn(out.shape, dtype=torch.float64, generator=g)
    for a, b in zip(torch.autograd.grad(out, (feat, weight, bias), grad_out),
                    torch.autograd.grad(ref, (feat, weight, bias), grad_out)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("big", [True, False])
def test_convolution_is_deterministic_and_rows_isolated_with_two_threads(big):
    """Bit for bit: the same inputs give the same outputs and gradients, and changing another batch item's
    features changes nothing of this item's (the gather/scatter are CSR products, never a parallel
    accumulating scatter whose order depends on the threads)."""
    from minidiffuser.points.sparse_conv import CSR_MIN_ELEMENTS

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grid, batch, _ = random_sites(seed=5, n_batch=2, density=0.5 if big else 0.1)
        order = torch.argsort(batch, stable=True)
        grid, batch = grid[order], batch[order]
        nmap = build_neighbor_map(grid, batch, 3)
        conv = SubMConv3d(16, 16, 3)
        assert (nmap.plan().num_rows * 16 >= CSR_MIN_ELEMENTS) == big  # the CSR path, or the small levels' one
        g = torch.Generator().manual_seed(6)
        feat = torch.randn(len(grid), 16, generator=g)
        other = feat.clone()
        other[batch == 1] += torch.randn(int((batch == 1).sum()), 16, generator=g)
        grad_out = torch.randn(len(grid), 16, generator=g)

        def run(f):
            f = f.clone().requires_grad_(True)
            out = conv(f, nmap)
            return out.detach(), *torch.autograd.grad(out, (f, conv.weight), grad_out)

        first = run(feat)
        for _ in range(3):
            assert all(torch.equal(a, b) for a, b in zip(first, run(feat)))
        moved = run(other)
        own = batch == 0
        assert torch.equal(first[0][own], moved[0][own]) and torch.equal(first[1][own], moved[1][own])
    finally:
        torch.set_num_threads(threads)


def test_offset_groups_minimise_padded_rows():
    from itertools import combinations, pairwise

    from minidiffuser.points.sparse_conv import split_sorted_counts

    counts = [90, 88, 60, 59, 58, 20, 12, 11, 3]
    for max_groups in (1, 2, 3):
        for cost in (0, 30, 1000):
            runs = split_sorted_counts(counts, max_groups, cost)
            assert runs[0][0] == 0 and runs[-1][1] == len(counts) and len(runs) <= max_groups
            assert all(a[1] == b[0] for a, b in pairwise(runs))
            got = sum((j - i) * counts[i] + cost for i, j in runs)
            best = min(sum((j - i) * counts[i] + cost for i, j in zip((0, *cuts), (*cuts, len(counts))))
                       for g in range(max_groups) for cuts in combinations(range(1, len(counts)), g))
            assert got == best
    assert split_sorted_counts([], 2, 0) == []


def test_plan_is_built_once_per_map():
    grid, batch, _ = random_sites(seed=7)
    nmap = build_neighbor_map(grid, batch, 3)
    plan = nmap.plan()
    assert nmap.plan() is plan
    assert plan.matrices(torch.float32) is plan.matrices(torch.float32)
    # every pair appears exactly once among the groups' rows; padding rows are marked -1 in both arrays
    real = plan.gather >= 0
    assert torch.equal(real, plan.scatter >= 0)
    assert int(real.sum()) == len(nmap.in_idx) - nmap.num_sites
    assert sum(b - a for a, b in (g.rows for g in plan.groups)) == plan.num_rows
