"""``DiffuserActorConfig``: 3D Diffuser Actor (3DDA) hyper-parameters, Level-2 strategy and the original's quirks.

Spec: ../shared/reference/diffuser_actor.md. Presets: ``paper`` (the PerAct-18 recipe's model, C = 120, frozen
CLIP RN50 layout), ``small`` (CPU, the embedded Meta-World suite's 4 cameras at 128 x 128, a smaller backbone
trained from scratch) and ``tiny`` (unit tests on synthetic data).
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.policy import check_number

LEVEL2_MODES = ("replicate", "loop", "shared")
SCHEDULES = ("scaled_linear", "squaredcos_cap_v2")
LEVELS = ("res1", "res2", "res3", "res4", "res5")


@dataclass
class DiffuserActorConfig:
    """Every field is settable as ``model.options.<field>``.

    Level-2 batching (``level2``), how M noised samples of one observation are paid for:
    ``replicate``: the scene condition is copied M times and the original, invasive head runs on B x M rows
    (its self-attention updates the sampled scene tokens per sample, so nothing is shared); ``loop``: the
    condition is encoded once and the invasive head runs M times over B rows, one noise draw each (3D
    FlowMatch Actor's ``lv2_batch_size``); ``shared``: the paper's minimal modification (arXiv 2505.09430
    §4.4.1): non-invasive head attention (scene tokens are not updated by the head and never attend to the
    queries; a query attends to the scene and to itself only), one B x M batch of queries over one condition.

    Quirks of the original code (spec §2.15), reproduced by default where they change results:
    ``quaternion_format`` "xyzw" (training from scratch) or "wxyz" (read RLBench's xyzw quaternions as wxyz,
    as the released checkpoint was trained); ``fps_space`` "feature" (farthest point sampling in the 120-d
    feature space, start index 0) or "xyz"; ``rotary_split`` "full" (rotary applied across all C channels
    before the split into heads, which straddles heads when the head width is odd) or "per_head" (each
    head's channels rotated on their own; needs a head width divisible by 6); ``mask_text_padding`` False
    (pad tokens are attended to); ``backbone_bn`` "train" (the frozen backbone's BatchNorm uses batch
    statistics in training, mixing the observations of a batch) or "frozen"; ``position_schedule``
    "scaled_linear" (terminal alpha_bar 0.485: the position is never fully noised). History rotation and
    openness are not read (as the original).
    """

    preset: str = "small"
    embedding_dim: int = 60
    num_heads: int = 4
    # visual encoder (baselines/diffuser_actor/vision.py)
    backbone_layers: tuple[int, ...] = (1, 1, 1, 1)
    backbone_width: int = 16
    backbone_weights: str | None = None  # local CLIP RN50 state dict; nothing is downloaded
    freeze_backbone: bool = False
    backbone_bn: str = "frozen"
    feature_level: str = "res3"
    deepest_level: str = "res5"  # the trunk and pyramid stop here (tiny: res3, for 8 x 12 test images)
    # language, history, sampling
    text_dim: int = 512
    num_vis_ins_attn_layers: int = 1
    n_hist: int = 3
    history_layers: int = 2
    fps_factor: int = 5
    lang_dropout: float = 0.1
    # denoising head
    cross_layers: int = 2
    self_layers: int = 2
    branch_layers: int = 1
    level2: str = "replicate"
    # diffusion and loss
    num_train_timesteps: int = 100
    position_schedule: str = "scaled_linear"
    rotation_schedule: str = "squaredcos_cap_v2"
    pos_weight: float = 30.0
    rot_weight: float = 10.0
    open_weight: float = 1.0
    # workspace bounds (world frame, metres) mapping positions to [-1, 1]; None: the dataset metadata + buffer
    workspace_min: tuple[float, ...] | None = None
    workspace_max: tuple[float, ...] | None = None
    bounds_buffer: float = 0.0  # metres added on every side of the dataset's bounds (the original: 0.04)
    # quirks (spec §2.15)
    quaternion_format: str = "xyzw"
    fps_space: str = "feature"
    rotary_split: str = "full"
    mask_text_padding: bool = False

    @property
    def action_dim(self) -> int:
        return 9  # normalised position (3) + 6D rotation (6)

    def validate(self) -> DiffuserActorConfig:
        """Raise ``ValueError`` naming the field and its value for any bad setting (``make_config`` calls it)."""
        for name in ("embedding_dim", "num_heads", "backbone_layers", "backbone_width", "text_dim",
                     "num_vis_ins_attn_layers", "n_hist", "history_layers", "fps_factor", "cross_layers",
                     "self_layers", "branch_layers", "num_train_timesteps"):
            check_number(self, name, 1, integer=True)
        check_number(self, "lang_dropout", 0, 1, high_open=True)
        for name in ("pos_weight", "rot_weight", "open_weight", "bounds_buffer"):
            check_number(self, name, 0)
        for name in ("workspace_min", "workspace_max"):
            if getattr(self, name) is not None:
                check_number(self, name)  # finite numbers
        C, h = self.embedding_dim, self.num_heads
        if C % h:
            raise ValueError(f"embedding_dim {C} is not divisible by num_heads {h}")
        if C % 6:
            raise ValueError(f"embedding_dim {C} must be divisible by 6 (3D rotary: C/3 channels per axis, in pairs)")
        if self.rotary_split == "per_head" and (C // h) % 6:
            raise ValueError(f"rotary_split=per_head needs a head width divisible by 6, got {C // h}")
        choices = {"level2": LEVEL2_MODES, "quaternion_format": ("xyzw", "wxyz"), "fps_space": ("feature", "xyz"),
                   "rotary_split": ("full", "per_head"), "backbone_bn": ("train", "frozen"),
                   "position_schedule": SCHEDULES, "rotation_schedule": SCHEDULES,
                   "feature_level": LEVELS, "deepest_level": LEVELS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if len(self.backbone_layers) != 4:
            raise ValueError(f"backbone_layers needs 4 positive block counts, got {self.backbone_layers}")
        if (self.workspace_min is None) != (self.workspace_max is None):
            raise ValueError("set both workspace_min and workspace_max, or neither")
        if self.workspace_min is not None and (len(self.workspace_min) != 3 or len(self.workspace_max) != 3 or any(
                hi <= lo for lo, hi in zip(self.workspace_min, self.workspace_max))):
            raise ValueError(f"workspace bounds must be 3 values each with max > min, got "
                                 f"{self.workspace_min} .. {self.workspace_max}")
        return self


PRESETS: dict[str, dict] = {
    # unit tests on the synthetic data (2 cameras of 8 x 12 pixels): stride-4 features, 2 x 3 tokens per camera
    "tiny": {"embedding_dim": 24, "num_heads": 2, "backbone_layers": (1, 1, 1, 1), "backbone_width": 8,
             "feature_level": "res2", "deepest_level": "res3", "history_layers": 1, "fps_factor": 2, "cross_layers": 1, "self_layers": 1,
             "branch_layers": 1, "num_vis_ins_attn_layers": 1},
    # CPU, the embedded Meta-World suite (4 cameras, 128 x 128): 4 x 16 x 16 = 1024 scene tokens, 204 sampled.
    # A small backbone trained from scratch: a frozen random one would make any comparison meaningless.
    "small": {},
    # the PerAct-18 recipe's model (scripts/train_keypose_peract.sh): C = 120, 8 heads, frozen CLIP RN50
    # layout (weights from backbone_weights when given), BatchNorm in train mode, bounds buffer 0.04 m
    "paper": {"embedding_dim": 120, "num_heads": 8, "backbone_layers": (3, 4, 6, 3), "backbone_width": 64,
              "freeze_backbone": True, "backbone_bn": "train", "num_vis_ins_attn_layers": 2, "history_layers": 3,
              "cross_layers": 2, "self_layers": 4, "branch_layers": 2, "bounds_buffer": 0.04},
}
