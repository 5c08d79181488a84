"""Submanifold sparse 3-D convolution and exact-voxel lookup on hashed voxel grids, pure PyTorch.

Written by hand because there is no CPU-capable library for it: spconv's CPU wheel runs ``SubMConv3d``
forward but its backward asserts CUDA, and torch_scatter / MinkowskiEngine / torchsparse need compiling
against the installed torch. This module is plain PyTorch (CPU and CUDA alike, autograd included); spconv is
never imported.

Algorithm (gather - matmul - scatter, as in spconv's "native" algorithm):

1. Voxel hash: each active site ``(batch, x, y, z)`` is packed into one int64 key
   ``((batch * Ex + x') * Ey + y') * Ez + z'`` with ``x' = x - min_x + margin`` etc. The margin
   (``kernel_size // 2``) guarantees that adding a kernel offset never wraps into a neighbouring row, so the
   key of ``site + offset`` is ``key + packed(offset)``. Keys are sorted once.
2. Neighbour map: for all ``k**3`` offsets at once, ``torch.searchsorted`` finds the input site at
   ``out_site + offset`` (same batch item); the hits become ``(in_idx, out_idx)`` pairs grouped by offset.
3. Convolution: ``out = bias + feat @ W[center]`` (the centre offset pairs every site with itself), then the
   other offsets in one or two GROUPS (:meth:`NeighborMap.plan`): a group's offsets, sorted by pair count,
   are padded to the group's largest count and multiplied by one ``torch.bmm``. Gather and scatter are
   sparse-CSR x dense products (``T @ feat`` puts each pair's input row in place, zeros in the padding;
   ``S @ Y`` sums each output site's pair rows in a fixed order) and the backward is written out
   (:class:`_SubMConvFunction`): ``T^T @ dX`` and ``S^T @ dOut`` are again CSR products, so no kernel
   scatters with ``index_add_`` / ``index_put_``. Why: a convolution is ~20 kernels forward and backward
   together, not ~4 per offset (26 matmuls with their gathers and ``index_add_`` scatters forward, twice
   that backward, ~230 in all): on a shared
   2-core CPU every parallel kernel can wait a scheduler time slice for its second thread, and the
   per-offset loop made the sparse convolutions most of a training step. ``index_add_`` on CPU runs a
   parallel radix sort (several parallel regions per call, 10-100x slower than a CSR product on a loaded
   machine) and ``index_put_(accumulate=True)`` (the backward of ``x[idx]``) is not even deterministic with
   2 threads; the CSR products are deterministic and sum every row in the same order whatever the other
   rows hold. Not a dense (N, k**3) neighbour table: surface-like clouds fill only ~3-10 of the 27 offsets
   per site. Off CPU (CUDA, autocast) and for small levels (fewer than ``CSR_MIN_ELEMENTS`` gathered
   values: the index kernels then run on one thread) the same groups run through autograd
   (``index_select`` / ``bmm`` / ``index_add``); there is no spconv fast path.

Offset ordering and orientation match ``torch.nn.Conv3d`` (cross-correlation) on a dense volume laid out as
``(batch, C, X, Y, Z)``: offset ``o = i*k*k + j*k + l`` is the displacement ``(i - r, j - r, l - r)`` with
``r = k // 2``, and ``out[p] = bias + sum_o W[o]^T in[p + d_o]``. Hence
``W[o] = conv3d.weight[:, :, i, j, l].T`` (see :func:`dense_to_sparse_weight`).

Shapes: ``N`` active sites, ``grid`` int (N, 3), ``batch`` int (N,), features (N, C).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from minidiffuser.points.serialization import _is_int_tensor

MAX_KEY_BITS = 62


# ------------------------------------------------------------------------------------------ validation


def _shape(t: object) -> object:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_sites(
    grid: torch.Tensor, batch: torch.Tensor, gname: str, bname: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if not _is_int_tensor(grid) or grid.dim() != 2 or grid.shape[1] != 3:
        raise ValueError(f"{gname} must be an integer tensor of shape (N, 3), got {_shape(grid)}")
    if not _is_int_tensor(batch) or batch.dim() != 1 or batch.shape[0] != grid.shape[0]:
        raise ValueError(
            f"{bname} must be an integer tensor of shape ({grid.shape[0]},), got {_shape(batch)}"
        )
    return grid.long(), batch.long()


def _check_kernel_size(kernel_size: int) -> int:
    if (
        isinstance(kernel_size, bool)
        or not isinstance(kernel_size, int)
        or kernel_size < 1
        or kernel_size % 2 == 0
    ):
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
    return kernel_size


def kernel_offsets(kernel_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Kernel displacements in ``torch.nn.Conv3d`` weight order.

    Returns:
        int64 (k**3, 3): row ``o = i*k*k + j*k + l`` is ``(i - r, j - r, l - r)``, ``r = k // 2``.
    """
    k = _check_kernel_size(kernel_size)
    a = torch.arange(k, device=device) - k // 2
    return torch.stack(torch.meshgrid(a, a, a, indexing="ij"), dim=-1).reshape(-1, 3)


# ------------------------------------------------------------------------------------------ voxel hash


class _VoxelHash:
    """Sorted int64 keys of the active sites ``(batch, x, y, z)`` with a coordinate margin.

    Attributes: ``lo`` (3,) lowest packed coordinate, ``extent`` python ints (Ex, Ey, Ez), ``n_batch``,
    ``strides`` (sb, sx, sy, sz), ``keys`` (N,) unsorted, ``sorted_keys`` (N,), ``perm`` (N,) with
    ``keys[perm] == sorted_keys`` (stable sort: among duplicate sites the lowest index comes first, and
    :meth:`find` returns it).
    """

    def __init__(
        self,
        grid: torch.Tensor,
        batch: torch.Tensor,
        margin: int,
        gname: str,
        bname: str,
        allow_duplicates: bool = False,
    ):
        n = grid.shape[0]
        bmin, bmax = (int(v) for v in torch.aminmax(batch)) if n else (0, 0)
        if bmin < 0:
            raise ValueError(f"{bname} indices must be non-negative, got min {bmin}")
        # aminmax over dim 0: one reduction (int64 min/max along dim 0 are slow on CPU)
        gmin, gmax = torch.aminmax(grid, dim=0) if n else (grid.new_zeros(3), grid.new_zeros(3))
        self.lo = gmin - margin
        self.extent = [int(v) for v in (gmax - gmin + 1 + 2 * margin)]
        self.n_batch = bmax + 1
        ex, ey, ez = self.extent
        total = self.n_batch * ex * ey * ez
        if total.bit_length() > MAX_KEY_BITS:
            raise ValueError(
                f"voxel hash of {bname} x {gname} needs {total.bit_length()} bits (> {MAX_KEY_BITS}): "
                f"{self.n_batch} batch items x extent {self.extent}"
            )
        self.strides = (ex * ey * ez, ey * ez, ez, 1)
        self.keys = self._pack(grid - self.lo, batch)
        self.sorted_keys, self.perm = torch.sort(self.keys, stable=True)
        if not allow_duplicates and n > 1 and bool((self.sorted_keys[1:] == self.sorted_keys[:-1]).any()):
            raise ValueError(
                f"({bname}, {gname}) contains duplicate active sites; voxelise/deduplicate first "
                "or pass allow_duplicates=True"
            )

    def _pack(self, rel: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        sb, sx, sy, sz = self.strides
        return batch * sb + rel[:, 0] * sx + rel[:, 1] * sy + rel[:, 2] * sz

    def pack_offsets(self, offsets: torch.Tensor) -> torch.Tensor:
        """Key increments (K,) of integer displacements (K, 3)."""
        _, sx, sy, sz = self.strides
        return offsets[:, 0] * sx + offsets[:, 1] * sy + offsets[:, 2] * sz

    def find(self, query_keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Look keys up. Returns (site index into the original order, found mask), both shaped like the input.

        The index is meaningless (but in range) where ``found`` is False.
        """
        n = self.sorted_keys.shape[0]
        pos = torch.searchsorted(self.sorted_keys, query_keys).clamp_(max=max(n - 1, 0))
        found = self.sorted_keys[pos] == query_keys
        return self.perm[pos], found

    def pack_queries(self, query_grid: torch.Tensor, query_batch: torch.Tensor) -> torch.Tensor:
        """Keys (Q,) of arbitrary integer queries; -1 (never a valid key) where out of the hashed range."""
        rel = query_grid - self.lo
        ext = torch.tensor(self.extent, device=rel.device)
        ok = (rel >= 0).all(1) & (rel < ext).all(1) & (query_batch >= 0) & (query_batch < self.n_batch)
        keys = self._pack(rel.clamp(min=0), query_batch.clamp(min=0))
        return torch.where(ok, keys, torch.full_like(keys, -1))


# ---------------------------------------------------------------------------------------- neighbor map


@dataclass
class NeighborMap:
    """Gather/scatter pairs of a submanifold convolution, grouped by kernel offset.

    For offset ``o`` (Conv3d weight order, displacement ``kernel_offsets(k)[o]``) the pairs are
    ``in_idx[ptr[o]:ptr[o+1]]`` / ``out_idx[ptr[o]:ptr[o+1]]``: site ``out_idx`` + displacement is the active
    site ``in_idx`` of the same batch item. Within an offset, pairs are ordered by the output site's packed
    ``(batch, x, y, z)`` key.

    Attributes:
        in_idx: int64 (M,) input site indices.
        out_idx: int64 (M,) output site indices.
        offset_ptr: tuple of K+1 python ints, CSR pointers into the pair arrays (K = kernel_size**3).
        kernel_size: k.
        num_sites: N, the number of active sites (inputs = outputs).
    """

    in_idx: torch.Tensor
    out_idx: torch.Tensor
    offset_ptr: tuple[int, ...]
    kernel_size: int
    num_sites: int
    _plan: ConvPlan | None = field(default=None, repr=False, compare=False)

    def plan(self, max_groups: int = 2) -> ConvPlan:
        """The non-centre offsets with pairs, as at most ``max_groups`` :class:`OffsetGroup` with their gather /
        scatter rows (built once per map and cached: every layer convolving on this map reuses it)."""
        if self._plan is None or len(self._plan.groups) > max_groups:
            self._plan = _conv_plan(self, max_groups)
        return self._plan

    @property
    def kernel_volume(self) -> int:
        """K = kernel_size**3."""
        return self.kernel_size**3

    @property
    def center(self) -> int:
        """Index of the zero offset (its pairs are the identity)."""
        return self.kernel_volume // 2

    def counts(self) -> list[int]:
        """Number of pairs per offset, length K."""
        p = self.offset_ptr
        return [p[o + 1] - p[o] for o in range(self.kernel_volume)]

    def pairs(self, o: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(in_idx, out_idx) of offset ``o``, each int64 (M_o,)."""
        s, e = self.offset_ptr[o], self.offset_ptr[o + 1]
        return self.in_idx[s:e], self.out_idx[s:e]

    def to(self, device: torch.device | str) -> NeighborMap:
        """Copy of the map with index tensors on ``device`` (the plan is rebuilt there when needed)."""
        return NeighborMap(
            self.in_idx.to(device), self.out_idx.to(device), self.offset_ptr, self.kernel_size, self.num_sites
        )


@dataclass
class OffsetGroup:
    """Offsets convolved together by one batched matmul (see :meth:`NeighborMap.plan`).

    ``offsets`` int64 (G,); ``rows``: (start, stop) of the group's G * L padded pair rows in the plan's row
    layout; ``length`` L, the largest pair count among the G offsets.
    """

    offsets: torch.Tensor
    rows: tuple[int, int]
    length: int


@dataclass
class ConvPlan:
    """How :func:`submanifold_conv3d` runs on one neighbour map: the groups and, over R padded pair rows,
    ``gather`` (R,) input site of each row and ``scatter`` (R,) output site (both -1 on padding rows), and
    the CSR matrices built from them (lazily, per dtype): T (R x N) and S (N x R) with one 1 per real row,
    and their transposes."""

    groups: list[OffsetGroup]
    gather: torch.Tensor
    scatter: torch.Tensor
    num_sites: int
    _csr: dict = field(default_factory=dict, repr=False)

    @property
    def num_rows(self) -> int:
        return int(self.gather.numel())

    def matrices(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """(T, T^T, S, S^T) as sparse CSR tensors of ``dtype``."""
        if dtype not in self._csr:
            real = torch.nonzero(self.gather >= 0).squeeze(1)
            T, Tt = _selection_csr(real, self.gather[real], self.num_rows, self.num_sites, dtype)
            St, S = _selection_csr(real, self.scatter[real], self.num_rows, self.num_sites, dtype)
            self._csr[dtype] = (T, Tt, S, St)
        return self._csr[dtype]


def _selection_csr(rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_cols: int, dtype: torch.dtype):
    """CSR (n_rows x n_cols) with a 1 at each (rows[i], cols[i]) (``rows`` ascending, unique) and its
    transpose; the transpose's entries of one row keep the ascending order of ``rows``."""
    device = rows.device
    ones = torch.ones(len(rows), dtype=dtype, device=device)
    zero = torch.zeros(1, dtype=torch.long, device=device)
    crow = torch.cat([zero, torch.cumsum(torch.bincount(rows, minlength=n_rows), 0)])
    by_col, perm = torch.sort(cols, stable=True)
    crow_t = torch.cat([zero, torch.cumsum(torch.bincount(by_col, minlength=n_cols), 0)])
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is stable
        warnings.simplefilter("ignore", UserWarning)
        fwd = torch.sparse_csr_tensor(crow, cols, ones, size=(n_rows, n_cols), check_invariants=False)
        bwd = torch.sparse_csr_tensor(crow_t, rows[perm], ones, size=(n_cols, n_rows), check_invariants=False)
    return fwd, bwd


def split_sorted_counts(counts: list[int], max_groups: int, group_cost: float) -> list[tuple[int, int]]:
    """Split counts sorted in descending order into at most ``max_groups`` contiguous runs minimising the
    padded rows (each run costs len(run) x its first count) plus ``group_cost`` per run. Returns
    [(start, stop), ...]. Exact dynamic programme (n <= k**3 - 1, groups <= 3)."""
    n = len(counts)
    if n == 0:
        return []
    inf = float("inf")
    # best[g][j]: cheapest cost of the first j counts in g runs; cut[g][j]: start of the last run
    best = [[inf] * (n + 1) for _ in range(max_groups + 1)]
    cut = [[0] * (n + 1) for _ in range(max_groups + 1)]
    best[0][0] = 0.0
    for g in range(1, max_groups + 1):
        for j in range(1, n + 1):
            for i in range(j):
                c = best[g - 1][i] + (j - i) * counts[i] + group_cost
                if c < best[g][j]:
                    best[g][j], cut[g][j] = c, i
    g = min(range(1, max_groups + 1), key=lambda g: best[g][n])
    runs, j = [], n
    while g:
        i = cut[g][j]
        runs.append((i, j))
        j, g = i, g - 1
    return runs[::-1]


def _conv_plan(nm: NeighborMap, max_groups: int) -> ConvPlan:
    counts = nm.counts()
    live = sorted((o for o in range(nm.kernel_volume) if o != nm.center and counts[o]),
                  key=lambda o: (-counts[o], o))
    total = sum(counts[o] for o in live)
    # an extra group (a bmm forward, two backward) pays when it saves > 1/8 of the pairs (and > 1024
    # rows). Measured on the small preset's 1 cm tabletop clouds: one group pads the pairs 2-3.7x, two
    # groups 1.0-1.3x, a third saves < 10 % more
    runs = split_sorted_counts([counts[o] for o in live], max_groups, group_cost=max(total / 8, 1024))
    device = nm.in_idx.device
    groups, gathers, scatters = [], [], []
    row = 0
    for start, stop in runs:
        offs = live[start:stop]
        length = counts[offs[0]]
        first = torch.tensor([nm.offset_ptr[o] for o in offs], device=device)
        n_pairs = torch.tensor([counts[o] for o in offs], device=device)
        j = torch.arange(length, device=device)
        valid = (j[None, :] < n_pairs[:, None]).reshape(-1)  # (G * L,)
        pos = (first[:, None] + j[None, :]).reshape(-1).clamp(max=max(len(nm.in_idx) - 1, 0))
        gathers.append(torch.where(valid, nm.in_idx[pos], -1))
        scatters.append(torch.where(valid, nm.out_idx[pos], -1))
        groups.append(OffsetGroup(torch.tensor(offs, device=device), (row, row + len(offs) * length), length))
        row += len(offs) * length
    empty = nm.in_idx.new_zeros(0)
    return ConvPlan(groups, torch.cat(gathers) if gathers else empty, torch.cat(scatters) if scatters else empty,
                    nm.num_sites)


def build_neighbor_map(
    grid: torch.Tensor, batch: torch.Tensor, kernel_size: int = 3, allow_duplicates: bool = False
) -> NeighborMap:
    """Neighbour pairs of a submanifold convolution over the active sites.

    Args:
        grid: integer (N, 3) voxel coordinates (any sign); sites should be unique per batch item.
        batch: integer (N,) non-negative batch index of each site; different items never interact.
        kernel_size: odd k; the map covers the k**3 offsets in :func:`kernel_offsets` order.
        allow_duplicates: if False (default) duplicate ``(batch, voxel)`` sites raise ValueError. If True,
            every duplicate still gets its own output and sees its own feature through the centre offset,
            but as a *neighbour* a duplicated voxel contributes only its lowest-index site. (spconv's hash
            also keeps one representative per voxel, chosen nondeterministically, and uses it for the
            centre too.)

    Returns:
        :class:`NeighborMap`. Cost: one sort of N keys plus one ``searchsorted`` of k**3 * N keys.
    """
    grid, batch = _check_sites(grid, batch, "grid", "batch")
    k = _check_kernel_size(kernel_size)
    n = grid.shape[0]
    if n == 0:
        empty = grid.new_zeros(0)
        return NeighborMap(empty, empty.clone(), (0,) * (k**3 + 1), k, 0)
    vh = _VoxelHash(
        grid, batch, margin=k // 2, gname="grid", bname="batch", allow_duplicates=allow_duplicates
    )
    deltas = vh.pack_offsets(kernel_offsets(k, device=grid.device))  # (K,)
    # Queries built from the *sorted* keys are sorted within each offset row, which makes searchsorted
    # about twice as fast (cache-friendly) as querying in the sites' original order.
    query = vh.sorted_keys.unsqueeze(0) + deltas.unsqueeze(1)  # (K, N)
    src, found = vh.find(query)
    o_idx, col = found.nonzero(as_tuple=True)  # row-major: grouped by offset, then by output key
    in_idx = src[o_idx, col]
    out_idx = vh.perm[col]
    counts = found.sum(1)
    ptr = [0] + torch.cumsum(counts, 0).tolist()
    if allow_duplicates:  # the centre offset pairs every site with itself (not with its first duplicate)
        c = k**3 // 2
        in_idx[ptr[c] : ptr[c + 1]] = out_idx[ptr[c] : ptr[c + 1]]
    return NeighborMap(in_idx, out_idx, tuple(ptr), k, n)


# ---------------------------------------------------------------------------------------- convolution


def dense_to_sparse_weight(weight: torch.Tensor) -> torch.Tensor:
    """``torch.nn.Conv3d`` weight (C_out, C_in, k, k, k) -> sparse layout (k**3, C_in, C_out)."""
    if (
        not isinstance(weight, torch.Tensor)
        or weight.dim() != 5
        or not (weight.shape[2] == weight.shape[3] == weight.shape[4])
    ):
        raise ValueError(f"weight must have shape (C_out, C_in, k, k, k), got {_shape(weight)}")
    c_out, c_in, k = weight.shape[0], weight.shape[1], weight.shape[2]
    return weight.permute(2, 3, 4, 1, 0).reshape(k**3, c_in, c_out)


def sparse_to_dense_weight(weight: torch.Tensor) -> torch.Tensor:
    """Sparse layout (k**3, C_in, C_out) -> ``torch.nn.Conv3d`` weight (C_out, C_in, k, k, k)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 3:
        raise ValueError(f"weight must have shape (k**3, C_in, C_out), got {_shape(weight)}")
    k = round(weight.shape[0] ** (1 / 3))
    if k**3 != weight.shape[0]:
        raise ValueError(f"weight.shape[0] must be a cube k**3, got {weight.shape[0]}")
    return weight.reshape(k, k, k, weight.shape[1], weight.shape[2]).permute(4, 3, 0, 1, 2)


def submanifold_conv3d(
    feat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, neighbor_map: NeighborMap
) -> torch.Tensor:
    """Functional submanifold convolution.

    Args:
        feat: (N, C_in) features of the active sites (the order used to build ``neighbor_map``).
        weight: (k**3, C_in, C_out).
        bias: (C_out,) or None.
        neighbor_map: from :func:`build_neighbor_map` with the same N and k.

    Returns:
        (N, C_out): ``out[p] = bias + sum_o feat[p + d_o] @ weight[o]`` over active ``p + d_o``.
    """
    nm = neighbor_map
    if not isinstance(feat, torch.Tensor) or feat.dim() != 2 or feat.shape[0] != nm.num_sites:
        raise ValueError(f"feat must have shape ({nm.num_sites}, C_in), got {_shape(feat)}")
    if weight.dim() != 3 or weight.shape[0] != nm.kernel_volume or weight.shape[1] != feat.shape[1]:
        raise ValueError(
            f"weight must have shape ({nm.kernel_volume}, {feat.shape[1]}, C_out), got {_shape(weight)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[2],):
        raise ValueError(f"bias must have shape ({weight.shape[2]},), got {_shape(bias)}")
    plan = nm.plan()
    if (feat.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
            and plan.num_rows * max(weight.shape[1], weight.shape[2]) >= CSR_MIN_ELEMENTS):
        return _SubMConvFunction.apply(feat, weight, bias, nm.center, plan)
    return _grouped_conv(feat, weight, bias, nm.center, plan)


# A CSR product always runs on every thread; below torch's parallel grain size (32768 elements) the index
# kernels of the autograd path run on one, so small levels take that path (each parallel region can cost a
# scheduler time slice on a loaded machine: 7 ms for a 234-row product with 2 threads, 0.02 ms with 1)
CSR_MIN_ELEMENTS = 32768


def _grouped_conv(feat, weight, bias, center: int, plan: ConvPlan) -> torch.Tensor:
    """The same sum through autograd (any device, autocast): gathers, batched matmuls, one ``index_add_``."""
    w = weight[center]
    out = feat @ w if bias is None else torch.addmm(bias.to(feat.dtype), feat, w.to(feat.dtype))
    if not plan.groups:
        return out
    real = plan.gather >= 0
    x = feat.index_select(0, plan.gather.clamp(min=0)) * real[:, None].to(feat.dtype)
    ys = [torch.bmm(x[a:b].view(len(g.offsets), g.length, -1), weight[g.offsets].to(x.dtype))
          for g in plan.groups for a, b in [g.rows]]
    y = torch.cat([v.reshape(-1, v.shape[-1]) for v in ys])
    acc = torch.cat([out, out.new_zeros(1, out.shape[1])])  # row N: the padding rows' dummy
    scatter = torch.where(real, plan.scatter, plan.num_sites)
    return acc.index_add(0, scatter, y.to(acc.dtype))[: plan.num_sites]


class _SubMConvFunction(torch.autograd.Function):
    """CPU submanifold convolution over a :class:`ConvPlan` with a hand-written backward (module docstring,
    step 3). Forward: out = bias + feat @ W_c + S @ Y, Y = the groups' bmm of X = T @ feat. Backward:
    dW_c = feat^T dOut, dY = S^T dOut, dW_g = X_g^T dY_g, dX_g = dY_g W_g^T, dFeat = dOut W_c^T + T^T dX.
    X is recomputed in the backward rather than kept (one CSR product; saves ~60 MB a step at small)."""

    @staticmethod
    def forward(ctx, feat, weight, bias, center, plan):
        ctx.center, ctx.plan, ctx.has_bias = center, plan, bias is not None
        ctx.save_for_backward(feat, weight)
        w_c = weight[center]
        out = feat @ w_c if bias is None else torch.addmm(bias, feat, w_c)
        if not plan.groups:
            return out
        T, _, S, _ = plan.matrices(feat.dtype)
        x = T @ feat  # (R, C_in), zero rows where padded
        y = feat.new_empty(plan.num_rows, weight.shape[2])
        for g in plan.groups:
            a, b = g.rows
            torch.bmm(x[a:b].view(len(g.offsets), g.length, -1), weight.index_select(0, g.offsets),
                      out=y[a:b].view(len(g.offsets), g.length, -1))
        return torch.addmm(out, S, y)

    @staticmethod
    def backward(ctx, grad):
        feat, weight = ctx.saved_tensors
        plan, c = ctx.plan, ctx.center
        grad = grad.contiguous()
        need_feat, need_w, need_b = ctx.needs_input_grad[:3]
        d_feat = grad @ weight[c].t() if need_feat else None
        d_w = torch.zeros_like(weight) if need_w else None
        if need_w:
            torch.mm(feat.t(), grad, out=d_w[c])
        d_b = grad.sum(0) if need_b and ctx.has_bias else None
        if plan.groups and (need_feat or need_w):
            T, Tt, _, St = plan.matrices(feat.dtype)
            dy = St @ grad  # (R, C_out), zero rows where padded
            x = T @ feat if need_w else None
            dx = feat.new_empty(plan.num_rows, feat.shape[1]) if need_feat else None
            for g in plan.groups:
                a, b = g.rows
                n = len(g.offsets)
                dy_g = dy[a:b].view(n, g.length, -1)
                if need_w:
                    d_w.index_copy_(0, g.offsets, torch.bmm(x[a:b].view(n, g.length, -1).transpose(1, 2), dy_g))
                if need_feat:
                    torch.bmm(dy_g, weight.index_select(0, g.offsets).transpose(1, 2),
                              out=dx[a:b].view(n, g.length, -1))
            if need_feat:
                d_feat = torch.addmm(d_feat, Tt, dx)
        return d_feat, d_w, d_b, None, None


class SubMConv3d(nn.Module):
    """Submanifold sparse 3-D convolution (outputs at the active input sites only), pure PyTorch.

    Equivalent to spconv's ``SubMConv3d(in_channels, out_channels, kernel_size, bias=bias)`` and to a dense
    ``torch.nn.Conv3d(..., padding=k // 2)`` evaluated at the active sites with inactive sites zero.

    Initialisation: ``torch.nn.Conv3d``'s default, which spconv 2.x also uses
    (``kaiming_uniform_(a=sqrt(5))`` with fan_in = C_in * k**3): weight and bias ~ U(-1/sqrt(fan_in),
    1/sqrt(fan_in)).

    Args:
        in_channels: C_in.
        out_channels: C_out.
        kernel_size: odd k (3 for PTv3's CPE / ConvBlock, 5 for the stem).
        bias: add a learnable bias.

    Shapes: ``forward(feat (N, C_in), neighbor_map) -> (N, C_out)``; ``weight`` (k**3, C_in, C_out).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _check_kernel_size(kernel_size)
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(kernel_size**3, in_channels, out_channels, **kw))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **kw))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias, fan_in = C_in * k**3 (Conv3d default)."""
        bound = 1.0 / math.sqrt(self.in_channels * self.kernel_size**3)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    def forward(self, feat: torch.Tensor, neighbor_map: NeighborMap) -> torch.Tensor:
        """(N, C_in) features + map of the same N sites and kernel size -> (N, C_out)."""
        if neighbor_map.kernel_size != self.kernel_size:
            raise ValueError(
                f"neighbor_map was built for kernel_size={neighbor_map.kernel_size}, layer has {self.kernel_size}"
            )
        return submanifold_conv3d(feat, self.weight, self.bias, neighbor_map)

    @torch.no_grad()
    def from_dense_weight(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> SubMConv3d:
        """Copy a ``torch.nn.Conv3d`` weight (C_out, C_in, k, k, k) (and optional bias) in place; returns self."""
        w = dense_to_sparse_weight(weight)
        if tuple(w.shape) != tuple(self.weight.shape):
            raise ValueError(
                f"weight shape {tuple(weight.shape)} does not match "
                f"({self.out_channels}, {self.in_channels}, {self.kernel_size}, {self.kernel_size}, "
                f"{self.kernel_size})"
            )
        self.weight.copy_(w)
        if bias is not None:
            if self.bias is None or tuple(bias.shape) != tuple(self.bias.shape):
                raise ValueError(
                    f"bias of shape {_shape(bias)} does not fit this layer (bias={self.bias is not None})"
                )
            self.bias.copy_(bias)
        return self

    def to_dense_weight(self) -> torch.Tensor:
        """The weight in ``torch.nn.Conv3d`` layout (C_out, C_in, k, k, k) (a view; differentiable)."""
        return sparse_to_dense_weight(self.weight)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"bias={self.bias is not None}"
        )


# ---------------------------------------------------------------------------------------------- lookup


def lookup(
    query_grid: torch.Tensor,
    query_batch: torch.Tensor,
    grid: torch.Tensor,
    batch: torch.Tensor,
    feat: torch.Tensor,
    allow_duplicates: bool = False,
) -> torch.Tensor:
    """Feature of the active voxel at exactly each query's (batch, voxel); zero where there is none.

    Mini-Diffuser's local query (``retrieve_aligned_features``): anchors read the feature of the occupied
    voxel they fall in. Queries outside the active sites' range (negative coordinates, other batch indices)
    get zeros. Differentiable w.r.t. ``feat``.

    Args:
        query_grid: integer (Q, 3) voxel coordinates of the queries (any sign).
        query_batch: integer (Q,) batch index of each query.
        grid: integer (N, 3) active voxels (unique per batch item).
        batch: integer (N,) non-negative batch index of each active voxel.
        feat: (N, C) features of the active voxels.
        allow_duplicates: if False (default) duplicate active voxels raise ValueError; if True a query
            reads the lowest-index site of its voxel.

    Returns:
        (Q, C) tensor with ``feat``'s dtype/device.
    """
    query_grid, query_batch = _check_sites(query_grid, query_batch, "query_grid", "query_batch")
    grid, batch = _check_sites(grid, batch, "grid", "batch")
    if not isinstance(feat, torch.Tensor) or feat.dim() != 2 or feat.shape[0] != grid.shape[0]:
        raise ValueError(f"feat must have shape ({grid.shape[0]}, C), got {_shape(feat)}")
    q = query_grid.shape[0]
    if grid.shape[0] == 0 or q == 0:
        return feat.new_zeros(q, feat.shape[1])
    vh = _VoxelHash(grid, batch, margin=0, gname="grid", bname="batch", allow_duplicates=allow_duplicates)
    idx, found = vh.find(vh.pack_queries(query_grid, query_batch))
    # index_select, not feat[idx]: many queries share a voxel, and the backward of feat[idx] (an accumulating
    # index_put_) sums their gradients in a thread-dependent order on CPU; index_select's does not
    return torch.where(found.unsqueeze(1), feat.index_select(0, idx), feat.new_zeros(()))
