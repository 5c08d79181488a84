"""The ``mdh`` command: ``mdh data|train|sweep|report|bench|eval|checkpoint ...``. ``mdh --help`` lists them."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from harness.data.errors import DataError


def _add_data(sub) -> None:
    from harness.data.formats.rlbench_raw import PERACT_CAMERAS

    p = sub.add_parser("data", help="generate, inspect and convert keystep datasets")
    dsub = p.add_subparsers(dest="data_cmd", metavar="{metaworld,convert-rlbench,embed-instructions,inspect}")
    dsub.required = True

    mw = dsub.add_parser("metaworld", help="generate the embedded Meta-World suite (CPU, minutes)")
    mw.add_argument("--tasks", default="mt10", help="'mt10' or comma-separated task names (default mt10)")
    mw.add_argument("--episodes", type=int, default=20, help="training episodes per task (default 20)")
    mw.add_argument("--val-episodes", type=int, default=None, help="default max(1, episodes // 5)")
    mw.add_argument("--test-episodes", type=int, default=None, help="default max(1, episodes // 5)")
    mw.add_argument("--image-size", type=int, default=128, help="square render size in pixels")
    mw.add_argument("--seed", type=int, default=0)
    mw.add_argument("--encoder", default="hash", help="instruction text encoder: hash | clip")
    mw.add_argument("--stride", type=int, default=None, help="fixed keypose stride (default: generator's)")
    mw.add_argument("--out", default="data/metaworld", help="output folder (default data/metaworld)")
    mw.add_argument("--no-progress", action="store_true")

    cv = dsub.add_parser("convert-rlbench", help="raw RLBench episodes -> keysteps + voxel1cm LMDBs and "
                         "instruction files (resumable per task-variation)")
    cv.add_argument("raw", help="raw RLBench root, task or variation folder, or a folder of train/val/test roots")
    cv.add_argument("out", help="output dataset folder (rerun the same command to resume)")
    cv.add_argument("--tasks", default=None, help="comma-separated task names (default: every task found)")
    cv.add_argument("--cameras", default=",".join(PERACT_CAMERAS),
                    help=f"comma-separated cameras, in this order (default {','.join(PERACT_CAMERAS)})")
    cv.add_argument("--split", default="train", choices=["train", "val", "test"],
                    help="split a single raw root is written to (default train; a folder of train/val/test "
                         "roots fills each)")
    cv.add_argument("--keyposes", default="lotus", choices=["lotus", "peract"],
                    help="keypose variant: lotus (Mini-Diffuser / 3D-LOTUS / 3DDA, default) or peract")
    cv.add_argument("--stopping-delta", type=float, default=0.1, help="joint-velocity stop threshold (0.1)")
    cv.add_argument("--encoder", default="clip", help="instruction text encoder: clip (falls back to hash "
                    "without the weights, and says so) | hash")
    cv.add_argument("--workers", type=int, default=1, help="processes, one task-variation each (default 1)")
    cv.add_argument("--skip-bad", action="store_true", help="skip unreadable episodes; listed in meta.json")
    cv.add_argument("--no-progress", action="store_true")

    em = dsub.add_parser("embed-instructions", help="write taskvars_instructions.json + instr_embeds_<enc>.npy "
                         "beside a dataset of any format (e.g. 3DFA zarr stores)")
    em.add_argument("path")
    em.add_argument("--encoder", default="clip", help="clip (falls back to hash without the weights) | hash")
    em.add_argument("--format", default=None, help="force a format (default: detect)")
    em.add_argument("--out", default=None, help="folder to write to (default: the dataset folder)")

    ins = dsub.add_parser("inspect", help="summarise a dataset folder")
    ins.add_argument("path")
    ins.add_argument("--split", default="train")
    ins.add_argument("--kind", default="voxel1cm", choices=["voxel1cm", "keysteps"])
    ins.add_argument("--format", default=None, help="force a format (default: detect)")
    ins.add_argument("--json", action="store_true", help="print one JSON object")
    ins.add_argument("--skip-bad", action="store_true", help="skip bad episodes and report their counts")
    ins.add_argument("--render", metavar="OUT.png", default=None, help="draw one keystep's point cloud")
    ins.add_argument("--taskvar", default=None, help="with --render: which task+variation")
    ins.add_argument("--episode", default=None, help="with --render: which episode key")
    ins.add_argument("--keystep", type=int, default=0, help="with --render: which keystep")


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: data loading, training steps")
    bsub = p.add_subparsers(dest="bench_cmd", metavar="{data,step}")
    bsub.required = True
    d = bsub.add_parser("data", help="loader throughput in keysteps/s")
    d.add_argument("path")
    d.add_argument("--batch-size", type=int, default=8)
    d.add_argument("--workers", type=int, default=None, help="DataLoader workers (default min(4, cpus))")
    d.add_argument("--num-points", type=int, default=4000)
    d.add_argument("--batches", type=int, default=30)
    d.add_argument("--split", default="train")
    d.add_argument("--kind", default="voxel1cm", choices=["voxel1cm", "keysteps"])
    d.add_argument("--skip-bad", action="store_true", help="skip bad episodes and report their counts")
    d.add_argument("--json", action="store_true")
    _add_bench_step(bsub)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _add_bench_step(bsub) -> None:
    s = bsub.add_parser("step", help="training-step time and peak memory per Level-2 batch M")
    s.add_argument("--model", default="minidiffuser",
                   help="comma-separated policies, each NAME (its preset and every variant, e.g. 3DDA's three "
                        "Level-2 strategies) or NAME[VARIANT]; timed side by side in one process")
    s.add_argument("--preset", default=None, help="a preset of the policy (default: the policy's default)")
    s.add_argument("--B", type=int, default=8, help="Level-1 batch (observations per step)")
    s.add_argument("--M", type=_int_list, default=[1, 8, 64, 256], help="comma-separated Level-2 batches")
    s.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    s.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    s.add_argument("--device", default="cpu")
    s.add_argument("--data", metavar="PATH", default=None,
                   help="time real batches from this dataset (pre-loaded, not timed); default: synthetic")
    s.add_argument("--split", default="train", help="with --data: which split (default train)")
    s.add_argument("--kind", default=None, choices=["voxel1cm", "keysteps"],
                   help="with --data: the points policies' data kind (default voxel1cm); image policies read "
                        "keysteps")
    s.add_argument("--data-batches", type=int, default=8,
                   help="with --data: how many distinct batches each M cycles through (default 8)")
    s.add_argument("--json", action="store_true", help="print a JSON list of objects")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mdh", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="cmd", metavar="{data,train,sweep,report,bench,eval}")
    sub.required = True
    _add_data(sub)
    sub.add_parser("train", help="one training run (Hydra overrides: model=... train.M=64 ...; "
                                 "`mdh train --help` shows the config)", add_help=False)
    _add_report(sub)
    _add_sweep(sub)
    _add_bench(sub)
    _add_eval(sub)
    c = sub.add_parser("checkpoint", help="checkpoint tools: `import-official CKPT OUT_RUN_DIR`",
                       description="mdh checkpoint IMPORTER CKPT OUT_RUN_DIR [--model NAME] [--data PATH]: turn "
                                   "a checkpoint in a foreign format into a run folder, with an importer the policy "
                                   "offers (PolicyEntry.checkpoint_importers; minidiffuser: import-official, the "
                                   "released Mini-Diffuser checkpoint).")
    c.add_argument("action", metavar="IMPORTER", help="an importer of the policy --model, e.g. import-official")
    c.add_argument("ckpt", help="the checkpoint to import (e.g. a released Mini-Diffuser state dict, possibly nested)")
    c.add_argument("out", help="the run folder to write (must not exist)")
    c.add_argument("--model", default="minidiffuser", help="the policy whose importer runs (default minidiffuser)")
    c.add_argument("--data", default=None, help="data.path recorded for the run (used by mdh eval)")
    return parser


def _add_eval(sub) -> None:
    e = sub.add_parser("eval", help="closed-loop evaluation of a run (Meta-World on CPU); `compare A B`")
    e.add_argument("target", nargs="+", help="RUN_DIR or RUN_DIR/ckpt/last.pt; or `compare RUN_A RUN_B`")
    e.add_argument("--env", default="metaworld", choices=["metaworld", "rlbench"])
    e.add_argument("--tasks", default=None, help="comma-separated tasks (default: the run's data tasks)")
    e.add_argument("--episodes", type=int, default=10, help="episodes per task (default 10)")
    e.add_argument("--seed", type=int, default=0, help="offset into the dataset's test seed block (default 0)")
    e.add_argument("--train-seeds", action="store_true",
                   help="replay the dataset's TRAINING seeds instead of test seeds (debugging a policy that "
                        "never succeeds: can it replay what it was fitted on? not a held-out number)")
    e.add_argument("--workers", type=int, default=1, help="parallel processes (results do not depend on it)")
    e.add_argument("--max-keyposes", type=int, default=None,
                   help="keyposes per episode (default: metaworld twice the longest evaluated demonstration, at "
                        "least 10; rlbench 25 as the official evaluators)")
    e.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"])
    e.add_argument("--sampler-steps", type=int, default=10, help="DDIM steps (ddpm: all training steps)")
    e.add_argument("--data", default=None, help="the dataset folder, when the run's data.path is elsewhere here")
    e.add_argument("--test-data", default=None, help="--env rlbench: the stored test episodes (<task>/variation<V>/...)")
    e.add_argument("--no-oracle", action="store_true", help="skip the oracle (expert keyposes on the same seeds)")
    e.add_argument("--video", type=int, default=0, metavar="K",
                   help="write the first K episodes per task as GIFs (front camera, predicted keypose marked)")
    e.add_argument("--checkpoints", nargs="?", const="all", default=None, metavar="STEPS",
                   help="evaluate the run's kept checkpoints (train.keep_ckpt_every): all, or comma-separated "
                        "steps; writes eval_metaworld/success_vs_steps.csv and record.json success_curve")
    e.add_argument("--json", action="store_true", help="print one JSON object")


def _add_report(sub) -> None:
    # One positional list rather than subparsers: argparse cannot offer an optional subcommand beside a
    # positional folder, and both `mdh report runs A B` and `mdh report RESULTS_DIR` must work.
    rep = sub.add_parser(
        "report", help="report.md with Tables 2-3 and Figs. 2/4 from run records; `mdh report runs DIR...`",
        usage="mdh report RESULTS_DIR [--out DIR]\n       mdh report runs RUN_DIR [RUN_DIR ...] [--json]",
        description="mdh report RESULTS_DIR [--out DIR]: render DIR/report.md (default DIR = RESULTS_DIR) with "
                    "every table (Markdown, LaTeX, CSV) and figure (PNG, PDF) beside it, from the run records "
                    "(record.json, metrics.csv) below RESULTS_DIR; see docs/report.md. "
                    "mdh report runs RUN_DIR...: the key figures of run folders side by side. "
                    "(A results folder literally named `runs`: write ./runs.)")
    rep.add_argument("target", nargs="+", metavar="RESULTS_DIR | runs RUN_DIR",
                     help="a results folder, or `runs` followed by run folders")
    rep.add_argument("--out", default=None, help="output folder of report.md (default: RESULTS_DIR)")
    rep.add_argument("--json", action="store_true", help="with `runs`: print the records as JSON")


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="run a sweep file (sweeps/NAME.yaml) or report on one: `mdh sweep status DIR`",
                       description="mdh sweep NAME [overrides ...]: run every cell of sweeps/NAME.yaml (or a YAML "
                                   "path) into results/NAME/; finished runs are skipped, interrupted ones resume. "
                                   "mdh sweep status DIR [--json]: the state of each run of a sweep folder.")
    p.add_argument("name", help="sweep name (sweeps/NAME.yaml), a sweep YAML path, or `status`")
    p.add_argument("overrides", nargs="*", help="overrides for every cell (e.g. data.path=... cluster=slurm); "
                                                "with `status`: the sweep folder")
    p.add_argument("--out", default=None, help="output folder (default results/NAME)")
    p.add_argument("--retry-failed", action="store_true", help="run failed runs again")
    p.add_argument("--dry-run", action="store_true", help="print the plan, launch nothing")
    p.add_argument("--no-wait", action="store_true", help="submit and return (slurm, local_parallel)")
    p.add_argument("--json", action="store_true", help="with `status`: one JSON list")


def _sweep(args) -> int:
    from harness.config import ConfigError
    from harness.launch import format_status, run_sweep, sweep_status

    try:
        if args.name == "status":
            if len(args.overrides) != 1:
                raise ConfigError("usage: mdh sweep status DIR [--json]")
            rows = sweep_status(args.overrides[0])
            print(json.dumps(rows) if args.json else format_status(rows))
            return 0
        planned, outcomes = run_sweep(args.name, args.overrides, out=args.out, retry_failed=args.retry_failed,
                                      dry_run=args.dry_run, wait=not args.no_wait)
    except ConfigError as e:
        print(f"mdh sweep: error: {e}", file=sys.stderr)
        return 2
    for p in planned:
        outcome = outcomes.get(p.run_dir.name)
        what = outcome or ("skipped (done)" if p.state == "done" else
                           "skipped (failed; --retry-failed runs it again)" if p.state == "failed" else
                           "skipped (running elsewhere)" if p.state == "running" else "planned")
        print(f"{p.run_dir}: {what}  [{' '.join(p.cell)}]")
    failed = [o for o in outcomes.values() if o.startswith("failed")]
    return 1 if failed else 0


def _data(args) -> int:
    if args.data_cmd == "metaworld":
        from harness.data.metaworld.generate import format_oracle_table, generate_suite

        try:
            summary = generate_suite(args.out, tasks=args.tasks, episodes=args.episodes,
                                     val_episodes=args.val_episodes, test_episodes=args.test_episodes,
                                     image_size=args.image_size, seed=args.seed, encoder=args.encoder,
                                     stride=args.stride, progress=not args.no_progress)
        except ValueError as e:  # unknown task names, bad counts: one line, not a traceback
            if isinstance(e, DataError):
                raise
            print(f"mdh data metaworld: error: {e}", file=sys.stderr)
            return 2
        if args.no_progress:  # with progress on, generate_suite printed the table already
            print(format_oracle_table(summary))
        print(f"wrote {summary['out']} in {summary['seconds']:.0f} s "
              f"(instruction embeddings: {summary['text_encoder']})")
        return 0
    if args.data_cmd == "convert-rlbench":
        from harness.data.convert_rlbench import convert_rlbench

        tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
        s = convert_rlbench(args.raw, args.out, tasks=tasks, cameras=[c for c in args.cameras.split(",") if c],
                            split=args.split, keyposes=args.keyposes, stopping_delta=args.stopping_delta,
                            encoder=args.encoder, workers=args.workers, skip_bad=args.skip_bad,
                            progress=not args.no_progress)
        print(f"converted {len(s['converted'])} task-variation(s), kept {len(s['kept'])} already converted; "
              f"{s['episodes']} episodes, {s['keysteps']} keysteps in {s['out']} ({s['seconds']:.1f} s)")
        if s["text_encoder"] != args.encoder:
            print(f"instruction embeddings: {s['text_encoder']} (FELL BACK from {args.encoder}; the warning above says why)")
        else:
            print(f"instruction embeddings: {s['text_encoder']}")
        if s["fallback_instructions"]:
            print(f"variation_descriptions.pkl missing or without instruction strings for {s['fallback_instructions']}: "
                  "the instruction is the task name")
        for tv, bad in s["skipped"].items():
            print(f"skipped in {tv}: {bad}")
        return 0
    if args.data_cmd == "embed-instructions":
        from harness.data.formats.instructions import embed_instructions

        r = embed_instructions(args.path, encoder=args.encoder, fmt=args.format, out=args.out)
        fell_back = f" (FELL BACK from {args.encoder}; the warning above says why)" if r["encoder"] != args.encoder else ""
        print(f"wrote {r['instructions']} ({r['taskvars']} task-variations) and {r['embeds']} "
              f"({r['texts']} instructions, encoder {r['encoder']}{fell_back})")
        return 0
    if args.data_cmd == "inspect":
        from harness.data.inspect import format_summary, inspect_dataset, render_keystep

        s = inspect_dataset(args.path, split=args.split, kind=args.kind, fmt=args.format, skip_bad=args.skip_bad)
        print(json.dumps(s) if args.json else format_summary(s))
        if args.render:
            out = render_keystep(args.path, args.render, split=args.split, kind=args.kind, fmt=args.format,
                                 taskvar=args.taskvar, episode=args.episode, t=args.keystep)
            print(f"wrote {out}", file=sys.stderr)
        return 0
    raise AssertionError(args.data_cmd)


def _bench(args) -> int:
    if args.bench_cmd == "data":
        from harness.bench.data import bench_data

        r = bench_data(args.path, batch_size=args.batch_size, workers=args.workers, num_points=args.num_points,
                       batches=args.batches, split=args.split, kind=args.kind, skip_bad=args.skip_bad)
        if args.json:
            print(json.dumps(r))
        else:
            print(f"{r['keysteps_per_s_median']:.1f} keysteps/s (median of {r['passes']} passes of "
                  f"{r['batches_per_pass']} batches; batch {r['batch_size']}, {r['workers']} workers, "
                  f"{r['num_points']} points; dataset {r['keysteps']} keysteps)")
        return 0
    if args.bench_cmd == "step":
        from harness.bench.step import BenchInputError, bench_step, format_table

        for option, value, minimum in (("--B", args.B, 1), ("--data-batches", args.data_batches, 1),
                                       ("--steps", args.steps, 1), ("--warmup", args.warmup, 0)):
            if value < minimum:
                print(f"mdh bench step: error: {option} must be >= {minimum}, got {value}", file=sys.stderr)
                return 2
        try:
            results = bench_step(args.model, args.preset, args.B, args.M, steps=args.steps, warmup=args.warmup,
                                 device=args.device, data=args.data, split=args.split, kind=args.kind,
                                 n_batches=args.data_batches)
        except (BenchInputError, DataError) as e:
            print(f"mdh bench step: error: {e}", file=sys.stderr)
            return 2
        print(json.dumps(results) if args.json else format_table(results))
        return 0
    raise AssertionError(args.bench_cmd)


def _checkpoint(args) -> int:
    # The importer belongs to the policy (PolicyEntry.checkpoint_importers): the harness imports no model package.
    from harness.policy import get_policy, policy_names

    try:
        importers = get_policy(args.model).checkpoint_importers
    except KeyError as e:
        print(f"mdh checkpoint: error: {e.args[0]}", file=sys.stderr)
        return 2
    if args.action not in importers:
        offered = []
        for name in policy_names():
            found = get_policy(name).checkpoint_importers
            if found:
                offered.append(f"{name}: {', '.join(sorted(found))}")
        print(f"mdh checkpoint: error: policy {args.model!r} offers no importer {args.action!r} "
              f"(its importers: {sorted(importers) or 'none'}); importers by policy: "
              f"{'; '.join(offered) or 'none'} (choose one with --model NAME)", file=sys.stderr)
        return 2
    try:
        source = importers[args.action](args.ckpt, args.out, args.data)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"mdh checkpoint: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} (policy {args.model}, {args.action}: {source.get('imported_from') or 'imported'}) "
          f"from {source.get('path')} (sha256 {str(source.get('sha256'))[:12]}); evaluate: mdh eval {args.out}; "
          f"fine-tune: mdh train ... train.init_weights={args.out}")
    return 0


def _eval(args) -> int:
    from harness.evaluate.closed_loop import paired_comparison, read_episodes

    if args.target[0] == "compare":
        if len(args.target) != 3:
            print("mdh eval compare: error: usage: mdh eval compare RUN_A RUN_B", file=sys.stderr)
            return 2
        sides = []
        for run in args.target[1:]:
            path = Path(run) / f"eval_{args.env}" / "episodes.jsonl"
            if not path.is_file():
                print(f"mdh eval compare: error: {path} does not exist (run `mdh eval {run}` first)", file=sys.stderr)
                return 2
            sides.append([r for r in read_episodes(path) if r.policy != "oracle"])
        result = paired_comparison(*sides)
        print(json.dumps(result) if args.json else _format_comparison(result, *args.target[1:]))
        return 0
    if len(args.target) != 1:
        print("mdh eval: error: one run folder or checkpoint (or `compare RUN_A RUN_B`)", file=sys.stderr)
        return 2
    if args.episodes < 1 or args.workers < 1 or (args.max_keyposes is not None and args.max_keyposes < 1):
        print("mdh eval: error: --episodes, --workers and --max-keyposes must be >= 1", file=sys.stderr)
        return 2
    if args.env == "rlbench":
        return _eval_rlbench(args)
    from harness.config import ConfigError
    from harness.evaluate.metaworld_eval import MetaWorldEvalConfig
    from harness.evaluate.run_eval import evaluate
    from harness.runlock import RunFolderBusy

    cfg = MetaWorldEvalConfig(tasks=[t for t in (args.tasks or "").split(",") if t] or None,
                              episodes=args.episodes, seed_offset=args.seed, max_keyposes=args.max_keyposes,
                              seed_split="train" if args.train_seeds else "test",
                              sampler=args.sampler, sampler_steps=args.sampler_steps if args.sampler == "ddim" else None,
                              video=max(0, args.video))
    try:
        if args.checkpoints is not None:
            return _eval_checkpoints(args, cfg)
        summary = evaluate(args.target[0], cfg, data_path=args.data, workers=args.workers, oracle=not args.no_oracle)
    except (FileNotFoundError, ValueError, ConfigError, RunFolderBusy) as e:
        print(f"mdh eval: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary) if args.json else _format_eval(summary))
    return 0


def _eval_checkpoints(args, cfg) -> int:
    from harness.evaluate.run_eval import evaluate_checkpoints

    steps = None
    if args.checkpoints != "all":
        try:
            steps = [int(s) for s in args.checkpoints.split(",") if s]
        except ValueError:
            raise ValueError(f"--checkpoints takes 'all' or comma-separated steps, got {args.checkpoints!r}") from None
    rows = evaluate_checkpoints(args.target[0], cfg, steps, data_path=args.data, workers=args.workers)
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'step':>8} {'hours':>7} {'success %':>10} {'95 % CI':>15} {'n':>4}")
    for r in rows:
        hours = "-" if r["wall_time_s"] is None else f"{r['wall_time_s'] / 3600:.3f}"
        ci = f"[{r['ci_low_pct']:.1f}, {r['ci_high_pct']:.1f}]"
        print(f"{r['step']:>8} {hours:>7} {r['success_pct']:>10.1f} {ci:>15} {r['episodes']:>4}")
    print(f"curve: {Path(args.target[0])}/eval_metaworld/success_vs_steps.csv")
    return 0


def _eval_rlbench(args) -> int:
    from harness.evaluate.rlbench_eval import RLBenchEvalConfig
    from harness.evaluate.run_eval import evaluate_rlbench

    if not args.test_data or not args.tasks:
        print("mdh eval: error: --env rlbench needs --test-data (the stored test episodes) and --tasks",
              file=sys.stderr)
        return 2
    cfg = RLBenchEvalConfig(tasks=[t for t in args.tasks.split(",") if t], episodes=args.episodes,
                            max_keyposes=args.max_keyposes or 25)
    try:
        summary = evaluate_rlbench(args.target[0], cfg, args.test_data, data_path=args.data)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"mdh eval: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(json.dumps(summary) if args.json else _format_eval(summary))
    return 0


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _format_eval(s: dict) -> str:
    lo, hi = s["success_ci"]
    head = (f"success {_pct(s['success'])} % [{_pct(lo)}, {_pct(hi)}] over {s['episodes']} episodes "
            f"({s['excluded']} excluded: simulator/infrastructure), oracle {_pct(s.get('oracle_success'))} %")
    lines = [head, "failures: " + ", ".join(f"{k} {v}" for k, v in s["failures"].items())]
    for task, t in s["per_task"].items():
        lines.append(f"  {task:<24} {_pct(t['success'])} % [{_pct(t['success_ci'][0])}, {_pct(t['success_ci'][1])}]"
                     f" n={t['episodes']}  oracle {_pct((s.get('oracle_per_task') or {}).get(task))} %")
    lines.append(f"episodes: {s['run']}/eval_{s['env']}/episodes.jsonl")
    return "\n".join(lines)


def _format_comparison(r: dict, a: str, b: str) -> str:
    def line(name, d):
        if not d["n"]:
            return f"  {name:<24} no paired episodes"
        lo, hi = d["ci"]
        return (f"  {name:<24} {_pct(d['a'])} - {_pct(d['b'])} = {100 * d['difference']:+.1f} points "
                f"[{100 * lo:+.1f}, {100 * hi:+.1f}] (paired 95 %, n={d['n']})")
    return "\n".join([f"A = {a}\nB = {b}", line("overall", r), *(line(t, d) for t, d in r["per_task"].items()),
                      f"unpaired episodes: {r['unpaired']}"])


def _report(args) -> int:
    if args.target[0] == "runs":
        from harness.report.runs import format_runs, load_runs

        if len(args.target) < 2:
            print("mdh report runs: error: name at least one run folder (mdh report runs RUN_DIR ...)",
                  file=sys.stderr)
            return 2
        if args.out is not None:
            print("mdh report runs: error: --out belongs to `mdh report RESULTS_DIR`", file=sys.stderr)
            return 2
        runs = load_runs(args.target[1:])
        print(json.dumps(runs, default=str) if args.json else format_runs(runs))
        return 0
    if len(args.target) != 1 or args.json:
        print("mdh report: error: usage: mdh report RESULTS_DIR [--out DIR] "
              "(one folder; --json only with `runs`)", file=sys.stderr)
        return 2
    from harness.report.build import render_report

    try:
        report = render_report(args.target[0], args.out)
    except FileNotFoundError as e:
        print(f"mdh report: error: {e}", file=sys.stderr)
        return 1
    done = sum(r.done for r in report.runs)
    print(f"wrote {report.path} ({len(report.runs)} runs, {done} done and in the numbers; "
          f"{len(report.files)} files)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "train":  # everything after `train` belongs to Hydra (overrides, --help, --cfg)
        from harness.train_app import run

        return run(argv[1:])
    parser = build_parser()
    # parse_known_args: REMAINDER in a subparser does not swallow leading options (`mdh train --steps 5`)
    args, extra = parser.parse_known_args(argv)
    if args.cmd == "sweep":  # overrides after an option come back as extras (argparse does not intermix)
        args.overrides += [e for e in extra if not e.startswith("-")]
        extra = [e for e in extra if e.startswith("-")]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"data": _data, "bench": _bench, "report": _report, "sweep": _sweep, "eval": _eval,
                "checkpoint": _checkpoint}[args.cmd](args)
    except DataError as e:
        print(f"mdh {args.cmd}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
