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
from collections import Counter

from harness.report.figures import fig2
from harness.report.notebook import open_results, print_table, show
from harness.report.reference import load_paper_numbers
from harness.report.tables import runs_table, table2

# %% tags=["parameters"]
DEFAULT_RESULTS = "results/quick"  # MDH_RESULTS overrides it; MDH_NOTEBOOK_OUT: where outputs go

# %%
RESULTS, OUT, runs = open_results(DEFAULT_RESULTS)
done = [r for r in runs if r.done]
paper = load_paper_numbers()
print(f"published numbers: {paper.source}, version {paper.version}")
print_table(runs_table(runs), OUT)

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
print_table(t2, OUT)
print_table(d2, OUT)

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
