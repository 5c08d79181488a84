"""minidiffuser.official_import: the released official checkpoint's names -> our paper-preset model.

The routing test fills every official tensor with values that encode its index in the reference list
(index + a random fraction in [0.1, 0.9)), converts, and reads the indices back out of our tensors: every
non-ignored official tensor must land in exactly one of ours, each of ours must come from exactly one
official tensor, and the values must only be re-arranged (same multiset), never mixed or dropped.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness.policy import build_policy
from minidiffuser.official_import import (
    OFFICIAL_IGNORED,
    OfficialCheckpointError,
    convert_official_state_dict,
    is_ignored,
    official_name_map,
    ours_to_spconv_shape,
    read_reference_list,
    spconv_to_ours_weight,
    unwrap_state_dict,
)
from minidiffuser.points.sparse_conv import SubMConv3d, build_neighbor_map, kernel_offsets

REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference" / "official_minidiffuser_state_dict.tsv"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_policy("minidiffuser", preset="paper")


@pytest.fixture(scope="module")
def reference() -> dict[str, tuple[tuple[int, ...], str]]:
    if not REFERENCE.is_file():
        pytest.skip(f"official state-dict reference list not found at {REFERENCE}")
    return read_reference_list(REFERENCE)


def index_encoded(ref: dict[str, tuple[tuple[int, ...], str]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Official-layout state dict: tensor i holds i + U(0.1, 0.9) (float) or i (int64 counters)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, (name, (shape, dtype)) in enumerate(ref.items()):
        dt = getattr(torch, dtype)
        if dt.is_floating_point:
            out[name] = (i + 0.1 + 0.8 * torch.rand(shape, generator=gen, dtype=torch.float64)).to(dt)
        else:
            out[name] = torch.full(shape, i, dtype=dt)
    return out


def synthesized_official(model) -> dict[str, torch.Tensor]:
    """A well-formed official state dict derived from our model (needs no reference file)."""
    ours = model.state_dict()
    out = {}
    for off, (our, kind) in official_name_map(model).items():
        shape = ours_to_spconv_shape(tuple(ours[our].shape)) if kind == "spconv" else tuple(ours[our].shape)
        out[off] = torch.zeros(shape, dtype=ours[our].dtype)
    return out


# ------------------------------------------------------------------------------------------ 1. routing


def test_reference_list_parses_and_matches_the_name_map(reference, model):
    assert len(reference) == 611
    assert reference["ptv3_model.embedding.stem.conv.weight"] == ((36, 5, 5, 5, 7), "float32")
    assert reference["ptv3_model.embedding.stem.norm.num_batches_tracked"] == ((), "int64")
    ignored = {n for n in reference if is_ignored(n)}
    assert ignored == {"anchor_embeding", *(n for n in reference if n.startswith("act_proj_head.heatmap_mlp."))}
    assert len(ignored) == 5
    assert set(official_name_map(model)) == set(reference) - ignored


def test_every_official_tensor_lands_in_exactly_one_of_ours(reference, model):
    official = index_encoded(reference)
    converted = convert_official_state_dict(official, model)
    fresh = build_policy("minidiffuser", preset="paper")
    fresh.load_state_dict(converted, strict=True)
    loaded = fresh.state_dict()
    assert set(loaded) == set(converted)

    names = list(reference)
    source_of: dict[str, int] = {}
    for our_name, t in loaded.items():
        assert torch.equal(t, converted[our_name]), our_name
        idx = torch.unique(torch.floor(t.double()).long()) if t.is_floating_point() else torch.unique(t)
        assert idx.numel() == 1, f"{our_name} mixes values of official tensors {idx.tolist()[:5]}"
        i = int(idx)
        source_of[our_name] = i
        src = official[names[i]]
        assert t.dtype == src.dtype and t.numel() == src.numel(), our_name
        # only re-arranged: the same multiset of values
        assert torch.equal(torch.sort(t.flatten()).values, torch.sort(src.flatten()).values), our_name

    used = sorted(source_of.values())
    assert len(used) == len(set(used)), "an official tensor was copied into two of ours"
    expected = sorted(i for i, n in enumerate(names) if not is_ignored(n))
    assert used == expected


# by meaning (reference spec §1.3-1.10), not by order; the neck pairs are the non-obvious ones
PINNED = {
    "txt_fc.weight": "text.proj.weight",
    "txt_attn_fc.bias": "text.attn.bias",
    "ptv3_model.embedding.stem.conv.weight": "backbone.embedding.conv.weight",
    "ptv3_model.embedding.stem.norm.running_var": "backbone.embedding.norm.0.running_var",
    "ptv3_model.enc.enc1.down.proj.weight": "backbone.pools.0.proj.weight",
    "ptv3_model.enc.enc4.down.norm.0.num_batches_tracked": "backbone.pools.3.norm.0.num_batches_tracked",
    "ptv3_model.enc.enc2.block0.cpe.0.weight": "backbone.enc_blocks.2.cpe_conv.weight",
    "ptv3_model.enc.enc2.block0.cpe.1.weight": "backbone.enc_blocks.2.cpe.0.weight",
    "ptv3_model.enc.enc2.block0.cpe.2.bias": "backbone.enc_blocks.2.cpe.1.bias",
    "ptv3_model.enc.enc0.block0.attn.qkv.weight": "backbone.enc_blocks.0.attn.qkv.weight",
    "ptv3_model.enc.enc3.block0.mlp.0.fc2.weight": "backbone.enc_blocks.3.mlp.3.weight",
    "ptv3_model.enc.enc3.ca_block0.attn.kv.weight": "backbone.enc_cross.3.attn.kv.weight",
    "ptv3_model.mid_conv.conv.0.weight": "backbone.mid_conv.conv.weight",
    "ptv3_model.mid_conv.conv.2.weight": "backbone.mid_conv.post.1.weight",
    "ptv3_model.dec.dec3.up.proj.0.weight": "backbone.unpools.3.proj.0.weight",
    "ptv3_model.dec.dec0.up.proj_skip.1.running_mean": "backbone.unpools.0.proj_skip.1.0.running_mean",
    "ptv3_model.dec.dec1.block0.norm2.0.weight": "backbone.dec_blocks.1.norm2.weight",
    "ptv3_model.dec.dec2.ca_block0.mlp.0.fc1.bias": "backbone.dec_cross.2.mlp.0.bias",
    "ptv3_model.dec.dec2.conv0.conv.1.weight": "backbone.dec_convs.2.post.0.weight",
    "ptv3_model.anchor_proj.0.fc2.weight": "query.anchor_proj.2.weight",
    "ptv3_model.nec.neck3.attn.kv.weight": "query.necks.0.attn.kv.weight",
    "ptv3_model.nec.neck2.norm1.0.modulation.1.weight": "query.necks.1.norm1.modulation.1.weight",
    "ptv3_model.nec.neck1.attn.q.weight": "query.necks.2.attn.q.weight",
    "ptv3_model.nec.neck0.attn.kv.weight": "query.necks.3.attn.kv.weight",
    "ptv3_model.nec.neck_final.attn.kv.weight": "query.necks.4.attn.kv.weight",
    "ptv3_model.nec.neck_final.norm2.0.norm.bias": "query.necks.4.norm2.norm.bias",
    "act_proj_head.denoise_mlp.3.weight": "query.denoise_mlp.3.weight",
    "act_proj_head.action_mlp.0.weight": "head.mlp.0.weight",
    "act_proj_head.action_mlp.3.bias": "head.mlp.3.bias",
}


def test_pinned_correspondences(reference, model):
    official = index_encoded(reference, seed=1)
    converted = convert_official_state_dict(official, model)
    names = list(reference)
    for off, ours in PINNED.items():
        t = converted[ours]
        got = int(torch.floor(t.double()).flatten()[0]) if t.is_floating_point() else int(t.flatten()[0])
        assert names[got] == off, f"{ours} holds {names[got]}, expected {off}"


def test_official_quirks_model_has_the_same_tensors(model):
    quirky = build_policy("minidiffuser", preset="paper", official_quirks=True)
    a, b = model.state_dict(), quirky.state_dict()
    assert [(k, tuple(v.shape), v.dtype) for k, v in a.items()] == [(k, tuple(v.shape), v.dtype) for k, v in b.items()]
    quirky.load_state_dict(convert_official_state_dict(synthesized_official(quirky), quirky), strict=True)


def test_models_the_official_weights_cannot_describe_are_refused():
    tiny_transformer = build_policy("minidiffuser", preset="tiny", backbone="transformer", local_query=False)
    with pytest.raises(ValueError, match="backbone='ptv3'"):
        convert_official_state_dict({}, tiny_transformer)


# ------------------------------------------------------------------------------------------ 2. spconv layout


def test_spconv_permutation_on_index_encoded_values():
    k, c_out, c_in = 3, 2, 4
    # official[co, r0, r1, r2, ci] = 1000*co + 100*ci + kernel index (r0*9 + r1*3 + r2)
    co, r0, r1, r2, ci = torch.meshgrid(*(torch.arange(n) for n in (c_out, k, k, k, c_in)), indexing="ij")
    official = 1000 * co + 100 * ci + (r0 * 9 + r1 * 3 + r2)
    ours = spconv_to_ours_weight(official)
    assert ours.shape == (27, c_in, c_out)
    # explicit table: spconv kernel coordinate (r0, r1, r2) -> our row, and the row's displacement (x, y, z)
    table = {(0, 0, 0): (0, (-1, -1, -1)), (0, 0, 1): (1, (-1, -1, 0)), (0, 1, 0): (3, (-1, 0, -1)),
             (1, 0, 0): (9, (0, -1, -1)), (1, 1, 1): (13, (0, 0, 0)), (2, 1, 0): (21, (1, 0, -1)),
             (2, 2, 2): (26, (1, 1, 1))}
    offsets = kernel_offsets(k)
    for (a, b, c), (row, disp) in table.items():
        assert tuple(offsets[row].tolist()) == disp
        for o in range(c_out):
            for i in range(c_in):
                assert int(ours[row, i, o]) == 1000 * o + 100 * i + a * 9 + b * 3 + c
    assert ours_to_spconv_shape(tuple(ours.shape)) == tuple(official.shape)


@pytest.mark.parametrize("k", [3, 5])
def test_single_tap_spconv_kernel_reads_the_neighbour_at_that_offset(k):
    """spconv (subm, padding forced to k//2): out[p] = sum_r W[:, r0, r1, r2, :] in[p + (r - k//2)]."""
    r = k // 2
    centre = torch.tensor([10, 20, 30])
    d = torch.arange(k) - r
    cube = torch.stack(torch.meshgrid(d, d, d, indexing="ij"), dim=-1).reshape(-1, 3) + centre
    feat = (1.0 + torch.arange(len(cube), dtype=torch.float32))[:, None]  # distinct value per voxel
    batch = torch.zeros(len(cube), dtype=torch.long)
    nmap = build_neighbor_map(cube, batch, k)
    c_idx = int(((cube == centre).all(1)).nonzero())
    conv = SubMConv3d(1, 1, k, bias=False)
    for tap in [(0, 0, 0), (k - 1, r, 0), (r, r, r), (0, k - 1, 1), *[(a, b, c) for a in (0, k - 1)
                                                                       for b in (0, r) for c in (1, k - 1)]]:
        w = torch.zeros(1, k, k, k, 1)
        w[0, tap[0], tap[1], tap[2], 0] = 1.0
        with torch.no_grad():
            conv.weight.copy_(spconv_to_ours_weight(w))
        with torch.no_grad():
            out = conv(feat, nmap)
        neighbour = centre + torch.tensor(tap) - r
        expected = feat[int(((cube == neighbour).all(1)).nonzero()), 0]
        assert float(out[c_idx, 0]) == float(expected), tap


def test_single_tap_explicit_case():
    """Written out: tap (2, 1, 0) of a 3x3x3 kernel = displacement (+1, 0, -1) in (x, y, z)."""
    grid = torch.tensor([[5, 5, 5], [6, 5, 4], [4, 5, 6], [6, 5, 5]])
    feat = torch.tensor([[1.0], [7.0], [100.0], [1000.0]])
    w = torch.zeros(1, 3, 3, 3, 1)
    w[0, 2, 1, 0, 0] = 2.0
    conv = SubMConv3d(1, 1, 3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(spconv_to_ours_weight(w))
        out = conv(feat, build_neighbor_map(grid, torch.zeros(4, dtype=torch.long), 3))
    # (5,5,5) reads (6,5,4) = 7; (4,5,6) reads (5,5,5) = 1; the others have no neighbour at (+1, 0, -1)
    assert out[:, 0].tolist() == [14.0, 0.0, 2.0, 0.0]


# ------------------------------------------------------------------------------------------ 3. errors


def test_missing_extra_and_mis_shaped_are_each_reported(model):
    good = synthesized_official(model)
    convert_official_state_dict(good, model)  # well-formed: no error

    missing = dict(good)
    del missing["ptv3_model.nec.neck0.attn.q.weight"]
    with pytest.raises(OfficialCheckpointError, match=r"ptv3_model\.nec\.neck0\.attn\.q\.weight"):
        convert_official_state_dict(missing, model)

    extra = {**good, "ptv3_model.nec.neck4.attn.q.weight": torch.zeros(72, 72)}
    with pytest.raises(OfficialCheckpointError, match=r"ptv3_model\.nec\.neck4\.attn\.q\.weight"):
        convert_official_state_dict(extra, model)

    bad = {**good, "txt_fc.weight": torch.zeros(256, 500)}
    with pytest.raises(OfficialCheckpointError) as ei:
        convert_official_state_dict(bad, model)
    msg = str(ei.value)
    assert "txt_fc.weight" in msg and "(256, 500)" in msg and "(256, 512)" in msg
    assert ei.value.mis_shaped == [("txt_fc.weight", (256, 500), (256, 512))]

    # spconv kernels are checked in the official (C_out, k, k, k, C_in) layout
    bad_conv = {**good, "ptv3_model.embedding.stem.conv.weight": torch.zeros(36, 3, 3, 3, 7)}
    with pytest.raises(OfficialCheckpointError, match=r"\(36, 3, 3, 3, 7\) -> expected \(36, 5, 5, 5, 7\)"):
        convert_official_state_dict(bad_conv, model)


def test_all_problems_are_listed_at_once(model):
    sd = synthesized_official(model)
    del sd["ptv3_model.mid_conv.conv.0.bias"]
    sd["ptv3_model.pose_embedding.weight"] = torch.zeros(3)
    sd["act_proj_head.denoise_mlp.3.weight"] = torch.zeros(4, 72)
    sd["ptv3_model.dec.dec0.up.proj.1.num_batches_tracked"] = torch.zeros(())  # float where an int belongs
    with pytest.raises(OfficialCheckpointError) as ei:
        convert_official_state_dict(sd, model)
    err, msg = ei.value, str(ei.value)
    assert err.missing == ["ptv3_model.mid_conv.conv.0.bias"]
    assert err.unexpected == ["ptv3_model.pose_embedding.weight"]
    assert err.mis_shaped == [("act_proj_head.denoise_mlp.3.weight", (4, 72), (3, 72))]
    assert [n for n, _, _ in err.bad_dtype] == ["ptv3_model.dec.dec0.up.proj.1.num_batches_tracked"]
    for name in ("ptv3_model.mid_conv.conv.0.bias", "ptv3_model.pose_embedding.weight",
                 "act_proj_head.denoise_mlp.3.weight", "(4, 72)", "(3, 72)", "num_batches_tracked"):
        assert name in msg


def test_long_lists_are_cut_at_ten_but_counted(model):
    sd = synthesized_official(model)
    gone = [n for n in sd if n.startswith("ptv3_model.enc.enc0.")][:15]
    for n in gone:
        del sd[n]
    with pytest.raises(OfficialCheckpointError) as ei:
        convert_official_state_dict(sd, model)
    assert len(ei.value.missing) == 15
    msg = str(ei.value)
    assert "15 missing official tensors (first 10 shown)" in msg
    assert sum(n in msg for n in gone) == 10


def test_ignored_tensors_may_be_present_or_absent(model):
    sd = synthesized_official(model)
    assert not any(is_ignored(n) for n in sd)
    convert_official_state_dict(sd, model)
    with_ignored = {**sd, "anchor_embeding": torch.zeros(1, 3), "act_proj_head.heatmap_mlp.0.weight": torch.zeros(9)}
    out = convert_official_state_dict(with_ignored, model)
    assert set(out) == set(model.state_dict())
    assert OFFICIAL_IGNORED == ("anchor_embeding", "act_proj_head.heatmap_mlp.")
    assert not is_ignored("anchor_embeding_extra") and not is_ignored("act_proj_head.heatmap_mlpX.weight")


# ------------------------------------------------------------------------------------------ 4. unwrapping


def test_unwrap_state_dict_variants():
    sd = {"txt_fc.weight": torch.ones(2, 2), "txt_fc.bias": torch.zeros(2)}
    for wrapped in (sd, {"model": sd}, {"model": sd, "step": 5}, {"checkpoint": 1, "state_dict": {"model": sd}}):
        got = unwrap_state_dict(wrapped)
        assert list(got) == list(sd) and all(got[k] is sd[k] for k in sd)
    x = torch.arange(3)
    got = unwrap_state_dict({"state_dict": {"module.x": x}, "epoch": 3})
    assert list(got) == ["x"] and got["x"] is x
    got = unwrap_state_dict({"model_state_dict": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {}})
    assert set(got) == set(sd)


def test_unwrap_prefers_the_official_looking_candidate():
    other = {"encoder.weight": torch.zeros(1)}
    official = {"ptv3_model.mid_conv.conv.0.bias": torch.zeros(72)}
    assert set(unwrap_state_dict({"model": other, "ema": official})) == set(official)
    assert set(unwrap_state_dict({"model": official, "ema": other})) == set(official)


@pytest.mark.parametrize("obj", [{"step": 3, "optimizer": {"lr": 1.0}}, {"model": {}}, {}, [torch.zeros(1)],
                                 {"model": {"a": torch.zeros(1), "b": 3}}])
def test_unwrap_refuses_objects_without_tensors(obj):
    with pytest.raises(ValueError, match="no state dict of tensors"):
        unwrap_state_dict(obj)
