"""3DDA's visual encoder: CLIP's ResNet trunk, a feature pyramid, and one 3D position per feature cell.

Spec §2.3-2.4 (../shared/reference/diffuser_actor.md). The original runs ``clip.load("RN50")``'s visual
``ModifiedResNet`` on every camera image (no resize: 256 x 256 goes straight in), feeds all five of its
levels (res1..res5) to ``torchvision.ops.FeaturePyramidNetwork`` and keeps one level (res3, stride 8). Each
cell of that map becomes a scene token whose 3D position is the world-frame point map bilinearly resized to
the map's size (align_corners=False: a stride-8 cell gets the mean of the 2 x 2 pixels at its patch centre).

Both networks are written here in plain ``torch.nn`` because torchvision has no CPU build in this project's
environment (and the ``clip`` package would download weights). Parameter names follow the originals, so a
CLIP state dict (``visual.*`` keys, the unused ``attnpool.*`` head dropped) loads into ``ModifiedResNet``
strictly, and a torchvision FPN state dict loads into ``FeaturePyramid``.

The original's BatchNorm quirk (spec §2.15.5): the backbone's parameters are frozen, but the module is never
put in eval mode, so during training its BatchNorm layers normalise with the statistics of the current batch
(every camera of every observation in it) and keep updating their running statistics. An observation's
features therefore depend on the other observations in its batch. ``bn_mode="train"`` reproduces this;
``bn_mode="frozen"`` keeps the backbone's BatchNorm in eval mode whatever the module's mode.

Nothing is downloaded: pretrained weights come only from a local state-dict file (``weights``). Without one
the backbone is randomly initialised, and a *frozen* random backbone makes comparisons with the paper
meaningless (its features are random projections that never adapt), so presets without weights should train
it (``frozen=False``).
"""

from __future__ import annotations

import os
import zipfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

FEATURE_LEVELS = ("res1", "res2", "res3", "res4", "res5")
_STRIDES = {"res1": 2, "res2": 4, "res3": 8, "res4": 16, "res5": 32}

NO_WEIGHTS = "random init (no weights file)"
_EXPORT_HINT = ("export the CLIP model's state dict to a file, e.g. "
                "torch.save(clip.load('RN50', jit=False)[0].state_dict(), path)")


def stride(feature_level: str) -> int:
    """Input pixels per feature cell (along each axis) of ``feature_level``: res1..res5 -> 2, 4, 8, 16, 32."""
    _check_level(feature_level)
    return _STRIDES[feature_level]


def _check_level(feature_level: str) -> None:
    if feature_level not in _STRIDES:
        raise ValueError(f"feature_level must be one of {list(FEATURE_LEVELS)}, got {feature_level!r}")


class Bottleneck(nn.Module):
    """CLIP's ResNet bottleneck: anti-aliased downsampling (every conv has stride 1; an average pool strides).

    The average pool before the strided 1x1 (both in the residual branch and in ``downsample``) is what
    separates CLIP's ResNet from torchvision's; the module names (``downsample."-1"`` is the pool) are
    CLIP's, so its state dict keys match.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride > 1 or inplanes != out:
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, out, 1, stride=1, bias=False)),
                ("1", nn.BatchNorm2d(out)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu3(out + identity)


class ModifiedResNet(nn.Module):
    """CLIP's visual ResNet trunk (without its attention-pool head), returning every level's map.

    ``layers`` = blocks per stage (RN50: (3, 4, 6, 3)), ``width`` = stem width (RN50: 64). ``forward`` takes
    already normalised images (N, 3, H, W) and returns an OrderedDict, fine to coarse (the order the FPN
    needs): res1 = stem (H/2, width channels; taken before the stem's 2x pool, as the original does),
    res2..res5 = layer1..layer4 (H/4..H/32, 4, 8, 16, 32 x width channels).
    """

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), width: int = 64):
        super().__init__()
        layers = tuple(int(n) for n in layers)
        if len(layers) != 4 or min(layers) < 1 or width < 2 or width % 2:
            raise ValueError(f"ModifiedResNet needs 4 positive block counts and an even width >= 2, "
                             f"got layers={layers}, width={width}")
        self.layers, self.width = layers, width
        half = width // 2
        self.conv1 = nn.Conv2d(3, half, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(half, half, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(half, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        # CLIP's from-scratch init: each residual branch starts at zero, so every block starts as its shortcut
        # (matters only when the trunk is trained, i.e. when no pretrained weights are loaded)
        for block in (*self.layer1, *self.layer2, *self.layer3, *self.layer4):
            nn.init.zeros_(block.bn3.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        out = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        out += [Bottleneck(self._inplanes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*out)

    @property
    def channels(self) -> dict[str, int]:
        """Channels of each returned level."""
        w = self.width
        return {"res1": w, "res2": 4 * w, "res3": 8 * w, "res4": 16 * w, "res5": 32 * w}

    @staticmethod
    def coarsest_size(size: int, deepest: str = "res5") -> int:
        """``deepest``'s extent for an input extent ``size`` (0: the input is too small for the trunk)."""
        size = (size - 1) // 2 + 1  # conv1: 3x3, stride 2, pad 1 (res1)
        for _ in range(FEATURE_LEVELS.index(deepest)):
            size //= 2  # stem pool, then layer2..layer4's pools (AvgPool2d floors)
        return size

    def forward(self, x: torch.Tensor, deepest: str = "res5") -> OrderedDict[str, torch.Tensor]:
        """Levels res1..``deepest`` (the stages below ``deepest`` are not run)."""
        sizes = [self.coarsest_size(n, deepest) for n in x.shape[-2:]] if x.dim() == 4 else [0]
        if min(sizes) < 1:
            raise ValueError(f"ModifiedResNet needs (N, 3, H, W) images with H, W >= {stride(deepest) - 1} "
                             f"(every level down to {deepest}, stride {stride(deepest)}, must keep at least one "
                             f"cell), got {tuple(x.shape)}")
        x = x.to(self.conv1.weight.dtype)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        out = OrderedDict(res1=self.relu3(self.bn3(self.conv3(x))))
        x = self.avgpool(out["res1"])
        for level, stage in zip(FEATURE_LEVELS[1:], (self.layer1, self.layer2, self.layer3, self.layer4)):
            if FEATURE_LEVELS.index(level) > FEATURE_LEVELS.index(deepest):
                break
            x = out[level] = stage(x)
        return out


class FeaturePyramid(nn.Module):
    """Feature pyramid network, equivalent to ``torchvision.ops.FeaturePyramidNetwork`` without extra blocks.

    Per level a 1x1 lateral conv (``inner_blocks.i``) and a 3x3 output conv (``layer_blocks.i``), both with
    bias. Top-down: the coarsest level's lateral, then for each finer level its lateral plus the
    nearest-neighbour upsampled top-down map above it; each level's output is its 3x3 conv of the top-down
    map. Each conv sits in a one-element ``nn.Sequential`` because torchvision wraps it in a
    ``Conv2dNormActivation`` (index 0 is the conv), so the state-dict keys (``inner_blocks.0.0.weight``)
    match.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int):
        super().__init__()
        if not in_channels or min(in_channels) < 1 or out_channels < 1:
            raise ValueError(f"FeaturePyramid needs positive channel counts, got {list(in_channels)} -> "
                             f"{out_channels}")
        self.inner_blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(c, out_channels, 1)) for c in in_channels)
        self.layer_blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(out_channels, out_channels, 3, padding=1)) for _ in in_channels)
        for m in self.modules():  # torchvision's init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # torchvision < 0.13 held the convs directly (inner_blocks.0.weight); such checkpoints still exist
        for block in ("inner_blocks", "layer_blocks"):
            for i in range(len(self.inner_blocks)):
                for kind in ("weight", "bias"):
                    old, new = f"{prefix}{block}.{i}.{kind}", f"{prefix}{block}.{i}.0.{kind}"
                    if old in state_dict and new not in state_dict:
                        state_dict[new] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, features: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        """``features``: level -> (N, C_in, h, w), fine to coarse; returns the same keys, (N, C_out, h, w)."""
        names, maps = list(features.keys()), list(features.values())
        if len(maps) != len(self.inner_blocks):
            raise ValueError(f"FeaturePyramid was built for {len(self.inner_blocks)} levels, got {len(maps)}")
        top_down = self.inner_blocks[-1](maps[-1])
        outs = [self.layer_blocks[-1](top_down)]
        for i in range(len(maps) - 2, -1, -1):
            lateral = self.inner_blocks[i](maps[i])
            top_down = lateral + F.interpolate(top_down, size=lateral.shape[-2:], mode="nearest")
            outs.insert(0, self.layer_blocks[i](top_down))
        return OrderedDict(zip(names, outs, strict=True))


def load_clip_visual_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The visual-trunk tensors of a local CLIP state-dict file, keys as ``ModifiedResNet`` names them.

    Accepts the full CLIP model's state dict (only its ``visual.*`` keys are kept) or the visual trunk's
    alone; the attention-pool head (``attnpool.*``) is dropped because 3DDA never uses it.
    ``weights_only=True`` refuses any pickle that would construct arbitrary objects, so a file cannot run code
    when loaded.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"backbone weights file {path!r} does not exist; {_EXPORT_HINT}")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            # a TorchScript archive (what clip.load downloads) carries constants.pkl and code/
            if any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in zf.namelist()):
                raise ValueError(f"backbone weights file {path!r} is a TorchScript archive, not a state "
                                 f"dict; {_EXPORT_HINT}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure here means "not a loadable state dict"
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"cannot read backbone weights file {path!r} as a plain state dict "
                         f"({type(e).__name__}: {first_line}); {_EXPORT_HINT}") from e
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in obj.items()):
        raise ValueError(f"backbone weights file {path!r} does not hold a state dict (name -> tensor), "
                         f"got {type(obj).__name__}; {_EXPORT_HINT}")
    if any(k.startswith("visual.") for k in obj):
        obj = {k[len("visual."):]: v for k, v in obj.items() if k.startswith("visual.")}
    return {k: v for k, v in obj.items() if not k.startswith("attnpool.")}


class VisualEncoder(nn.Module):
    """Camera images and point maps -> scene tokens: (B, n_cam*h*w, C) features, (B, n_cam*h*w, 3) positions.

    ``channels``: C, the FPN's output width. ``layers``/``width``: the trunk (RN50: (3, 4, 6, 3), 64).
    ``feature_level``: which pyramid level becomes tokens (the original: res3). ``frozen``: the trunk's
    parameters get no gradient (the original); the FPN always trains. ``bn_mode``: "train" (the original's
    quirk, see the module docstring) or "frozen". ``weights``: a local CLIP state-dict file (None: random
    init).
    """

    def __init__(self, channels: int, layers: Sequence[int] = (3, 4, 6, 3), width: int = 64,
                 feature_level: str = "res3", frozen: bool = True, bn_mode: str = "train",
                 weights: str | os.PathLike | None = None, deepest_level: str = "res5"):
        super().__init__()
        _check_level(feature_level)
        _check_level(deepest_level)
        if FEATURE_LEVELS.index(deepest_level) < FEATURE_LEVELS.index(feature_level):
            raise ValueError(f"deepest_level {deepest_level!r} is finer than feature_level {feature_level!r}")
        self.deepest_level = deepest_level
        if bn_mode not in ("train", "frozen"):
            raise ValueError(f"bn_mode must be one of ['train', 'frozen'], got {bn_mode!r}")
        self.feature_level, self.frozen, self.bn_mode = feature_level, bool(frozen), bn_mode
        self.backbone = ModifiedResNet(layers, width)
        # the original's pyramid spans all five levels; ``deepest_level`` < res5 (unit-test presets on tiny
        # images) stops the trunk and the pyramid there
        levels = FEATURE_LEVELS[:FEATURE_LEVELS.index(deepest_level) + 1]
        self.fpn = FeaturePyramid([self.backbone.channels[k] for k in levels], channels)
        self.weights_source = NO_WEIGHTS
        if weights is not None:
            self._load_backbone(weights)
            self.weights_source = os.fspath(weights)
        if self.frozen:
            self.backbone.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.train(self.training)

    def _load_backbone(self, path: str | os.PathLike) -> None:
        state = load_clip_visual_state_dict(path)
        try:
            result = self.backbone.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatches: a different layout (layers/width) than the file's
            raise ValueError(f"backbone weights file {os.fspath(path)!r} does not fit "
                             f"{self.describe()['backbone']}: {e}") from e
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(f"backbone weights file {os.fspath(path)!r} does not fit "
                             f"{self.describe()['backbone']}: {len(result.missing_keys)} missing keys "
                             f"{result.missing_keys[:5]}, "
                             f"{len(result.unexpected_keys)} unexpected keys {result.unexpected_keys[:5]}")

    def train(self, mode: bool = True) -> VisualEncoder:
        """``nn.Module.train``, except that ``bn_mode="frozen"`` keeps the backbone's BatchNorm in eval."""
        super().train(mode)
        if self.bn_mode == "frozen":
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    @property
    def stride(self) -> int:
        """Input pixels per token (along each axis)."""
        return stride(self.feature_level)

    def describe(self) -> dict:
        """What the run record needs to tell which visual encoder produced a result."""
        return {"backbone": f"ModifiedResNet(layers={self.backbone.layers}, width={self.backbone.width})",
                "weights": self.weights_source, "frozen": self.frozen, "bn_mode": self.bn_mode}

    def forward(self, images: torch.Tensor, point_maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images`` (B, n_cam, 3, H, W) in [-1, 1], ``point_maps`` (B, n_cam, 3, H, W) per-pixel xyz.

        Returns ``features`` (B, n_cam*h*w, C) and ``positions`` (B, n_cam*h*w, 3); token k is camera
        k // (h*w), row (k % (h*w)) // w, column k % w, for both tensors.
        """
        for name, t in (("images", images), ("point_maps", point_maps)):
            if t.dim() != 5 or t.shape[2] != 3:
                raise ValueError(f"{name} must be (B, n_cam, 3, H, W), got {tuple(t.shape)}")
        if images.shape != point_maps.shape:
            raise ValueError(f"images {tuple(images.shape)} and point_maps {tuple(point_maps.shape)} must "
                             f"have the same shape (one xyz per pixel)")
        B, n_cam = images.shape[:2]
        x = images.flatten(0, 1)
        x = ((x + 1) / 2 - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        fmap = self.fpn(self.backbone(x, self.deepest_level))[self.feature_level]  # (B*n_cam, C, h, w)
        h, w = fmap.shape[-2:]
        pts = F.interpolate(point_maps.flatten(0, 1), size=(h, w), mode="bilinear", align_corners=False)
        features = fmap.reshape(B, n_cam, -1, h * w).permute(0, 1, 3, 2).reshape(B, n_cam * h * w, -1)
        positions = pts.reshape(B, n_cam, 3, h * w).permute(0, 1, 3, 2).reshape(B, n_cam * h * w, 3)
        return features, positions
