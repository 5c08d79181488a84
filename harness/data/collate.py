"""Collate transformed keysteps into a Level-1 batch of fixed-size tensors.

Shapes (B observations, N points, L text tokens): points/colors (B, N, 3), height (B, N, 1), point_mask
(B, N) bool, pose/target (B, 8), history (B, n_hist, 8), offset (B, 3), rotation (B,), text_tokens
(B, L_max, D) zero-padded with text_mask (B, L_max) bool; task/instruction/key are lists of B strings.
"""

from __future__ import annotations

import numpy as np
import torch

_STACKED = ("points", "colors", "height", "point_mask", "pose", "target", "history", "offset", "rotation",
            "rotation_center")
_OPTIONAL_STACKED = ("images", "point_maps")  # image policies only
_LISTS = ("task", "instruction", "key", "variation")


def batch_to(batch: dict, device) -> dict:
    """Move a collated batch's tensors to ``device`` (string lists stay as they are)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def collate_keysteps(items: list[dict]) -> dict:
    if not items:
        raise ValueError("cannot collate an empty list of keysteps")
    batch: dict = {}
    for name in _STACKED:
        arrays = [np.asarray(it[name]) for it in items]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"cannot stack '{name}': shapes differ across the batch {sorted(shapes)} "
                             "(set a fixed num_points)")
        batch[name] = torch.from_numpy(np.stack(arrays))
    for name in _OPTIONAL_STACKED:
        if all(name in it for it in items):
            arrays = [np.asarray(it[name]) for it in items]
            if len({a.shape for a in arrays}) != 1:
                raise ValueError(f"cannot stack '{name}': shapes differ across the batch "
                                 f"{sorted({a.shape for a in arrays})} (cameras or image sizes differ)")
            batch[name] = torch.from_numpy(np.stack(arrays))
    for name in _LISTS:
        batch[name] = [it[name] for it in items]
    tokens = [it.get("text_tokens") for it in items]
    if all(t is not None for t in tokens):
        dims = {t.shape[1] for t in tokens}
        if len(dims) != 1:
            raise ValueError(f"text embeddings have different widths across the batch: {sorted(dims)}")
        L = max(t.shape[0] for t in tokens)
        out = np.zeros((len(tokens), L, dims.pop()), np.float32)
        mask = np.zeros((len(tokens), L), bool)
        for i, t in enumerate(tokens):
            out[i, : len(t)] = t
            mask[i, : len(t)] = True
        batch["text_tokens"] = torch.from_numpy(out)
        batch["text_mask"] = torch.from_numpy(mask)
    return batch
