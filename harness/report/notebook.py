"""What the notebooks in notebooks/ share: where the results and outputs are, and how a table or figure is
shown (inline in Jupyter, as a printed path when run as a script).

    results, out, runs = open_results()      # MDH_RESULTS (default results/quick), MDH_NOTEBOOK_OUT
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

import harness
from harness.report.collect import discover_runs

try:  # inside Jupyter the figures are shown inline; as a plain script their paths are printed
    from IPython import get_ipython
    from IPython.display import Image, display
except ImportError:
    get_ipython = None
IN_JUPYTER = get_ipython is not None and get_ipython() is not None


def open_results(default: str = "results/quick") -> tuple[Path, Path, list]:
    """(results folder, output folder, runs): ``MDH_RESULTS`` (relative paths also tried from the checkout,
    for Jupyter started in notebooks/) and ``MDH_NOTEBOOK_OUT`` (default: a new temporary folder); prints
    where they are and how many runs are in which state. A missing results folder -> FileNotFoundError."""
    import matplotlib

    matplotlib.use("Agg")  # headless; the report's figures are drawn on matplotlib.figure.Figure, no pyplot
    repo = Path(harness.__file__).resolve().parent.parent
    results = Path(os.environ.get("MDH_RESULTS", default)).expanduser()
    if not results.is_absolute() and not results.exists() and (repo / results).exists():
        results = repo / results
    if not results.is_dir():
        raise FileNotFoundError(f"results folder {results} does not exist: run a sweep (`make quick`, "
                                "`mdh sweep table2 ...`) or set MDH_RESULTS")
    out = Path(os.environ.get("MDH_NOTEBOOK_OUT") or tempfile.mkdtemp(prefix="mdh-notebook-"))
    out.mkdir(parents=True, exist_ok=True)
    runs = discover_runs(results)
    states = ", ".join(f"{n} {s}" for s, n in sorted(Counter(r.state for r in runs).items()))
    print(f"results: {results}\noutput:  {out}")
    print(f"{len(runs)} run folders ({states or 'none'}); {sum(r.done for r in runs)} done and in the numbers")
    return results, out, runs


def show(path: Path) -> None:
    print(f"wrote {path}")
    if IN_JUPYTER:
        display(Image(filename=str(path)))


def print_table(table, out: Path) -> None:
    """A report table as `mdh report` writes it (title, Markdown, notes), also written to ``out``."""
    table.write(out)
    print(f"### {table.title}\n\n{table.to_markdown()}\n")
    for note in table.notes:
        print(f"- {note}")
    print()
