"""Space-filling-curve serialization of voxelised point clouds (PTv3 ``Point.serialization``), pure PyTorch.

Written by hand: Pointcept's serialization helpers are plain PyTorch too, but their Hilbert encoder works on
unpacked bit arrays and takes about a second for 20k points on a 2-core CPU; the official stack is otherwise
CUDA-only (spconv, torch_scatter, flash_attn), so the whole ``points`` package is self-contained PyTorch.
Everything here is vectorised over points; the only Python loops run over the ``depth`` bits and the 3 axes.

Conventions (chosen to reproduce Pointcept's codes bit for bit):

- z-order (Morton): bit ``i`` of x/y/z goes to bit ``3i+2`` / ``3i+1`` / ``3i`` of the code, so x is the most
  significant axis within each 3-bit group (Pointcept/OCNN ``xyz2key``).
- Hilbert: John Skilling's transpose algorithm ("Programming the Hilbert curve", AIP Conf. Proc. 707, 2004)
  with axis 0 = x as the most significant axis, the convention of ``numpy-hilbert-curve`` used by Pointcept.
  Consecutive codes are always face-adjacent voxels.
- "trans" orders swap x and y before encoding.
- The batch index goes above the curve bits: ``batch << (3 * depth) | code``, so sorting by code keeps every
  sample contiguous and patches never straddle samples.

Shapes: ``N`` points, ``grid`` is an integer tensor (N, 3) of non-negative voxel coordinates below
``2 ** depth``; codes are int64 (N,).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ORDERS: tuple[str, ...] = ("z", "z-trans", "hilbert", "hilbert-trans")
MAX_DEPTH = 16
MAX_CODE_BITS = 62

# Magic numbers to spread the low 21 bits of an int64 so that bit i lands at bit 3i ("part1by2"), and back.
_SPREAD = (
    (32, 0x1F00000000FFFF),
    (16, 0x1F0000FF0000FF),
    (8, 0x100F00F00F00F00F),
    (4, 0x10C30C30C30C30C3),
    (2, 0x1249249249249249),
)
_COMPACT = (
    (2, 0x10C30C30C30C30C3),
    (4, 0x100F00F00F00F00F),
    (8, 0x1F0000FF0000FF),
    (16, 0x1F00000000FFFF),
    (32, 0x1FFFFF),
)


def _spread_bits(v: torch.Tensor) -> torch.Tensor:
    """Move bit ``i`` of each int64 in ``v`` (< 2**21) to bit ``3i``. Shape preserved."""
    v = v & 0x1FFFFF
    tmp = torch.empty_like(v)  # in place with one scratch buffer (fresh allocations page-fault on CPU)
    for shift, mask in _SPREAD:
        v.bitwise_or_(torch.bitwise_left_shift(v, shift, out=tmp)).bitwise_and_(mask)
    return v


def _compact_bits(v: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_spread_bits`: gather bits ``3i`` of each int64 into bit ``i``. Shape preserved."""
    v = v & 0x1249249249249249
    tmp = torch.empty_like(v)
    for shift, mask in _COMPACT:
        v.bitwise_xor_(torch.bitwise_right_shift(v, shift, out=tmp)).bitwise_and_(mask)
    return v


def _interleave(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Interleave three int64 tensors bitwise, ``a`` most significant: bit i of a/b/c -> bit 3i+2/3i+1/3i."""
    out = _spread_bits(a).bitwise_left_shift_(2)
    out.bitwise_or_(_spread_bits(b).bitwise_left_shift_(1))
    return out.bitwise_or_(_spread_bits(c))


def _check_depth(depth: int) -> int:
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= MAX_DEPTH:
        raise ValueError(f"depth must be an int in [1, {MAX_DEPTH}], got {depth!r}")
    return depth


def _is_int_tensor(t: object) -> bool:
    return (
        isinstance(t, torch.Tensor)
        and not t.is_floating_point()
        and not t.is_complex()
        and t.dtype != torch.bool
    )


def _check_grid(grid: torch.Tensor, depth: int, name: str = "grid") -> torch.Tensor:
    """Validate an integer (N, 3) grid with coordinates in [0, 2**depth); return it as int64."""
    if not _is_int_tensor(grid) or grid.dim() != 2 or grid.shape[1] != 3:
        shape = tuple(grid.shape) if isinstance(grid, torch.Tensor) else type(grid).__name__
        dtype = grid.dtype if isinstance(grid, torch.Tensor) else None
        raise ValueError(f"{name} must be an integer tensor of shape (N, 3), got shape {shape} dtype {dtype}")
    grid = grid.long()
    if grid.numel():
        # aminmax over dim 0 is one cheap single-threaded reduction (a full int64 min/max is much slower on CPU)
        mins, maxs = torch.aminmax(grid, dim=0)
        lo, hi = min(mins.tolist()), max(maxs.tolist())
        if lo < 0 or hi >= (1 << depth):
            raise ValueError(
                f"{name} coordinates must lie in [0, 2**depth) = [0, {1 << depth}) for depth={depth}, "
                f"got range [{lo}, {hi}]"
            )
    return grid


def _check_code(code: torch.Tensor, depth: int) -> torch.Tensor:
    """Validate a 1-D integer code tensor with values in [0, 2**(3*depth)); return it as int64."""
    if not _is_int_tensor(code) or code.dim() != 1:
        shape = tuple(code.shape) if isinstance(code, torch.Tensor) else type(code).__name__
        raise ValueError(f"code must be a 1-D integer tensor of shape (N,), got {shape}")
    code = code.long()
    if code.numel():
        lo, hi = (int(v) for v in torch.aminmax(code))
        if lo < 0 or hi >= (1 << (3 * depth)):
            raise ValueError(f"code values must lie in [0, 2**(3*depth)) for depth={depth}, got [{lo}, {hi}]")
    return code


# ----------------------------------------------------------------------------------------------- z-order


def z_order_encode(grid: torch.Tensor, depth: int) -> torch.Tensor:
    """Morton (z-order) code of integer voxel coordinates.

    Args:
        grid: integer tensor (N, 3), coordinates in ``[0, 2**depth)``.
        depth: bits per axis, 1..16.

    Returns:
        int64 tensor (N,) in ``[0, 2**(3*depth))``; bit ``i`` of x/y/z is bit ``3i+2``/``3i+1``/``3i``.
    """
    depth = _check_depth(depth)
    grid = _check_grid(grid, depth)
    return _interleave(grid[:, 0], grid[:, 1], grid[:, 2])


def z_order_decode(code: torch.Tensor, depth: int) -> torch.Tensor:
    """Inverse of :func:`z_order_encode`.

    Args:
        code: integer tensor (N,) in ``[0, 2**(3*depth))`` (no batch bits).
        depth: bits per axis, 1..16.

    Returns:
        int64 tensor (N, 3) of voxel coordinates.
    """
    depth = _check_depth(depth)
    code = _check_code(code, depth)
    return torch.stack([_compact_bits(code >> 2), _compact_bits(code >> 1), _compact_bits(code)], dim=-1)


# ----------------------------------------------------------------------------------------------- Hilbert


def _skilling_pass(x: list[torch.Tensor], levels: range, axes: tuple[int, ...]) -> None:
    """In-place core step of Skilling's algorithm on the three axis tensors ``x`` (each int64 (N,)).

    For each bit level ``q`` in ``levels`` and axis ``i`` in ``axes`` with ``P = 2**q - 1``: where bit ``q`` of
    axis ``i`` is set, invert the low bits ``P`` of axis 0; elsewhere exchange the low bits of axes 0 and i.
    Written with in-place ops on two scratch buffers: fresh 100+ kB allocations each cost page faults on CPU.
    """
    x0 = x[0]
    m = torch.empty_like(x0)
    t = torch.empty_like(x0)
    for level in levels:
        low = (1 << level) - 1
        for i in axes:
            xi = x[i]
            torch.bitwise_right_shift(xi, level, out=m)
            if i == 0:
                m.bitwise_and_(1).neg_().bitwise_and_(low)  # low bits where the bit is on
                x0.bitwise_xor_(m)
                continue
            m.bitwise_and_(1).sub_(1).bitwise_and_(low)  # low bits where the bit is off
            torch.bitwise_xor(x0, xi, out=t).bitwise_and_(m)  # bits to exchange between axis 0 and axis i
            xi.bitwise_xor_(t)
            m.bitwise_xor_(low)  # low bits where the bit is on: invert them in axis 0
            x0.bitwise_xor_(m).bitwise_xor_(t)


def hilbert_encode(grid: torch.Tensor, depth: int) -> torch.Tensor:
    """3-D Hilbert index of integer voxel coordinates (Skilling's transpose algorithm, vectorised).

    Loops only over the ``depth - 1`` bit levels and the 3 axes; every step is a handful of in-place int64
    ops on all points at once.

    Args:
        grid: integer tensor (N, 3), coordinates in ``[0, 2**depth)``.
        depth: bits per axis, 1..16.

    Returns:
        int64 tensor (N,) in ``[0, 2**(3*depth))``; codes ``h`` and ``h + 1`` are face-adjacent voxels.
    """
    depth = _check_depth(depth)
    grid = _check_grid(grid, depth)
    return _hilbert_encode(grid, depth)


def _hilbert_encode(grid: torch.Tensor, depth: int) -> torch.Tensor:
    x = [grid[:, i].clone() for i in range(3)]  # contiguous copies, modified in place below
    # Inverse undo (Skilling's AxestoTranspose), from the most significant level down to level 1.
    _skilling_pass(x, range(depth - 1, 0, -1), (0, 1, 2))
    # The Gray-encode step of the transpose equals a prefix XOR (Gray -> binary) along the interleaved bits.
    h = _interleave(x[0], x[1], x[2])
    tmp = torch.empty_like(h)
    for shift in (1, 2, 4, 8, 16, 32):
        h.bitwise_xor_(torch.bitwise_right_shift(h, shift, out=tmp))
    return h


def hilbert_decode(code: torch.Tensor, depth: int) -> torch.Tensor:
    """Inverse of :func:`hilbert_encode`.

    Args:
        code: integer tensor (N,) in ``[0, 2**(3*depth))`` (no batch bits).
        depth: bits per axis, 1..16.

    Returns:
        int64 tensor (N, 3) of voxel coordinates.
    """
    depth = _check_depth(depth)
    code = _check_code(code, depth)
    g = code ^ (code >> 1)  # binary -> Gray along the interleaved bits
    x = [_compact_bits(g >> 2), _compact_bits(g >> 1), _compact_bits(g)]
    # Undo excess work (Skilling's TransposetoAxes), from level 1 up to the most significant level.
    _skilling_pass(x, range(1, depth), (2, 1, 0))
    return torch.stack(x, dim=-1)


# ------------------------------------------------------------------------------------ batched encoding


def encode(grid: torch.Tensor, batch: torch.Tensor | None, depth: int, order: str = "z") -> torch.Tensor:
    """Curve code of each point with its batch index in the high bits.

    Args:
        grid: integer tensor (N, 3), coordinates in ``[0, 2**depth)``.
        batch: integer tensor (N,) of non-negative sample indices, or None for no batch bits.
        depth: bits per axis, 1..16.
        order: one of ``"z"``, ``"z-trans"``, ``"hilbert"``, ``"hilbert-trans"`` ("trans" swaps x and y).

    Returns:
        int64 tensor (N,): ``batch << (3 * depth) | curve_code``.

    Raises:
        ValueError: on a bad order/shape, ``depth > 16`` or ``3 * depth + bit_length(max batch) > 62``.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    depth = _check_depth(depth)
    grid = _check_grid(grid, depth)
    if batch is not None:
        if not _is_int_tensor(batch) or batch.dim() != 1 or batch.shape[0] != grid.shape[0]:
            shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise ValueError(f"batch must be an integer tensor of shape ({grid.shape[0]},), got {shape}")
        batch = batch.long()
        if batch.numel():
            lo, hi = (int(v) for v in torch.aminmax(batch))
            if lo < 0:
                raise ValueError(f"batch indices must be non-negative, got min {lo}")
            if 3 * depth + hi.bit_length() > MAX_CODE_BITS:
                raise ValueError(
                    f"3*depth + bit_length(max batch) = {3 * depth} + {hi.bit_length()} exceeds "
                    f"{MAX_CODE_BITS} bits (depth={depth}, max batch={hi})"
                )
    if order.endswith("-trans"):
        grid = grid[:, [1, 0, 2]]
    if order.startswith("z"):
        code = _interleave(grid[:, 0], grid[:, 1], grid[:, 2])
    else:
        code = _hilbert_encode(grid, depth)
    if batch is not None:
        code.bitwise_or_(batch << (3 * depth))
    return code


@dataclass
class Serialization:
    """Serialized orders of one (batched) point set.

    Attributes:
        code: int64 (n_orders, N), batch-prefixed curve codes, one row per order.
        order: int64 (n_orders, N), ``argsort(code)`` (stable): ``x[order[k]]`` is x in curve order k.
        inverse: int64 (n_orders, N) with ``x[order[k]][inverse[k]] == x``.
        depth: bits per axis used for the codes.
        orders: the curve names, one per row.
    """

    code: torch.Tensor
    order: torch.Tensor
    inverse: torch.Tensor
    depth: int
    orders: tuple[str, ...]


def default_depth(grid: torch.Tensor) -> int:
    """PTv3's default depth: bit length of ``grid.max()``, at least 1. ``grid``: integer (N, 3)."""
    if not isinstance(grid, torch.Tensor) or grid.numel() == 0:
        return 1
    return max(1, int(grid.max()).bit_length())


def serialize(
    grid: torch.Tensor,
    batch: torch.Tensor | None,
    orders: tuple[str, ...] | list[str] = ORDERS,
    depth: int | None = None,
) -> Serialization:
    """Codes, sort orders and inverse permutations for several curves (Pointcept ``Point.serialization``).

    Args:
        grid: integer tensor (N, 3) of non-negative voxel coordinates.
        batch: integer tensor (N,) of sample indices (or None for a single sample).
        orders: curve names from :data:`ORDERS`, e.g. ``("z", "z-trans", "hilbert", "hilbert-trans")``.
        depth: bits per axis; default ``max(1, bit_length(grid.max()))``.

    Returns:
        :class:`Serialization` with ``code``/``order``/``inverse`` of shape (len(orders), N).
    """
    if isinstance(orders, str) or not isinstance(orders, (tuple, list)) or len(orders) == 0:
        raise ValueError(f"orders must be a non-empty tuple of names from {ORDERS}, got {orders!r}")
    if depth is None:
        depth = default_depth(grid)
    codes = torch.stack([encode(grid, batch, depth, o) for o in orders])
    # Row by row: a 1-D sort is several times faster than a batched 2-D argsort on CPU.
    order = torch.stack([torch.sort(c, stable=True).indices for c in codes])
    arange = torch.arange(codes.shape[1], device=codes.device).expand_as(order)
    inverse = torch.empty_like(order).scatter_(1, order, arange)
    return Serialization(code=codes, order=order, inverse=inverse, depth=depth, orders=tuple(orders))
