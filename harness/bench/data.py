"""``mdh bench data PATH``: loader throughput in keysteps/s with the default transforms and workers."""

from __future__ import annotations

import os
import time

import numpy as np
from torch.utils.data import DataLoader

from harness.data.collate import collate_keysteps
from harness.data.dataset import KeystepDataset
from harness.data.transforms import TransformConfig


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def bench_data(path: str, batch_size: int = 8, workers: int | None = None, num_points: int = 4000,
               batches: int = 30, warmup: int = 3, repeats: int = 3, split: str = "train",
               kind: str = "voxel1cm", skip_bad: bool = False) -> dict:
    """Time ``repeats`` passes of ``batches`` batches (after ``warmup`` batches) through a DataLoader.

    Returns keysteps/s median over passes plus each pass's figure. The loader cycles over the dataset
    if it has fewer keysteps than needed.
    """
    workers = default_workers() if workers is None else workers
    ds = KeystepDataset(path, split=split, kind=kind, transform=TransformConfig(num_points=num_points),
                        skip_bad=skip_bad)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                        collate_fn=collate_keysteps, persistent_workers=workers > 0, drop_last=False)

    def batches_forever():
        while True:
            yield from loader

    it = batches_forever()
    for _ in range(warmup):
        next(it)
    rates = []
    for _ in range(repeats):
        n = 0
        start = time.perf_counter()
        for _ in range(batches):
            n += len(next(it)["key"])
        rates.append(n / (time.perf_counter() - start))
    return {"path": str(path), "keysteps": len(ds), "batch_size": batch_size, "workers": workers,
            "num_points": num_points, "skipped": dict(ds.skipped), "batches_per_pass": batches, "passes": repeats,
            "keysteps_per_s_median": float(np.median(rates)), "keysteps_per_s": [float(r) for r in rates]}
