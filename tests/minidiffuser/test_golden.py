"""Golden test: a seeded tiny model's losses and sampled actions on a fixed batch stay what they were.

Regenerate with tests/artifacts/regenerate_golden.py when a change is meant to alter the outputs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
sys.path.insert(0, str(ARTIFACTS))

from regenerate_golden import GOLDEN, compute  # noqa: E402


def test_tiny_model_matches_pinned_outputs():
    pinned = json.loads(GOLDEN.read_text())
    now = compute()
    assert now["params"] == pinned["params"]
    assert set(now["losses"]) == set(pinned["losses"])
    for k, v in pinned["losses"].items():
        assert abs(now["losses"][k] - v) <= 1e-4 * max(1.0, abs(v)), (k, now["losses"][k], v)
    torch.testing.assert_close(torch.tensor(now["actions"]), torch.tensor(pinned["actions"]), atol=1e-4, rtol=1e-4)


def test_golden_is_deterministic_in_process():
    a, b = compute(), compute()
    assert a == b
