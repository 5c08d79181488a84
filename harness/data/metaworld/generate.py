"""Write the embedded Meta-World dataset: ``generate_suite(out, tasks="mt10", episodes=20, ...)``.

Layout under ``out`` (variation is 0 for every Meta-World task):

    meta.json                         DatasetMeta (source "metaworld"; settings, seeds, task records in extra)
    taskvars.json                     ["pick-place-v3+0", ...]
    taskvars_instructions.json        {"pick-place-v3+0": ["pick up the puck and ...", ...]}
    instr_embeds_<encoder>.npy        {instruction: (L, D) float32}
    <split>/keysteps/<task>+0/        LMDB, keys "episode<k>", keysteps values (rgb, point maps, depth, mask)
    <split>/voxel1cm/<task>+0/        LMDB, same keys, voxel1cm values (cropped, 1 cm voxels, sem from mask)

for split in train/val/test. Episode k of a split was generated from seed
``meta.extra["tasks"][task]["seeds"][split][k]``.

Per episode: run the expert from the seed's placement (a failed rollout moves on to the next seed; the
failures are recorded), pick keyframes = 0 + physical-gripper changes + every ``stride`` frames + last,
render them, write both LMDB values, and replay the keyposes with the oracle executor (``replay.py``).

Resumable: each task is written into ``out/.staging/<task>+0`` and its six LMDB folders are moved into
place when the task is complete; then ``meta.json`` is rewritten. A task whose six folders exist and whose
record is in ``meta.json`` is skipped and its numbers kept. A task with some folders but no record (an
interrupted move) is regenerated, with a warning. Resuming with different settings raises ``DataError``.
Determinism: the same arguments give bit-identical LMDB values on the same machine and library versions.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from harness.data.errors import DataError
from harness.data.formats.instructions import write_instruction_files, write_taskvars
from harness.data.formats.lotus_lmdb import (
    KEYSTEPS,
    VOXEL,
    LmdbWriter,
    keysteps_to_voxel_value,
    replace_dir_atomic,
)
from harness.data.meta import META_FILENAME, DatasetMeta
from harness.data.metaworld import scene
from harness.data.metaworld.cameras import CAMERAS
from harness.data.metaworld.instructions import instructions_for
from harness.data.metaworld.keysteps import demo_to_keysteps
from harness.data.metaworld.render import KeyframeRenderer
from harness.data.metaworld.replay import ServoConfig, replay_keyposes
from harness.data.metaworld.rollout import record_expert
from harness.data.metaworld.tasks import SPLITS, resolve_tasks, split_seed

log = logging.getLogger(__name__)

GENERATOR_NAME = "mdh-metaworld/2"  # 2: orientation in the tool frame (scene.TOOL_FROM_HAND)
# Stride 10 maximised the oracle on MT10 x 20 demos (198/200; stride 5: 195, 15: 197, 20: 197, 30: 193)
# with OPEN_THRESHOLD 0.6, 10 settle steps and the default ServoConfig.
DEFAULT_STRIDE = 10
SETTLE_STEPS = 10
KINDS = (KEYSTEPS, VOXEL)


def generator_version() -> str:
    versions = f"metaworld {metadata.version('metaworld')}, mujoco {metadata.version('mujoco')}"
    return f"{GENERATOR_NAME} ({versions})"


def generate_suite(out: Path, tasks: list[str] | str = "mt10", episodes: int = 20,
                   val_episodes: int | None = None, test_episodes: int | None = None, image_size: int = 128,
                   seed: int = 0, encoder: str = "hash", stride: int | None = None,
                   progress: bool = True) -> dict:
    """Generate (or resume) the dataset at ``out``; returns a summary dict:

    ``{"out", "seconds", "settings", "oracle_mean", "tasks": {task: {"episodes": {split: n},
    "keysteps": {split: n}, "oracle": fraction, "oracle_by_split": {split: fraction},
    "failed_seeds": {split: [seeds]}, "seconds": {"expert", "render", "write", "oracle", "total"},
    "skipped": bool}}}``. With ``progress`` a tqdm bar runs and the per-task oracle table is printed.
    """
    out = Path(out)
    scene.check_gl()  # first: with a broken GL back end even importing metaworld fails, confusingly
    tasks = resolve_tasks(tasks)
    counts = _split_counts(episodes, val_episodes, test_episodes)
    stride = DEFAULT_STRIDE if stride is None else stride
    for name, value, low in (("image_size", image_size, 8), ("stride", stride, 1), ("seed", seed, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    settings = _settings(counts, int(image_size), int(stride), int(seed))
    meta = _open_meta(out, settings)
    records: dict = meta.extra.setdefault("tasks", {})
    t_start = time.perf_counter()
    summary_tasks = {}

    from tqdm.auto import tqdm

    total = len(tasks) * sum(counts.values())
    with tqdm(total=total, disable=not progress, unit="ep", desc="metaworld") as bar:
        for task in tasks:
            taskvar = f"{task}+0"
            finals = [out / split / kind / taskvar for split in SPLITS for kind in KINDS]
            if all(p.is_dir() for p in finals) and task in records:
                bar.update(sum(counts.values()))
                summary_tasks[task] = {**_task_summary(records[task]), "skipped": True}
                continue
            if any(p.exists() for p in finals):
                log.warning("%s: found some of its LMDB folders but no record in %s (interrupted run); "
                            "regenerating the task", task, out / META_FILENAME)
                for p in finals:
                    if p.exists():
                        shutil.rmtree(p)
            record = _generate_task(out, task, counts, settings, meta, bar)
            records[task] = record
            meta.oracle_success[task] = record["oracle"]
            _refresh_splits(meta)
            meta.save(out)
            summary_tasks[task] = {**_task_summary(record), "skipped": False}

    _remove_if_empty(out / ".staging")
    enc = _write_instructions(out, list(records), encoder)
    if meta.extra.get("text_encoder") not in (None, enc):
        log.warning("instruction embeddings now written with encoder %r (before: %r)", enc,
                    meta.extra["text_encoder"])
    meta.extra["text_encoder"] = enc
    meta.save(out)
    summary = {"out": str(out), "seconds": time.perf_counter() - t_start, "settings": settings,
               "text_encoder": enc, "tasks": summary_tasks,
               "oracle_mean": float(np.mean([t["oracle"] for t in summary_tasks.values()]))}
    if progress:
        print(format_oracle_table(summary))
    return summary


def _split_counts(episodes, val_episodes, test_episodes) -> dict[str, int]:
    counts = {"train": episodes,
              "val": max(1, episodes // 5) if val_episodes is None else val_episodes,
              "test": max(1, episodes // 5) if test_episodes is None else test_episodes}
    for split, n in counts.items():
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise ValueError(f"number of {split} episodes must be an int >= 1, got {n!r}")
    return {k: int(v) for k, v in counts.items()}


def _settings(counts: dict, image_size: int, stride: int, seed: int) -> dict:
    """Everything that determines the LMDB contents; resuming requires equality."""
    return {"generator_version": generator_version(), "episodes": counts, "image_size": image_size,
            "stride": stride, "seed": seed, "open_threshold": scene.OPEN_THRESHOLD,
            "settle_steps": SETTLE_STEPS, "servo": ServoConfig().to_dict(),
            "cameras": [dataclasses.asdict(c) for c in CAMERAS]}


def _normalise(x):
    # JSON round trip turns tuples into lists; compare like with like.
    if isinstance(x, dict):
        return {k: _normalise(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_normalise(v) for v in x]
    return x


def _open_meta(out: Path, settings: dict) -> DatasetMeta:
    path = out / META_FILENAME
    if path.is_file():
        meta = DatasetMeta.load(path)
        if meta.source != "metaworld":
            raise DataError(f"folder holds a {meta.source!r} dataset, not a Meta-World one", path, "source")
        old = _normalise(meta.extra.get("settings", {}))
        new = _normalise(settings)
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            what = ", ".join(f"{k} (existing {old.get(k)!r}, requested {new.get(k)!r})" for k in diff)
            raise DataError(f"cannot resume: settings differ from the existing dataset in {what}; "
                            "write to a new folder or use the existing settings", path, "extra.settings")
        return meta
    out.mkdir(parents=True, exist_ok=True)
    return DatasetMeta(
        source="metaworld", generator_version=settings["generator_version"],
        workspace_bounds=scene.WORKSPACE_BOUNDS, table_height=scene.TABLE_HEIGHT, robot_base=scene.ROBOT_BASE,
        cameras=[c.name for c in CAMERAS], image_size=(settings["image_size"], settings["image_size"]),
        voxel_size=0.01, robot_labels=list(scene.ARM_LABELS), gripper_labels=list(scene.GRIPPER_LABELS),
        robot_link_boxes=[],
        keypose_method=(f"frame 0 + gripper_stride_keyposes(stride={settings['stride']}) on the physical "
                        f"gripper state (obs[3] > {scene.OPEN_THRESHOLD}); demos run up to "
                        f"{SETTLE_STEPS} steps past success"),
        splits={}, oracle_success={},
        extra={"settings": settings, "tasks": {},
               "labels": "mask/sem = MuJoCo body id (per-task permutation pinning the Sawyer at 3..31, see "
                         "harness/data/metaworld/scene.py); -1 = background; 0 = world (floor, goal markers)",
               "pose": "[hand xyz, hand quat xyzw, physical gripper open 1/0]; hand orientation is fixed"},
    )


def _refresh_splits(meta: DatasetMeta) -> None:
    """meta.splits[split] = sorted union of the seeds used by every task in that split."""
    meta.splits = {split: sorted({s for rec in meta.extra["tasks"].values() for s in rec["seeds"][split]})
                   for split in SPLITS}


def _generate_task(out: Path, task: str, counts: dict, settings: dict, meta: DatasetMeta, bar) -> dict:
    """Write all splits of ``task`` into ``out/.staging``, move them into place; returns the task record."""
    taskvar = f"{task}+0"
    staging = out / ".staging" / taskvar
    if staging.exists():
        shutil.rmtree(staging)  # leftovers of an interrupted run
    secs = dict.fromkeys(("expert", "render", "write", "oracle"), 0.0)
    t0 = time.perf_counter()
    env = scene.make_env(task, max_image_size=settings["image_size"])
    labels = scene.body_labels(env.model)
    record = {"seeds": {}, "failed_seeds": {}, "oracle_success": {}, "keysteps": {}, "frames": {},
              "table_height": scene.table_top_z(env)}
    if not np.array_equal(labels, np.arange(len(labels))):
        record["label_permutation"] = labels.tolist()
    try:
        with KeyframeRenderer(env.model, CAMERAS, settings["image_size"]) as renderer:
            for split in SPLITS:
                bar.set_postfix_str(f"{task} {split}")
                done = _generate_split(env, renderer, task, split, counts[split], settings, meta,
                                       staging / split, secs, bar)
                for field, value in done.items():
                    record[field][split] = value
    finally:
        env.close()
    for split in SPLITS:
        for kind in KINDS:
            final = out / split / kind / taskvar
            final.parent.mkdir(parents=True, exist_ok=True)
            replace_dir_atomic(staging / split / kind, final)
    shutil.rmtree(staging, ignore_errors=True)
    record["oracle"] = float(np.mean([ok for split in SPLITS for ok in record["oracle_success"][split]]))
    record["seconds"] = {**secs, "total": time.perf_counter() - t0}
    return record


def _generate_split(env, renderer: KeyframeRenderer, task: str, split: str, count: int, settings: dict,
                    meta: DatasetMeta, folder: Path, secs: dict, bar) -> dict:
    """``count`` successful episodes of ``split`` into ``folder/<kind>`` LMDBs; adds to ``secs`` timings.

    Returns {"seeds": [...], "failed_seeds": [...], "oracle_success": [bool per episode],
    "keysteps": total training keysteps, "frames": [demo length per episode]}.
    """
    servo = ServoConfig(**settings["servo"])
    out = {"seeds": [], "failed_seeds": [], "oracle_success": [], "keysteps": 0, "frames": []}
    with LmdbWriter(folder / KEYSTEPS) as kw, LmdbWriter(folder / VOXEL) as vw:
        attempt = 0
        while len(out["seeds"]) < count:
            seed = split_seed(settings["seed"], split, attempt)
            attempt += 1
            t = time.perf_counter()
            demo = record_expert(env, task, seed, open_threshold=settings["open_threshold"],
                                 settle_steps=settings["settle_steps"])
            secs["expert"] += time.perf_counter() - t
            if not demo.success:
                out["failed_seeds"].append(seed)
                failed = out["failed_seeds"]
                if len(failed) > 10 + 2 * count:
                    raise DataError(f"the scripted expert of {task} failed on {len(failed)} seeds of the "
                                    f"{split} split ({failed[:10]}...); is metaworld "
                                    f"{metadata.version('metaworld')} the pinned 3.1.1?")
                continue
            key = f"episode{len(out['seeds'])}"
            keyframes = demo.keyframes(settings["stride"])
            t = time.perf_counter()
            value = demo_to_keysteps(env, renderer, demo, keyframes, key=key)
            secs["render"] += time.perf_counter() - t
            t = time.perf_counter()
            kw.put(key, value)
            vw.put(key, keysteps_to_voxel_value(value, meta))
            secs["write"] += time.perf_counter() - t
            t = time.perf_counter()
            result = replay_keyposes(env, seed, demo.poses[keyframes], servo)
            secs["oracle"] += time.perf_counter() - t
            out["seeds"].append(seed)
            out["oracle_success"].append(bool(result.success))
            out["keysteps"] += len(keyframes) - 1
            out["frames"].append(len(demo))
            bar.update(1)
    return out


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:  # missing, or holds an unfinished task (kept for inspection; rerun cleans it)
        pass


def _task_summary(record: dict) -> dict:
    return {"episodes": {s: len(v) for s, v in record["seeds"].items()}, "keysteps": dict(record["keysteps"]),
            "oracle": record["oracle"],
            "oracle_by_split": {s: float(np.mean(v)) for s, v in record["oracle_success"].items()},
            "failed_seeds": dict(record["failed_seeds"]), "seconds": dict(record["seconds"])}


def _write_instructions(out: Path, tasks: list[str], encoder: str) -> str:
    """taskvars.json, taskvars_instructions.json and instr_embeds_<encoder>.npy; returns the encoder used."""
    taskvars = [f"{t}+0" for t in tasks]
    instructions = {f"{t}+0": instructions_for(t) for t in tasks}
    write_taskvars(out / "taskvars.json", taskvars)
    return write_instruction_files(out, instructions, encoder)[0]


def format_oracle_table(summary: dict) -> str:
    """Plain-text table of the per-task oracle success (the numbers in meta.json's oracle_success)."""
    lines = [f"{'task':<28} {'train/val/test eps':>18} {'keysteps':>8} {'oracle':>7} {'seconds':>8}"]
    for task, t in summary["tasks"].items():
        eps = "/".join(str(t["episodes"][s]) for s in SPLITS)
        lines.append(f"{task:<28} {eps:>18} {sum(t['keysteps'].values()):>8} {t['oracle']:>7.3f} "
                     f"{t['seconds']['total']:>8.1f}" + ("  (kept)" if t["skipped"] else ""))
    lines.append(f"{'mean':<28} {'':>18} {'':>8} {summary['oracle_mean']:>7.3f} {summary['seconds']:>8.1f}")
    return "\n".join(lines)
