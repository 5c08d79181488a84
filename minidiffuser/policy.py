"""``MiniDiffuser``: the Policy protocol (harness/policy.py) for the method under study.

encode(batch) runs the whole point stream ONCE per observation (text, U-Net, local ConvBlocks) and
returns a ``Condition``; denoise(x_t, t, condition) runs only the light query stream over the M samples.
Only the position (or position + 6D rotation with ``head="joint"``) is diffused; rotation bins and the
gripper come from a head on the max-pooled point feature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.diffusion import SamplerConfig, initial_sample, make_sampler, make_train_scheduler, run_sampler
from harness.policy import DataInfo, InputSpec, PolicyEntry
from harness.rotations import euler_bins_to_quat, quat_to_6d, quat_to_euler_bins, sixd_to_quat
from minidiffuser.config import PRESETS, MiniDiffuserConfig
from minidiffuser.heads import ActionHead
from minidiffuser.layers import init_weights
from minidiffuser.points.unet import PointUNet, make_level
from minidiffuser.query import Condition, QueryLevel, QueryStream
from minidiffuser.text import TextEncoder
from minidiffuser.transformer import TransformerBackbone

REQUIRED_KEYS = ("points", "colors", "height", "point_mask", "text_tokens", "text_mask")


class MiniDiffuser(nn.Module):
    shares_condition = True

    def __init__(self, cfg: MiniDiffuserConfig, bounds: tuple[list, list] | None = None):
        """``bounds``: (low, high) world-frame keypose bounds, needed by ``position_norm="keypose_bounds"``
        (a checkpoint restores them)."""
        super().__init__()
        self.cfg = self.config = cfg.validate()
        self.action_dim = cfg.action_dim
        self.input_spec = InputSpec("points", num_points=cfg.num_points, text_dim=cfg.text_dim)
        self.noise_scheduler = make_train_scheduler(cfg.schedule)
        self.text = TextEncoder(cfg.text_dim, cfg.context_channels)
        if cfg.backbone == "ptv3":
            self.backbone = PointUNet(cfg)
            final_channels = cfg.dec_channels[0]
        else:
            self.backbone = TransformerBackbone(cfg)
            final_channels = cfg.transformer_channels
        self.query = QueryStream(cfg, self.backbone.level_channels)
        self.n_bins = round(360 / cfg.euler_resolution)
        self.head = ActionHead(final_channels, cfg.head_hidden, cfg.head_dropout,
                               self.n_bins if cfg.head == "decoupled" else None)
        self.apply(init_weights)
        if cfg.position_norm == "keypose_bounds":  # saved with the weights: evaluation needs the same box
            low, high = (torch.tensor(v, dtype=torch.float32) for v in (bounds or ([-1.0] * 3, [1.0] * 3)))
            self.register_buffer("pos_low", low)
            self.register_buffer("pos_high", high)

    def position_bounds(self) -> dict | None:
        """{"low", "high"} (m, world frame) of the box the diffused position is scaled by; None when the
        position is diffused in centred metres. The harness records it (record.json ``keypose_bounds``)."""
        if self.cfg.position_norm == "centred":
            return None
        return {"low": [round(float(v), 6) for v in self.pos_low], "high": [round(float(v), 6) for v in self.pos_high]}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------------------ protocol
    # ------------------------------------------------------------------------------ position space
    def _to_diffusion(self, pos: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """(..., 3) centred metres -> the diffused position space (``position_norm``)."""
        if self.cfg.position_norm == "centred":
            return pos
        shape = (-1,) + (1,) * (pos.dim() - 2) + (3,)
        world = pos + offset.to(pos).reshape(shape)
        return 2 * (world - self.pos_low) / (self.pos_high - self.pos_low) - 1

    def _to_centred(self, x: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
        """(..., D) diffused sample -> the same with its position in centred metres (what the network reads)."""
        if self.cfg.position_norm == "centred":
            return x
        shape = (-1,) + (1,) * (x.dim() - 2) + (3,)
        world = (x[..., :3] + 1) / 2 * (self.pos_high - self.pos_low) + self.pos_low
        return torch.cat([world - offset.to(x).reshape(shape), x[..., 3:]], dim=-1)

    def diffusion_target(self, batch: dict) -> torch.Tensor:
        target = batch["target"]
        pos = self._to_diffusion(target[:, :3], batch.get("offset"))
        if self.cfg.head == "decoupled":
            return pos
        return torch.cat([pos, quat_to_6d(target[:, 3:7])], dim=-1)

    def encode(self, batch: dict) -> Condition:
        missing = [k for k in REQUIRED_KEYS if k not in batch]
        if missing:
            raise KeyError(f"batch lacks {missing}; Mini-Diffuser needs {list(REQUIRED_KEYS)} "
                           "(point clouds and instruction embeddings)")
        points, mask = batch["points"], batch["point_mask"]
        B = points.shape[0]
        feats = torch.cat([points, batch["colors"], batch["height"]], dim=-1)
        if feats.shape[-1] != self.cfg.in_channels:
            raise ValueError(f"point features have {feats.shape[-1]} channels, config expects {self.cfg.in_channels}")
        text, pooled = self.text(batch["text_tokens"], batch["text_mask"])
        if self.cfg.backbone == "transformer":
            levels = self.backbone(points, feats, mask, text, batch["text_mask"])
            final = levels[-1]
            global_feat = final.feat.masked_fill(~final.mask[..., None], float("-inf")).amax(1)
            return Condition(levels, pooled, torch.nan_to_num(global_feat, neginf=0.0), batch.get("offset"))
        b, n = mask.nonzero(as_tuple=True)
        level0 = make_level(feats[b, n], points[b, n], b, B, self.cfg.grid_size, batch_origin=self.cfg.official_quirks)
        point_levels, convs = self.backbone(level0, text, batch["text_mask"])
        levels = []
        for i, lv in enumerate(point_levels):
            levels.append(QueryLevel(feat=lv.padded(), coord=lv.padded(lv.coord), mask=lv.mask(), grid=lv.grid,
                                     batch=lv.batch, conv_feat=convs[i] if convs else None,
                                     grid_size=lv.grid_size, origin=lv.origin))
        final = point_levels[-1]
        global_feat = final.feat.new_zeros(B, final.feat.shape[1]).scatter_reduce(
            0, final.batch[:, None].expand_as(final.feat), final.feat, "amax", include_self=False)
        return Condition(levels, pooled, global_feat, batch.get("offset"))

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, condition: Condition) -> torch.Tensor:
        return self.query(self._to_centred(x_t, condition.offset), t, condition)

    def loss(self, batch: dict, level2, condition: Condition) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        eps_hat = self.denoise(level2.x_t, level2.t, condition)
        if cfg.pos_loss == "l1":
            pos = F.l1_loss(eps_hat, level2.noise)
        else:
            pos = F.mse_loss(eps_hat, level2.noise)
        target = batch["target"]
        pos_cond = target[:, :3] + cfg.rot_cond_noise * torch.randn_like(target[:, :3])
        rot_logits, open_logit = self.head(condition.global_feat, pos_cond)
        terms = {"pos": pos, "open": F.binary_cross_entropy_with_logits(open_logit, target[:, 7])}
        total = cfg.pos_weight * pos + cfg.open_weight * terms["open"]
        if rot_logits is not None:
            bins = quat_to_euler_bins(target[:, 3:7], cfg.euler_resolution).to(target.device)
            terms["rot"] = F.cross_entropy(rot_logits, bins)
            total = total + cfg.rot_weight * terms["rot"]
        terms["total"] = total
        return terms

    @torch.no_grad()
    def sample(self, batch: dict, sampler=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 8) [xyz, quat xyzw, open logit] in the batch's centred frame; the condition is encoded once
        and reused for every denoising step."""
        sampler = sampler if sampler is not None else make_sampler(self.noise_scheduler, SamplerConfig())
        cond = self.encode(batch)
        device = batch["points"].device
        x = initial_sample(self.noise_scheduler, (cond.batch_size, 1, self.action_dim), generator, device)
        x = run_sampler(lambda x, t: self.denoise(x, t, cond), x, sampler, generator)[:, 0]
        x = self._to_centred(x, cond.offset)
        pos = x[:, :3]
        rot_logits, open_logit = self.head(cond.global_feat, pos)
        if rot_logits is not None:
            quat = euler_bins_to_quat(rot_logits.argmax(dim=1), self.cfg.euler_resolution).to(device)
        else:
            quat = sixd_to_quat(x[:, 3:9])
        return torch.cat([pos, quat, open_logit[:, None]], dim=-1)


def build(config: MiniDiffuserConfig, data_info: DataInfo | None = None) -> MiniDiffuser:
    """The policy for ``config``; ``data_info`` must agree with what the model reads (text width)."""
    if data_info is not None and data_info.text_dim is not None and data_info.text_dim != config.text_dim:
        raise ValueError(f"the instruction embeddings are {data_info.text_dim}-d but the model expects "
                         f"{config.text_dim} (set model.options.text_dim={data_info.text_dim})")
    bounds = None
    if config.position_norm == "keypose_bounds":
        bounds = data_info.keypose_bounds() if data_info is not None else None
        if bounds is None:  # a placeholder box; a checkpoint's buffers replace it (evaluation, resume)
            bounds = ([-1.0] * 3, [1.0] * 3)
    return MiniDiffuser(config, bounds)


def import_official(ckpt, out_dir, data_path: str | None = None) -> dict:
    """``mdh checkpoint import-official CKPT OUT_RUN_DIR``: the released checkpoint -> a run folder
    (minidiffuser/official_import.py: ``import_official_checkpoint``)."""
    from minidiffuser.official_import import import_official_checkpoint

    return import_official_checkpoint(ckpt, out_dir, data_path)


# Declared in pyproject.toml: [project.entry-points."mdh.policies"] minidiffuser = "minidiffuser.policy:ENTRY"
ENTRY = PolicyEntry(name="minidiffuser", config_class=MiniDiffuserConfig, build=build, presets=PRESETS,
                    default_preset="small",
                    description="Mini-Diffuser: PTv3-style point U-Net encoded once, light sample-query stream",
                    checkpoint_importers={"import-official": import_official})
