# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Efficiency: Table 2 and Fig. 2
#
# Training time and peak memory of every done run beside the paper's published rows: Table 2 (offline
# accuracy, success, training time, peak memory, comparability flags) and Fig. 2 (log-log training time vs
# peak memory; V100 x 8 x day, CPU-hours and GPU-hours each on their own panel) - what `mdh report` renders
# (docs/report.md, "Table 2" and "Fig. 2"), drawn here by the same code (`harness.report.tables.table2`,
# `harness.report.figures.fig2`) from the same run records (`harness.report.collect.discover_runs`) and the
# versioned published numbers (`results/reference/paper_numbers.csv`).
#
# Parameters (environment): `MDH_RESULTS` - the results folder (default `results/quick`, e.g. after
# `make quick`); `MDH_NOTEBOOK_OUT` - where the PNG/PDF figure and the CSV/Markdown/LaTeX tables are
# written (default: a new temporary folder).

# %%
import os
import tempfile
from collections import Counter
from pathlib import Path

import matplotlib

import harness
from harness.report.collect import discover_runs
from harness.report.figures import fig2
from harness.report.reference import load_paper_numbers
from harness.report.tables import runs_table, table2

matplotlib.use("Agg")  # headless; the report's figures are drawn on matplotlib.figure.Figure, no pyplot

try:  # inside Jupyter the figures are shown inline; as a plain script their paths are printed
    from IPython import get_ipython
    from IPython.display import Image, display
except ImportError:
    get_ipython = None
IN_JUPYTER = get_ipython is not None and get_ipython() is not None


def show(path: Path) -> None:
    print(f"wrote {path}")
    if IN_JUPYTER:
        display(Image(filename=str(path)))


def print_table(table) -> None:
    """A report table as `mdh report` writes it (title, Markdown, notes), also written to OUT."""
    table.write(OUT)
    print(f"### {table.title}\n\n{table.to_markdown()}\n")
    for note in table.notes:
        print(f"- {note}")
    print()


# %% tags=["parameters"]
REPO = Path(harness.__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("MDH_RESULTS", "results/quick")).expanduser()
OUT = Path(os.environ.get("MDH_NOTEBOOK_OUT") or tempfile.mkdtemp(prefix="mdh-notebook-"))

# %%
if not RESULTS.is_absolute() and not RESULTS.exists() and (REPO / RESULTS).exists():
    RESULTS = REPO / RESULTS  # opened from notebooks/ in Jupyter: relative to the checkout
if not RESULTS.is_dir():
    raise FileNotFoundError(f"results folder {RESULTS} does not exist: run a sweep (`make quick`, "
                            "`mdh sweep table2 ...`) or set MDH_RESULTS")
OUT.mkdir(parents=True, exist_ok=True)
paper = load_paper_numbers()
runs = discover_runs(RESULTS)
done = [r for r in runs if r.done]
states = ", ".join(f"{n} {s}" for s, n in sorted(Counter(r.state for r in runs).items()))
print(f"results: {RESULTS}\noutput:  {OUT}\npublished numbers: {paper.source}, version {paper.version}")
print(f"{len(runs)} run folders ({states or 'none'}); {len(done)} done and in the numbers")
print_table(runs_table(runs))

# %% [markdown]
# ## Table 2: efficiency
#
# One row per done run (one seed each), then the published rows.

# %%
t2, d2 = table2(runs, paper)
measured = [row for row in t2.rows if row["source"] == "measured"]
seeds = sorted({row["seed"] for row in measured if row["seed"] is not None})
print(f"Table 2: {len(measured)} measured rows (runs), seeds {seeds or '-'}; "
      f"{len(t2.rows) - len(measured)} published rows")
print_table(t2)
print_table(d2)

# %% [markdown]
# ## Fig. 2: training time vs peak memory

# %%
paths, data, skipped = fig2(runs, paper, OUT)
data.write(OUT)
points = Counter(p["source"] for p in data.rows)
print(f"Fig. 2: {points['measured']} measured points (one run each), {points['published']} published points; "
      f"panels: {', '.join(sorted({p['panel'] for p in data.rows})) or '-'}")
if skipped:
    print(f"not plotted (no time or memory figure): {', '.join(skipped)}")
show(paths[0])
