"""The local query (reference §1.5): at every level each sample reads the ConvBlock feature of the voxel it
falls in on THAT level's own grid; ``official_quirks`` reuses the coarsest level's index (documented bug)."""

from __future__ import annotations

import pytest
import torch

import minidiffuser.query as query_module
from harness.bench.synthetic import synthetic_batch
from harness.policy import build_policy

B, M = 3, 6


def reference_lookup(xyz: torch.Tensor, level, index_level, origin=None, truncate: bool = False) -> torch.Tensor:
    """Brute force: the voxel of each sample (B, M, 3) on ``index_level``'s grid (its origin, or ``origin``,
    and size; floored, or truncated toward zero), read in ``level``'s sites (level.grid, level.batch,
    level.conv_feat) -> (B, M, C), zeros where empty."""
    rel = (xyz - (index_level.origin if origin is None else origin)[:, None, :]) / index_level.grid_size
    vox = (torch.trunc(rel) if truncate else torch.floor(rel)).long()
    out = level.conv_feat.new_zeros(B, M, level.conv_feat.shape[1])
    for b in range(B):
        for m in range(M):
            hit = ((level.batch == b) & (level.grid == vox[b, m]).all(dim=1)).nonzero()
            if len(hit):
                out[b, m] = level.conv_feat[hit[0, 0]]
    return out


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    fixed = build_policy("minidiffuser", preset="tiny").eval()
    quirk = build_policy("minidiffuser", preset="tiny", official_quirks=True).eval()
    quirk.load_state_dict(fixed.state_dict())
    batch = synthetic_batch(B=B, N=256)
    with torch.no_grad():
        torch.manual_seed(1)
        cond = fixed.encode(batch)
    # samples sitting on points of the finest level: their own voxel is occupied at EVERY level, so a wrong
    # index shows up as a wrong feature (in free space both would read zeros at the fine levels)
    fine = cond.levels[-1]
    g = torch.Generator().manual_seed(2)
    picks = [torch.randperm(int(fine.mask[b].sum()), generator=g)[:M] for b in range(B)]
    xyz = torch.stack([fine.coord[b, picks[b]] for b in range(B)])
    t = torch.randint(0, 100, (B, M), generator=g)
    return fixed, quirk, cond, xyz, t


def _assert_reads(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    wrong = (got != expected).any(dim=-1)
    assert not wrong.any(), (f"{what}: {int(wrong.sum())}/{B * M} samples read another voxel's feature "
                             f"(max |difference| {float((got - expected).abs().max()):.3g})")


def _spied_lookups(policy, cond, xyz, t, monkeypatch) -> list[torch.Tensor]:
    """Run denoise and return what each level's local query read, (B, M, C) per level, coarsest first."""
    calls = []
    real = query_module.lookup

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out.view(B, M, -1))
        return out

    monkeypatch.setattr(query_module, "lookup", spy)
    with torch.no_grad():
        policy.denoise(xyz, t, cond)
    assert len(calls) == len(cond.levels), "one local-query lookup per level expected"
    return calls


def test_the_case_separates_own_from_coarsest_voxel_index(setup):
    _, _, cond, xyz, _ = setup
    coarsest = cond.levels[0]
    for i, level in enumerate(cond.levels):
        own = reference_lookup(xyz, level, level)
        assert (own.abs().sum(-1) > 0).all(), f"level {i}: every sample sits in an occupied voxel"
        if i > 0:
            assert not torch.allclose(own, reference_lookup(xyz, level, coarsest)), f"level {i}"


def test_local_query_reads_each_levels_own_voxel(setup, monkeypatch):
    fixed, _, cond, xyz, t = setup
    for i, (level, got) in enumerate(zip(cond.levels, _spied_lookups(fixed, cond, xyz, t, monkeypatch))):
        _assert_reads(got, reference_lookup(xyz, level, level), f"level {i}")


def test_official_quirk_reads_the_coarsest_index_at_every_level(setup, monkeypatch):
    _, quirk, cond, xyz, t = setup
    coarsest = cond.levels[0]
    for i, (level, got) in enumerate(zip(cond.levels, _spied_lookups(quirk, cond, xyz, t, monkeypatch))):
        # official: the batch-wide minimum of the bottleneck's pooled coordinates, truncated toward zero
        origin = coarsest.coord[coarsest.mask].min(0).values.expand(B, 3)
        _assert_reads(got, reference_lookup(xyz, level, coarsest, origin, truncate=True), f"level {i} (quirk)")
