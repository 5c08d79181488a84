"""The report's figures (matplotlib, Agg; PNG and PDF, with their plotted data as CSV beside them).

Fig. 4: offline accuracy against training step, one line per M, mean over seeds and a Student-t 95 % band.
Fig. 2: log-log training time against peak memory; measured and published points, never two time units
on one axis (V100 x 8 x day, CPU-hours and GPU-hours without a V100 factor each get their own panel).
"""

from __future__ import annotations

import math
from pathlib import Path

from harness.report.collect import Run, closed_loop_success
from harness.report.reference import PaperNumbers
from harness.report.render import Col, Table
from harness.report.stats import mean_t_interval
from harness.report.tables import GIB, Family

FIG4_PANELS = [("pct_within_1cm", "% within 1 cm"), ("pct_within_3deg", "% within 3 deg"),
               ("pos_err_cm", "position error (cm)"), ("pct_all", "% all (1 cm, 3 deg, gripper)")]


def _figure(ncols: int, nrows: int = 1, size=(5.0, 3.8)):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _save(fig, out_dir: Path, name: str) -> list[Path]:
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    for p in paths:
        fig.savefig(p, dpi=130)
    return paths


def convergence_curves(fam: Family) -> list[dict]:
    """Per M, metric and evaluated step: mean, t 95 % bounds and n over the seeds evaluated at that step."""
    rows = []
    for m, members in fam.by_m().items():
        steps = sorted({row["step"] for r in members for row in r.metrics})
        for metric, _ in FIG4_PANELS:
            for step in steps:
                vals = [row.get(metric) for r in members for row in r.metrics if row["step"] == step]
                ci = mean_t_interval(v for v in vals if isinstance(v, float))
                if ci.n:
                    rows.append({"M": m, "metric": metric, "step": step, "mean": ci.mean, "low": ci.low,
                                 "high": ci.high, "n": ci.n, "runs": [r.id for r in members]})
    return rows


def fig4(fam: Family, out_dir: Path) -> tuple[list[Path], Table]:
    curves = convergence_curves(fam)
    fig, axes = _figure(2, 2)
    cmap = _cmap("viridis")
    ms = sorted(fam.by_m())
    by_m = fam.by_m()
    for ax, (metric, label) in zip(axes, FIG4_PANELS):
        for i, m in enumerate(ms):
            pts = [c for c in curves if c["M"] == m and c["metric"] == metric]
            if not pts:
                continue
            colour = cmap(0.85 * i / max(1, len(ms) - 1))  # viridis' last 15 % is too pale to read
            n = len(by_m[m])
            tag = f"M={m} (n={n} seeds)" if n > 1 else f"M={m} (n=1: no band)"
            ax.plot([c["step"] for c in pts], [c["mean"] for c in pts], "-o", ms=3, color=colour, label=tag)
            band = [c for c in pts if c["low"] is not None]
            if band:
                lo, hi = [c["low"] for c in band], [c["high"] for c in band]
                if metric != "pos_err_cm":  # percentages: the t-band is drawn inside [0, 100] (CSV: unclipped)
                    lo, hi = [max(0.0, x) for x in lo], [min(100.0, x) for x in hi]
                else:  # log axis: a band reaching below zero is drawn down to the lowest mean / 10
                    floor = min(c["mean"] for c in pts if c["mean"] > 0) / 10 if any(c["mean"] > 0 for c in pts) \
                        else 1e-3
                    lo = [max(floor, x) for x in lo]
                ax.fill_between([c["step"] for c in band], lo, hi, color=colour, alpha=0.2, lw=0)
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if metric == "pos_err_cm" and any(c["mean"] > 0 for c in curves if c["metric"] == metric):
            from matplotlib.ticker import FuncFormatter

            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            low, high = ax.get_ylim()
            narrow = high / max(low, 1e-12) < 10  # less than a decade: no major tick may fall inside, label minors
            ax.yaxis.set_minor_formatter(FuncFormatter(
                lambda v, _, narrow=narrow: f"{v:g}" if narrow or f"{v:g}"[0] in "25" else ""))
            ax.yaxis.set_tick_params(which="minor", labelsize=6)
    axes[0].legend(fontsize=7)
    keysteps = sorted({r.overall.get("n") for r in fam.runs if r.overall.get("n") is not None})
    fig.suptitle(f"{fam.name}: {fam.label}\nmean over seeds, band = Student-t 95 % (drawn within the axis "
                 "range; CSV unclipped); "
                 f"{', '.join(str(k) for k in keysteps) or '?'} eval keysteps per evaluation", fontsize=8)
    paths = _save(fig, out_dir, fam.name)
    table = Table(f"{fam.name}_data", f"{fam.name}: plotted data",
                  [Col("M"), Col("metric"), Col("step"), Col("mean"), Col("low"), Col("high"), Col("n"),
                   Col("runs")], curves)
    return paths, table


def _cmap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]


def _log_axes(ax, pts: list[dict]) -> None:
    """Log-log with plain-number tick labels, padded limits, and minor labels when a range spans less
    than a decade (else a narrow range shows no label at all)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for axis, key in ((ax.xaxis, "time"), (ax.yaxis, "memory_gb")):
        vals = [p[key] for p in pts]
        if not vals:
            continue
        lo, hi = min(vals), max(vals)
        (ax.set_xlim if key == "time" else ax.set_ylim)(lo / 1.6, hi * 1.6)
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(plain if hi * 1.6 / (lo / 1.6) < 10 else NullFormatter())
        axis.set_tick_params(which="minor", labelsize=6)


def fig2_points(runs: list[Run], paper: PaperNumbers) -> list[dict]:
    """One point per published method and per done run with a time and a memory figure. ``panel``: the
    time unit (``v100x8_days``, ``cpu_hours``, ``gpu_hours``); ``value_kind``: ``success`` or ``offline``."""
    pts = [{"panel": "v100x8_days", "source": "published", "label": p.method, "run": None,
            "time": p.train_time_v100x8_days, "memory_gb": p.memory_gb, "value": p.success_pct,
            "value_kind": "success", "memory_source": "paper"} for p in paper.table2]
    for r in runs:
        if not r.done:
            continue
        cost = r.sub("cost")
        if r.v100_allowed():
            panel, time = "v100x8_days", cost.get("v100x8_days")
        elif r.device_kind == "cpu":
            panel, time = "cpu_hours", cost.get("cpu_hours")
        elif r.device_kind == "cuda":
            panel, time = "gpu_hours", cost.get("gpu_hours")
        else:
            continue
        success, _ = closed_loop_success(r)
        value, kind = (success, "success") if success is not None else (r.overall.get("pct_all"), "offline")
        peak = r.peak_memory_bytes
        pts.append({"panel": panel, "source": "measured", "label": r.id, "run": r.id, "time": time,
                    "memory_gb": None if peak is None else peak / GIB, "value": value, "value_kind": kind,
                    "memory_source": r.sub("memory").get("memory_source")})
    return pts


PANEL_LABELS = {"v100x8_days": "training time (V100 x 8 x day)",
                "cpu_hours": "training time (CPU-hours; CPU runs, no V100 figure)",
                "gpu_hours": "training time (GPU-hours; GPUs without a V100 factor)"}


def fig2(runs: list[Run], paper: PaperNumbers, out_dir: Path) -> tuple[list[Path], Table, list[str]]:
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D

    pts = fig2_points(runs, paper)

    def plottable(p):
        return all(isinstance(p[k], (int, float)) and math.isfinite(p[k]) and p[k] > 0
                   for k in ("time", "memory_gb"))

    skipped = [p["run"] for p in pts if p["source"] == "measured" and not plottable(p)]
    shown = [p for p in pts if plottable(p)]
    panels = [k for k in PANEL_LABELS if any(p["panel"] == k for p in shown)] or ["v100x8_days"]
    fig, axes = _figure(len(panels), size=(5.5, 4.4))
    cmap, norm = _cmap("viridis"), Normalize(0, 100)
    markers = {("published", "success"): "o", ("measured", "success"): "s", ("measured", "offline"): "^"}
    for ax, panel in zip(axes, panels):
        for p in (q for q in shown if q["panel"] == panel):
            v = p["value"] if isinstance(p["value"], (int, float)) else None
            ax.scatter(p["time"], p["memory_gb"], s=25 + 3 * (v or 0), c=[cmap(norm(v if v is not None else 0))],
                       marker=markers[(p["source"], p["value_kind"])], edgecolors="k", linewidths=0.6,
                       alpha=0.85, zorder=3)
            ax.annotate(p["label"], (p["time"], p["memory_gb"]), fontsize=6, xytext=(4, 3),
                        textcoords="offset points")
        _log_axes(ax, [q for q in shown if q["panel"] == panel])
        ax.set_xlabel(PANEL_LABELS[panel])
        ax.set_ylabel("peak memory (GB)")
        ax.grid(alpha=0.3, which="both")
    handles = [Line2D([], [], ls="", marker="o", mfc="w", mec="k", label="published (success %)"),
               Line2D([], [], ls="", marker="s", mfc="w", mec="k", label="measured, closed-loop success %"),
               Line2D([], [], ls="", marker="^", mfc="w", mec="k", label="measured, offline % all (no success)")]
    axes[0].legend(handles=handles, fontsize=7, loc="lower right")
    from matplotlib.cm import ScalarMappable

    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, label="colour and size: success % (o, s) or "
                 "offline % all (^)")
    fig.suptitle("Fig. 2: training time vs peak memory (log-log); measured memory: GPU allocator/NVML on CUDA, "
                 "process RSS on CPU", fontsize=8)
    paths = _save(fig, out_dir, "fig2_efficiency")
    table = Table("fig2_efficiency_data", "Fig. 2: plotted data",
                  [Col("panel"), Col("source"), Col("label"), Col("run"), Col("time"), Col("memory_gb"),
                   Col("value"), Col("value_kind"), Col("memory_source")], shown)
    return paths, table, skipped
