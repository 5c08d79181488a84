"""Closed-loop Fig. 4: success curves of kept checkpoints -> per-M means, the time-to-success table, the figure."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.report.collect import Run
from harness.report.success_curves import (
    fig4_success,
    first_reached,
    success_families,
    success_rows,
    time_to_success_table,
)
from harness.report.tables import Family


def _run(m: int, seed: int, curve: list[tuple[int, float, float]], oracle: float = 90.0) -> Run:
    """curve: (step, hours, success %) per kept checkpoint."""
    points = [{"step": s, "wall_time_s": h * 3600, "success_pct": p, "ci_pct": [0, 100], "episodes": 20,
               "oracle_success_pct": oracle} for s, h, p in curve]
    return Run(id=f"M{m}_s{seed}", dir=Path("."), state="done",
               record={"M": m, "success_curve": {"env": "metaworld", "points": points}},
               semantic={"train.M": m, "train.seed": seed})


def _family():
    runs = [_run(64, 0, [(500, 0.5, 40.0), (1000, 1.0, 75.0), (1500, 1.5, 85.0)]),
            _run(64, 1, [(500, 0.5, 50.0), (1000, 1.0, 80.0), (1500, 1.5, 90.0)]),
            _run(1, 0, [(500, 0.4, 0.0), (1000, 0.8, 10.0), (1500, 1.2, 20.0)]),
            _run(1, 1, [(500, 0.4, 5.0), (1000, 0.8, 70.0), (1500, 1.2, 75.0)]),
            Run(id="no_curve", dir=Path("."), state="done", record={"M": 8}, semantic={"train.M": 8})]
    return success_families([Family("fig4_convergence_1", runs, "minidiffuser / small")])[0]


def test_first_reached_is_the_first_point_at_or_above_the_target():
    pts = [{"step": 1, "success_pct": 10.0}, {"step": 2, "success_pct": 72.0}, {"step": 3, "success_pct": 71.0}]
    assert first_reached(pts, 72.0)["step"] == 2 and first_reached(pts, 73.0) is None


def test_rows_average_seeds_per_step_and_runs_without_curves_are_dropped():
    fam = _family()
    assert fam.name == "fig4_success_1" and {r.id for r in fam.runs} == {"M64_s0", "M64_s1", "M1_s0", "M1_s1"}
    row = next(r for r in success_rows(fam) if r["M"] == 64 and r["step"] == 1000)
    assert row["mean"] == pytest.approx(77.5) and row["n"] == 2 and row["hours"] == pytest.approx(1.0)
    assert row["low"] < 77.5 < row["high"]


def test_time_to_success_uses_80_percent_of_the_oracle():
    table = time_to_success_table([_family()])
    by_m = {r["M"]: r for r in table.rows}
    # target 72 %: M=64 seed 0 first at step 1000 (75), seed 1 at 1000 (80); M=1 only seed 1 (70 < 72 -> 1500)
    assert by_m[64]["target_pct"] == pytest.approx(72.0)
    assert (by_m[64]["reached"], by_m[64]["steps_median"], by_m[64]["hours_median"]) == (2, 1000, 1.0)
    assert (by_m[1]["reached"], by_m[1]["steps_median"], by_m[1]["hours_median"]) == (1, 1500, 1.2)
    assert by_m[1]["hours_vs_largest_m"] == pytest.approx(1.2)
    assert by_m[64]["last_mean"] == pytest.approx(87.5)


def test_figure_and_its_data_are_written(tmp_path):
    paths, data = fig4_success(_family(), tmp_path)
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    assert {r["M"] for r in data.rows} == {1, 64}


def _finished(m: int, seed: int, wins: int, n: int) -> Run:
    return Run(id=f"M{m}_s{seed}", dir=Path("."), state="done",
               record={"M": m, "final_metrics": {"success": {"success_pct": 100 * wins / n, "episodes": n}}},
               semantic={"train.M": m, "train.seed": seed})


def test_final_success_says_when_the_budget_does_not_resolve_the_level2_effect():
    from harness.report.success_curves import final_success_table

    close = final_success_table([Family("f", [_finished(1, 0, 2, 10), _finished(64, 0, 4, 10)], "quick")])
    assert [r["resolved"] for r in close.rows] == [False, False]
    assert any("convergence_cpu" in n for n in close.notes)
    apart = final_success_table([Family("f", [_finished(1, 0, 0, 20), _finished(1, 1, 1, 20),
                                              _finished(64, 0, 19, 20), _finished(64, 1, 20, 20)], "long")])
    by_m = {r["M"]: r for r in apart.rows}
    assert (by_m[1]["successes"], by_m[1]["episodes"], by_m[64]["successes"]) == (1, 40, 39)
    assert by_m[64]["resolved"] is True and not any("convergence_cpu" in n for n in apart.notes)
