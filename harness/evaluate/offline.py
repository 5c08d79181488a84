"""Offline evaluation: how many predicted keyposes land within 1 cm and 3 degrees of the target.

Rotation error is the geodesic angle between the predicted and the TARGET orientation (the official
validation compared with the current pose by mistake, reference §9.4). Gripper accuracy thresholds the
predicted open logit at 0 against the target's open flag at 0.5.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from harness.data.collate import batch_to
from harness.policy import world_actions
from harness.rotations import geodesic_deg

POS_THRESHOLD_CM = 1.0
ROT_THRESHOLD_DEG = 3.0


def per_sample_errors(pred: torch.Tensor, target: torch.Tensor) -> dict[str, np.ndarray]:
    """pred (B, 8) [xyz, quat xyzw, open logit], target (B, 8) [xyz, quat xyzw, open] in one frame ->
    per-sample arrays: pos_err_cm, rot_err_deg, gripper_ok, within_1cm, within_3deg, all_ok."""
    pred, target = pred.detach().float().cpu(), target.detach().float().cpu()
    pos = (pred[:, :3] - target[:, :3]).norm(dim=-1).numpy() * 100.0
    rot = geodesic_deg(pred[:, 3:7], target[:, 3:7]).numpy()
    grip = ((pred[:, 7] > 0) == (target[:, 7] > 0.5)).numpy()
    within_pos, within_rot = pos < POS_THRESHOLD_CM, rot < ROT_THRESHOLD_DEG
    return {"pos_err_cm": pos, "rot_err_deg": rot, "gripper_ok": grip, "within_1cm": within_pos,
            "within_3deg": within_rot, "all_ok": within_pos & within_rot & grip}


def summarize(errors: dict[str, np.ndarray]) -> dict[str, float]:
    """Means over samples: pos_err_cm, pct_within_1cm, rot_err_deg, pct_within_3deg, gripper_acc, pct_all."""
    return {
        "pos_err_cm": float(np.mean(errors["pos_err_cm"])),
        "pct_within_1cm": 100.0 * float(np.mean(errors["within_1cm"])),
        "rot_err_deg": float(np.mean(errors["rot_err_deg"])),
        "pct_within_3deg": 100.0 * float(np.mean(errors["within_3deg"])),
        "gripper_acc": 100.0 * float(np.mean(errors["gripper_ok"])),
        "pct_all": 100.0 * float(np.mean(errors["all_ok"])),
        "n": len(errors["pos_err_cm"]),
    }


def offline_metrics(pred: torch.Tensor, target: torch.Tensor, tasks: list[str]) -> dict:
    """{"overall": summary, "per_task": {task: summary}} over all samples."""
    errors = per_sample_errors(pred, target)
    by_task: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(tasks):
        by_task[t].append(i)
    per_task = {t: summarize({k: v[idx] for k, v in errors.items()}) for t, idx in sorted(by_task.items())}
    return {"overall": summarize(errors), "per_task": per_task}


@torch.no_grad()
def evaluate_policy(policy, batches, sampler, device, generator: torch.Generator | None = None) -> dict:
    """Sample one action per held-out keystep (``batches``: collated batches) and score it."""
    was_training = policy.training
    policy.eval()
    preds, targets, tasks = [], [], []
    try:
        for batch in batches:
            batch = batch_to(batch, device)
            # both in the world frame through the helper closed-loop evaluation uses too
            preds.append(world_actions(policy.sample(batch, sampler, generator=generator), batch).cpu())
            targets.append(world_actions(batch["target"], batch).cpu())
            tasks.extend(batch["task"])
    finally:
        policy.train(was_training)
    return offline_metrics(torch.cat(preds), torch.cat(targets), tasks)
