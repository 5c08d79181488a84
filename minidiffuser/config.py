"""``MiniDiffuserConfig``: one dataclass, every ablation is a field; presets tiny / small / paper."""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.diffusion import ScheduleConfig
from harness.policy import check_number

POSITION_NORMS = ("centred", "keypose_bounds")


@dataclass
class MiniDiffuserConfig:
    """Architecture and loss switches (reference: ../shared/reference/minidiffuser.md §1-2).

    Point backbone (``backbone="ptv3"``): a 5-stage serialized-attention U-Net; ``enc_channels`` /
    ``enc_heads`` per encoder stage, ``dec_channels`` / ``dec_heads`` per decoder stage (finest first),
    ``patch_size`` points per attention patch, ``grid_size`` metres of the finest voxel.
    ``backbone="transformer"``: 3DDA-style transformer over ``fps_tokens`` farthest-point-sampled tokens.
    Query stream: ``query_channels`` wide, ``query_heads`` heads (head dim divisible by 6 for 3D RoPE).
    Ablations: ``rope3d`` (3D RoPE on queries and keys of the query cross-attention), ``local_query``
    (3x3x3 kernel feature looked up at each query's voxel at every level), ``head``: "decoupled"
    (position diffused; rotation bins + gripper from a classification head) or "joint" (position + 6D
    rotation diffused together, 3DDA-style; gripper from the head).
    ``official_quirks``: reproduce the released code's behaviours for comparison with it (text tiling; the
    U-Net grid anchored at the batch-wide minimum coordinate, so observations of one batch share voxel
    indices; the local-query voxel index computed once at the bottleneck from the batch-wide pooled minimum
    and truncated toward zero; RoPE on queries only, applied before the q LayerNorm; decoder CPEs that see the
    skip branch only; patches padded with re-used points); the default is the fixed model (README table).
    """

    preset: str = "small"
    in_channels: int = 7  # xyz centred, rgb in [-1, 1], height above the table
    text_dim: int = 512  # raw instruction token width (CLIP last hidden state)
    context_channels: int = 256  # projected text tokens and the FiLM context
    backbone: str = "ptv3"
    enc_channels: tuple[int, ...] = (36, 72, 144, 192, 384)
    enc_heads: tuple[int, ...] = (2, 4, 8, 16, 32)
    dec_channels: tuple[int, ...] = (72, 72, 144, 192)
    dec_heads: tuple[int, ...] = (4, 4, 8, 16)
    stem_kernel: int = 5
    patch_size: int = 120
    grid_size: float = 0.01
    serialization_orders: tuple[str, ...] = ("z", "z-trans", "hilbert", "hilbert-trans")
    shuffle_orders: str = "always"  # "always" (official, also at test time) | "train" | "never"
    mlp_ratio: int = 4
    attn_drop: float = 0.1
    proj_drop: float = 0.1
    fps_tokens: int = 256  # transformer backbone only
    transformer_layers: int = 4  # transformer backbone only
    transformer_channels: int = 120  # transformer backbone only
    transformer_heads: int = 4  # transformer backbone only (head dim divisible by 6 for RoPE)
    query_channels: int = 72
    query_heads: int = 4
    rope3d: bool = True
    local_query: bool = True
    head: str = "decoupled"
    head_hidden: int = 72
    head_dropout: float = 0.2
    euler_resolution: float = 5.0
    rot_cond_noise: float = 0.01  # std (m) of the noise on the GT position that conditions the head
    pos_weight: float = 20.0
    rot_weight: float = 1.0
    open_weight: float = 1.0
    pos_loss: str = "l1"
    num_points: int = 4000
    official_quirks: bool = False
    # the diffused position: "centred" (official: metres in the point-centred frame, noise N(0, I) of 1 m)
    # or "keypose_bounds" (world frame scaled to [-1, 1] by the training keyposes' bounds + 0.04 m, as 3DDA
    # and 3DFA; the network still sees metres, only the diffusion space is scaled)
    position_norm: str = "centred"
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    @property
    def action_dim(self) -> int:
        return 3 if self.head == "decoupled" else 9

    def validate(self) -> MiniDiffuserConfig:
        """Raise ``ValueError`` naming the field and its value for any bad setting (``make_config`` calls it)."""
        for name in ("in_channels", "text_dim", "context_channels", "enc_channels", "enc_heads", "dec_channels",
                     "dec_heads", "stem_kernel", "patch_size", "mlp_ratio", "fps_tokens", "transformer_layers",
                     "transformer_channels", "transformer_heads", "query_channels", "query_heads", "head_hidden",
                     "num_points"):
            check_number(self, name, 1, integer=True)
        for name in ("attn_drop", "proj_drop", "head_dropout"):  # dropout probabilities
            check_number(self, name, 0, 1, high_open=True)
        check_number(self, "grid_size", 0, low_open=True)  # metres of the finest voxel
        check_number(self, "euler_resolution", 0, 360, low_open=True)  # degrees per rotation bin
        for name in ("rot_cond_noise", "pos_weight", "rot_weight", "open_weight"):
            check_number(self, name, 0)
        self.schedule.validate("MiniDiffuserConfig.schedule")
        n_enc, n_dec = len(self.enc_channels), len(self.dec_channels)
        if len(self.enc_heads) != n_enc or len(self.dec_heads) != n_dec or n_dec != n_enc - 1:
            raise ValueError(f"enc_channels/enc_heads need {n_enc} entries and dec_channels/dec_heads "
                             f"{n_enc - 1}; got {self.enc_heads}, {self.dec_channels}, {self.dec_heads}")
        for c, h in [*zip(self.enc_channels, self.enc_heads), *zip(self.dec_channels, self.dec_heads)]:
            if c % h:
                raise ValueError(f"{c} channels are not divisible by {h} heads")
        if self.query_channels % self.query_heads:
            raise ValueError(f"query_channels {self.query_channels} not divisible by query_heads {self.query_heads}")
        if self.rope3d and (self.query_channels // self.query_heads) % 6:
            raise ValueError(f"3D RoPE needs a query head dim divisible by 6, got "
                             f"{self.query_channels // self.query_heads}")
        if self.backbone not in ("ptv3", "transformer"):
            raise ValueError(f"unknown backbone {self.backbone!r}; choices: ptv3, transformer")
        if self.backbone == "transformer" and (self.transformer_channels % self.transformer_heads
                                               or (self.transformer_channels // self.transformer_heads) % 6):
            raise ValueError(f"the transformer backbone's 3D RoPE needs transformer_channels "
                             f"{self.transformer_channels} / transformer_heads {self.transformer_heads} to be a "
                             "whole head width divisible by 6")
        if self.backbone == "transformer" and self.local_query:
            raise ValueError("local_query looks up voxels of the ptv3 U-Net levels; set local_query=false "
                             "with backbone=transformer")
        if self.head not in ("decoupled", "joint"):
            raise ValueError(f"unknown head {self.head!r}; choices: decoupled, joint")
        if self.shuffle_orders not in ("always", "train", "never"):
            raise ValueError(f"shuffle_orders must be always|train|never, got {self.shuffle_orders!r}")
        if self.position_norm not in POSITION_NORMS:
            raise ValueError(f"position_norm must be one of {POSITION_NORMS}, got {self.position_norm!r}")
        if self.pos_loss not in ("l1", "l2"):
            raise ValueError(f"pos_loss must be l1 or l2, got {self.pos_loss!r}")
        return self


PRESETS: dict[str, dict] = {
    # unit tests: a few hundred points, seconds per step on a laptop
    "tiny": {"enc_channels": (12, 24, 24, 48, 48), "enc_heads": (1, 2, 2, 4, 4), "dec_channels": (24, 24, 24, 48),
                 "dec_heads": (2, 2, 2, 4), "stem_kernel": 3, "patch_size": 16, "query_channels": 24, "query_heads": 2,
                 "head_hidden": 24, "context_channels": 32, "num_points": 256, "fps_tokens": 32, "transformer_layers": 2,
                 "transformer_channels": 24, "transformer_heads": 2},
    # CPU default for the embedded Meta-World suite
    "small": {"enc_channels": (24, 48, 72, 96, 144), "enc_heads": (2, 4, 4, 8, 8), "dec_channels": (48, 48, 72, 96),
                  "dec_heads": (4, 4, 4, 8), "stem_kernel": 3, "patch_size": 64, "query_channels": 48, "query_heads": 4,
                  "head_hidden": 48, "context_channels": 128, "num_points": 1024, "fps_tokens": 128, "transformer_layers": 3,
                  "transformer_channels": 96, "transformer_heads": 8,
                  # CPU cost: attention dropout draws a mask per score (B x heads x M x N for the queries)
                  # and the MLPs dominate at these widths; both measured with `mdh bench step`
                  "attn_drop": 0.0, "mlp_ratio": 2,
                  # policies that work on CPU budgets (issue 18, README "Policies that work"): positions
                  # diffused in the keypose-bounds box with a schedule that reaches noise; the official
                  # centred metres + scaled_linear: position_norm=centred schedule.schedule=scaled_linear
                  "position_norm": "keypose_bounds", "schedule": {"schedule": "squaredcos_cap_v2"}},
    # the paper / official code (yaml L122-158)
    "paper": {"enc_channels": (36, 72, 144, 192, 384), "enc_heads": (2, 4, 8, 16, 32),
                  "dec_channels": (72, 72, 144, 192), "dec_heads": (4, 4, 8, 16), "stem_kernel": 5, "patch_size": 120,
                  "query_channels": 72, "query_heads": 4, "head_hidden": 72, "context_channels": 256, "num_points": 4000},
}
