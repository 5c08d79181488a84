"""Convert raw RLBench episodes into the training layout: ``convert_rlbench(raw, out, ...)``.

``mdh data convert-rlbench RAW OUT`` writes what the embedded Meta-World suite holds
(harness/data/metaworld/generate.py), so every command that reads one reads the other:

    meta.json                         DatasetMeta (source "rlbench"; settings and one record per converted
                                      task-variation in extra["converted"][split][taskvar])
    taskvars.json                     ["close_jar+0", ...]
    taskvars_instructions.json        {"close_jar+0": ["close the red jar", ...]}
    instr_embeds_<encoder>.npy        {instruction: (L, D) float32}
    <split>/keysteps/<task>+<var>/    LMDB, keys "episode<k>": rgb, world point maps, depth, mask (when
                                      recorded), link boxes (when recorded), action, key_frameids
    <split>/voxel1cm/<task>+<var>/    LMDB, same keys: all cameras' points cropped to the workspace box and
                                      voxel-downsampled at 1 cm (3D-LOTUS's gen_simple_policy_data.py)

``RAW`` is a raw RLBench root (``<task>/variation<V>/episodes/episode<k>`` or the PerAct fork's
``<task>/all_variations/episodes/...``), one task folder or one variation folder, converted into ``split``;
or a folder holding ``train/``, ``val/``, ``test/`` raw roots (PerAct's download), each converted into its
split. Keyframes: frame 0 + ``peract_keyposes`` with the chosen variant (default "lotus", the Mini-Diffuser
/ 3D-LOTUS one; see harness/data/keyposes.py).

Resumable and atomic per (split, task-variation): each is written into ``OUT/.staging/<split>/<taskvar>``
and its two LMDB folders are moved into place when it is complete; then its record is added to meta.json.
A task-variation with a record and both folders is kept as it is; one without a record (an interrupted
move) is converted again. So an interrupted conversion never leaves a folder that reads as complete, and
rerunning the same command finishes it with the same bytes as an uninterrupted run. Resuming with other
settings (cameras, keypose rule, crop) raises ``DataError``: the folder would mix two conversions.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

from harness.data.errors import DataError
from harness.data.formats import natural_key
from harness.data.formats.instructions import write_instruction_files, write_taskvars
from harness.data.formats.lotus_lmdb import (
    KEYSTEPS,
    VOXEL,
    LmdbWriter,
    keysteps_to_voxel_value,
    keysteps_value,
    replace_dir_atomic,
)
from harness.data.formats.rlbench_raw import PERACT_CAMERAS, RLBenchRawSource
from harness.data.keyposes import KEYPOSE_RULES
from harness.data.meta import META_FILENAME, RLBENCH18, DatasetMeta

log = logging.getLogger(__name__)

CONVERTER_NAME = "mdh convert-rlbench/1"
SPLIT_NAMES = ("train", "val", "test")
KINDS = (KEYSTEPS, VOXEL)
STAGING = ".staging"


def split_roots(raw: Path, split: str) -> dict[str, Path]:
    """{split: raw root}: ``raw`` itself (into ``split``) or its ``train``/``val``/``test`` raw roots."""
    raw = Path(raw)
    if not raw.is_dir():
        raise DataError("raw RLBench folder does not exist", raw)
    if RLBenchRawSource.detect(raw):
        return {split: raw}
    found = {s: raw / s for s in SPLIT_NAMES if (raw / s).is_dir() and RLBenchRawSource.detect(raw / s)}
    if not found:
        raise DataError("not a raw RLBench folder: expected <root>/<task>/variation<V>/episodes/episode<k> "
                        "(or <task>/all_variations/episodes/...), a task or variation folder, or a folder "
                        f"holding such roots named {list(SPLIT_NAMES)}", raw)
    return found


def _settings(cameras: list[str], keyposes: str, stopping_delta: float, encoder: str) -> dict:
    meta = RLBENCH18
    return {"converter": CONVERTER_NAME, "cameras": list(cameras), "keyposes": keyposes,
            "stopping_delta": float(stopping_delta), "frame0": True,
            "workspace_bounds": [list(b) for b in meta.workspace_bounds], "voxel_size": meta.voxel_size,
            "text_encoder": encoder}


def _new_meta(settings: dict) -> DatasetMeta:
    return dataclasses.replace(
        RLBENCH18, generator_version=CONVERTER_NAME, cameras=list(settings["cameras"]),
        keypose_method=(f"frame 0 + peract_keyposes(rule={settings['keyposes']!r}, "
                        f"stopping_delta={settings['stopping_delta']}) on gripper_open and joint_velocities"),
        robot_link_boxes=[], extra={"settings": settings, "converted": {}},
    )


def _open_meta(out: Path, settings: dict) -> DatasetMeta:
    path = out / META_FILENAME
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        return _new_meta(settings)
    meta = DatasetMeta.load(path)
    old = meta.extra.get("settings")
    if meta.source != "rlbench" or not isinstance(old, dict) or old.get("converter", "").split("/")[0] != \
            CONVERTER_NAME.split("/")[0]:
        raise DataError(f"folder holds a dataset not written by `mdh data convert-rlbench` "
                        f"(source {meta.source!r}); choose another OUT", path, "extra.settings")
    changed = {k: (old.get(k), v) for k, v in settings.items() if k != "text_encoder" and old.get(k) != v}
    if changed:
        listing = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise DataError(f"resuming with other settings would mix two conversions in one folder ({listing}); "
                        "use another OUT or the original settings", path, ",".join(changed))
    return meta


def _plan(roots: dict[str, Path], tasks: list[str] | None,
          source_args: dict) -> list[tuple[str, str, Path, int]]:
    """[(split, taskvar, task folder, episodes)] in split then natural order; unknown ``tasks`` -> DataError."""
    jobs, seen = [], set()
    for split, root in roots.items():
        src = RLBenchRawSource(root, **source_args)
        for tv in src.taskvars():
            task = tv.rpartition("+")[0]
            seen.add(task)
            if tasks is None or task in tasks:
                jobs.append((split, tv, src.taskvar_path(tv).parent, len(src.episode_keys(tv))))
    if tasks is not None:
        unknown = sorted(set(tasks) - seen)
        if unknown:
            raise DataError(f"tasks {unknown} not found; the raw data holds {sorted(seen)}",
                            next(iter(roots.values())))
    return jobs


def convert_taskvar(task_dir: Path, taskvar: str, staging: Path, source_args: dict, skip_bad: bool = False,
                    on_episode=None) -> dict:
    """Write both LMDBs of one task-variation into ``staging/{keysteps,voxel1cm}``; returns its record.

    A bad episode raises ``DataError`` (naming the file and key) unless ``skip_bad``, which records it in
    ``record["skipped"]`` instead. ``on_episode()`` is called after each episode (progress bars).
    """
    t0 = time.perf_counter()
    if staging.exists():
        shutil.rmtree(staging)  # leftovers of an interrupted run
    src = RLBenchRawSource(task_dir, **source_args)
    record = {"source": str(src.taskvar_path(taskvar)),
              "episodes": 0, "keysteps": 0, "keyframes": {}, "demo_length": {}, "skipped": {},
              "image_size": None, "link_boxes": True, "has_mask": True}
    keys = src.episode_keys(taskvar)
    if not keys:
        raise DataError(f"task-variation {taskvar} holds no episode folders", src.taskvar_path(taskvar) / "episodes")
    with LmdbWriter(staging / KEYSTEPS) as kw, LmdbWriter(staging / VOXEL) as vw:
        for key in keys:
            try:
                ep = src.read_episode(taskvar, key)
                value = keysteps_value(ep.rgb_images, ep.point_maps, ep.actions, ep.key_frameids,
                                       depth=ep.depth, mask=ep.mask, bbox_info=ep.bbox_info,
                                       pose_info=ep.pose_info, path=ep.extra["path"], key=key)
                voxel = keysteps_to_voxel_value(value, RLBENCH18)  # the crop and voxel size of _settings
            except DataError as e:
                if not skip_bad:
                    raise
                record["skipped"][key] = str(e)
                log.warning("skip_bad: skipping %s", e)
                continue
            kw.put(key, value)
            vw.put(key, voxel)
            size = list(ep.rgb_images.shape[2:4])
            if record["image_size"] not in (None, size):
                raise DataError(f"images are {size[0]}x{size[1]} but earlier episodes of {taskvar} are "
                                f"{record['image_size'][0]}x{record['image_size'][1]}", ep.extra["path"], key)
            record["image_size"] = size
            record["episodes"] += 1
            record["keysteps"] += ep.num_keysteps
            record["keyframes"][key] = list(ep.key_frameids)
            record["demo_length"][key] = int(ep.extra["demo_length"])
            record["link_boxes"] &= bool(ep.bbox_info) and all(
                f"{link}_bbox" in ep.bbox_info and f"{link}_pose" in (ep.pose_info or {})
                for link in RLBENCH18.robot_link_boxes)
            record["has_mask"] &= ep.mask is not None
            record["instructions"] = ep.extra["instructions"]
            record["instructions_fallback"] = bool(ep.extra["instructions_fallback"])
            if on_episode is not None:
                on_episode()
    if record["episodes"] == 0:
        raise DataError(f"no episode of {taskvar} could be converted ({len(record['skipped'])} skipped)",
                        record["source"], taskvar)
    record["seconds"] = time.perf_counter() - t0
    return record


def _refresh_meta(meta: DatasetMeta) -> None:
    """Dataset-wide facts from the per-taskvar records: image size, link boxes."""
    records = [r for per_split in meta.extra["converted"].values() for r in per_split.values()]
    sizes = {tuple(r["image_size"]) for r in records}
    meta.image_size = sizes.pop() if len(sizes) == 1 else None
    # Box removal needs every link's box in every episode; upstream RLBench records none (robot points stay)
    meta.robot_link_boxes = list(RLBENCH18.robot_link_boxes) if records and all(
        r["link_boxes"] for r in records) else []


def _write_instructions(out: Path, meta: DatasetMeta, encoder: str) -> str:
    """taskvars.json, taskvars_instructions.json and instr_embeds_<encoder>.npy over every converted
    task-variation (all splits); returns the encoder actually used."""
    instructions: dict[str, list[str]] = {}
    for per_split in meta.extra["converted"].values():
        for tv, rec in per_split.items():
            instructions.setdefault(tv, rec["instructions"])
    taskvars = sorted(instructions, key=natural_key)
    write_taskvars(out / "taskvars.json", taskvars)
    encoder_used, embeds_path = write_instruction_files(out, {tv: instructions[tv] for tv in taskvars}, encoder)
    for old in out.glob("instr_embeds_*.npy"):  # one embedding file: the dataset reads the first it finds
        if old != embeds_path:
            old.unlink()
    return encoder_used


def convert_rlbench(raw: str | Path, out: str | Path, tasks: list[str] | None = None,
                    cameras: list[str] | tuple[str, ...] = PERACT_CAMERAS, split: str = "train",
                    keyposes: str = "lotus", stopping_delta: float = 0.1, encoder: str = "clip",
                    workers: int = 1, skip_bad: bool = False, progress: bool = True) -> dict:
    """Convert the raw RLBench data at ``raw`` into ``out`` (module docstring). Returns a summary:
    {"out", "converted": ["split/taskvar", ...], "kept": [...], "episodes", "keysteps", "skipped",
    "text_encoder", "seconds"}."""
    t0 = time.perf_counter()
    raw, out = Path(raw), Path(out)
    if keyposes not in KEYPOSE_RULES:
        raise DataError(f"unknown keypose rule {keyposes!r}; choices: {list(KEYPOSE_RULES)}")
    if workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}")
    if split not in SPLIT_NAMES:
        raise DataError(f"split must be one of {list(SPLIT_NAMES)}, got {split!r}")
    cameras = [cameras] if isinstance(cameras, str) else list(cameras)
    source_args = {"cameras": cameras, "keyposes": keyposes, "stopping_delta": stopping_delta}
    roots = split_roots(raw, split)
    jobs = _plan(roots, tasks, source_args)
    settings = _settings(cameras, keyposes, stopping_delta, encoder)
    meta = _open_meta(out, settings)
    converted: dict = meta.extra.setdefault("converted", {})

    def done(s: str, tv: str) -> bool:
        return tv in converted.get(s, {}) and all((out / s / kind / tv).is_dir() for kind in KINDS)

    todo = [job for job in jobs if not done(job[0], job[1])]
    kept = [f"{s}/{tv}" for s, tv, *_ in jobs if done(s, tv)]
    for s, tv, *_ in todo:
        if any((out / s / kind / tv).exists() for kind in KINDS):
            log.warning("%s/%s: folders without a record (an interrupted move?); converting again", s, tv)
    total = sum(n for *_, n in todo)

    def finish(s: str, tv: str, record: dict) -> None:
        """Move one finished task-variation into place, then record it (the order makes it atomic)."""
        for kind in KINDS:
            final = out / s / kind / tv
            final.parent.mkdir(parents=True, exist_ok=True)
            replace_dir_atomic(out / STAGING / s / tv / kind, final)
        shutil.rmtree(out / STAGING / s / tv, ignore_errors=True)
        converted.setdefault(s, {})[tv] = record
        _refresh_meta(meta)
        meta.save(out)

    with tqdm(total=total, disable=not progress, unit="ep", desc="convert-rlbench") as bar:
        if workers == 1 or len(todo) <= 1:
            for s, tv, d, _ in todo:
                bar.set_postfix_str(f"{s}/{tv}")
                finish(s, tv, convert_taskvar(d, tv, out / STAGING / s / tv, source_args, skip_bad,
                                              on_episode=lambda: bar.update(1)))
        else:
            ctx = multiprocessing.get_context("spawn")  # no inherited LMDB handles or torch threads
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                futures = {pool.submit(convert_taskvar, d, tv, out / STAGING / s / tv, source_args, skip_bad):
                           (s, tv) for s, tv, d, _ in todo}
                for fut in as_completed(futures):
                    s, tv = futures[fut]
                    record = fut.result()
                    finish(s, tv, record)
                    bar.update(record["episodes"] + len(record["skipped"]))
    if not converted:
        raise DataError("nothing was converted", raw)
    _remove_if_empty(out / STAGING)
    enc = _write_instructions(out, meta, encoder)
    meta.extra["text_encoder"] = enc
    meta.save(out)
    records = {f"{s}/{tv}": r for s, per in converted.items() for tv, r in per.items()}
    return {"out": str(out), "converted": [f"{s}/{tv}" for s, tv, *_ in todo], "kept": kept,
            "episodes": sum(r["episodes"] for r in records.values()),
            "keysteps": sum(r["keysteps"] for r in records.values()),
            "skipped": {k: r["skipped"] for k, r in records.items() if r["skipped"]},
            "fallback_instructions": sorted(k for k, r in records.items() if r.get("instructions_fallback")),
            "text_encoder": enc, "seconds": time.perf_counter() - t0}


def _remove_if_empty(path: Path) -> None:
    for p in sorted(path.glob("**/*"), key=lambda p: -len(p.parts)) + [path]:
        try:
            p.rmdir()
        except OSError:  # missing, or holds an unfinished task-variation (the next run cleans it)
            pass
