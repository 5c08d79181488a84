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
# # Ablations: Table 3
#
# Batching (M vs M = 1 at the same B; B vs the next smaller B) and component ablations (`model.options`
# such as `rope3d=false` vs the full model), each seed group against its base: Δ median step time, Δ peak
# memory and accuracy with a Student-t 95 % interval over seeds, beside the paper's claims - Table 3 of
# `mdh report` (docs/report.md, "Table 3"), computed here by the same code (`harness.report.tables.table3`)
# from the same run records (`harness.report.collect.discover_runs`).
#
# Parameters (environment): `MDH_RESULTS` - the results folder (default `results/quick`, e.g. after
# `make quick`); `MDH_NOTEBOOK_OUT` - where the CSV/Markdown/LaTeX tables are written (default: a new
# temporary folder).

# %%
from collections import Counter

from harness.report.notebook import open_results, print_table
from harness.report.reference import load_paper_numbers
from harness.report.render import Table
from harness.report.tables import runs_table, seed_groups, table3

# %% tags=["parameters"]
DEFAULT_RESULTS = "results/quick"  # MDH_RESULTS overrides it; MDH_NOTEBOOK_OUT: where outputs go

# %%
RESULTS, OUT, runs = open_results(DEFAULT_RESULTS)
done = [r for r in runs if r.done]
paper = load_paper_numbers()
print(f"paper claims: {paper.source}, version {paper.version}")
print_table(runs_table(runs), OUT)

# %% [markdown]
# ## Seed groups
#
# Done runs that differ only in their seed (same configuration, same device); Table 3 averages over them.

# %%
groups = seed_groups(runs)
print(f"{len(groups)} seed groups of {len(done)} done runs:")
for g in groups:
    options = ", ".join(f"{k}={v}" for k, v in sorted(g.switches.items())) or "default options"
    print(f"  {g.first.get('model')} / {g.first.get('preset')}, B={g.B}, M={g.M}, {options} on "
          f"{g.first.device_kind}: n={len(g.runs)} seeds {sorted(r.seed for r in g.runs)}")

# %% [markdown]
# ## Table 3: ablations
#
# First the key columns (the same rows and cell formats), then the full table as the report writes it.

# %%
t3, d3 = table3(runs, paper)
kinds = Counter(row["kind"] for row in t3.rows)
print(f"Table 3: {len(t3.rows)} comparisons ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items())) or '-'})")
KEY_COLUMNS = ("kind", "comparison", "row_seeds", "delta_time_pct", "delta_memory_pct", "row_pct_all",
               "delta_pct_all_points", "paper_delta_time_pct", "paper_delta_memory_pct",
               "paper_delta_success_points")
key_view = Table(f"{t3.name}_key_columns", f"{t3.title} (key columns)",
                 [c for c in t3.cols if c.key in KEY_COLUMNS], t3.rows)
print(f"### {key_view.title}\n\n{key_view.to_markdown()}\n")
print_table(t3, OUT)
print_table(d3, OUT)
