"""``mdh report RESULTS_DIR``: a results folder written here by hand (record.json + metrics.csv as
docs/record.md defines them), rendered once; every table cell is checked against its records."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from harness.cli import main
from harness.measure.cost import cost_summary
from harness.record import RECORD_FIELDS
from harness.report.build import render_report
from harness.report.stats import mean_t_interval, wilson_interval
from harness.runlock import RunLock

H100 = ("cuda", "NVIDIA H100 80GB HBM3")  # has a factor (4.42) in gpu_factors.csv
H200 = ("cuda", "NVIDIA H200")            # deliberately has none
CPU = ("cpu", "x86_64")
GIB = 2**30
PAPER_MD = Path(__file__).resolve().parents[3] / "shared" / "reference" / "paper_numbers.md"


def _metrics(M: int, seed: int) -> list[dict]:
    """Deterministic curves: larger M converges faster; seed 1 is slightly worse."""
    rows = []
    for step in range(100, 600, 100):
        pos = 40.0 / (1 + step * (M ** 0.5) / 400.0) + seed
        within = min(100.0, 1000.0 / pos)
        rows.append({"step": step, "loss": 1.0 / step, "wall_time_s": step * 0.5, "lr": 3e-4, "pos_err_cm": pos,
                     "pct_within_1cm": within, "rot_err_deg": pos / 2, "pct_within_3deg": within / 2,
                     "gripper_acc": 90.0, "pct_all": within / 3, "pos": 0.1, "rot": 0.2, "open": 0.3})
    return rows


def make_run(root: Path, name: str, *, model="minidiffuser", preset="small", B=4, M=64, seed=0, device=H100,
             status="done", options=None, num_points=None, step_time=1.0, peak=8 * GIB, success=None,
             error=None, metrics=True) -> dict:
    options = options or {}
    rows = _metrics(M, seed) if metrics else []
    overall = {k: v for k, v in rows[-1].items() if k in ("pos_err_cm", "pct_within_1cm", "rot_err_deg",
                                                           "pct_within_3deg", "gripper_acc", "pct_all")} \
        if rows else {}
    overall["n"] = 64
    final = {"overall": overall, "per_task": {}}
    if success is not None:
        final["success"] = {"success_pct": success[0], "episodes": success[1]}
    semantic = {"model.name": model, "model.preset": preset, "train.B": float(B), "train.M": float(M),
                "train.seed": float(seed), "train.steps": 500.0, "train.lr": 3e-4, "data.name": "metaworld",
                "data.num_points": None if num_points is None else float(num_points)}
    semantic.update({f"model.options.{k}": v for k, v in options.items()})
    wall = 500 * step_time
    cost = cost_summary(device[0], device[1], 1, wall, step_time, 500)
    record = {
        "schema_version": 2, "run_id": name.split("/")[-1], "status": status, "error": error,
        "fingerprint": "abc", "semantic_config": semantic,
        "config": {"model": {"name": model, "preset": preset, "options": options},
                   "data": {"name": "metaworld", "num_points": num_points},
                   "train": {"B": B, "M": M, "seed": seed, "steps": 500, "recipe_steps": None}},
        "device": {"kind": device[0], "name": device[1], "count": 1}, "B": B, "M": M, "model": model,
        "preset": preset, "ablation": options, "model_config": {"num_points": 1024, "rope3d": True},
        "steps_total": 500, "steps_done": 500 if status == "done" else 200,
        "data": {"path": "/data", "train_keysteps": 1830, "eval_split": "val", "eval_keysteps": 64,
                 "meta": "file:/data/meta.json"},
        "timing": {"step_time_median_s": step_time, "step_time_p90_s": step_time * 1.1, "wall_time_s": wall},
        "memory": {"peak_memory_bytes": peak,
                   "memory_source": "process_rss" if device[0] == "cpu" else "allocator_peak"},
        "cost": cost, "final_metrics": final,
    }
    assert set(record) <= RECORD_FIELDS
    d = root / name
    d.mkdir(parents=True)
    (d / "record.json").write_text(json.dumps(record))
    if rows:
        cols = list(rows[0])
        (d / "metrics.csv").write_text(",".join(cols) + "\n" + "".join(
            ",".join(repr(r[c]) for c in cols) + "\n" for r in rows))
    return record


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    rec = {}
    for M, t, mem in ((1, 1.0, 8 * GIB), (64, 1.1, 8.4 * GIB)):
        for seed in (0, 1):
            rec[f"t3/M{M}-s{seed}"] = make_run(root, f"t3/M{M}-s{seed}", M=M, seed=seed,
                                               step_time=t + 0.02 * seed, peak=mem + seed * GIB / 8,
                                               success=(60.0, 25) if (M, seed) == (64, 0) else None)
    rec["t3/norope"] = make_run(root, "t3/norope", M=64, options={"rope3d": False}, step_time=1.05,
                                peak=8.2 * GIB)
    rec["cpu/run"] = make_run(root, "cpu/run", device=CPU, num_points=2048, step_time=3.0, peak=3 * GIB)
    # a writer bug must not leak V100 figures into a CPU row
    cpu = json.loads((root / "cpu/run/record.json").read_text())
    cpu["cost"].update(v100_days=1.0, v100x8_days=0.125, factor=1.0, projected_recipe_v100x8_days=0.5)
    (root / "cpu/run/record.json").write_text(json.dumps(cpu))
    rec["cpu/run"] = cpu
    rec["h200/run"] = make_run(root, "h200/run", B=8, device=H200, step_time=0.5, peak=20 * GIB)
    rec["dda/run"] = make_run(root, "dda/run", model="diffuser_actor", preset="paper", step_time=2.0,
                              peak=40 * GIB, success=(80.0, 25))
    make_run(root, "bad/failed", status="failed", error="RuntimeError: boom\nmore", metrics=False)
    make_run(root, "bad/died", status="running", metrics=False)        # no lock holder: reads died
    make_run(root, "bad/running", status="running", metrics=False)
    make_run(root, "bad/interrupted", status="interrupted", error="stopped by SIGTERM", metrics=False)
    (root / "bad/garbled").mkdir()
    (root / "bad/garbled/record.json").write_text("{not json")
    manifest = {"sweep": "t", "runs": [{"run": "pending1", "cell": ["x=1"]}]}  # listed, never started
    (root / "bad/sweep.json").write_text(json.dumps(manifest))
    out = tmp_path_factory.mktemp("out")
    with RunLock(root / "bad/running"):
        report = render_report(root, out)
    return root, out, report, rec


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def num(text: str) -> float | None:
    return None if text == "" else float(text)


def test_every_table_and_figure_is_written(rendered):
    _, out, _report, _ = rendered
    assert (out / "report.md").is_file()
    for name in ("runs", "table2_efficiency", "table2_differences", "table3_ablations", "table3_differences",
                 "fig4_thresholds", "comparability", "fig2_efficiency_data", "fig4_convergence_1_data"):
        for ext in ("csv", "md", "tex"):
            assert (out / f"{name}.{ext}").stat().st_size > 0, (name, ext)
        assert "\\toprule" in (out / f"{name}.tex").read_text()
    for fig in ("fig2_efficiency", "fig4_convergence_1"):
        assert (out / f"{fig}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / f"{fig}.pdf").read_bytes()[:5] == b"%PDF-"
        assert (out / f"{fig}.png").stat().st_size > 10_000
    text = (out / "report.md").read_text()
    assert "fig4_convergence_1.png" in text and "fig2_efficiency.png" in text and "V100 x 8 x day" in text


def test_failed_running_and_broken_runs_are_listed_and_excluded(rendered):
    _, out, _, _ = rendered
    states = {r["run"]: (r["state"], r["in_numbers"]) for r in read_csv(out / "runs.csv")}
    assert states["bad/failed"] == ("failed", "False")
    assert states["bad/died"] == ("died", "False")
    assert states["bad/running"] == ("running", "False")
    assert states["bad/interrupted"] == ("interrupted", "False")
    assert states["bad/garbled"] == ("unreadable", "False")
    assert states["bad/pending1"] == ("pending", "False")
    assert states["t3/M1-s0"] == ("done", "True")
    failed = next(r for r in read_csv(out / "runs.csv") if r["run"] == "bad/failed")
    assert failed["error"] == "RuntimeError: boom"
    bad = {k for k in states if k.startswith("bad/")}
    for name in ("table2_efficiency", "table3_ablations", "fig4_thresholds", "fig2_efficiency_data",
                 "fig4_convergence_1_data", "comparability"):
        assert "bad/" not in (out / f"{name}.csv").read_text(), name
    assert all(b in (out / "report.md").read_text() for b in bad)


def test_table2_measured_cells_equal_their_records(rendered):
    _, out, _, rec = rendered
    rows = [r for r in read_csv(out / "table2_efficiency.csv") if r["source"] == "measured"]
    assert {r["run"] for r in rows} == set(rec)
    for row in rows:
        r = rec[row["run"]]
        o = r["final_metrics"]["overall"]
        assert (int(row["B"]), int(row["M"]), int(row["seed"])) == (r["B"], r["M"], r["config"]["train"]["seed"])
        assert (row["model"], row["preset"], row["device_kind"], row["device_name"]) == \
            (r["model"], r["preset"], r["device"]["kind"], r["device"]["name"])
        assert int(row["steps_done"]) == r["steps_done"] and int(row["eval_keysteps"]) == o["n"]
        for key in ("pct_within_1cm", "pct_within_3deg", "pct_all"):
            assert num(row[key]) == o[key], key
        assert num(row["memory_gb"]) == r["memory"]["peak_memory_bytes"] / GIB
        assert row["memory_source"] == r["memory"]["memory_source"]
        success = r["final_metrics"].get("success")
        if success:
            assert num(row["success_pct"]) == success["success_pct"]
            assert int(row["success_episodes"]) == success["episodes"]
            n = success["episodes"]
            lo, hi = wilson_interval(round(success["success_pct"] * n / 100), n)
            assert (num(row["success_ci_low"]), num(row["success_ci_high"])) == \
                pytest.approx((100 * lo, 100 * hi))
        else:
            assert row["success_pct"] == "" and row["success_ci_low"] == ""
        if r["device"]["name"] == H100[1]:
            assert num(row["train_time_v100x8_days"]) == r["cost"]["v100x8_days"]
            assert num(row["train_time_v100x8_days"]) == pytest.approx(500 * r["timing"]["step_time_median_s"]
                                                                       / 3600 * 4.42 / 24 / 8)
            assert num(row["gpu_hours"]) == r["cost"]["gpu_hours"] and row["cpu_hours"] == ""


def test_cpu_rows_and_gpus_without_a_factor_never_get_a_v100_figure(rendered):
    _, out, _, rec = rendered
    rows = {r["run"]: r for r in read_csv(out / "table2_efficiency.csv") if r["source"] == "measured"}
    cpu, h200 = rows["cpu/run"], rows["h200/run"]
    for row in (cpu, h200):
        assert row["train_time_v100x8_days"] == "" and row["projected_recipe_v100x8_days"] == ""
        assert row["v100_factor"] == ""
    assert num(cpu["cpu_hours"]) == rec["cpu/run"]["cost"]["cpu_hours"] and cpu["gpu_hours"] == ""
    assert num(h200["gpu_hours"]) == rec["h200/run"]["cost"]["gpu_hours"]
    md = (out / "table2_efficiency.md").read_text()
    cpu_line = next(line for line in md.splitlines() if "cpu/run" in line)
    assert "CPU (x86_64)" in cpu_line and "CPU-h" in cpu_line and "0.125" not in cpu_line
    points = {p["run"]: p for p in read_csv(out / "fig2_efficiency_data.csv") if p["source"] == "measured"}
    assert points["cpu/run"]["panel"] == "cpu_hours" and points["cpu/run"]["time"] == cpu["cpu_hours"]
    assert points["h200/run"]["panel"] == "gpu_hours" and points["t3/M1-s0"]["panel"] == "v100x8_days"
    assert points["t3/M64-s0"]["value_kind"] == "success" and points["t3/M1-s0"]["value_kind"] == "offline"


def test_published_rows_equal_the_paper(rendered):
    _, out, _, _ = rendered
    rows = {r["method"]: r for r in read_csv(out / "table2_efficiency.csv") if r["source"] == "published"}
    assert len(rows) == 10
    if PAPER_MD.is_file():
        text = PAPER_MD.read_text().split("## Table 2 summary", 1)[1].split("\n## ", 1)[0]
        for line in text.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 5 and cells[1].isdigit():
                row = rows[cells[0]]
                assert int(row["year"]) == int(cells[1])
                assert num(row["success_pct"]) == float(cells[2].split()[0])
                assert num(row["train_time_v100x8_days"]) == float(cells[3])
                assert num(row["memory_gb"]) == float(cells[4])
    # a measured 3DDA run exists: % of 3DDA columns, measured rows vs the measured 3DDA run
    m64 = next(r for r in read_csv(out / "table2_efficiency.csv") if r["run"] == "t3/M64-s0")
    assert num(m64["pct_of_3dda_success"]) == pytest.approx(100 * 60 / 80)
    assert num(m64["pct_of_3dda_memory"]) == pytest.approx(100 * 8.4 / 40)
    mini = rows["Mini-Diffuser"]
    assert num(mini["pct_of_3dda_success"]) == pytest.approx(100 * 75.5 / 81.3)


def test_table3_deltas_equal_the_records(rendered):
    _, out, _, rec = rendered
    rows = {r["comparison"]: r for r in read_csv(out / "table3_ablations.csv")}
    bat = rows["M=64 vs M=1 at B=4"]
    assert bat["row_runs"] == "t3/M64-s0;t3/M64-s1" and bat["base_runs"] == "t3/M1-s0;t3/M1-s1"

    def mean(runs, fn):
        return sum(fn(rec[r]) for r in runs) / len(runs)

    row_t = mean(["t3/M64-s0", "t3/M64-s1"], lambda r: r["timing"]["step_time_median_s"])
    base_t = mean(["t3/M1-s0", "t3/M1-s1"], lambda r: r["timing"]["step_time_median_s"])
    row_m = mean(["t3/M64-s0", "t3/M64-s1"], lambda r: r["memory"]["peak_memory_bytes"])
    base_m = mean(["t3/M1-s0", "t3/M1-s1"], lambda r: r["memory"]["peak_memory_bytes"])
    assert num(bat["row_step_time_s"]) == pytest.approx(row_t)
    assert num(bat["base_step_time_s"]) == pytest.approx(base_t)
    assert num(bat["delta_time_pct"]) == pytest.approx(100 * (row_t / base_t - 1))
    assert num(bat["delta_memory_pct"]) == pytest.approx(100 * (row_m / base_m - 1))
    acc = mean_t_interval(rec[r]["final_metrics"]["overall"]["pct_all"] for r in ("t3/M64-s0", "t3/M64-s1"))
    assert (num(bat["row_pct_all"]), num(bat["row_pct_all_ci_low"]), num(bat["row_pct_all_ci_high"])) == \
        pytest.approx((acc.mean, acc.low, acc.high))
    assert (num(bat["paper_delta_memory_pct"]), num(bat["paper_delta_time_pct"])) == (3.0, 7.0)

    comp = rows["rope3d=False vs full model at B=4, M=64"]
    assert comp["kind"] == "component" and comp["row_runs"] == "t3/norope"
    assert comp["base_runs"] == "t3/M64-s0;t3/M64-s1"
    assert num(comp["delta_time_pct"]) == pytest.approx(100 * (1.05 / row_t - 1))
    assert num(comp["delta_memory_pct"]) == pytest.approx(100 * (8.2 * GIB / row_m - 1))
    assert num(comp["paper_delta_success_points"]) == -13.4
    assert comp["row_pct_all_ci_low"] == ""  # one seed: no interval
    # the CPU, H200 and 3DDA runs have no base in their own family: no comparison of theirs
    assert not any(r in (out / "table3_ablations.csv").read_text() for r in ("cpu/run", "h200/run", "dda/run"))


def test_fig4_thresholds_follow_metrics_csv(rendered):
    _, out, _, _ = rendered
    rows = {int(r["M"]): r for r in read_csv(out / "fig4_thresholds.csv")}
    assert set(rows) == {1, 64} and rows[64]["n_seeds"] == "2" and rows[64]["runs"] == "t3/M64-s0;t3/M64-s1"

    def first(M, seed, ok):
        return next((r["step"] for r in _metrics(M, seed) if ok(r)), None)

    s = [first(64, seed, lambda r: r["pos_err_cm"] <= 5) for seed in (0, 1)]
    assert num(rows[64]["pos_le_5cm_mean"]) == sum(s) / 2 and rows[64]["pos_le_5cm_reached"] == "2"
    s = [first(1, seed, lambda r: r["pos_err_cm"] <= 10) for seed in (0, 1)]
    hit = [x for x in s if x is not None]
    assert rows[1]["pos_le_10cm_reached"] == str(len(hit))
    assert num(rows[1]["pos_le_10cm_mean"]) == (sum(hit) / len(hit) if hit else None)
    curve = next(r for r in read_csv(out / "fig4_convergence_1_data.csv")
                 if r["M"] == "64" and r["metric"] == "pos_err_cm" and r["step"] == "500.0")
    ci = mean_t_interval(_metrics(64, seed)[-1]["pos_err_cm"] for seed in (0, 1))
    assert (num(curve["mean"]), num(curve["low"]), int(curve["n"])) == pytest.approx((ci.mean, ci.low, 2))


def test_comparability_flags_name_what_differs(rendered):
    _, out, _, _ = rendered
    diffs = read_csv(out / "table2_differences.csv")
    assert any(d["key"] == "num_points" and d["value"] == "2048" and d["runs"] == "cpu/run" for d in diffs)
    assert any(d["key"] == "device.kind" for d in diffs)
    rows = {r["run"]: r for r in read_csv(out / "table2_efficiency.csv") if r["source"] == "measured"}
    assert "num_points=2048" in rows["cpu/run"]["flags"] and "device=cpu" in rows["cpu/run"]["flags"]
    assert "steps=500/95200" in rows["t3/M1-s0"]["flags"] and "data=metaworld" in rows["t3/M1-s0"]["flags"]
    comp = {r["run"]: r for r in read_csv(out / "comparability.csv")}
    assert comp["cpu/run"]["num_points"] == "2048" and comp["t3/M1-s0"]["num_points"] == "1024"
    assert math.isclose(num(comp["t3/M1-s0"]["pct_of_recipe"]), 100 * 500 / 95200)


def test_cli_renders_and_keeps_report_runs(rendered, tmp_path, capsys):
    root, _, _, _ = rendered
    assert main(["report", str(root), "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.md").is_file() and "wrote" in capsys.readouterr().out
    assert main(["report", "runs", str(root / "t3/M1-s0"), str(root / "t3/M64-s0")]) == 0
    assert "4 x 64" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing")]) == 1
    assert main(["report", "runs"]) == 2


def test_component_base_is_the_full_model_even_with_options_every_run_sets(tmp_path):
    from harness.report.collect import discover_runs
    from harness.report.reference import load_paper_numbers
    from harness.report.tables import table2, table3

    common = {"shuffle_orders": "train"}  # set by every cell of a sweep: on both sides of each comparison
    make_run(tmp_path, "full", options=common, step_time=1.0, peak=10 * GIB)
    make_run(tmp_path, "nolq", options={**common, "local_query": False}, step_time=0.9, peak=9 * GIB)
    make_run(tmp_path, "dda_like", options={**common, "local_query": False, "backbone": "transformer",
                                            "head": "joint"}, step_time=1.18, peak=14.4 * GIB)
    runs = discover_runs(tmp_path)
    t3, _ = table3(runs, load_paper_numbers())
    rows = {r["row_runs"][0]: r for r in t3.rows}
    assert rows["nolq"]["base_runs"] == ["full"] and rows["nolq"]["paper_delta_success_points"] == -1.0
    assert rows["nolq"]["comparison"] == "local_query=False vs full model at B=4, M=64"
    dda = rows["dda_like"]
    assert dda["base_runs"] == ["full"] and dda["paper_claim"] == "backbone_head_3dda"
    assert dda["delta_time_pct"] == pytest.approx(18.0) and dda["delta_memory_pct"] == pytest.approx(44.0)
    assert (dda["paper_delta_time_pct"], dda["paper_delta_memory_pct"]) == (18.0, 44.0)
    t2, _ = table2(runs, load_paper_numbers())
    assert "pct_of_3dda_success" not in {c.key for c in t2.cols}  # no measured 3DDA run: no such columns


def test_budget_states_seeds_steps_and_summed_wall_time(tmp_path):
    from harness.report.build import budget_summary
    from harness.report.collect import discover_runs

    for seed in (0, 1, 2):
        make_run(tmp_path, f"m1s{seed}", M=1, seed=seed, step_time=2.0)   # 500 steps x 2 s each
    make_run(tmp_path, "m64s0", M=64, seed=0, step_time=4.0)
    make_run(tmp_path, "failed", M=8, status="failed", step_time=100.0)  # not done: not counted
    text = budget_summary(discover_runs(tmp_path))
    assert "4 done runs, 2 configurations, 1/3 seed(s) each, 500 training steps per run" in text
    assert f"{(3 * 500 * 2.0 + 500 * 4.0) / 60:.1f} min of training wall time" in text
    assert "Budget" in (render_report(tmp_path).path.read_text())


def test_3dda_rows_compare_with_minidiffuser_at_the_same_B_and_M(tmp_path):
    """Table 3's "3DDA" and "3DDA, minimal modification" rows: each 3D Diffuser Actor group against
    Mini-Diffuser's full model at the same B, M, preset and device; the shared head carries the paper's
    "3DDA backbone + action head" claim."""
    md = make_run(tmp_path, "md", M=64, step_time=1.0, peak=8 * GIB)
    make_run(tmp_path, "md_m1", M=1, step_time=0.9, peak=7 * GIB)
    shared = make_run(tmp_path, "dda_shared", model="diffuser_actor", M=64, options={"level2": "shared"},
                      step_time=1.3, peak=11 * GIB)
    naive = make_run(tmp_path, "dda_naive", model="diffuser_actor", M=1, step_time=2.0, peak=9 * GIB)
    render_report(tmp_path)
    rows = {r["comparison"]: r for r in read_csv(tmp_path / "table3_ablations.csv")}
    mm = rows["3DDA, minimal modification (level2=shared) vs minidiffuser (full model (default options)) at B=4, M=64"]
    assert mm["kind"] == "model" and mm["row_runs"] == "dda_shared" and mm["base_runs"] == "md"
    assert num(mm["delta_time_pct"]) == pytest.approx(100 * (1.3 / 1.0 - 1))
    assert num(mm["delta_memory_pct"]) == pytest.approx(100 * (shared["memory"]["peak_memory_bytes"]
                                                              / md["memory"]["peak_memory_bytes"] - 1))
    assert (num(mm["paper_delta_memory_pct"]), num(mm["paper_delta_time_pct"])) == (44.0, 18.0)
    plain = rows["3DDA (level2=replicate) vs minidiffuser (full model (default options)) at B=4, M=1"]
    assert plain["base_runs"] == "md_m1" and plain["paper_delta_time_pct"] == ""
    assert num(plain["delta_time_pct"]) == pytest.approx(100 * (naive["timing"]["step_time_median_s"] / 0.9 - 1))


def test_pct_of_3dda_time_uses_each_models_recipe_steps_not_run_length(rendered):
    """A Mini-Diffuser row's time % of 3DDA = its median step time x 95.2k recipe steps over 3DDA's x 600k
    (both H100: the V100 factor cancels), whatever steps the runs themselves trained; memory: the peaks."""
    _, out, _, rec = rendered
    rows = {r["run"]: r for r in read_csv(out / "table2_efficiency.csv") if r["source"] == "measured"}
    md, dda = rec["t3/M64-s0"], rec["dda/run"]
    want = 100 * (md["timing"]["step_time_median_s"] * 95200) / (dda["timing"]["step_time_median_s"] * 600000)
    assert num(rows["t3/M64-s0"]["pct_of_3dda_time"]) == pytest.approx(want)
    assert num(rows["t3/M64-s0"]["pct_of_3dda_memory"]) == pytest.approx(
        100 * md["memory"]["peak_memory_bytes"] / dda["memory"]["peak_memory_bytes"])
    assert rows["cpu/run"]["pct_of_3dda_time"] == ""  # no 3DDA run on a CPU: no ratio
