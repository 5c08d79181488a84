"""``mdh data inspect``: what a dataset folder holds, as text or one JSON object, and a picture of a keystep."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np

from harness.data.errors import DataError
from harness.data.formats import open_source, parse_taskvar
from harness.data.formats.lotus_lmdb import LotusLmdbSource
from harness.data.meta import resolve_meta
from harness.data.transforms import TransformConfig
from harness.data.validate import check_episode, check_length


def _open(path: Path, split: str, kind: str, fmt: str | None):
    if fmt in (None, "lotus_lmdb") and LotusLmdbSource.detect(path):
        return LotusLmdbSource(path, split=split, kind=kind)
    return open_source(path, fmt, split=split)


def _problem(e: DataError, taskvar: str | None = None) -> dict:
    return {"taskvar": taskvar, "path": e.path, "key": e.key, "problem": e.problem}


def inspect_dataset(path: str | os.PathLike, split: str = "train", kind: str = "voxel1cm",
                    fmt: str | None = None, max_episodes: int | None = None, skip_bad: bool = False) -> dict:
    """Summary dict: format, tasks, variations, episodes, keysteps, points per cloud, cameras, image size,
    and ``problems`` (list of {taskvar, path, key, problem}).

    Reads every episode (or the first ``max_episodes`` per task-variation) once and checks it as the
    training dataset does (``harness.data.validate`` with the default transform settings). Missing data is
    listed under ``problems`` and not counted as a task: a ``<task>+<var>`` folder without an LMDB, an LMDB
    with no episodes, an episode with fewer than 2 keyframes. Any other bad episode or unreadable LMDB
    raises ``DataError`` unless ``skip_bad``; then it is listed under ``problems`` too and counted under
    "skipped" (problem -> count).
    """
    path = Path(path)
    src = _open(path, split, kind, fmt)
    meta, meta_source = resolve_meta(getattr(src, "path", path))
    cfg = TransformConfig()
    tasks, variations, points = set(), set(), []
    episodes = keysteps = 0
    skipped: Counter = Counter()
    problems: list[dict] = []
    cameras, image_size = None, None

    def where(tv: str):
        return src.taskvar_path(tv) if hasattr(src, "taskvar_path") else getattr(src, "path", path)

    def bad(e: DataError, tv: str | None, missing: bool = False) -> None:
        if not (missing or skip_bad):
            raise e
        problems.append(_problem(e, tv))
        if not missing:
            skipped[e.problem] += 1

    for tv, e in (src.bad_taskvars() if hasattr(src, "bad_taskvars") else {}).items():
        bad(e, tv, missing=True)
    for tv in src.taskvars():
        try:
            keys = src.episode_keys(tv)
        except DataError as e:
            bad(e, tv)
            continue
        if not keys:
            bad(DataError(f"task-variation {tv} holds no episodes (an empty LMDB?)", where(tv)), tv, missing=True)
            continue
        n_good = 0
        for key in keys[:max_episodes] if max_episodes else keys:
            try:
                ep = src.read_episode(tv, key)
            except DataError as e:
                bad(e, tv)
                continue
            loc = ep.extra.get("path") or where(tv)
            try:
                check_length(ep, loc, key)
            except DataError as e:
                bad(e, tv, missing=True)
                continue
            try:
                check_episode(ep, meta, cfg, loc, key)
            except DataError as e:
                bad(e, tv)
                continue
            n_good += 1
            episodes += 1
            keysteps += ep.num_keysteps
            if ep.xyz is not None:
                points.extend(len(x) for x in ep.xyz)
            elif ep.point_maps is not None:
                points.extend([int(np.prod(ep.point_maps.shape[1:4]))] * len(ep.point_maps))
            if ep.rgb_images is not None:
                cameras = int(ep.rgb_images.shape[1])
                image_size = [int(ep.rgb_images.shape[2]), int(ep.rgb_images.shape[3])]
        if n_good:
            tasks.add(parse_taskvar(tv)[0])
            variations.add(tv)
    fmt_name = src.name + (f":{src.kind}" if getattr(src, "kind", None) else "")
    return {
        "path": str(getattr(src, "path", path)),
        "format": fmt_name,
        "source": meta.source,
        "meta": meta_source,
        "tasks": sorted(tasks),
        "variations": len(variations),
        "episodes": episodes,
        "keysteps": keysteps,
        "points_per_cloud": ({"min": int(np.min(points)), "median": float(np.median(points)),
                              "max": int(np.max(points))} if points else None),
        "cameras": meta.cameras if cameras is None or len(meta.cameras) == cameras else cameras,
        "num_cameras": cameras if cameras is not None else len(meta.cameras),
        "image_size": image_size or (list(meta.image_size) if meta.image_size else None),
        "oracle_success": meta.oracle_success or None,
        "skipped": dict(skipped),
        "problems": problems,
    }


def format_summary(s: dict) -> str:
    lines = [f"{s['path']}  ({s['format']}, source {s['source']}, metadata {s['meta']})",
             f"  tasks ({len(s['tasks'])}): {', '.join(s['tasks'])}",
             f"  variations {s['variations']}   episodes {s['episodes']}   keysteps {s['keysteps']}"]
    if s["points_per_cloud"]:
        p = s["points_per_cloud"]
        lines.append(f"  points per cloud: min {p['min']}  median {p['median']:.0f}  max {p['max']}")
    lines.append(f"  cameras: {s['cameras']}   image size: {s['image_size']}")
    if s.get("skipped"):
        lines.append(f"  skipped {sum(s['skipped'].values())} bad episodes or unreadable LMDBs: {s['skipped']}")
    if s.get("problems"):
        lines.append(f"  problems ({len(s['problems'])}):")
        lines.extend(f"    {p['path']}" + (f" [{p['key']}]" if p["key"] else "") + f": {p['problem']}"
                     for p in s["problems"])
    if s.get("oracle_success"):
        mean = float(np.mean(list(s["oracle_success"].values())))
        lines.append(f"  oracle keypose-replay success: {mean:.0%} mean; "
                     + ", ".join(f"{k} {v:.0%}" for k, v in s["oracle_success"].items()))
    return "\n".join(lines)


def render_keystep(path: str | os.PathLike, out: str | os.PathLike, split: str = "train",
                   kind: str = "voxel1cm", fmt: str | None = None, taskvar: str | None = None,
                   episode: str | None = None, t: int = 0, max_points: int = 20000) -> Path:
    """Draw one keystep's point cloud (world frame, true colours) with the current gripper position (o)
    and the target keypose position (*) into a PNG. Returns the written path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    src = _open(Path(path), split, kind, fmt)
    taskvar = taskvar or src.taskvars()[0]
    episode = episode or src.episode_keys(taskvar)[0]
    ks = src.read_episode(taskvar, episode).keystep(t)
    meta, _ = resolve_meta(getattr(src, "path", path))
    from harness.data.transforms import crop_to_workspace

    pts, cols = ks.points, ks.colors if ks.colors is not None else np.zeros_like(ks.points)
    keep = crop_to_workspace(pts, meta.workspace_bounds)
    pts, cols = pts[keep], cols[keep]
    if len(pts) > max_points:
        sel = np.random.default_rng(0).choice(len(pts), max_points, replace=False)
        pts, cols = pts[sel], cols[sel]
    fig = plt.figure(figsize=(7, 6))
    ax = fig.add_subplot(projection="3d")
    ax.scatter(pts[:, 0], pts[:, 1], pts[:, 2], c=np.clip((cols + 1) / 2, 0, 1), s=1, depthshade=False)
    ax.scatter(*ks.pose[:3], c="blue", s=120, marker="o", label="current gripper")
    ax.scatter(*ks.target[:3], c="red", s=200, marker="*", label="target keypose")
    ax.set_xlabel("x (m)")
    ax.set_ylabel("y (m)")
    ax.set_zlabel("z (m)")
    ax.set_title(f"{taskvar} {episode} keystep {t}: {len(pts)} points")
    ax.legend(loc="upper left")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out
