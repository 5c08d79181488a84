"""``mdh report RESULTS_DIR [--out DIR]``: DIR/report.md with every table (Markdown, LaTeX, CSV) and figure
(PNG, PDF, plotted data as CSV) beside it, rendered from the run records below RESULTS_DIR only.

docs/report.md describes each table and figure, the units, how a cell traces to its run and the
comparability flags.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.report.collect import Run, discover_runs
from harness.report.figures import fig2, fig4
from harness.report.reference import PaperNumbers, load_paper_numbers
from harness.report.render import Table, write_text
from harness.report.success_curves import (
    fig4_success,
    final_success_table,
    success_families,
    time_to_success_table,
)
from harness.report.tables import (
    comparability_table,
    convergence_families,
    runs_table,
    table2,
    table3,
    thresholds_table,
)


@dataclass
class Report:
    path: Path
    runs: list[Run]
    tables: dict[str, Table] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


def _section(table: Table, out_dir: Path, files: list[Path]) -> str:
    paths = table.write(out_dir)
    files += paths.values()
    links = " · ".join(f"[{ext.upper()}]({p.name})" for ext, p in paths.items())
    md = f"### {table.title}\n\n{table.to_markdown()}\n\n"
    if table.notes:
        md += "\n".join(f"- {n}" for n in table.notes) + "\n\n"
    return md + f"Files: {links}\n\n"


def _fig2_counts(data: Table, done: list[Run]) -> str:
    """How many measured points, seeds, keysteps and episodes Fig. 2 shows."""
    from harness.report.collect import closed_loop_success

    shown = {p["run"] for p in data.rows if p["source"] == "measured"}
    runs = [r for r in done if r.id in shown]
    keysteps = sorted({r.overall.get("n") for r in runs if r.overall.get("n") is not None})
    episodes = sorted({closed_loop_success(r)[1] for r in runs} - {None})
    return (f"{len(runs)} measured points, one run (one seed, n=1) each; offline values over "
            f"{', '.join(str(k) for k in keysteps) or '-'} evaluated keysteps per run; closed-loop success over "
            f"{', '.join(str(e) for e in episodes) or '-'} episodes per run that has it.")


def budget_summary(runs: list[Run]) -> str:
    """What the measured numbers cost and how many seeds stand behind them: per sweep (or 'no sweep'), the
    runs done, training steps, seeds per configuration and the summed wall time, from the records."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        if r.done:
            groups.setdefault(r.sweep or "(no sweep)", []).append(r)
    if not groups:
        return "Budget: no done run."
    lines = []
    for name, rs in sorted(groups.items()):
        wall = sum(r.sub("timing").get("wall_time_s") or 0.0 for r in rs)
        steps = sorted({int(r.get("steps_done", 0)) for r in rs})
        configs: dict[tuple, set] = {}
        for r in rs:
            key = tuple(sorted((k, str(v)) for k, v in r.semantic.items() if k != "train.seed"))
            configs.setdefault(key, set()).add(r.seed)
        seeds = sorted({len(s) for s in configs.values()})
        devices = sorted({f"{r.device_kind or '?'} x{r.sub('device').get('count', 1)}" for r in rs})
        lines.append(f"- `{name}`: {len(rs)} done runs, {len(configs)} configurations, "
                     f"{'/'.join(str(n) for n in seeds)} seed(s) each, {'/'.join(str(s) for s in steps)} "
                     f"training steps per run, {wall / 60:.1f} min of training wall time in all "
                     f"({', '.join(devices)}).")
    return "Budget (from the records: steps, seeds, summed wall time of the done runs):\n\n" + "\n".join(lines)


def render_report(results_dir: str | Path, out_dir: str | Path | None = None,
                  paper: PaperNumbers | None = None) -> Report:
    """Render the report of every run below ``results_dir`` into ``out_dir`` (default: ``results_dir``)."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"results folder {results_dir} does not exist")
    out_dir = Path(out_dir) if out_dir is not None else results_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    paper = paper or load_paper_numbers()
    runs = discover_runs(results_dir)
    done = [r for r in runs if r.done]
    report = Report(out_dir / "report.md", runs)
    files = report.files

    factor_versions = sorted({r.sub("cost").get("factor_table_version") for r in done} - {None})
    parts = [
        "# Mini-Diffuser reproduction report\n",
        (f"Rendered by `mdh report` on {time.strftime('%Y-%m-%d %H:%M %Z')} from the run records below "
         f"`{results_dir}` (each run's record.json and metrics.csv only; nothing is re-measured). "
         f"{len(runs)} run folders, {len(done)} done and in the numbers. Published numbers: {paper.source}; "
         f"results/reference/paper_numbers.csv version {paper.version}. GPU factor table version(s) in the "
         f"records: {', '.join(factor_versions) or '-'}. Every measured cell names its run(s): a run id is the "
         "run folder's path relative to the results folder (`<results>/<run id>/record.json`). "
         "See docs/report.md for what each table and figure shows.\n"),
        budget_summary(runs) + "\n",
        "## Runs\n",
        _section(runs_table(runs), out_dir, files),
    ]

    t2, d2 = table2(runs, paper)
    parts += ["## Table 2: efficiency\n", _section(t2, out_dir, files), _section(d2, out_dir, files)]

    t3, d3 = table3(runs, paper)
    parts += ["## Table 3: ablations\n", _section(t3, out_dir, files), _section(d3, out_dir, files)]

    parts.append("## Fig. 4: convergence vs M\n")
    families = convergence_families(runs)
    if not families:
        parts.append("_No done run with metrics.csv rows: no convergence figure._\n\n")
    for fam in families:
        paths, data = fig4(fam, out_dir)
        files += paths
        files += data.write(out_dir).values()
        seeds = {m: len(rs) for m, rs in fam.by_m().items()}
        parts.append(f"![{fam.name}]({paths[0].name})\n\n{fam.name}: {fam.label}. Seeds per M: "
                     + ", ".join(f"M={m}: n={n}" + (" (no band)" if n == 1 else "") for m, n in seeds.items())
                     + f". Files: [PNG]({paths[0].name}) · [PDF]({paths[1].name}) · "
                     f"[plotted data CSV]({data.name}.csv)\n\n")
    thr = thresholds_table(families)
    parts.append(_section(thr, out_dir, files))

    parts.append("## Fig. 4 in closed loop: success vs steps and hours\n")
    success = success_families(families)
    if not success:
        parts.append("_No run has a success curve (`mdh eval RUN --checkpoints` over checkpoints kept with "
                     "`train.keep_ckpt_every`): no closed-loop convergence figure. `make quick`'s budget does not "
                     "resolve closed-loop success; sweeps/convergence_cpu.yaml does._\n\n")
    for fam in success:
        paths, data = fig4_success(fam, out_dir)
        files += paths
        files += data.write(out_dir).values()
        parts.append(f"![{fam.name}]({paths[0].name})\n\n{fam.name}: {fam.label}. Files: [PNG]({paths[0].name}) · "
                     f"[PDF]({paths[1].name}) · [plotted data CSV]({data.name}.csv)\n\n")
    tts = time_to_success_table(success)
    if success:
        parts.append(_section(tts, out_dir, files))
    final = final_success_table(families)
    if final.rows:
        parts.append(_section(final, out_dir, files))

    parts.append("## Fig. 2: training time vs memory\n")
    paths, data, skipped = fig2(runs, paper, out_dir)
    files += paths
    files += data.write(out_dir).values()
    parts.append(f"![fig2]({paths[0].name})\n\nPublished methods (circles, success %) and measured runs "
                 "(squares: closed-loop success %; triangles: offline % all, when a run has no success). "
                 "Time: V100 x 8 x day for published rows and GPU runs with a V100 factor; CPU runs in "
                 "CPU-hours and GPUs without a factor in GPU-hours, each in its own panel. Measured time is the "
                 f"run's own wall time. {_fig2_counts(data, done)} "
                 + (f"Not plotted (no time or memory figure): {', '.join(skipped)}. " if skipped else "")
                 + f"Files: [PNG]({paths[0].name}) · [PDF]({paths[1].name}) · [plotted data CSV]({data.name}.csv)"
                 "\n\n")

    parts += ["## Comparability\n", _section(comparability_table(runs), out_dir, files)]
    write_text(report.path, "\n".join(parts))
    files.append(report.path)
    report.tables = {t.name: t for t in (t2, d2, t3, d3, thr, tts, final)}
    return report
