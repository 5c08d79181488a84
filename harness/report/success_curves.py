"""Fig. 4 with closed-loop success: success of kept checkpoints (record.json ``success_curve``, written by
``mdh eval RUN --checkpoints``) against training steps and against training wall-clock hours, one line
per M, and the steps / hours each M needs to reach a fraction of the oracle's success.

Families are those of the offline Fig. 4 (runs that differ only in M and seed), restricted to runs with a
success curve. Pure functions of the records: nothing is re-measured.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from harness.report.collect import Run
from harness.report.render import Col, Table, fmt_value
from harness.report.stats import mean_t_interval
from harness.report.tables import Family

TARGET_FRACTION = 0.8  # "reaches 80 % of the oracle's success"


def curve_points(run: Run) -> list[dict]:
    """The run's success curve points ({step, wall_time_s, success_pct, ci_pct, episodes,
    oracle_success_pct}) by step; [] when it has none."""
    points = run.sub("success_curve").get("points") or []
    return sorted((p for p in points if isinstance(p, dict) and p.get("success_pct") is not None),
                  key=lambda p: p["step"])


def success_families(families: list[Family]) -> list[Family]:
    """The offline Fig. 4 families, keeping runs that have a success curve (families left empty dropped)."""
    out = []
    for fam in families:
        members = [r for r in fam.runs if curve_points(r)]
        if members:
            out.append(Family(fam.name.replace("fig4_convergence", "fig4_success"), members, fam.label))
    return out


def success_rows(fam: Family) -> list[dict]:
    """Per M and evaluated step: mean success over the seeds evaluated there with a Student-t 95 % interval,
    the mean training hours at that step, n seeds, episodes per evaluation."""
    rows = []
    for m, members in fam.by_m().items():
        steps = sorted({p["step"] for r in members for p in curve_points(r)})
        for step in steps:
            pts = [p for r in members for p in curve_points(r) if p["step"] == step]
            ci = mean_t_interval(p["success_pct"] for p in pts)
            hours = [p["wall_time_s"] / 3600 for p in pts if p.get("wall_time_s") is not None]
            rows.append({"M": m, "step": step, "hours": statistics.fmean(hours) if hours else None,
                         "mean": ci.mean, "low": ci.low, "high": ci.high, "n": ci.n,
                         "episodes": sorted({p.get("episodes") for p in pts}),
                         "oracle_pct": _oracle(pts), "runs": [r.id for r in members]})
    return rows


def _oracle(points: list[dict]) -> float | None:
    vals = [p["oracle_success_pct"] for p in points if p.get("oracle_success_pct") is not None]
    return statistics.fmean(vals) if vals else None


def first_reached(points: list[dict], target_pct: float) -> dict | None:
    """The first curve point whose success is >= ``target_pct``; None if none is."""
    return next((p for p in points if p["success_pct"] >= target_pct), None)


def fig4_success(fam: Family, out_dir: Path) -> tuple[list[Path], Table]:
    from harness.report.figures import _cmap, _figure, _save

    rows = success_rows(fam)
    fig, axes = _figure(2, 1)
    cmap = _cmap("viridis")
    by_m = fam.by_m()
    ms = sorted(by_m)
    for i, m in enumerate(ms):
        colour = cmap(0.85 * i / max(1, len(ms) - 1))
        pts = [r for r in rows if r["M"] == m]
        n = len(by_m[m])
        for ax, x in zip(axes, ("step", "hours")):
            for run in by_m[m]:  # each seed faintly, the mean bold
                own = curve_points(run)
                xs = [p["step"] if x == "step" else (p.get("wall_time_s") or 0) / 3600 for p in own]
                ax.plot(xs, [p["success_pct"] for p in own], "-", color=colour, alpha=0.3, lw=0.8)
            good = [r for r in pts if r[x] is not None]
            ax.plot([r[x] for r in good], [r["mean"] for r in good], "-o", ms=3, color=colour,
                    label=f"M={m} (n={n} seed{'s' if n > 1 else ''})")
            band = [r for r in good if r["low"] is not None]
            if band:
                ax.fill_between([r[x] for r in band], [max(0.0, r["low"]) for r in band],
                                [min(100.0, r["high"]) for r in band], color=colour, alpha=0.15, lw=0)
    oracle = _oracle([{"oracle_success_pct": r["oracle_pct"]} for r in rows])
    for ax, label in zip(axes, ("training step", "training wall-clock hours")):
        if oracle is not None:
            ax.axhline(oracle, color="grey", ls="--", lw=0.8, label=f"oracle {oracle:.0f} %")
            ax.axhline(TARGET_FRACTION * oracle, color="grey", ls=":", lw=0.8,
                       label=f"{TARGET_FRACTION:.0%} of the oracle")
        ax.set_xlabel(label)
        ax.set_ylabel("closed-loop success (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    episodes = sorted({e for r in rows for e in r["episodes"] if e is not None})
    fig.suptitle(f"{fam.name}: {fam.label}\nmean over seeds (faint: each seed), band = Student-t 95 %; "
                 f"{', '.join(str(e) for e in episodes) or '?'} episodes per evaluation", fontsize=8)
    paths = _save(fig, out_dir, fam.name)
    table = Table(f"{fam.name}_data", f"{fam.name}: plotted data",
                  [Col("M"), Col("step"), Col("hours"), Col("mean"), Col("low"), Col("high"), Col("n"),
                   Col("episodes"), Col("oracle_pct"), Col("runs")], rows)
    return paths, table


def time_to_success_table(families: list[Family], fraction: float = TARGET_FRACTION) -> Table:
    """Per family and M: how many seeds reached ``fraction`` x the oracle's success, the median steps and
    training hours at which they first did, the hours relative to the largest M's, and the last
    evaluation's mean success (t 95 %)."""
    rows = []
    for fam in families:
        by_m = fam.by_m()
        per_m = {}
        for m, members in by_m.items():
            curves = [curve_points(r) for r in members]
            oracle = _oracle([p for c in curves for p in c])
            target = None if oracle is None else fraction * oracle
            hits = [first_reached(c, target) if target is not None else None for c in curves]
            reached = [h for h in hits if h is not None]
            last = mean_t_interval(c[-1]["success_pct"] for c in curves)
            hours = [h["wall_time_s"] / 3600 for h in reached if h.get("wall_time_s") is not None]
            per_m[m] = {
                "figure": fam.name, "family": fam.label, "M": m, "n_seeds": len(members),
                "runs": [r.id for r in members], "oracle_pct": oracle, "target_pct": target,
                "reached": len(reached),
                "steps_median": statistics.median(h["step"] for h in reached) if reached else None,
                "hours_median": statistics.median(hours) if hours else None,
                "per_seed": [f"s{fmt_value(r.seed)}:{fmt_value(h['step'] if h else None)}"
                             for r, h in zip(members, hits)],
                "last_step": max(c[-1]["step"] for c in curves),
                "last_hours": max((c[-1].get("wall_time_s") or 0) / 3600 for c in curves),
                "last_mean": last.mean, "last_low": last.low, "last_high": last.high}
        ref = per_m.get(max(per_m)) if per_m else None
        for row in per_m.values():
            if ref and ref["hours_median"] and row["hours_median"]:
                row["hours_vs_largest_m"] = row["hours_median"] / ref["hours_median"]
            rows.append(row)

    def reached(v, r):
        if r["target_pct"] is None:
            return "no oracle"
        if not r["reached"]:
            return f"not reached in {fmt_value(r['last_step'])} steps / {r['last_hours']:.2f} h (0/{r['n_seeds']})"
        return f"{fmt_value(v, '.0f')} ({r['reached']}/{r['n_seeds']})"

    def last(v, r):
        if v is None:
            return None
        return f"{v:.1f}" + (f" [{r['last_low']:.1f}, {r['last_high']:.1f}]" if r["last_low"] is not None else "")

    cols = [Col("figure", "figure"), Col("family", show=False), Col("M", "M"), Col("n_seeds", "n seeds"),
            Col("oracle_pct", "oracle %", ".1f"), Col("target_pct", "target %", ".1f"),
            Col("steps_median", "steps to target (median)", reached), Col("reached", show=False),
            Col("hours_median", "hours to target (median)", ".2f"),
            Col("hours_vs_largest_m", "hours / largest M's", ".2f"),
            Col("last_mean", "last eval success % (t 95 %)", last), Col("last_low", show=False),
            Col("last_high", show=False), Col("last_step", "last step"), Col("last_hours", "last hours", ".2f"),
            Col("per_seed", show=False), Col("runs", "runs")]
    notes = [(f"Target = {fraction:.0%} of the oracle's success on the same episodes. Steps and hours: the first "
             "kept checkpoint at or above the target (resolution = train.keep_ckpt_every); hours = the run's "
             "training wall clock at that checkpoint (offline evaluations included, closed-loop evaluation not). "
             "Median over the seeds that reached it, with (seeds reached / seeds).")]
    return Table("fig4_time_to_success", "Fig. 4: steps and hours to closed-loop success, per M", cols, rows,
                 notes + [f"{f.name}: {f.label}" for f in families])


def final_success_table(families: list[Family]) -> Table:
    """Per family and M: the closed-loop success of the finished runs (``mdh eval`` / a sweep's eval stage),
    pooled over seeds with a Wilson 95 % interval, and whether the budget resolves the Level-2 effect: the
    intervals of the smallest and the largest M do not overlap."""
    from harness.report.collect import closed_loop_success
    from harness.report.stats import wilson_interval

    rows = []
    for fam in families:
        per_m = {}
        for m, members in fam.by_m().items():
            wins = n = 0
            for r in members:
                pct, episodes = closed_loop_success(r)
                if pct is not None and episodes:
                    wins += round(pct * episodes / 100)
                    n += episodes
            if n:
                lo, hi = wilson_interval(wins, n)
                per_m[m] = {"figure": fam.name, "family": fam.label, "M": m, "n_seeds": len(members),
                            "successes": wins, "episodes": n, "success_pct": 100 * wins / n,
                            "ci_low_pct": 100 * lo, "ci_high_pct": 100 * hi, "runs": [r.id for r in members]}
        if len(per_m) >= 2:
            small, large = per_m[min(per_m)], per_m[max(per_m)]
            resolved = small["ci_high_pct"] < large["ci_low_pct"] or large["ci_high_pct"] < small["ci_low_pct"]
            for row in per_m.values():
                row["resolved"] = resolved
        rows += per_m.values()
    cols = [Col("figure", "figure"), Col("family", show=False), Col("M", "M"), Col("n_seeds", "n seeds"),
            Col("success_pct", "success %", lambda v, r: f"{v:.1f} [{r['ci_low_pct']:.1f}, {r['ci_high_pct']:.1f}] "
                f"({r['successes']}/{r['episodes']})"),
            Col("successes", show=False), Col("episodes", show=False), Col("ci_low_pct", show=False),
            Col("ci_high_pct", show=False),
            Col("resolved", "smallest vs largest M resolved", lambda v, r: "-" if v is None else ("yes" if v else
                "no: the intervals overlap")),
            Col("runs", "runs")]
    unresolved = [r for r in rows if r.get("resolved") is False]
    notes = ["Closed-loop success of the finished runs, pooled over seeds, Wilson 95 %."]
    if unresolved:
        notes.append("This budget does not resolve the Level-2 effect on closed-loop success (the intervals of "
                     "the smallest and the largest M overlap); sweeps/convergence_cpu.yaml does: closed-loop "
                     "success of kept checkpoints against steps and hours for M = 1, 8, 64 over 3 seeds.")
    return Table("final_success_by_m", "Closed-loop success of the finished runs, per M", cols, rows, notes)
