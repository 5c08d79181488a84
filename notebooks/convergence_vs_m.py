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
import os
import tempfile
from collections import Counter
from pathlib import Path

import matplotlib

import harness
from harness.report.collect import discover_runs
from harness.report.figures import fig4
from harness.report.tables import convergence_families, runs_table, thresholds_table

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
                            "`mdh sweep convergence_m ...`) or set MDH_RESULTS")
OUT.mkdir(parents=True, exist_ok=True)
runs = discover_runs(RESULTS)
done = [r for r in runs if r.done]
states = ", ".join(f"{n} {s}" for s, n in sorted(Counter(r.state for r in runs).items()))
print(f"results: {RESULTS}\noutput:  {OUT}")
print(f"{len(runs)} run folders ({states or 'none'}); {len(done)} done and in the numbers")
print_table(runs_table(runs))

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
print_table(thresholds_table(families))
