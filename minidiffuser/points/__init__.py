"""Pure-PyTorch point-cloud building blocks for the PTv3-style backbone of Mini-Diffuser.

The official code relies on CUDA-only or compiled libraries for these pieces (spconv for submanifold sparse
convolution, whose CPU wheel cannot run backward; torch_scatter, which must be compiled against the installed
torch; Pointcept's serialization helpers). There is no CPU-capable library that covers them, so they are
written here by hand in plain PyTorch (CPU and CUDA alike):

- :mod:`.serialization`: z-order (Morton) and 3-D Hilbert space-filling-curve codes, batched serialization
  (``code`` / ``order`` / ``inverse``) as in Pointcept's ``Point.serialization``.
- :mod:`.sparse_conv`: voxel hashing, neighbour maps, submanifold sparse 3-D convolution (``SubMConv3d``) and
  the exact-voxel feature ``lookup`` used by Mini-Diffuser's local query.
- :mod:`.sampling`: batched farthest point sampling.
"""

from minidiffuser.points.sampling import farthest_point_sample
from minidiffuser.points.serialization import (
    ORDERS,
    Serialization,
    encode,
    hilbert_decode,
    hilbert_encode,
    serialize,
    z_order_decode,
    z_order_encode,
)
from minidiffuser.points.sparse_conv import (
    NeighborMap,
    SubMConv3d,
    build_neighbor_map,
    dense_to_sparse_weight,
    kernel_offsets,
    lookup,
    sparse_to_dense_weight,
    submanifold_conv3d,
)

__all__ = [
    "ORDERS",
    "NeighborMap",
    "Serialization",
    "SubMConv3d",
    "build_neighbor_map",
    "dense_to_sparse_weight",
    "encode",
    "farthest_point_sample",
    "hilbert_decode",
    "hilbert_encode",
    "kernel_offsets",
    "lookup",
    "serialize",
    "sparse_to_dense_weight",
    "submanifold_conv3d",
    "z_order_decode",
    "z_order_encode",
]
