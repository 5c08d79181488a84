"""Rotation-bin and gripper head (reference §1.10-1.11).

Input: the observation's max-pooled final point feature (B, C) concatenated with a position (B, 3):
the ground truth + N(0, 1 cm) in training, the denoised position when sampling. ``decoupled``: 3 x 72
Euler-bin logits (bin-major, as the official layout) + 1 gripper logit. ``joint`` (rotation diffused with
the position): the gripper logit only.
"""

from __future__ import annotations

import torch
from torch import nn

from minidiffuser.layers import Dropout


class ActionHead(nn.Module):
    def __init__(self, in_channels: int, hidden: int, dropout: float, n_bins: int | None):
        super().__init__()
        self.n_bins = n_bins
        out = (n_bins * 3 if n_bins else 0) + 1
        self.mlp = nn.Sequential(nn.Linear(in_channels + 3, hidden), nn.LeakyReLU(0.02), Dropout(dropout),
                                 nn.Linear(hidden, out))

    def forward(self, global_feat: torch.Tensor, position: torch.Tensor):
        """(B, C), (B, 3) -> (rotation logits (B, n_bins, 3) or None, gripper-open logit (B,))."""
        out = self.mlp(torch.cat([global_feat, position], dim=-1))
        rot = out[:, :-1].reshape(-1, self.n_bins, 3) if self.n_bins else None
        return rot, out[:, -1]
