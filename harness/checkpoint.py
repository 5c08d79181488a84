"""Atomic checkpoints with every RNG state, so a resumed run continues exactly where it stopped."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from harness.record import atomic_path


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save through a temporary file in the same folder, then ``os.replace``."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict:
    # weights_only=False: the file holds RNG states (numpy tuples) written by this program itself
    return torch.load(path, map_location="cpu", weights_only=False)
