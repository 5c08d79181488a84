"""3DDA visual encoder (baselines/diffuser_actor/vision.py): CLIP RN50 layout and state-dict names, the FPN's
top-down arithmetic, token/position pairing and order, freezing and the BatchNorm quirk, weight-file loading.

Most tests use a small trunk (width 8, one block per stage): the properties checked do not depend on size.
"""

from __future__ import annotations

import os
import pickle
import shlex

import pytest
import torch
import torch.nn.functional as F

from baselines.diffuser_actor.vision import (
    CLIP_MEAN,
    CLIP_STD,
    FeaturePyramid,
    ModifiedResNet,
    VisualEncoder,
    stride,
)

SMALL = {"layers": (1, 1, 1, 1), "width": 8}


def _seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randomise_bn(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm affine and running stats, so eval-mode outputs are not just the init's."""
    g = _seeded(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = 0.5 + torch.rand(m.weight.shape, generator=g)
            m.bias.data = 0.1 * torch.randn(m.bias.shape, generator=g)
            m.running_mean = 0.1 * torch.randn(m.running_mean.shape, generator=g)
            m.running_var = 0.5 + torch.rand(m.running_var.shape, generator=g)


def _rn50_param_count(layers=(3, 4, 6, 3), width=64) -> int:
    """Parameters from the layer formula: k*k*c_in*c_out per conv (no bias), 2*c per BatchNorm."""
    def conv(k, cin, cout):
        return k * k * cin * cout

    def bn(c):
        return 2 * c

    half = width // 2
    n = conv(3, 3, half) + bn(half) + conv(3, half, half) + bn(half) + conv(3, half, width) + bn(width)
    inplanes = width
    for stage, blocks in enumerate(layers):
        planes, first_stride = width * 2 ** stage, (1 if stage == 0 else 2)
        for b in range(blocks):
            cin = inplanes if b == 0 else 4 * planes
            n += conv(1, cin, planes) + bn(planes) + conv(3, planes, planes) + bn(planes)
            n += conv(1, planes, 4 * planes) + bn(4 * planes)
            if b == 0 and (first_stride > 1 or cin != 4 * planes):
                n += conv(1, cin, 4 * planes) + bn(4 * planes)
        inplanes = 4 * planes
    return n


# ---------------------------------------------------------------- ModifiedResNet

def test_rn50_levels_channels_strides_and_param_count():
    net = ModifiedResNet((3, 4, 6, 3), 64).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 64, 64, generator=_seeded()))
    assert list(out) == ["res1", "res2", "res3", "res4", "res5"]
    expected = {"res1": (64, 2), "res2": (256, 4), "res3": (512, 8), "res4": (1024, 16), "res5": (2048, 32)}
    for level, (ch, s) in expected.items():
        assert out[level].shape == (1, ch, 64 // s, 64 // s), level
        assert net.channels[level] == ch
        assert stride(level) == s
    n = sum(p.numel() for p in net.parameters())
    assert n == _rn50_param_count()
    # cross-check from torchvision's published resnet50 count: 25,557,032 - fc (2048*1000 + 1000) + CLIP's
    # 3-conv stem instead of one 7x7 conv (28,768 - 9,536); the bottleneck stages have the same parameters
    assert n == 25_557_032 - 2_049_000 + (28_768 - 9_536)


def test_rn50_state_dict_names_match_clip():
    keys = set(ModifiedResNet((3, 4, 6, 3), 64).state_dict())
    for k in ("conv1.weight", "bn3.running_var", "layer1.0.downsample.0.weight", "layer1.0.downsample.1.bias",
              "layer2.0.downsample.0.weight", "layer4.2.conv3.weight", "layer3.5.bn2.running_mean"):
        assert k in keys, k
    # the anti-aliasing pools hold no parameters (CLIP's state dict has no such keys)
    assert not [k for k in keys if k.startswith(("layer2.0.avgpool", "avgpool", "layer2.0.downsample.-1"))]
    assert "layer1.1.downsample.0.weight" not in keys  # only a stage's first block changes shape
    assert "layer4.3.conv1.weight" not in keys


def test_bottleneck_strides_by_pooling_not_by_conv():
    net = ModifiedResNet(**SMALL)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d) and m is not net.conv1:
            assert m.stride == (1, 1)


def test_too_small_image_is_refused_with_the_minimum():
    net = ModifiedResNet(**SMALL).eval()
    assert net(torch.zeros(1, 3, 31, 31))["res5"].shape[-2:] == (1, 1)
    with pytest.raises(ValueError, match="31"):
        net(torch.zeros(1, 3, 30, 64))


# ---------------------------------------------------------------- FeaturePyramid

def test_fpn_shapes_and_torchvision_keys():
    fpn = FeaturePyramid([64, 256, 512, 1024, 2048], 12)
    keys = set(fpn.state_dict())
    assert {"inner_blocks.0.0.weight", "inner_blocks.0.0.bias", "layer_blocks.4.0.bias",
            "layer_blocks.4.0.weight"} <= keys
    assert len(keys) == 5 * 2 * 2
    assert all(not m.bias.detach().any() for m in fpn.modules() if isinstance(m, torch.nn.Conv2d))
    feats = {f"res{i + 1}": torch.randn(2, c, 32 // 2 ** i, 32 // 2 ** i)
             for i, c in enumerate([64, 256, 512, 1024, 2048])}
    out = fpn(feats)
    assert list(out) == list(feats)
    for k in feats:
        assert out[k].shape == (2, 12, *feats[k].shape[-2:])


def test_fpn_two_levels_by_hand():
    fpn = FeaturePyramid([1, 1], 1)
    with torch.no_grad():
        fpn.inner_blocks[0][0].weight.fill_(1.0)
        fpn.inner_blocks[0][0].bias.fill_(0.5)
        fpn.inner_blocks[1][0].weight.fill_(2.0)
        fpn.inner_blocks[1][0].bias.fill_(1.0)
        delta = torch.zeros(1, 1, 3, 3)
        delta[0, 0, 1, 1] = 1.0
        fpn.layer_blocks[0][0].weight.copy_(delta)  # fine output = its top-down map
        fpn.layer_blocks[0][0].bias.zero_()
        fpn.layer_blocks[1][0].weight.fill_(1.0)  # coarse output = 3x3 sum (zero padded) of its map
        fpn.layer_blocks[1][0].bias.fill_(-4.0)
    fine = torch.arange(16.0).view(1, 1, 4, 4)
    coarse = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    out = fpn({"a": fine, "b": coarse})
    # coarse lateral = 2 * coarse + 1 = [[3, 5], [7, 9]]; each 3x3 window of a 2x2 map covers it all: 24 - 4
    assert torch.equal(out["b"], torch.full((1, 1, 2, 2), 20.0))
    up = torch.tensor([[3.0, 3, 5, 5], [3, 3, 5, 5], [7, 7, 9, 9], [7, 7, 9, 9]])
    assert torch.equal(out["a"][0, 0], torch.arange(16.0).view(4, 4) + 0.5 + up)


def test_fpn_loads_old_torchvision_key_names():
    new = FeaturePyramid([3, 5], 4)
    old_style = {k.replace(".0.weight", ".weight").replace(".0.bias", ".bias"): v
                 for k, v in new.state_dict().items()}
    assert "inner_blocks.1.weight" in old_style
    other = FeaturePyramid([3, 5], 4)
    other.load_state_dict(old_style, strict=True)
    assert torch.equal(other.layer_blocks[1][0].weight, new.layer_blocks[1][0].weight)


# ---------------------------------------------------------------- VisualEncoder

def _inputs(B=2, n_cam=2, H=64, W=64, seed=0):
    g = _seeded(seed)
    return torch.rand(B, n_cam, 3, H, W, generator=g) * 2 - 1, torch.randn(B, n_cam, 3, H, W, generator=g)


def test_tokens_pair_features_and_positions_in_camera_row_column_order():
    enc = VisualEncoder(6, **SMALL).eval()
    _randomise_bn(enc.backbone)
    images, points = _inputs(B=2, n_cam=3)
    with torch.no_grad():
        feats, pos = enc(images, points)
        x = ((images.flatten(0, 1) + 1) / 2 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(
            CLIP_STD).view(1, 3, 1, 1)
        fmap = enc.fpn(enc.backbone(x))["res3"].view(2, 3, 6, 8, 8)
    h = w = 64 // 8
    assert feats.shape == (2, 3 * h * w, 6) and pos.shape == (2, 3 * h * w, 3)
    for b, cam, i, j in [(0, 0, 0, 0), (1, 2, 7, 7), (0, 1, 2, 5), (1, 0, 6, 1)]:
        k = cam * h * w + i * w + j
        torch.testing.assert_close(feats[b, k], fmap[b, cam, :, i, j])
        # stride 8, align_corners=False: output (i, j) samples input (8i + 3.5, 8j + 3.5)
        patch = points[b, cam, :, 8 * i + 3:8 * i + 5, 8 * j + 3:8 * j + 5]
        torch.testing.assert_close(pos[b, k], patch.mean(dim=(1, 2)))


def test_positions_of_a_linear_point_map_are_patch_centres():
    enc = VisualEncoder(6, **SMALL, feature_level="res3").eval()
    H = W = 64
    rows, cols = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32),
                                indexing="ij")
    points = torch.stack([cols, rows, torch.full_like(rows, 7.0)]).expand(1, 2, 3, H, W).clone()
    images = torch.zeros(1, 2, 3, H, W)
    with torch.no_grad():
        _, pos = enc(images, points)
    h = w = 8
    k = 1 * h * w + 5 * w + 2  # camera 1, row 5, column 2
    assert pos[0, k].tolist() == [8 * 2 + 3.5, 8 * 5 + 3.5, 7.0]


def test_changing_one_camera_changes_only_its_tokens():
    enc = VisualEncoder(6, **SMALL).eval()
    _randomise_bn(enc.backbone)
    images, points = _inputs(B=1, n_cam=2)
    changed = images.clone()
    changed[:, 1] = -changed[:, 1]
    with torch.no_grad():
        a, _ = enc(images, points)
        b, _ = enc(changed, points)
    hw = 8 * 8
    assert torch.equal(a[:, :hw], b[:, :hw])
    assert (a[:, hw:] - b[:, hw:]).abs().amax(dim=-1).min() > 0  # every camera-1 token moved


@pytest.mark.parametrize("level,cells", [("res1", 32), ("res2", 16), ("res4", 4), ("res5", 2)])
def test_feature_level_sets_the_token_grid(level, cells):
    enc = VisualEncoder(4, **SMALL, feature_level=level).eval()
    images, points = _inputs(B=1, n_cam=2)
    with torch.no_grad():
        feats, pos = enc(images, points)
    assert feats.shape == (1, 2 * cells * cells, 4) and pos.shape == (1, 2 * cells * cells, 3)
    assert enc.stride == 64 // cells


def test_bad_feature_level_and_bn_mode():
    with pytest.raises(ValueError, match="res1.*res5"):
        VisualEncoder(4, **SMALL, feature_level="res6")
    with pytest.raises(ValueError, match="res1"):
        stride("p3")
    with pytest.raises(ValueError, match="bn_mode"):
        VisualEncoder(4, **SMALL, bn_mode="eval")


@pytest.mark.parametrize("images_shape,points_shape,name", [
    ((2, 3, 32, 32), (2, 3, 32, 32), "images"),  # 4-D
    ((1, 2, 4, 32, 32), (1, 2, 3, 32, 32), "images"),  # 4 channels
    ((1, 2, 3, 32, 32), (1, 2, 1, 32, 32), "point_maps"),
    ((1, 2, 3, 32, 32), (1, 2, 3, 64, 64), "point_maps"),  # resolution differs
    ((1, 2, 3, 32, 32), (1, 1, 3, 32, 32), "point_maps"),  # camera count differs
])
def test_bad_input_shapes_are_named(images_shape, points_shape, name):
    enc = VisualEncoder(4, **SMALL)
    with pytest.raises(ValueError, match=name):
        enc(torch.zeros(images_shape), torch.zeros(points_shape))


def test_frozen_backbone_trainable_fpn():
    enc = VisualEncoder(4, **SMALL, frozen=True)
    assert not any(p.requires_grad for p in enc.backbone.parameters())
    assert all(p.requires_grad for p in enc.fpn.parameters())
    images, points = _inputs(B=1, n_cam=2, H=32, W=32)
    feats, _ = enc(images, points)
    feats.sum().backward()
    assert all(p.grad is None for p in enc.backbone.parameters())
    assert enc.fpn.inner_blocks[2][0].weight.grad is not None
    trainable = VisualEncoder(4, **SMALL, frozen=False)
    assert all(p.requires_grad for p in trainable.parameters())


def test_bn_mode_train_updates_running_stats_and_mixes_the_batch():
    enc = VisualEncoder(4, **SMALL, bn_mode="train").train()
    images, points = _inputs(B=2, n_cam=2)
    before = enc.backbone.bn1.running_mean.clone()
    with torch.no_grad():
        a, _ = enc(images, points)
    assert not torch.equal(enc.backbone.bn1.running_mean, before)
    changed = images.clone()
    changed[1] = changed[1].flip(-1) * 0.5
    with torch.no_grad():
        b, _ = enc(changed, points)
    # observation 0's inputs did not change, its features did: the batch statistics leak across observations
    assert not torch.allclose(a[0], b[0])
    enc.eval()  # and in eval mode the quirk mode follows: running statistics, no update
    before = enc.backbone.bn1.running_mean.clone()
    with torch.no_grad():
        enc(images, points)
    assert torch.equal(enc.backbone.bn1.running_mean, before)


def test_bn_mode_frozen_keeps_running_stats_and_observations_independent():
    enc = VisualEncoder(4, **SMALL, bn_mode="frozen")
    _randomise_bn(enc.backbone)
    enc.train()
    enc.train(True)  # a second call must not switch the BatchNorm layers back
    assert enc.training and enc.fpn.training
    assert not any(m.training for m in enc.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    stats = {k: v.clone() for k, v in enc.backbone.state_dict().items()}
    images, points = _inputs(B=2, n_cam=2)
    changed = images.clone()
    changed[1] = changed[1].flip(-1) * 0.5
    with torch.no_grad():
        a, _ = enc(images, points)
        b, _ = enc(changed, points)
    assert all(torch.equal(v, enc.backbone.state_dict()[k]) for k, v in stats.items())
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-6)
    assert not torch.allclose(a[1], b[1])


def test_describe_without_weights():
    d = VisualEncoder(4, **SMALL, frozen=False, bn_mode="frozen").describe()
    assert d == {"backbone": "ModifiedResNet(layers=(1, 1, 1, 1), width=8)",
                 "weights": "random init (no weights file)", "frozen": False, "bn_mode": "frozen"}


# ---------------------------------------------------------------- weights files

def _clip_like_state_dict(seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = ModifiedResNet(**SMALL)
    _randomise_bn(net, seed)
    state = {f"visual.{k}": v.clone() for k, v in net.state_dict().items()}
    state["visual.attnpool.c_proj.weight"] = torch.randn(4, 4)  # the unused head: must be dropped
    state["transformer.resblocks.0.attn.in_proj_weight"] = torch.randn(4, 4)  # the text tower: ignored
    state["logit_scale"] = torch.tensor(4.6)
    return state


def test_loads_a_full_clip_state_dict(tmp_path):
    state = _clip_like_state_dict()
    path = tmp_path / "clip_rn.pt"
    torch.save(state, path)
    enc = VisualEncoder(4, **SMALL, weights=str(path))
    for k, v in enc.backbone.state_dict().items():
        assert torch.equal(v, state[f"visual.{k}"]), k
    assert enc.weights_source == str(path) and enc.describe()["weights"] == str(path)
    assert not any(p.requires_grad for p in enc.backbone.parameters())


def test_loads_a_visual_only_state_dict(tmp_path):
    state = {k[len("visual."):]: v for k, v in _clip_like_state_dict().items() if k.startswith("visual.")}
    path = tmp_path / "visual.pt"
    torch.save(state, path)
    enc = VisualEncoder(4, **SMALL, weights=path)
    assert torch.equal(enc.backbone.layer3[0].conv2.weight, state["layer3.0.conv2.weight"])


def test_missing_or_unexpected_keys_are_named(tmp_path):
    state = _clip_like_state_dict()
    del state["visual.layer2.0.conv1.weight"]
    state["visual.layer5.0.conv1.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match="broken.pt") as err:
        VisualEncoder(4, **SMALL, weights=str(path))
    assert "layer2.0.conv1.weight" in str(err.value) and "layer5.0.conv1.weight" in str(err.value)


def test_wrong_layout_is_a_value_error(tmp_path):
    path = tmp_path / "wide.pt"
    torch.save(_clip_like_state_dict(), path)
    with pytest.raises(ValueError, match="wide.pt"):
        VisualEncoder(4, layers=(1, 1, 1, 1), width=16, weights=str(path))


def test_missing_file_and_non_state_dict(tmp_path):
    with pytest.raises(ValueError, match="nope.pt"):
        VisualEncoder(4, **SMALL, weights=str(tmp_path / "nope.pt"))
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="list.pt.*state dict"):
        VisualEncoder(4, **SMALL, weights=str(path))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torchscript_archive_is_refused_with_the_export_hint(tmp_path):
    path = tmp_path / "RN50.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
    with pytest.raises(ValueError, match=r"RN50.pt.* is a TorchScript archive.*state_dict\(\)"):
        VisualEncoder(4, **SMALL, weights=str(path))


class _RunsCode:
    marker = ""

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_a_pickle_that_would_run_code_is_refused(tmp_path, writer):
    marker = tmp_path / "marker"
    payload = _RunsCode()
    payload.marker = str(marker)
    path = tmp_path / "evil.pt"
    if writer == "pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))  # torch.load's own protocol: no warning
    else:
        torch.save({"conv1.weight": payload}, path)
    with pytest.raises(ValueError, match="evil.pt"):
        VisualEncoder(4, **SMALL, weights=str(path))
    assert not marker.exists()


def test_bilinear_resize_reference_is_what_the_encoder_uses():
    # guards the claim in the spec (§2.4) that the tests above rely on: stride-8 align_corners=False bilinear
    # downsampling is the 2x2 patch-centre mean
    x = torch.randn(1, 3, 16, 16, generator=_seeded())
    y = F.interpolate(x, size=(2, 2), mode="bilinear", align_corners=False)
    torch.testing.assert_close(y[0, :, 1, 0], x[0, :, 11:13, 3:5].mean(dim=(1, 2)))


def test_deepest_level_stops_trunk_and_pyramid_for_small_images():
    """The unit-test preset's 8 x 12 images cannot reach stride 32: ``deepest_level="res3"`` stops there."""
    enc = VisualEncoder(12, **SMALL, feature_level="res2", deepest_level="res3", frozen=False, bn_mode="frozen")
    assert len(enc.fpn.inner_blocks) == 3
    images = torch.rand(2, 2, 3, 8, 12, generator=_seeded()) * 2 - 1
    feats, pos = enc(images, torch.rand(2, 2, 3, 8, 12, generator=_seeded(1)))
    assert feats.shape == (2, 2 * 2 * 3, 12) and pos.shape == (2, 12, 3)
    with pytest.raises(ValueError, match="H, W >= 31"):
        VisualEncoder(12, **SMALL)(images, images)
    with pytest.raises(ValueError, match="finer than feature_level"):
        VisualEncoder(12, **SMALL, feature_level="res4", deepest_level="res3")
