"""A resumable batch order: batch k is a pure function of (seed, k), so a run resumed at step k draws
exactly the batches an uninterrupted run would have drawn, however far DataLoader workers prefetched."""

from __future__ import annotations

import numpy as np
from torch.utils.data import Sampler


class ResumableBatchSampler(Sampler):
    """Infinite stream of batches of ``(index, epoch)`` pairs.

    Epoch e is a permutation of ``range(n)`` drawn from ``default_rng([seed, e])``; batches are consecutive
    slices of ``batch_size`` (the last partial slice of an epoch is dropped). ``start`` = index of the
    first batch to yield (the training step to resume at). The epoch travels with each index so the
    dataset's per-item augmentation RNG is deterministic inside worker processes too.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0):
        if n < batch_size:
            raise ValueError(f"dataset has {n} keysteps, fewer than one batch of {batch_size}; lower train.B")
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start
        self.per_epoch = n // batch_size

    def batch(self, k: int) -> list[tuple[int, int]]:
        epoch, offset = divmod(k, self.per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return [(int(i), epoch) for i in perm[offset * self.batch_size:(offset + 1) * self.batch_size]]

    def __iter__(self):
        k = self.start
        while True:
            yield self.batch(k)
            k += 1

    def __len__(self) -> int:  # DataLoader asks; the stream is infinite, the loop counts steps itself
        return 2**62
