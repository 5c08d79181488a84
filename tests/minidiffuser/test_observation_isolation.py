"""Level-1 isolation: observation b's condition and denoised samples never read another observation.

Each test runs in eval and in train mode. Two train-mode effects are accounted for, not hidden:
- dropout: the compared runs reset the global seed and draw masks of identical shapes, so they draw identical
  masks (the perturbations below keep every shape: see ``_translate_one``); gradients need no care, since
  an elementwise mask cannot create a cross-observation path;
- the point encoder's BatchNorm batch statistics mix observations BY DESIGN (as the official code; see
  minidiffuser/points/unet.py). Tests that run the encoder in train mode therefore put the BatchNorm layers
  alone in eval mode ("train-bn-frozen"); tests that start from an encoded condition run fully in train mode.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from harness.bench.synthetic import synthetic_batch
from harness.policy import build_policy

VARIANTS = {
    "default": {},
    "transformer": {"backbone": "transformer", "local_query": False},
}
# Not here: official_quirks=true, which reproduces the released code's cross-observation dependences on
# purpose (the anchors' voxel origin is the batch-wide minimum, the patch size the smallest observation's
# point count; tests/minidiffuser/test_official_quirks.py pins both).
B, PERTURBED = 3, 1  # with a (b+1) % B leak, observation 0 would read the perturbed observation 1


def _policy(variant: str, mode: str):
    torch.manual_seed(0)
    policy = build_policy("minidiffuser", preset="tiny", **VARIANTS[variant]).train(mode != "eval")
    if mode == "train-bn-frozen":
        for m in policy.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    return policy


@pytest.fixture(scope="module")
def batch():
    return synthetic_batch(B=B, N=256)


def _samples(policy, M=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, M, policy.action_dim, generator=g) * 0.2, torch.randint(0, 100, (B, M), generator=g)


def _translate_one(batch: dict, b: int = PERTURBED) -> dict:
    """Observation b moved rigidly by a few cm with new colours (and heights): every observation keeps its
    voxel structure (grids are anchored at each observation's own minimum), so all shapes stay the same."""
    out = {k: v.clone() for k, v in batch.items()}
    m = out["point_mask"][b][:, None]
    g = torch.Generator().manual_seed(7)
    out["points"][b] = (out["points"][b] + torch.tensor([0.0625, -0.03125, 0.015625])) * m
    out["colors"][b] = (torch.rand(out["colors"][b].shape, generator=g) * 2 - 1) * m
    out["height"][b] = (out["points"][b][:, 2:3] + 0.2) * m
    return out


def _run(policy, batch, x, t, grad: bool = False):
    """Seeded encode + denoise (identical dropout masks and serialization orders for identical shapes)."""
    with torch.set_grad_enabled(grad):
        torch.manual_seed(5)
        cond = policy.encode(batch)
        torch.manual_seed(6)
        return cond, policy.denoise(x, t, cond)


def _observation_parts(cond, b: int) -> dict[str, torch.Tensor]:
    """Every tensor of the condition that belongs to observation b."""
    parts = {"pooled_text": cond.pooled_text[b], "global_feat": cond.global_feat[b]}
    for i, lv in enumerate(cond.levels):
        parts[f"L{i}.mask"] = lv.mask[b]
        parts[f"L{i}.feat"] = lv.feat[b][lv.mask[b]]
        parts[f"L{i}.coord"] = lv.coord[b][lv.mask[b]]
        if lv.batch is not None:
            own = lv.batch == b
            parts[f"L{i}.grid"] = lv.grid[own]
            parts[f"L{i}.origin"] = lv.origin[b]
            if lv.conv_feat is not None:
                parts[f"L{i}.conv_feat"] = lv.conv_feat[own]
    return parts


@pytest.mark.parametrize("mode", ["eval", "train-bn-frozen"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_moving_one_observation_leaves_the_others_exactly_unchanged(variant, mode, batch):
    policy = _policy(variant, mode)
    x, t = _samples(policy)
    cond, eps = _run(policy, batch, x, t)
    cond2, eps2 = _run(policy, _translate_one(batch), x, t)
    # precondition of an exact comparison: identical shapes everywhere (so identical dropout masks)
    assert [lv.feat.shape for lv in cond.levels] == [lv.feat.shape for lv in cond2.levels]
    for lv, lv2 in zip(cond.levels, cond2.levels):
        assert torch.equal(lv.mask, lv2.mask)
    for b in range(B):
        if b == PERTURBED:
            continue
        now = _observation_parts(cond2, b)
        for name, value in _observation_parts(cond, b).items():
            assert torch.equal(value, now[name]), f"observation {b}'s {name} changed"
        assert torch.equal(eps[b], eps2[b]), (b, (eps[b] - eps2[b]).abs().max())
    assert not torch.equal(eps[PERTURBED], eps2[PERTURBED])
    assert not torch.equal(cond.levels[-1].feat[PERTURBED], cond2.levels[-1].feat[PERTURBED])


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_perturbing_one_observations_condition_leaves_the_others_denoising_unchanged(variant, mode, batch):
    """The query stream alone (fully in train mode: it has no BatchNorm): observation 1's level features,
    coordinates and local-query features are perturbed inside an encoded condition."""
    policy = _policy(variant, mode)
    x, t = _samples(policy)
    cond, eps = _run(policy, batch, x, t)
    g = torch.Generator().manual_seed(9)
    levels = []
    for lv in cond.levels:
        feat, coord = lv.feat.clone(), lv.coord.clone()
        feat[PERTURBED] += torch.randn(feat[PERTURBED].shape, generator=g)
        coord[PERTURBED] += 0.05 * torch.randn(coord[PERTURBED].shape, generator=g)
        conv = lv.conv_feat
        if conv is not None:
            conv = conv.clone()
            own = lv.batch == PERTURBED
            conv[own] += torch.randn(conv[own].shape, generator=g)
        levels.append(dataclasses.replace(lv, feat=feat, coord=coord, conv_feat=conv))
    with torch.no_grad():
        torch.manual_seed(6)
        eps2 = policy.denoise(x, t, dataclasses.replace(cond, levels=levels))
    for b in range(B):
        if b != PERTURBED:
            assert torch.equal(eps[b], eps2[b]), (b, (eps[b] - eps2[b]).abs().max())
    assert not torch.equal(eps[PERTURBED], eps2[PERTURBED])


@pytest.mark.parametrize("mode", ["eval", "train-bn-frozen"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_gradient_of_one_observation_wrt_another_is_zero(variant, mode, batch):
    """d(observation b's outputs) / d(another observation's input points, colours, level features, level
    coordinates, local-query features) is exactly zero; w.r.t. its own inputs it is not."""
    policy = _policy(variant, mode)
    inputs = {k: batch[k].clone().requires_grad_(True) for k in ("points", "colors")}
    x, t = _samples(policy)
    cond, eps = _run(policy, {**batch, **inputs}, x, t, grad=True)
    # name -> (tensor, observation of each row): padded tensors are (B, ...); conv_feat is flat (N, C)
    wrt = {name: (value, torch.arange(B)) for name, value in inputs.items()}
    for i, lv in enumerate(cond.levels):
        wrt[f"L{i}.feat"], wrt[f"L{i}.coord"] = (lv.feat, torch.arange(B)), (lv.coord, torch.arange(B))
        if lv.conv_feat is not None:
            wrt[f"L{i}.conv_feat"] = (lv.conv_feat, lv.batch)
    tensors = [value for value, _ in wrt.values()]
    for b in range(B):
        grads = torch.autograd.grad(eps[b].pow(2).sum(), tensors, retain_graph=True, allow_unused=True)
        for (name, (value, owner)), grad in zip(wrt.items(), grads):
            grad = torch.zeros_like(value) if grad is None else grad  # unused (e.g. keys without RoPE): zero
            others = owner != b
            assert torch.count_nonzero(grad[others]) == 0, f"observation {b}'s outputs depend on others' {name}"
            if name in inputs or name == "L0.feat":
                assert torch.count_nonzero(grad[~others]) > 0, f"observation {b} ignores its own {name}"
