"""``DiffuserActor``: 3D Diffuser Actor (Ke et al., CoRL 2024) on the policy contract (harness/policy.py).

encode(batch): 4 (any number of) cameras -> ResNet + feature pyramid -> stride-8 tokens placed at the
bilinearly downsampled point map; language tokens projected to C and attended to by the visual tokens;
the gripper history (positions only) summarised by learned queries attending to the scene with 3D rotary
positions; farthest point sampling keeps 1/``fps_factor`` of the tokens. denoise(x_t, t, condition): the
AdaLN-conditioned rotary head over the normalised position (3) + 6D rotation (6), in one of three Level-2
strategies (``DiffuserActorConfig.level2``). Spec: ../shared/reference/diffuser_actor.md.

Positions (targets, history, scene tokens) are mapped to [-1, 1] by the workspace bounds; the position is
noised with the ``position_schedule`` and the 6D rotation with the ``rotation_schedule``, one timestep for
both; loss 30 L1(position noise) + 10 L1(rotation noise) + BCE(openness).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn

from baselines.diffuser_actor.config import PRESETS, DiffuserActorConfig
from baselines.diffuser_actor.layers import (
    AttentionStack,
    LanguageAttention,
    rope_width,
    rotary_3d,
    sinusoidal_embedding,
)
from baselines.diffuser_actor.vision import VisualEncoder
from harness.diffusion import SamplerConfig, make_sampler
from harness.policy import DataInfo, InputSpec, PolicyEntry
from harness.rotations import quat_to_6d, sixd_to_quat
from minidiffuser.points.sampling import farthest_point_sample

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("images", "point_maps", "history", "offset", "text_tokens", "text_mask")
XYZW_AS_WXYZ = [1, 2, 3, 0]  # xyzw numbers read as (w, x, y, z) -> the xyzw of that quaternion
WXYZ_OF_XYZW = [3, 0, 1, 2]


class SplitNoiseSchedule:
    """The position dimensions (first 3) on one DDPM schedule and the 6D rotation on another, one timestep
    for both (spec §2.12). ``config`` is the position schedule's (``make_sampler`` builds from it)."""

    def __init__(self, position: DDPMScheduler, rotation: DDPMScheduler):
        self.position, self.rotation = position, rotation
        self.config = position.config

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.position.add_noise(x0[..., :3], noise[..., :3], t),
                          self.rotation.add_noise(x0[..., 3:], noise[..., 3:], t)], dim=-1)


def _ddpm(schedule: str, steps: int) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=steps, beta_schedule=schedule, prediction_type="epsilon",
                         clip_sample=True, clip_sample_range=1.0)


@dataclass
class SceneCondition:
    """The encoded observations (B of them): computed once, never written by ``denoise``."""

    context: torch.Tensor          # (B, N, C) language-conditioned scene tokens
    context_rope: torch.Tensor     # (B, N, W, 2) rotary table of their positions
    sampled: torch.Tensor          # (B, K, C) farthest-point-sampled tokens
    sampled_rope: torch.Tensor     # (B, K, W, 2)
    language: torch.Tensor         # (B, L, C)
    language_pad: torch.Tensor | None  # (B, L) True = padding (only with mask_text_padding)
    history: torch.Tensor          # (B, C) gripper-history summary, added to the time embedding

    @property
    def batch_size(self) -> int:
        return int(self.context.shape[0])

    def repeat(self, M: int) -> SceneCondition:
        """Each observation's condition copied M times (the ``replicate`` strategy's B x M rows)."""
        def rep(x):
            return None if x is None else x.repeat_interleave(M, dim=0)
        return SceneCondition(*(rep(getattr(self, f)) for f in self.__dataclass_fields__))


class DiffuserActor(nn.Module):
    def __init__(self, cfg: DiffuserActorConfig, bounds: tuple[tuple[float, ...], tuple[float, ...]]):
        """``bounds``: (min xyz, max xyz) world-frame workspace that maps positions to [-1, 1]
        (``resolve_bounds``); kept in the state dict, so a checkpoint carries the bounds it was trained with."""
        super().__init__()
        self.cfg = self.config = cfg.validate()
        C, H = cfg.embedding_dim, cfg.num_heads
        self.action_dim = cfg.action_dim
        self.shares_condition = cfg.level2 == "shared"
        self.input_spec = InputSpec("images", text_dim=cfg.text_dim, n_hist=cfg.n_hist)
        self.position_scheduler = _ddpm(cfg.position_schedule, cfg.num_train_timesteps)
        self.rotation_scheduler = _ddpm(cfg.rotation_schedule, cfg.num_train_timesteps)
        self.noise_scheduler = SplitNoiseSchedule(self.position_scheduler, self.rotation_scheduler)
        self.register_buffer("bounds_min", torch.tensor(bounds[0], dtype=torch.float32))
        self.register_buffer("bounds_max", torch.tensor(bounds[1], dtype=torch.float32))
        self.rope_channels = rope_width(C, H, cfg.rotary_split)
        split = cfg.rotary_split

        # ---- encoder (spec §2.3-2.8)
        self.vision = VisualEncoder(C, layers=tuple(cfg.backbone_layers), width=cfg.backbone_width,
                                    feature_level=cfg.feature_level, frozen=cfg.freeze_backbone,
                                    bn_mode=cfg.backbone_bn, weights=cfg.backbone_weights,
                                    deepest_level=cfg.deepest_level)
        self.instruction_encoder = nn.Linear(cfg.text_dim, C)
        self.vl_attention = nn.ModuleList(LanguageAttention(C, H, cfg.lang_dropout)
                                          for _ in range(cfg.num_vis_ins_attn_layers))
        self.history_queries = nn.Embedding(cfg.n_hist, C)
        self.goal_gripper_embed = nn.Embedding(1, C)  # unused, as in the original (its checkpoints hold it)
        self.history_attention = AttentionStack(C, H, cfg.history_layers, adaln=False, split=split)
        self.history_mlp = nn.Sequential(nn.Linear(cfg.n_hist * C, C), nn.ReLU(), nn.Linear(C, C))

        # ---- denoising head (spec §2.11)
        self.traj_encoder = nn.Linear(self.action_dim, C)
        self.traj_lang_attention = LanguageAttention(C, H, cfg.lang_dropout, use_ffn=False)
        self.time_emb = nn.Sequential(nn.Linear(C, C), nn.ReLU(), nn.Linear(C, C))
        self.cross_attn = AttentionStack(C, H, cfg.cross_layers, adaln=True, split=split)
        self.self_attn = AttentionStack(C, H, cfg.self_layers, adaln=True, split=split)
        self.rotation_self_attn = AttentionStack(C, H, cfg.branch_layers, adaln=True, split=split)
        self.position_self_attn = AttentionStack(C, H, cfg.branch_layers, adaln=True, split=split)
        self.rotation_proj = nn.Linear(C, C)
        self.rotation_predictor = nn.Sequential(nn.Linear(C, C), nn.ReLU(), nn.Linear(C, 6))
        self.position_proj = nn.Linear(C, C)
        self.position_predictor = nn.Sequential(nn.Linear(C, C), nn.ReLU(), nn.Linear(C, 3))
        self.openness_predictor = nn.Sequential(nn.Linear(C, C), nn.ReLU(), nn.Linear(C, 1))
        # the trajectory-index embedding of a keypose (one step, index 0), constant
        self.register_buffer("index_embedding", sinusoidal_embedding(torch.zeros(1), C)[0], persistent=False)

    # ------------------------------------------------------------------------------ helpers
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def normalize(self, xyz: torch.Tensor) -> torch.Tensor:
        return 2 * (xyz - self.bounds_min) / (self.bounds_max - self.bounds_min) - 1

    def denormalize(self, xyz: torch.Tensor) -> torch.Tensor:
        return (xyz + 1) / 2 * (self.bounds_max - self.bounds_min) + self.bounds_min

    def _rope(self, xyz: torch.Tensor) -> torch.Tensor:
        return rotary_3d(xyz, self.rope_channels)

    def _rotation_6d(self, quat_xyzw: torch.Tensor) -> torch.Tensor:
        q = quat_xyzw[:, XYZW_AS_WXYZ] if self.cfg.quaternion_format == "wxyz" else quat_xyzw
        return quat_to_6d(q)

    def _quaternion(self, r6: torch.Tensor) -> torch.Tensor:
        q = sixd_to_quat(r6)
        return q[:, WXYZ_OF_XYZW] if self.cfg.quaternion_format == "wxyz" else q

    # ------------------------------------------------------------------------------ protocol
    def diffusion_target(self, batch: dict) -> torch.Tensor:
        target = batch["target"]
        return torch.cat([self.normalize(target[:, :3] + batch["offset"]), self._rotation_6d(target[:, 3:7])], -1)

    def encode(self, batch: dict) -> SceneCondition:
        missing = [k for k in REQUIRED_KEYS if k not in batch]
        if missing:
            raise KeyError(f"batch lacks {missing}; 3D Diffuser Actor needs {list(REQUIRED_KEYS)} (camera images "
                           "and point maps: data.kind=keysteps or raw RLBench)")
        cfg = self.cfg
        offset = batch["offset"][:, None]
        features, positions = self.vision(batch["images"], batch["point_maps"])
        xyz = self.normalize(positions + offset)
        language = self.instruction_encoder(batch["text_tokens"])
        pad = ~batch["text_mask"] if cfg.mask_text_padding else None
        context = features
        for layer in self.vl_attention:
            context = layer(context, language, key_padding_mask=pad)
        context_rope = self._rope(xyz)
        B = context.shape[0]
        hist_xyz = self.normalize(batch["history"][..., :3] + offset)  # rotation and openness unused (§2.7)
        queries = self.history_queries.weight[None].expand(B, -1, -1)
        hist = self.history_attention.cross(queries, context, self._rope(hist_xyz), context_rope)
        history = self.history_mlp(hist.flatten(1))
        k = max(1, context.shape[1] // cfg.fps_factor)
        space = context if cfg.fps_space == "feature" else xyz
        idx = farthest_point_sample(space.detach().double(), k)  # start index 0: deterministic (§2.8)
        sampled = context.gather(1, idx[..., None].expand(-1, -1, context.shape[-1]))
        sampled_rope = context_rope.gather(1, idx[..., None, None].expand(-1, -1, *context_rope.shape[2:]))
        return SceneCondition(context, context_rope, sampled, sampled_rope, language, pad, history)

    def _queries(self, x: torch.Tensor, t: torch.Tensor, cond: SceneCondition):
        """x (R, L, 9), t (R, L) -> query features, AdaLN signal (R, L, C) and rotary table of the noisy xyz."""
        feats = self.traj_encoder(x)
        feats = self.traj_lang_attention(feats, cond.language, query_pos=self.index_embedding,
                                         key_padding_mask=cond.language_pad)
        feats = feats + self.index_embedding
        signal = self.time_emb(sinusoidal_embedding(t, self.cfg.embedding_dim)) + cond.history[:, None]
        return feats, signal, self._rope(x[..., :3])

    def _predict_outputs(self, pos_feat: torch.Tensor, rot_feat: torch.Tensor):
        pos_feat = self.position_proj(pos_feat)
        eps = torch.cat([self.position_predictor(pos_feat), self.rotation_predictor(self.rotation_proj(rot_feat))], -1)
        return eps, self.openness_predictor(pos_feat)[..., 0]

    def _invasive_head(self, x, t, cond: SceneCondition):
        """The original head over R rows of one sample each: the sampled scene tokens are updated by the
        self-attention together with the query, so they are that sample's own."""
        q, signal, rope = self._queries(x, t, cond)
        q = self.cross_attn.cross(q, cond.context, rope, cond.context_rope, signal)
        L = q.shape[1]
        tokens = torch.cat([q, cond.sampled], dim=1)
        ropes = torch.cat([rope, cond.sampled_rope], dim=1)
        tokens = self.self_attn.self_attend(tokens, ropes, signal)
        rot = self.rotation_self_attn.self_attend(tokens, ropes, signal)[:, :L]
        pos = self.position_self_attn.self_attend(tokens, ropes, signal)[:, :L]
        return self._predict_outputs(pos, rot)

    def _shared_head(self, x, t, cond: SceneCondition):
        """Non-invasive head over the M samples of each observation at once (§4.4.1 of the Mini-Diffuser
        paper): every query attends to the scene and to itself; the scene tokens stay the condition's."""
        q, signal, rope = self._queries(x, t, cond)
        q = self.cross_attn.cross(q, cond.context, rope, cond.context_rope, signal)
        q = self.self_attn.non_invasive(q, cond.sampled, rope, cond.sampled_rope, signal)
        rot = self.rotation_self_attn.non_invasive(q, cond.sampled, rope, cond.sampled_rope, signal)
        pos = self.position_self_attn.non_invasive(q, cond.sampled, rope, cond.sampled_rope, signal)
        return self._predict_outputs(pos, rot)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: SceneCondition):
        """x_t (B, M, 9), t (B, M) -> (noise (B, M, 9), openness logit (B, M)) by the Level-2 strategy."""
        B, M, D = x_t.shape
        mode = self.cfg.level2
        if mode == "shared":
            return self._shared_head(x_t, t, cond)
        if mode == "replicate":
            eps, logit = self._invasive_head(x_t.reshape(B * M, 1, D), t.reshape(B * M, 1), cond.repeat(M))
            return eps.reshape(B, M, D), logit.reshape(B, M)
        outs = [self._invasive_head(x_t[:, m:m + 1], t[:, m:m + 1], cond) for m in range(M)]  # loop
        return torch.cat([o[0] for o in outs], dim=1), torch.cat([o[1] for o in outs], dim=1)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, condition: SceneCondition) -> torch.Tensor:
        return self.predict(x_t, t, condition)[0]

    def loss(self, batch: dict, level2, condition: SceneCondition) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        eps, logit = self.predict(level2.x_t, level2.t, condition)
        pos = F.l1_loss(eps[..., :3], level2.noise[..., :3])
        rot = F.l1_loss(eps[..., 3:], level2.noise[..., 3:])
        opened = F.binary_cross_entropy_with_logits(logit, batch["target"][:, 7:8].expand_as(logit))
        total = cfg.pos_weight * pos + cfg.rot_weight * rot + cfg.open_weight * opened
        return {"total": total, "pos": pos, "rot": rot, "open": opened}

    @torch.no_grad()
    def sample(self, batch: dict, sampler=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 8) [xyz, quat xyzw, open logit] in the batch's centred frame. The position follows ``sampler``
        (built from the position schedule); the rotation a sampler of the same kind and steps on the
        rotation schedule; both start from N(0, I) (spec §2.12) and clip x0 to [-1, 1] at every step."""
        sampler = sampler if sampler is not None else make_sampler(self.noise_scheduler, SamplerConfig())
        rot_sampler = type(sampler).from_config(self.rotation_scheduler.config)
        rot_sampler.set_timesteps(sampler.num_inference_steps)
        cond = self.encode(batch)
        B, device = cond.batch_size, cond.context.device
        x = torch.randn((B, 1, self.action_dim), generator=generator, device=device)
        logit = None
        for t in sampler.timesteps:
            eps, logit = self.predict(x, torch.full((B, 1), int(t), dtype=torch.long, device=device), cond)
            pos = sampler.step(eps[..., :3], t, x[..., :3], generator=generator).prev_sample
            rot = rot_sampler.step(eps[..., 3:], t, x[..., 3:], generator=generator).prev_sample
            x = torch.cat([pos, rot], dim=-1)
        position = self.denormalize(x[:, 0, :3]) - batch["offset"]
        return torch.cat([position, self._quaternion(x[:, 0, 3:]), logit[:, :1]], dim=-1)


PERACT18_BOUNDS = ((-0.1101, -0.5558, 0.7129), (0.6481, 0.5184, 1.5116))  # spec §2.2, 0.04 m buffer included


def resolve_bounds(config: DiffuserActorConfig, data_info: DataInfo | None):
    """(min, max) workspace: the config's when set; else the dataset metadata's widened by ``bounds_buffer``;
    without metadata, the PerAct-18 union of the original."""
    if config.workspace_min is not None:
        return tuple(config.workspace_min), tuple(config.workspace_max)
    bounds = getattr(getattr(data_info, "meta", None), "workspace_bounds", None)
    if bounds is None:
        return PERACT18_BOUNDS
    lo, hi = (tuple(float(v) for v in b) for b in bounds)
    buf = config.bounds_buffer
    return tuple(v - buf for v in lo), tuple(v + buf for v in hi)


def build(config: DiffuserActorConfig, data_info: DataInfo | None = None) -> DiffuserActor:
    """The policy for ``config``; ``data_info`` gives the workspace bounds and must agree on the text width."""
    if data_info is not None and data_info.text_dim is not None and data_info.text_dim != config.text_dim:
        raise ValueError(f"the instruction embeddings are {data_info.text_dim}-d but the model expects "
                         f"{config.text_dim} (set model.options.text_dim={data_info.text_dim})")
    bounds = resolve_bounds(config, data_info)
    policy = DiffuserActor(config, bounds)
    frozen = sum(p.numel() for p in policy.parameters() if not p.requires_grad)
    log.info("diffuser_actor (%s, level2=%s): %d trainable parameters, %d frozen (backbone weights: %s); "
             "workspace %s .. %s", config.preset, config.level2, policy.trainable_parameters(), frozen,
             policy.vision.weights_source, bounds[0], bounds[1])
    if config.freeze_backbone and config.backbone_weights is None:
        log.warning("diffuser_actor: the backbone is frozen at random initialisation (no backbone_weights file): "
                    "its features carry no pretrained information, so results are not comparable with the paper")
    return policy


# Declared in pyproject.toml: [project.entry-points."mdh.policies"] diffuser_actor = ...
ENTRY = PolicyEntry(name="diffuser_actor", config_class=DiffuserActorConfig, build=build, presets=PRESETS,
                    default_preset="small",
                    description="3D Diffuser Actor baseline: camera tokens + rotary AdaLN head; "
                                "level2 = replicate | loop | shared",
                    variants={"loop": {"level2": "loop"}, "shared": {"level2": "shared"}})
