"""``mdh eval`` end to end on the embedded Meta-World suite: a trained tiny Mini-Diffuser and the oracle on
2 tasks x 2 episodes, test seeds disjoint from the training seeds, the same episodes for any --workers,
results files that parse, success in the record and the report; a crashing worker is an infra_failure."""

from __future__ import annotations

import csv
import json
import os

import pytest

from harness.cli import main
from harness.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from harness.evaluate.closed_loop import read_episodes
from harness.evaluate.metaworld_eval import MetaWorldEvalConfig, evaluation_seeds
from harness.evaluate.run_eval import _run_jobs, evaluate, resolve_run
from harness.train import dataset_info, run_training

TASKS = ["reach-v3", "push-v3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, metaworld):
    root = tmp_path_factory.mktemp("mw_eval")
    metaworld.generate_suite(root / "suite", TASKS, test_episodes=2)
    cfg = RunConfig(model=ModelConfig(name="minidiffuser", preset="tiny"),
                    data=DataConfig(name="metaworld", path=str(root / "suite"), workers=0, eval_keysteps=4),
                    train=TrainConfig(B=2, M=4, steps=6, eval_every=6, ckpt_every=6, warmup_steps=1, device="cpu",
                                      progress=False, sampler="ddim", sampler_steps=2))
    run_dir = root / "run"
    assert run_training(cfg, run_dir)["status"] == "done"
    return run_dir, cfg


def _strip(rows):
    return [{k: v for k, v in r.to_dict().items() if k not in ("time_s", "attempts")} for r in rows]


def test_mdh_eval_writes_episodes_summary_and_record(trained, capsys):
    run_dir, cfg = trained
    rc = main(["eval", str(run_dir), "--episodes", "2", "--sampler-steps", "2", "--max-keyposes", "3", "--video", "1",
               "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary["tasks"]) == set(TASKS)
    assert summary["episodes"] + summary["excluded"] == 4 and sum(summary["failures"].values()) == 4
    lo, hi = summary["success_ci"]
    assert 0 <= lo <= (summary["success"] or 0) <= hi <= 1
    # test seeds: the dataset's test block, never a train or val seed
    meta = dataset_info(cfg).meta
    assert summary["seeds"] == evaluation_seeds(meta, 2) == meta.splits["test"]
    assert not set(summary["seeds"]) & (set(meta.splits["train"]) | set(meta.splits["val"]))
    # the oracle on those seeds is what the data generator recorded for them
    for task in TASKS:
        assert summary["oracle_per_task"][task] == meta.oracle_success[task]
    episodes = read_episodes(run_dir / "eval_metaworld" / "episodes.jsonl")
    assert len(episodes) == 8 and {e.policy for e in episodes} == {run_dir.name, "oracle"}
    assert json.loads((run_dir / "eval_metaworld" / "summary.json").read_text())["seeds"] == summary["seeds"]
    # --video 1: the first episode of each task as a GIF, named with its outcome
    import imageio.v3 as iio

    gifs = sorted((run_dir / "eval_metaworld" / "videos").glob("*.gif"))
    first = {e.task: e for e in episodes if e.policy != "oracle" and e.seed == summary["seeds"][0]}
    assert [g.name for g in gifs] == sorted(f"{t}_seed{e.seed}_{e.outcome}.gif" for t, e in first.items())
    assert all(iio.imread(g, index=None).shape[1:] == (32, 32, 3) for g in gifs)
    success = json.loads((run_dir / "record.json").read_text())["final_metrics"]["success"]
    assert success["episodes"] == summary["episodes"] and success["env"] == "metaworld"
    # the report's Table 2 shows it
    assert main(["report", str(run_dir.parent), "--out", str(run_dir.parent / "report")]) == 0
    with open(run_dir.parent / "report" / "table2_efficiency.csv") as f:
        rows = list(csv.DictReader(f))
    row = next(r for r in rows if r["source"] == "measured")
    assert float(row["success_pct"]) == pytest.approx(100 * summary["success"])
    assert int(row["success_episodes"]) == summary["episodes"]


def test_the_same_seeds_give_the_same_episodes_for_any_workers(trained):
    run_dir, _ = trained
    cfg = MetaWorldEvalConfig(episodes=2, sampler_steps=2, max_keyposes=3)
    one = evaluate(run_dir, cfg, workers=1, oracle=False, write=False)
    two = evaluate(run_dir, cfg, workers=2, oracle=False, write=False)
    for key in ("success", "failures", "per_task", "seeds"):
        assert one[key] == two[key], key


def crashing_worker(run_dir, ckpt, data_path, cfg_dict, jobs, with_policy):
    """Stands in for a worker process that dies (a segfault in a simulator, the OOM killer)."""
    os._exit(3)


def test_a_crashed_worker_is_retried_then_an_infra_failure(trained):
    run_dir, _ = trained
    _, ckpt = resolve_run(run_dir)
    jobs = [("reach-v3", 1), ("reach-v3", 2), ("push-v3", 1)]
    res = _run_jobs(run_dir, ckpt, None, MetaWorldEvalConfig(), jobs, True, workers=2, timeout_s=60,
                    worker=crashing_worker)
    assert [r.outcome for r in res] == ["infra_failure"] * 3
    assert all(r.attempts == 2 and "worker failed" in r.error for r in res)


def test_a_sweep_evaluates_its_done_runs_once_with_one_oracle(trained, tmp_path, monkeypatch, capsys):
    """The sweep's eval stage: every done run gets success in its record, the oracle is evaluated once for
    the sweep's data, and a second `mdh sweep` re-evaluates nothing."""
    from harness.evaluate import run_eval
    from harness.launch import run_sweep

    _, cfg = trained
    sweep = tmp_path / "s.yaml"
    sweep.write_text(
        "# test sweep\ndescription: eval stage\n"
        f"overrides: [model=minidiffuser, model.preset=tiny, data=metaworld, data.path={cfg.data.path}, "
        "data.workers=0, data.eval_keysteps=2, train.B=2, train.steps=2, train.eval_every=2, train.ckpt_every=2, "
        "train.warmup_steps=1, train.device=cpu, train.progress=false, train.sampler=ddim, train.sampler_steps=2, "
        "train.keep_ckpt_every=1]\n"
        "cells: [[train.M=1], [train.M=2]]\n"
        "eval: {episodes: 1, max_keyposes: 2, sampler_steps: 2, tasks: reach-v3, checkpoints: true}\n")
    oracle_jobs = []
    real = run_eval._run_jobs

    def counting(run_dir, ckpt, data_path, c, jobs, with_policy, *args, **kwargs):
        if not with_policy:
            oracle_jobs.append(list(jobs))
        return real(run_dir, ckpt, data_path, c, jobs, with_policy, *args, **kwargs)

    monkeypatch.setattr(run_eval, "_run_jobs", counting)
    planned, outcomes = run_sweep(str(sweep), [], out=str(tmp_path / "out"))
    assert len(oracle_jobs) == 1 and oracle_jobs[0] == [("reach-v3", evaluation_seeds(dataset_info(cfg).meta, 1)[0])]
    for p in planned:
        success = json.loads((p.run_dir / "record.json").read_text())["final_metrics"]["success"]
        assert success["episodes"] == 1 and success["config"]["episodes"] == 1 and success["tasks"] == ["reach-v3"]
        assert "success" in outcomes[p.run_dir.name]
        oracle_lines = [e for e in read_episodes(p.run_dir / "eval_metaworld" / "episodes.jsonl")
                        if e.policy == "oracle"]
        assert len(oracle_lines) == 1
        # checkpoints: true -> every kept checkpoint evaluated too, with the sweep's one oracle
        record = json.loads((p.run_dir / "record.json").read_text())
        assert [pt["step"] for pt in record["success_curve"]["points"]] == [1, 2]
        assert "success by step: 1: " in outcomes[p.run_dir.name]
    _, again = run_sweep(str(sweep), [], out=str(tmp_path / "out"))
    assert again == {} and len(oracle_jobs) == 1
    # the two runs met the same episode: `mdh eval compare` pairs it
    a, b = (str(p.run_dir) for p in planned)
    assert main(["eval", "compare", a, b, "--json"]) == 0
    paired = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert paired["n"] == 1 and paired["unpaired"] == 0 and set(paired["per_task"]) == {"reach-v3"}


def test_rlbench_without_the_simulator_says_what_to_install(trained, tmp_path, capsys):
    run_dir, _ = trained
    try:
        import rlbench  # noqa: F401
        pytest.skip("RLBench is installed here: the real test (marker rlbench) covers it")
    except ImportError:
        pass
    rc = main(["eval", str(run_dir), "--env", "rlbench", "--test-data", str(tmp_path), "--tasks", "close_jar"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "CoppeliaSim 4.1.0, PyRep and the PerAct fork" in err


def test_kept_checkpoints_are_each_evaluated_on_the_same_episodes(tmp_path, metaworld, capsys, monkeypatch):
    """``mdh eval RUN --checkpoints``: every kept checkpoint through the one evaluation path, the oracle once, a
    success-vs-steps curve with the training wall clock; re-running evaluates nothing again."""
    from harness.evaluate import run_eval

    metaworld.generate_suite(tmp_path / "suite", ["reach-v3"], test_episodes=2)
    cfg = RunConfig(model=ModelConfig(name="minidiffuser", preset="tiny"),
                    data=DataConfig(name="metaworld", path=str(tmp_path / "suite"), workers=0, eval_keysteps=4),
                    train=TrainConfig(B=2, M=4, steps=4, eval_every=4, ckpt_every=2, keep_ckpt_every=2,
                                      warmup_steps=1, device="cpu", progress=False, sampler="ddim",
                                      sampler_steps=2, lr=0.05))
    run_dir = tmp_path / "run"
    assert run_training(cfg, run_dir)["status"] == "done"
    args = ["eval", str(run_dir), "--checkpoints", "--episodes", "2", "--sampler-steps", "2", "--max-keyposes", "3",
            "--json"]
    assert main(args) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["step"] for r in rows] == [2, 4]
    with open(run_dir / "eval_metaworld" / "success_vs_steps.csv") as f:
        curve = list(csv.DictReader(f))
    assert [int(r["step"]) for r in curve] == [2, 4] and all(float(r["wall_time_s"]) > 0 for r in curve)
    assert float(curve[0]["wall_time_s"]) < float(curve[1]["wall_time_s"])
    record = json.loads((run_dir / "record.json").read_text())
    assert [p["step"] for p in record["success_curve"]["points"]] == [2, 4]
    # each step's episodes are exactly those of its own checkpoint evaluated directly
    oracle_runs = []
    for step in (2, 4):
        folder = run_dir / "eval_metaworld" / "steps" / f"step_{step:07d}"
        stored = read_episodes(folder / "episodes.jsonl")
        assert {e.policy for e in stored} == {run_dir.name, "oracle"}
        oracle_runs.append(_strip([e for e in stored if e.policy == "oracle"]))
        mine = [e for e in stored if e.policy != "oracle"]
        assert _strip(mine) == [{k: v for k, v in r.items() if k not in ("time_s", "attempts")}
                                for r in _direct_episodes(run_dir, step)]
    assert oracle_runs[0] == oracle_runs[1]  # the oracle once, the same episodes for every checkpoint
    # idempotent: nothing is evaluated again
    monkeypatch.setattr(run_eval, "_run_jobs", lambda *a, **k: pytest.fail("a kept checkpoint was evaluated twice"))
    assert main(args) == 0
    assert main(["eval", str(run_dir), "--checkpoints", "3", "--episodes", "2"]) == 2
    assert "no kept checkpoint at steps [3]" in capsys.readouterr().err


def _direct_episodes(run_dir, step):
    """The episodes of checkpoint ``step`` evaluated in this process, apart from ``evaluate_checkpoints``."""
    from dataclasses import asdict

    from harness.evaluate.run_eval import _episodes_worker

    cfg = MetaWorldEvalConfig(episodes=2, sampler_steps=2, max_keyposes=3)
    seeds = json.loads((run_dir / "eval_metaworld" / "steps" / f"step_{step:07d}" / "summary.json").read_text())["seeds"]
    return _episodes_worker(str(run_dir), str(run_dir / "ckpt" / f"step_{step:07d}.pt"), None,
                            {**asdict(cfg), "_video_seeds": seeds}, [("reach-v3", s) for s in seeds], True)
