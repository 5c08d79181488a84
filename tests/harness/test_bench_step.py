"""``mdh bench step``: it times THE training step (``TrainStep``) on real batches from ``--data`` or on labelled
synthetic ones, and reads the RSS peak through ``harness.measure.memory``."""

from __future__ import annotations

import json

import pytest
import torch

import harness.bench.step as bench
from harness.bench.step import BenchInputError, StepRunner, bench_step, format_table
from harness.cli import main
from harness.config import TrainConfig
from harness.measure.memory import MEMORY_SOURCES, SUMMARY_KEYS
from harness.optim import lr_factor
from harness.train_step import TrainStep


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One intra-op thread here and in the benchmark's subprocesses: on a shared 2-core machine OpenMP
    threads spinning against other processes made a tiny step take 0.1 s or 40 s at random."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def data_root(tmp_path, synth):
    d = synth.make_dataset(tmp_path / "ds", episodes=3, kinds=("voxel1cm",))
    assert d.num_keysteps >= 8
    return d.root


def _check_results(results: list[dict], root, B: int = 2) -> None:
    assert [r["M"] for r in results] == [1, 4]
    for r in results:
        assert r["inputs"].startswith(f"data:{root} (train, ") and r["inputs"].endswith(" batches)")
        assert r["input_batches"] >= 2 and f"{r['input_batches']} batches" in r["inputs"]
        assert r["data_kind"] == "voxel1cm" and r["data_split"] == "train"
        assert len(r["step_times_s"]) == 2 and r["step_time_median_s"] > 0
        assert r["peak_memory_bytes"] > 0 and r["memory_source"] == "process_rss"  # as mdh train's record
        assert r["memory_source"] in MEMORY_SOURCES and set(SUMMARY_KEYS) <= set(r)
        assert r["samples_per_s"] == pytest.approx(B * r["M"] / r["step_time_median_s"])
        assert r["autocast"] == "none"  # CPU: no autocast, as in training
    assert results[0]["time_ratio"] == 1.0 and results[0]["memory_ratio"] == 1.0
    r0, r1 = results
    assert r1["time_ratio"] == pytest.approx(r1["step_time_median_s"] / r0["step_time_median_s"])
    assert results[1]["memory_ratio"] > 0 and "step_memory_ratio" in results[1]


def test_cli_bench_step_with_data_json(capsys, data_root):
    rc = main(["bench", "step", "--model", "minidiffuser", "--preset", "tiny", "--B", "2", "--M", "1,4",
               "--steps", "2", "--warmup", "1", "--data", str(data_root), "--data-batches", "3", "--json"])
    assert rc == 0
    results = json.loads(capsys.readouterr().out)
    _check_results(results, data_root)
    assert results[0]["input_batches"] == 3 and results[0]["inputs"] == f"data:{data_root} (train, 3 batches)"
    assert f"inputs=data:{data_root} (train," in format_table(results).splitlines()[0]


def test_runner_steps_with_the_training_step(monkeypatch, data_root):
    runner = StepRunner("minidiffuser", "tiny", B=2, data=data_root, n_batches=2)
    assert isinstance(runner.trainer, TrainStep)
    cfg = TrainConfig()
    groups = runner.trainer.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [cfg.weight_decay, 0.0]  # harness.optim.param_groups
    assert all(p.ndim <= 1 for p in groups[1]["params"]) and all(p.ndim > 1 for p in groups[0]["params"])

    clipped = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *args, **kwargs):
        clipped.append(max_norm)
        return real_clip(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    assert runner.step(1) > 0 and runner.step(4) > 0
    assert clipped == [cfg.grad_clip, cfg.grad_clip]
    assert runner.trainer.lr_scheduler.last_epoch == 2  # the LR schedule advanced once per step
    want = cfg.lr * lr_factor(2, cfg.warmup_steps, cfg.steps, cfg.cosine_cycles, cfg.lr_floor / cfg.lr)
    assert groups[0]["lr"] == pytest.approx(want)


def test_real_batches_cycle_identically_for_every_M(monkeypatch, data_root):
    runner = StepRunner("minidiffuser", "tiny", B=2, data=data_root, n_batches=2)
    assert len(runner.batches) == 2 and runner.inputs == f"data:{data_root} (train, 2 batches)"
    b = runner.batches[0]
    assert b["points"].shape == (2, runner.policy.input_spec.num_points, 3) and len(b["key"]) == 2  # real keysteps
    assert runner.batches[0]["key"] != runner.batches[1]["key"]
    seen: dict[int, list] = {1: [], 4: []}
    monkeypatch.setattr(runner.trainer, "step", lambda batch, M: seen[M].append(tuple(batch["key"])))
    for M in (1, 4, 1, 4, 1, 4):
        runner.step(M)
    keys = [tuple(b["key"]) for b in runner.batches]
    assert seen[1] == seen[4] == [keys[0], keys[1], keys[0]]


def test_synthetic_inputs_are_labelled_and_memory_uses_the_training_monitor(monkeypatch):
    """Bench memory goes through the MemoryMonitor `mdh train` measures with: its summary keys and its
    memory_source names (harness.measure.memory.MEMORY_SOURCES), reading the shared RSS peak."""
    from harness.measure import memory

    runner = StepRunner("minidiffuser", "tiny", B=2)
    assert runner.inputs == "synthetic" and runner.describe()["inputs"] == "synthetic"
    started = []
    real_start = memory.MemoryMonitor.start
    monkeypatch.setattr(memory.MemoryMonitor, "start", lambda self: started.append(self) or real_start(self))
    monkeypatch.setattr(memory, "maxrss_bytes", lambda: 7 * 2**40)
    mem = bench.peak_memory("minidiffuser", "tiny", B=2, M=2, steps=1)
    assert len(started) == 1 and str(started[0].device) == "cpu"
    assert mem["memory_source"] in MEMORY_SOURCES and mem["memory_source"] == "process_rss"
    assert set(SUMMARY_KEYS) <= set(mem) and mem["nvml_status"].startswith("unavailable")
    assert mem["peak_memory_bytes"] == mem["rss_peak_bytes"] == 7 * 2**40
    assert mem["step_memory_bytes"] == 7 * 2**40 - mem["rss_before_steps_bytes"]


@pytest.mark.parametrize("what", ["missing", "empty_folder", "empty_string", "no_split"])
def test_cli_bad_data_is_one_line_exit_2(capsys, tmp_path, data_root, what):
    path = {"missing": str(tmp_path / "nope"), "empty_folder": str(tmp_path), "empty_string": "",
            "no_split": str(data_root)}[what]
    extra = ["--split", "val"] if what == "no_split" else []
    rc = main(["bench", "step", "--preset", "tiny", "--B", "2", "--M", "1", "--data", path, *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("mdh bench step: error: ") and len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("option, value, message", [("--steps", "0", "--steps must be >= 1, got 0"),
                                                    ("--steps", "-2", "--steps must be >= 1, got -2"),
                                                    ("--warmup", "-1", "--warmup must be >= 0, got -1"),
                                                    ("--B", "0", "--B must be >= 1, got 0"),
                                                    ("--data-batches", "0", "--data-batches must be >= 1, got 0")])
def test_cli_bad_counts_are_one_line_exit_2(capsys, monkeypatch, option, value, message):
    monkeypatch.setattr(bench, "bench_step", lambda *a, **k: pytest.fail("benchmark started with a bad count"))
    rc = main(["bench", "step", "--preset", "tiny", "--B", "2", "--M", "1", option, value])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == f"mdh bench step: error: {message}"


def test_too_few_keysteps_for_one_batch(data_root):
    with pytest.raises(BenchInputError, match="fewer than one batch of --B 1000"):
        bench_step("minidiffuser", "tiny", B=1000, Ms=[1], data=data_root)


@pytest.mark.parametrize("model, preset, message", [("minidiffuser", "huge", "unknown preset 'huge'"),
                                                    ("no-such-model", None, "unknown policy 'no-such-model'")])
def test_bad_model_or_preset_is_one_line_before_any_subprocess(capsys, model, preset, message):
    with pytest.raises(BenchInputError, match=message):
        bench_step(model, preset, 2, [1], steps=1, warmup=0)
    args = ["bench", "step", "--model", model, "--B", "2", "--M", "1"] + (["--preset", preset] if preset else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_synthetic_batch_has_every_key_the_input_spec_names():
    from harness.bench.synthetic import synthetic_batch
    from harness.policy import InputSpec

    InputSpec("points", num_points=32, text_dim=16, n_hist=3).check_batch(
        synthetic_batch(2, 32, D=16, full=True, n_hist=3))


def test_model_list_expands_variants_and_names_bad_ones():
    from harness.bench.step import parse_targets

    labels = [t["label"] for t in parse_targets("diffuser_actor,minidiffuser")]
    assert labels == ["diffuser_actor", "diffuser_actor[loop]", "diffuser_actor[shared]", "minidiffuser"]
    assert parse_targets("diffuser_actor[shared]") == [
        {"label": "diffuser_actor[shared]", "model": "diffuser_actor", "options": {"level2": "shared"}}]
    with pytest.raises(BenchInputError, match="no variant 'twice'; choices: \\['loop', 'shared'\\]"):
        parse_targets("diffuser_actor[twice]")
    with pytest.raises(BenchInputError, match="twice"):
        parse_targets("minidiffuser,minidiffuser")


def test_configurations_side_by_side_with_per_sample_ratios():
    """Two 3DDA strategies timed in one process on synthetic camera inputs; ratios at equal B x M."""
    results = bench_step("diffuser_actor[loop],diffuser_actor[shared]", "tiny", B=2, Ms=[1, 2], steps=1, warmup=0)
    assert [(r["label"], r["M"]) for r in results] == [("diffuser_actor[loop]", 1), ("diffuser_actor[loop]", 2),
                                                       ("diffuser_actor[shared]", 1), ("diffuser_actor[shared]", 2)]
    for r in results:
        assert r["inputs"] == "synthetic (4 cameras 128x128)" and r["options"]["level2"] in ("loop", "shared")
        assert r["time_per_sample_s"] == pytest.approx(r["step_time_median_s"] / (2 * r["M"]))
        ref = next(x for x in results if x["label"] == "diffuser_actor[loop]" and x["M"] == r["M"])
        assert r["sample_time_ratio_to_first"] == pytest.approx(r["time_per_sample_s"] / ref["time_per_sample_s"])
        assert r["memory_ratio_to_first"] == pytest.approx(r["peak_memory_bytes"] / ref["peak_memory_bytes"])
    assert results[2]["time_ratio"] == 1.0  # each configuration's ratios are to its own first M
    table = format_table(results)
    assert "configuration" in table and "sample time / diffuser_actor[loop]" in table


def test_runner_builds_the_policy_with_the_datasets_facts(tmp_path, synth):
    """With --data the policy is built as `mdh train` builds it: 3DDA normalises by the data's workspace."""
    root = synth.make_dataset(tmp_path / "ds", episodes=2, kinds=("keysteps",)).root
    runner = StepRunner("diffuser_actor", "tiny", B=2, data=root, n_batches=1)
    lo, hi = synth.synthetic_meta().workspace_bounds
    assert runner.policy.bounds_min.tolist() == pytest.approx(lo) and runner.policy.bounds_max.tolist() == \
        pytest.approx(hi)
    assert runner.kind == "keysteps" and runner.batches[0]["images"].shape[:2] == (2, 2)


def test_ab_step_times_a_committed_baseline_against_the_working_tree_in_one_process(tmp_path):
    """``python -m harness.bench.ab_step``: the baseline package is extracted from git under another name,
    the two models hold the same weights, and their outputs and step times come side by side."""
    import sys

    from harness.bench import ab_step

    out = ab_step.extract_baseline("HEAD", tmp_path)
    text = (out / "policy.py").read_text()
    assert "from minidiffuser" not in text and f"from {ab_step.BASELINE}." in text
    res = ab_step.run(rev="HEAD", preset="tiny", B=2, Ms=(1, 2), steps=2, warmup=0, threads=None)
    assert f"{ab_step.BASELINE}.policy" in sys.modules and not any(ab_step.BASELINE in p for p in sys.path)
    assert set(res["median_s"]) == {"old", "new"} and set(res["median_s"]["new"]) == {"1", "2"}
    assert all(len(t) == 2 for arm in res["times_s"].values() for t in arm.values())
    assert res["new_over_old"]["2"] == pytest.approx(res["median_s"]["new"]["2"] / res["median_s"]["old"]["2"])
    assert res["max_difference"]["eps_hat"] < 1e-4  # a speed-up must not change the outputs
