"""Closed-loop evaluation on the embedded Meta-World suite (CPU): ``mdh eval RUN --env metaworld``.

Per episode: reset the task to a test seed; at most ``max_keyposes`` times, render the four cameras, turn
the frame and the hand-pose history into the Level-1 batch the policy was trained on (the same LMDB value
layout, voxelisation for point policies, instruction embedding and evaluation transform as the dataset:
``LiveObservation``), sample the next keypose, and execute it with the move-then-actuate executor the
data generator's oracle uses (``harness.data.metaworld.replay.KeyposeExecutor``). Outcomes:
harness/evaluate/closed_loop.py.

Test seeds come from the dataset's test block (``split_seed(data seed, "test", offset + i)``), never from
the train or val seeds the dataset recorded; every policy evaluated with the same offset and count sees the
same episodes (paired comparison). The oracle replays the scripted expert's keyposes on the same seeds.
"""

from __future__ import annotations

import ast
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from harness.data.collate import collate_keysteps
from harness.data.formats.lotus_lmdb import episode_from_value, keysteps_to_voxel_value, keysteps_value
from harness.data.metaworld.replay import KeyposeExecutor, ServoConfig
from harness.evaluate.closed_loop import EpisodeResult

log = logging.getLogger(__name__)


@dataclass
class MetaWorldEvalConfig:
    """``episodes`` per task; ``seed_offset`` into the test seed block; ``max_keyposes`` per episode (None:
    ``default_max_keyposes`` of the evaluated data: door-open's demonstrations need 12 keyposes);
    ``sampler``/``sampler_steps`` for the policy (DDIM-k is much faster than DDPM-100); ``servo``: the
    executor (default: the data generator's)."""

    tasks: list[str] | None = None
    episodes: int = 10
    seed_offset: int = 0
    seed_split: str = "test"  # "train": the training episodes' own seeds (debugging; not a held-out number)
    max_keyposes: int | None = None  # None: twice the longest evaluated demonstration, at least 10
    sampler: str = "ddim"
    sampler_steps: int | None = 10
    video: int = 0  # the first `video` episodes of each task are written as GIFs
    servo: ServoConfig = field(default_factory=ServoConfig)


def default_max_keyposes(keysteps_per_episode) -> int:
    """Keypose budget of an episode: twice the longest demonstration among ``keysteps_per_episode`` (an
    iterable of counts), at least 10 (RLBench's evaluators use 25 whatever the task)."""
    return max(10, 2 * max(keysteps_per_episode, default=0))


def generator_settings(meta) -> dict:
    """The data generator's settings (seed, stride, open threshold, servo) from ``meta.extra``, a Python
    literal written by ``mdh data metaworld`` (read with ``ast.literal_eval``: no code runs)."""
    extra = getattr(meta, "extra", None)
    if isinstance(extra, str):
        try:
            extra = ast.literal_eval(extra)
        except (ValueError, SyntaxError):
            extra = None
    return dict((extra or {}).get("settings") or {}) if isinstance(extra, dict) else {}


def evaluation_seeds(meta, count: int, offset: int = 0, split: str = "test") -> list[int]:
    """``count`` test seeds of the dataset's test block, checked disjoint from its train and val seeds.
    ``split="train"``: the dataset's own training seeds ``offset..offset+count`` instead (a policy replaying
    the episodes it was fitted on: the first rung of debugging a policy that never succeeds; never a
    held-out number)."""
    from harness.data.metaworld.tasks import split_seed

    if split == "train":
        train = [int(s) for s in (getattr(meta, "splits", None) or {}).get("train", [])]
        if offset + count > len(train):
            raise ValueError(f"the dataset has {len(train)} training seeds; asked for {count} from offset {offset}")
        return train[offset:offset + count]
    if split != "test":
        raise ValueError(f"evaluation seeds come from 'test' or 'train', got {split!r}")
    base = int(generator_settings(meta).get("seed", 0))
    seeds = [split_seed(base, "test", offset + i) for i in range(count)]
    used = {int(s) for split in ("train", "val") for s in (getattr(meta, "splits", None) or {}).get(split, [])}
    clash = sorted(set(seeds) & used)
    if clash:
        raise ValueError(f"evaluation seeds {clash[:5]} are training or validation seeds of the dataset")
    return seeds


class LiveObservation:
    """A rendered frame + pose history -> the collated batch of one keystep, through the dataset's own code
    path: ``keysteps_value`` (the LMDB layout), ``keysteps_to_voxel_value`` for voxel-kind data, the
    ``Episode``/``Keystep`` reader and ``dataset.transform`` (the evaluation transform: no augmentation)."""

    def __init__(self, dataset, kind: str, n_hist: int):
        if dataset.transform is None or dataset.transform.cfg.train:
            raise ValueError("LiveObservation needs a dataset with the evaluation transform (train=False)")
        self.ds, self.kind, self.n_hist = dataset, kind, n_hist

    def batch(self, frame, poses: list[np.ndarray], task: str, variation: int = 0) -> dict:
        hist = [np.asarray(p, np.float32) for p in poses[-self.n_hist:]]
        actions = np.stack([*hist, hist[-1]])  # the target slot is never read at evaluation
        T = len(actions)
        def rep(a):
            return None if a is None else np.repeat(np.asarray(a)[None], T, axis=0)

        value = keysteps_value(rep(frame.rgb), rep(frame.pc), actions, list(range(T)),
                               depth=rep(getattr(frame, "depth", None)), mask=rep(getattr(frame, "mask", None)))
        if self.kind == "voxel1cm":
            value = keysteps_to_voxel_value(value, self.ds.meta)
        taskvar = f"{task}+{variation}"
        episode = episode_from_value(value, taskvar, "live")
        text, tokens = self.ds._instruction_for(taskvar, None)
        ks = episode.keystep(T - 2, n_hist=self.n_hist, instruction=text, text_tokens=tokens)
        return collate_keysteps([self.ds.transform(ks, np.random.default_rng(0))])


def current_pose(env, obs: np.ndarray, threshold: float) -> np.ndarray:
    """The demos' pose layout (``rollout.frame_pose``), imported here lazily: Meta-World loads on first use."""
    from harness.data.metaworld.rollout import frame_pose

    return frame_pose(env, obs, threshold)


class VideoRecorder:
    """One camera's RGB after every env step (every ``every``-th), with the current predicted keypose
    marked by a red cross; ``save(path)`` writes a GIF (imageio)."""

    def __init__(self, renderer, env, camera: int = 0, every: int = 2):
        from harness.data.metaworld.cameras import camera_to_world

        self.renderer, self.env, self.camera, self.every = renderer, env, camera, every
        cid = renderer.cam_ids[camera]
        self.T = camera_to_world(env.data.cam_xpos[cid], env.data.cam_xmat[cid])
        self.K = renderer.K[camera]
        self.frames: list[np.ndarray] = []
        self.target: np.ndarray | None = None
        self.n = 0

    def capture(self, force: bool = False) -> None:
        from harness.data.metaworld.cameras import project_to_pixel

        self.n += 1
        if not force and self.n % self.every:
            return
        img = self.renderer.render_rgb(self.env.data, self.camera)
        if self.target is not None:
            u, v, z = project_to_pixel(self.target, self.K, self.T)
            if z > 0:
                H, W = img.shape[:2]
                for d in range(-3, 4):
                    for x, y in ((int(u) + d, int(v)), (int(u), int(v) + d)):
                        if 0 <= x < W and 0 <= y < H:
                            img[y, x] = (255, 0, 0)
        self.frames.append(img)

    def save(self, path: Path) -> Path:
        import imageio.v3 as iio

        path.parent.mkdir(parents=True, exist_ok=True)
        iio.imwrite(path, np.stack(self.frames), duration=100, loop=0)
        return path


def run_episode(env, render, observe, predict, task: str, seed: int, cfg: MetaWorldEvalConfig,
                open_threshold: float = 0.6, policy_name: str = "", recorder: VideoRecorder | None = None
                ) -> EpisodeResult:
    """One closed-loop episode. ``render(env) -> frame``; ``observe(frame, poses, task) -> batch``;
    ``predict(batch, episode_seed, keypose_index) -> (8,)`` world-frame [xyz, quat, open logit]. Errors raised by the
    simulator (reset, step, render) end the episode as ``sim_error``; errors of the policy propagate."""
    from harness.data.metaworld.scene import reset_to_seed

    t0 = time.perf_counter()
    keyposes = 0

    clips: list[float] = []  # metres each clipped keypose moved to enter the mocap box

    def result(outcome: str, steps: int = 0, error: str | None = None) -> EpisodeResult:
        return EpisodeResult(task, seed, outcome, keyposes, steps, time.perf_counter() - t0, error,
                             policy=policy_name, clipped_keyposes=len(clips),
                             clip_max_m=round(max(clips), 6) if clips else 0.0,
                             clip_mean_m=round(float(np.mean(clips)), 6) if clips else 0.0)

    try:
        obs = reset_to_seed(env, seed)
    except Exception as e:  # noqa: BLE001 - any simulator failure is an outcome, not a crash
        return result("sim_error", 0, f"reset: {type(e).__name__}: {e}")
    executor = KeyposeExecutor(env, obs, cfg.servo, open_state=current_pose(env, obs, open_threshold)[7],
                               on_step=recorder.capture if recorder is not None else None)
    poses = [current_pose(env, obs, open_threshold)]
    low, high = np.asarray(env.mocap_low, float), np.asarray(env.mocap_high, float)
    for _ in range(cfg.max_keyposes):
        try:
            frame = render(env)
        except Exception as e:  # noqa: BLE001
            return result("sim_error", executor.steps, f"render: {type(e).__name__}: {e}")
        action = np.asarray(predict(observe(frame, poses, task), seed, keyposes), dtype=np.float64)
        keyposes += 1
        if action.shape != (8,) or not np.isfinite(action).all():
            return result("policy_failure", executor.steps, f"non-finite or malformed action {action.tolist()}")
        target, new_open = action[:3], 1.0 if action[7] > 0 else 0.0
        if recorder is not None:
            recorder.target = target
            recorder.capture(force=True)
        # Meta-World clips every mocap target to [mocap_low, mocap_high]; so does the evaluation, and it
        # records by how much (the demonstrations sit at the box floor: push's keyposes reach z = 0.052)
        clipped = np.clip(target, low, high)
        distance = float(np.linalg.norm(clipped - target))
        if distance > 0:
            clips.append(distance)
            target = clipped
        try:
            status = executor.execute(target, new_open)
        except Exception as e:  # noqa: BLE001
            return result("sim_error", executor.steps, f"step: {type(e).__name__}: {e}")
        if not np.isfinite(executor.obs).all():
            return result("sim_error", executor.steps, "non-finite simulator state")
        if status == "success":
            return result("success", executor.steps)
        if status == "limit":
            return result("policy_failure", executor.steps, "environment step budget spent")
        poses.append(current_pose(env, executor.obs, open_threshold))
    return result("policy_failure", executor.steps, f"keypose budget ({cfg.max_keyposes}) spent")


def oracle_episode(env, task: str, seed: int, stride: int, servo: ServoConfig,
                   open_threshold: float = 0.6) -> EpisodeResult:
    """The scripted expert's keyposes on ``seed``, replayed with the same executor."""
    from harness.data.metaworld.replay import replay_keyposes
    from harness.data.metaworld.rollout import record_expert

    t0 = time.perf_counter()
    try:
        demo = record_expert(env, task, seed, open_threshold=open_threshold)
        if not demo.success:
            return EpisodeResult(task, seed, "policy_failure", 0, 0, time.perf_counter() - t0,
                                 "the scripted expert failed on this seed", policy="oracle")
        keyframes = demo.keyframes(stride)
        res = replay_keyposes(env, seed, demo.poses[keyframes], servo)
    except Exception as e:  # noqa: BLE001
        return EpisodeResult(task, seed, "sim_error", 0, 0, time.perf_counter() - t0,
                             f"{type(e).__name__}: {e}", policy="oracle")
    return EpisodeResult(task, seed, "success" if res.success else "policy_failure", len(keyframes) - 1,
                         res.steps, time.perf_counter() - t0, policy="oracle")


def make_predictor(policy, sampler_name: str, sampler_steps: int | None, device: torch.device):
    """``predict(batch, seed, k) -> (8,)``: the policy's world-frame keypose; the sampling noise and the global
    RNG are seeded by (episode seed, keypose index), so an episode repeats exactly whatever ran before it in
    the process (any --workers, any earlier checkpoint)."""
    from harness.diffusion import SamplerConfig, make_sampler
    from harness.policy import world_actions

    sampler = make_sampler(policy.noise_scheduler, SamplerConfig(sampler_name, sampler_steps))

    def predict(batch: dict, seed: int, k: int) -> np.ndarray:
        batch = {key: v.to(device) if torch.is_tensor(v) else v for key, v in batch.items()}
        gen = torch.Generator(device=device).manual_seed(int(seed) * 1000 + int(k))
        # the global RNG too: a policy may draw from it inside (Mini-Diffuser shuffles its serialisation
        # orders at test time), and an episode must not depend on what this process evaluated before
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(int(seed) * 1000 + int(k))
            actions = policy.sample(batch, sampler, generator=gen)
        return world_actions(actions, batch)[0].detach().cpu().double().numpy()

    return predict
