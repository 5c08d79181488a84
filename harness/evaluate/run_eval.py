"""``mdh eval``: closed-loop evaluation of a run folder (or its checkpoint), results into the run folder.

Writes ``<run>/eval_<env>/episodes.jsonl`` (one line per episode, the policy's then the oracle's),
``<run>/eval_<env>/summary.json``, and ``final_metrics.success`` of record.json (under the run's lock), so
``mdh report`` shows success with its Wilson interval in Table 2/3.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import multiprocessing
import os
from dataclasses import asdict, replace
from pathlib import Path

import torch

from harness.evaluate.closed_loop import EpisodeResult, summarize, write_episodes
from harness.evaluate.metaworld_eval import MetaWorldEvalConfig

log = logging.getLogger(__name__)
INFRA_RETRIES = 1  # a crashed or hung worker's episodes are run once more, then reported as infra_failure


def resolve_run(target: str | os.PathLike) -> tuple[Path, Path]:
    """A run folder or a checkpoint inside one -> (run folder, checkpoint). Clear errors naming the path."""
    p = Path(target).expanduser()
    if p.is_file():
        run_dir = p.parent.parent if p.parent.name == "ckpt" else p.parent
        ckpt = p
    else:
        run_dir, ckpt = p, p / "ckpt" / "last.pt"
    if not (run_dir / "record.json").is_file():
        raise FileNotFoundError(f"{target}: no record.json in {run_dir} (pass a run folder or its ckpt/last.pt)")
    if not ckpt.is_file():
        raise FileNotFoundError(f"{target}: no checkpoint {ckpt} (the run has not checkpointed yet)")
    return run_dir, ckpt


def run_config(record: dict, data_path: str | None = None):
    """The RunConfig a run was trained with (record.json "config"), optionally at another data path."""
    from harness.config import ClusterConfig, DataConfig, ModelConfig, RunConfig, TrainConfig

    c = record.get("config") or {}
    try:
        cfg = RunConfig(model=ModelConfig(**c["model"]), data=DataConfig(**c["data"]),
                        train=TrainConfig(**{**c["train"], "betas": tuple(c["train"]["betas"])}),
                        cluster=ClusterConfig(**c.get("cluster", {})))
    except (KeyError, TypeError) as e:
        raise ValueError(f"record.json has no usable 'config' ({e})") from None
    if data_path is not None:
        cfg.data.path = str(data_path)
    return cfg


def load_policy(run_dir: Path, ckpt: Path, data_path: str | None = None):
    """(policy in eval mode with the checkpoint's weights, RunConfig, evaluation dataset)."""
    from harness.checkpoint import load_checkpoint
    from harness.train import build_datasets, build_run_policy, dataset_info

    record = json.loads((run_dir / "record.json").read_text())
    cfg = run_config(record, data_path)
    if not Path(cfg.data.path).expanduser().exists():
        raise FileNotFoundError(f"data.path {cfg.data.path!r} of {run_dir} does not exist here; pass --data")
    policy = build_run_policy(cfg, dataset_info(cfg))
    policy.load_state_dict(load_checkpoint(ckpt)["model"])
    policy.eval()
    _, eval_ds, _ = build_datasets(cfg, policy)
    return policy, cfg, eval_ds


def _episodes_worker(run_dir: str, ckpt: str, data_path: str | None, cfg_dict: dict,
                     jobs: list[tuple[str, int]], with_policy: bool) -> list[dict]:
    """Evaluate ``jobs`` [(task, seed)] in this process (policy episodes, or the oracle's)."""
    from harness.data.metaworld.cameras import CAMERAS
    from harness.data.metaworld.render import KeyframeRenderer
    from harness.data.metaworld.scene import make_env
    from harness.evaluate.metaworld_eval import (
        LiveObservation,
        VideoRecorder,
        generator_settings,
        make_predictor,
        oracle_episode,
        run_episode,
    )

    torch.set_num_threads(1)  # results must not depend on --workers: one intra-op thread everywhere
    cfg = MetaWorldEvalConfig(**{k: v for k, v in cfg_dict.items() if not k.startswith("_") and k != "servo"},
                              servo=_servo(cfg_dict["servo"]))
    if with_policy:
        policy, run_cfg, ds = load_policy(Path(run_dir), Path(ckpt), data_path)
        meta = ds.meta
        observe = LiveObservation(ds, run_cfg.data.kind, policy.input_spec.n_hist)
        predict = make_predictor(policy, cfg.sampler, cfg.sampler_steps, torch.device("cpu"))
    else:  # the oracle needs the dataset's facts only, not the policy, its weights or its transforms
        from harness.train import dataset_info

        meta = dataset_info(run_config(json.loads((Path(run_dir) / "record.json").read_text()), data_path)).meta
    size = int(meta.image_size[0])
    settings = generator_settings(meta)
    threshold = float(settings.get("open_threshold", 0.6))
    name = Path(run_dir).name
    out, envs = [], {}
    try:
        for task, seed in jobs:
            if task not in envs:
                env = make_env(task, max_image_size=size)
                envs[task] = (env, KeyframeRenderer(env.model, CAMERAS, size))
            env, renderer = envs[task]
            if with_policy:
                recorder = None
                if cfg.video and cfg_dict["_video_seeds"] and seed in cfg_dict["_video_seeds"][:cfg.video]:
                    recorder = VideoRecorder(renderer, env)
                res = run_episode(env, lambda e, r=renderer: r.render(e.data), observe.batch, predict, task, seed,
                                  cfg, threshold, policy_name=name, recorder=recorder)
                if recorder is not None and recorder.frames:
                    recorder.save(Path(run_dir) / "eval_metaworld" / "videos" / f"{task}_seed{seed}_{res.outcome}.gif")
            else:
                res = oracle_episode(env, task, seed, int(settings.get("stride", 10)), cfg.servo, threshold)
            out.append(res.to_dict())
    finally:
        for env, renderer in envs.values():
            renderer.close()
            env.close()
    return out


def _servo(d: dict):
    from harness.data.metaworld.replay import ServoConfig

    return d if isinstance(d, ServoConfig) else ServoConfig(**d)


def _run_jobs(run_dir: Path, ckpt: Path, data_path, cfg: MetaWorldEvalConfig, jobs, with_policy: bool,
              workers: int, timeout_s: float, worker=None) -> list[EpisodeResult]:
    """Episodes of ``jobs`` in this process (``workers`` 1) or split over ``workers`` spawned processes;
    a chunk whose process crashes or exceeds ``timeout_s`` per episode is run again (``INFRA_RETRIES``),
    then reported as ``infra_failure``. ``worker``: the function a process runs (tests swap it)."""
    worker = worker or _episodes_worker
    # the video episodes: the first cfg.video seeds of the evaluation (the same in every worker)
    cfg_dict = {**asdict(cfg), "_video_seeds": sorted({s for _, s in jobs})}
    if workers <= 1:
        before = torch.get_num_threads()
        try:
            rows = worker(str(run_dir), str(ckpt), data_path, cfg_dict, jobs, with_policy)
        finally:
            torch.set_num_threads(before)
        return [EpisodeResult(**r) for r in rows]
    results: dict[tuple[str, int], EpisodeResult] = {}
    pending = list(jobs)
    attempts: dict[tuple[str, int], int] = {}
    for _ in range(1 + INFRA_RETRIES):
        if not pending:
            break
        for j in pending:
            attempts[j] = attempts.get(j, 0) + 1
        chunks = [pending[i::workers] for i in range(workers) if pending[i::workers]]
        ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds GL contexts and threads
        failed: list[tuple[str, int]] = []
        errors: dict[tuple[str, int], str] = {}
        with cf.ProcessPoolExecutor(len(chunks), mp_context=ctx) as pool:
            futures = {pool.submit(worker, str(run_dir), str(ckpt), data_path, cfg_dict, c, with_policy): c
                       for c in chunks}
            for fut, chunk in futures.items():
                try:
                    for r in fut.result(timeout=timeout_s * len(chunk)):
                        results[(r["task"], r["seed"])] = EpisodeResult(**{**r, "attempts": attempts[(r["task"],
                                                                                                     r["seed"])]})
                except (cf.process.BrokenProcessPool, cf.TimeoutError, OSError) as e:
                    failed += chunk
                    errors.update({j: f"worker failed: {type(e).__name__}: {e}" for j in chunk})
            if failed:
                for proc in getattr(pool, "_processes", {}).values():  # a hung worker must not block the exit
                    proc.kill()
        pending = failed
    for task, seed in pending:
        results[(task, seed)] = EpisodeResult(task, seed, "infra_failure", error=errors.get((task, seed)),
                                              attempts=attempts[(task, seed)],
                                              policy=run_dir.name if with_policy else "oracle")
    return [results[j] for j in jobs]


def evaluate(target: str | os.PathLike, cfg: MetaWorldEvalConfig, data_path: str | None = None,
             workers: int = 1, oracle: bool | list[EpisodeResult] = True, write: bool = True,
             timeout_s: float = 600.0, out_dir: Path | None = None, record: bool = True) -> dict:
    """Closed-loop Meta-World evaluation of a run; returns the summary (see closed_loop.summarize) with the
    oracle's episodes under "oracle_episodes". ``oracle``: True (replay the expert on the same seeds),
    False, or the oracle episodes of an earlier evaluation on the same data, tasks and seeds (a sweep
    evaluates the oracle once for all its runs)."""
    from harness.data.metaworld.replay import ServoConfig
    from harness.evaluate.metaworld_eval import evaluation_seeds, generator_settings

    run_dir, ckpt = resolve_run(target)
    _, _, ds = load_policy(run_dir, ckpt, data_path)
    servo = generator_settings(ds.meta).get("servo")
    if cfg.servo == ServoConfig() and servo:  # the executor the data generator's oracle used
        cfg = replace(cfg, servo=ServoConfig(**servo))
    tasks = cfg.tasks or ds.summary()["tasks"]
    requested = {k: v for k, v in asdict(cfg).items() if k != "servo"}  # what a re-run compares against
    if cfg.max_keyposes is None:
        from collections import Counter

        from harness.evaluate.metaworld_eval import default_max_keyposes

        cfg = replace(cfg, max_keyposes=default_max_keyposes(Counter((tv, key) for tv, key, _ in ds.index).values()))
    seeds = evaluation_seeds(ds.meta, cfg.episodes, cfg.seed_offset, cfg.seed_split)
    jobs = [(t, s) for t in tasks for s in seeds]
    results = _run_jobs(run_dir, ckpt, data_path, cfg, jobs, True, workers, timeout_s)
    if isinstance(oracle, list):
        by_job = {(r.task, r.seed): r for r in oracle}
        missing = [j for j in jobs if j not in by_job]
        if missing:
            raise ValueError(f"the oracle episodes given lack {missing[:3]}; evaluate the oracle on these seeds")
        oracle_results = [by_job[j] for j in jobs]
    else:
        oracle_results = _run_jobs(run_dir, ckpt, data_path, cfg, jobs, False, workers, timeout_s) if oracle else None
    summary = summarize(results, oracle_results)
    summary.update(env="metaworld", tasks=tasks, seeds=seeds, run=str(run_dir), checkpoint=str(ckpt),
                   config=requested, max_keyposes=cfg.max_keyposes, servo=asdict(cfg.servo),
                   workers=workers)
    if write:  # out_dir: another folder than eval_metaworld/ (a kept checkpoint's); record: final success
        out = out_dir or run_dir / "eval_metaworld"
        out.mkdir(parents=True, exist_ok=True)
        write_episodes(out / "episodes.jsonl", results + (oracle_results or []))
        from harness.record import write_text_atomic

        write_text_atomic(out / "summary.json", json.dumps(summary, indent=1, sort_keys=True))
        if record:
            record_success(run_dir, summary, seeds=seeds, config=summary["config"])
    summary["oracle_episodes"] = [r.to_dict() for r in oracle_results or []]
    return summary


CURVE_FILE = "success_vs_steps.csv"
CURVE_COLUMNS = ("step", "wall_time_s", "success_pct", "ci_low_pct", "ci_high_pct", "successes", "episodes",
                 "excluded", "oracle_success_pct", "clipped_keyposes", "checkpoint")


def evaluate_checkpoints(target: str | os.PathLike, cfg: MetaWorldEvalConfig, steps: list[int] | None = None,
                         data_path: str | None = None, workers: int = 1, timeout_s: float = 600.0,
                         oracle: bool | list[EpisodeResult] = True) -> list[dict]:
    """Closed-loop success of every checkpoint a run kept (``train.keep_ckpt_every``: ``ckpt/step_<k>.pt``),
    or of those at ``steps``, through ``evaluate`` (the same episodes, seeds and executor for each; the
    oracle once). Per checkpoint: ``eval_metaworld/steps/step_<k>/{episodes.jsonl, summary.json}``; all
    of them: ``eval_metaworld/success_vs_steps.csv`` (CURVE_COLUMNS; wall_time_s = the training wall
    clock at that checkpoint) and record.json ``success_curve``. A checkpoint already evaluated with the
    same settings and seeds is read back, not run again (re-running after more training adds the new
    ones). ``oracle``: as ``evaluate`` (a list: the oracle's episodes of an earlier evaluation on the same
    data; True: replayed once, at the first checkpoint). Returns the rows by step."""
    from harness.checkpoint import kept_checkpoints, load_checkpoint
    from harness.evaluate.closed_loop import read_episodes
    from harness.record import write_text_atomic

    run_dir, _ = resolve_run(target)
    kept = kept_checkpoints(run_dir)
    if steps is not None:
        missing = sorted(set(steps) - {k for k, _ in kept})
        if missing:
            raise FileNotFoundError(f"{run_dir}: no kept checkpoint at steps {missing}; kept: "
                                    f"{[k for k, _ in kept]} (train.keep_ckpt_every keeps them)")
        kept = [(k, p) for k, p in kept if k in set(steps)]
    if not kept:
        raise FileNotFoundError(f"{run_dir}: no kept checkpoints ckpt/step_<k>.pt (train with "
                                "train.keep_ckpt_every=K to keep them)")
    settings = {k: v for k, v in asdict(cfg).items() if k != "servo"}
    rows = []
    for step, path in kept:
        out = run_dir / "eval_metaworld" / "steps" / f"step_{step:07d}"
        done = out / "summary.json"
        summary = json.loads(done.read_text()) if done.is_file() else None
        if summary is None or summary.get("config") != settings:
            summary = evaluate(path, cfg, data_path, workers, oracle=oracle, timeout_s=timeout_s, out_dir=out,
                               record=False)
        if oracle is True:  # the oracle's episodes of the first checkpoint serve every later one
            oracle = [r for r in read_episodes(out / "episodes.jsonl") if r.policy == "oracle"] or True
        wall = load_checkpoint(path).get("wall_time_s")
        lo, hi = summary["success_ci"]
        rows.append({"step": step, "wall_time_s": wall, "success_pct": _pct(summary["success"]),
                     "ci_low_pct": _pct(lo), "ci_high_pct": _pct(hi), "successes": summary["successes"],
                     "episodes": summary["episodes"], "excluded": summary["excluded"],
                     "oracle_success_pct": _pct(summary.get("oracle_success")),
                     "clipped_keyposes": (summary.get("clipping") or {}).get("keyposes"),
                     "checkpoint": path.name})
    import csv
    import io

    previous = _read_curve(run_dir)
    merged = {**{int(r["step"]): r for r in previous}, **{r["step"]: r for r in rows}}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CURVE_COLUMNS)
    writer.writeheader()
    for step in sorted(merged):
        writer.writerow({k: merged[step].get(k) for k in CURVE_COLUMNS})
    write_text_atomic(run_dir / "eval_metaworld" / CURVE_FILE, buf.getvalue())
    _record_curve(run_dir, [merged[k] for k in sorted(merged)], settings)
    return rows


def _pct(v):
    return None if v is None else round(100 * v, 4)


def _read_curve(run_dir: Path) -> list[dict]:
    import csv

    path = run_dir / "eval_metaworld" / CURVE_FILE
    if not path.is_file():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def _record_curve(run_dir: Path, rows: list[dict], settings: dict) -> None:
    """record.json ``success_curve``: {"env", "config", "points": [{step, wall_time_s, success_pct, ci, n}]}."""
    from harness.record import RunRecord
    from harness.runlock import RunFolderBusy, RunLock

    def num(v):
        return None if v in (None, "") else float(v)

    points = [{"step": int(r["step"]), "wall_time_s": num(r["wall_time_s"]), "success_pct": num(r["success_pct"]),
               "ci_pct": [num(r["ci_low_pct"]), num(r["ci_high_pct"])], "episodes": int(r["episodes"]),
               "oracle_success_pct": num(r["oracle_success_pct"])} for r in rows]
    try:
        with RunLock(run_dir):
            rec = RunRecord(run_dir)
            rec.data = rec.load() or {}
            rec.update(success_curve={"env": "metaworld", "config": settings, "points": points})
    except RunFolderBusy as e:  # still training: the CSV has the curve; the record gets it on a later call
        log.warning("%s; success_vs_steps.csv is written, record.json success_curve is not: run `mdh eval RUN "
                    "--checkpoints` again when training has finished (evaluated checkpoints are read back)", e)


def evaluate_rlbench(target: str | os.PathLike, cfg, test_root: str, data_path: str | None = None) -> dict:
    """Closed-loop RLBench evaluation of a run on the stored test episodes under ``test_root``
    (``<task>/variation<V>/episodes/episode<k>``): at most ``cfg.episodes`` per task, variations in order.
    Needs the optional extra (harness/evaluate/rlbench_eval.py); writes eval_rlbench/{episodes.jsonl,
    results.jsonl, summary.json} and the record's final_metrics.success."""
    from harness.evaluate.metaworld_eval import LiveObservation, make_predictor
    from harness.evaluate.rlbench_eval import launch_environment, planning_errors, run_episode, write_results
    from harness.record import write_text_atomic

    run_dir, ckpt = resolve_run(target)
    policy, run_cfg, ds = load_policy(run_dir, ckpt, data_path)
    env = launch_environment(test_root, cfg)  # raises with the install hint when RLBench is missing
    from rlbench.backend.utils import task_file_to_task_class

    observe = LiveObservation(ds, run_cfg.data.kind, policy.input_spec.n_hist)
    predict = make_predictor(policy, "ddpm", None, torch.device("cpu"))
    results, variations = [], {}
    try:
        for name in cfg.tasks:
            task = env.get_task(task_file_to_task_class(name))
            folders = sorted(Path(test_root, name).glob("variation*"), key=lambda p: int(p.name[9:]))
            done = 0
            for folder in folders:
                var = int(folder.name[len("variation"):])
                for ep in sorted((folder / "episodes").glob("episode*"), key=lambda p: int(p.name[7:])):
                    if done >= cfg.episodes:
                        break
                    demo = env.get_demos(name, amount=1, variation_number=var, from_episode_number=int(ep.name[7:]),
                                         random_selection=False, image_paths=True)[0]
                    variations.setdefault((name, var), []).append(len(results))
                    results.append(run_episode(task, demo, var,
                                               lambda f, poses, t, v=var: observe.batch(f, poses, t, v),
                                               predict, name, done, cfg, planning_errors(), run_dir.name))
                    done += 1
    finally:
        env.shutdown()
    summary = summarize(results)
    summary.update(env="rlbench", tasks=list(cfg.tasks), run=str(run_dir), checkpoint=str(ckpt))
    out = run_dir / "eval_rlbench"
    out.mkdir(exist_ok=True)
    write_episodes(out / "episodes.jsonl", results)
    summary["demo_weighted_per_task"] = write_results(out / "results.jsonl", str(ckpt), results, variations)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1, sort_keys=True))
    record_success(run_dir, summary)
    return summary


def record_success(run_dir: Path, summary: dict, **extra) -> None:
    """``final_metrics.success`` of the run's record (in %, as every metric there), written under the run's
    lock so that it never races a training process on the same folder."""
    from harness.record import RunRecord
    from harness.runlock import RunLock

    def pct(v):
        return None if v is None else 100 * v

    with RunLock(run_dir):
        rec = RunRecord(run_dir)
        data = rec.load() or {}
        final = dict(data.get("final_metrics") or {})
        final["success"] = {"success_pct": pct(summary["success"]), "episodes": summary["episodes"],
                            "ci_pct": [pct(v) for v in summary["success_ci"]], "env": summary["env"],
                            "oracle_success_pct": pct(summary.get("oracle_success")),
                            "failures": summary["failures"], "tasks": summary["tasks"], **extra}
        rec.data = data
        rec.update(final_metrics=final)

