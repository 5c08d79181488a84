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
# # Fig. 4: convergence vs M
#
# Offline accuracy against the training step, one line per M (mean over seeds, Student-t 95 % band), for
# every *family* of done runs that differ only in M, seed and GPU name - the figure `mdh report` draws
# (docs/report.md, "Fig. 4"), drawn here by the same code (`harness.report.figures.fig4`) from the same run
# records (`harness.report.collect.discover_runs`: each run's record.json and metrics.csv, nothing else).
# Below the figures: the steps at which each M first reached the accuracy thresholds (`fig4_thresholds`).
#
# Parameters (environment): `MDH_RESULTS` - the results folder (default `results/quick`, e.g. after
# `make quick`); `MDH_NOTEBOOK_OUT` - where the PNG/PDF figures and the CSV/Markdown/LaTeX tables are
# written (default: a new temporary folder).

# %%
from harness.report.figures import fig4
from harness.report.notebook import open_results, print_table, show
from harness.report.tables import convergence_families, runs_table, thresholds_table

# %% tags=["parameters"]
DEFAULT_RESULTS = "results/quick"  # MDH_RESULTS overrides it; MDH_NOTEBOOK_OUT: where outputs go

# %%
RESULTS, OUT, runs = open_results(DEFAULT_RESULTS)
done = [r for r in runs if r.done]
print_table(runs_table(runs), OUT)

# %% [markdown]
# ## Fig. 4, one figure per family

# %%
families = convergence_families(runs)
if not families:
    print("No done run with metrics.csv rows: no convergence figure.")
for fam in families:
    paths, data = fig4(fam, OUT)
    data.write(OUT)
    by_m = fam.by_m()
    print(f"{fam.name}: {fam.label}")
    print(f"  {len(fam.runs)} runs; seeds per M: "
          + ", ".join(f"M={m}: n={len(rs)} (seeds {sorted(r.seed for r in rs)})" for m, rs in by_m.items()))
    print(f"  plotted data: {len(data.rows)} points -> {OUT / (data.name + '.csv')}")
    show(paths[0])

# %% [markdown]
# ## Steps to reach the accuracy thresholds
#
# Per family and M, the first evaluated step at which the position error or % within 1 cm crossed each
# threshold: mean over the seeds that reached it, with (seeds reached / seeds).

# %%
print_table(thresholds_table(families), OUT)
