"""Reports from run records: ``mdh report RESULTS_DIR`` (harness.report.build: report.md with Tables 2-3 and
Figs. 2/4, docs/report.md) and ``mdh report runs DIR...`` (harness.report.runs: key figures side by side)."""
