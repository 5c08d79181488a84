"""notebooks/*.py (jupytext percent format): each runs headless as a plain Python script on the records of a
real tiny sweep, writes its figures, and its tables are byte-for-byte the ones `mdh report` writes from the
same folder (the notebooks call the report's own functions); each converts to a valid .ipynb with jupytext."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.launch import run_sweep
from harness.report.build import render_report

REPO = Path(__file__).resolve().parents[2]
SEEDS = (0, 1)
# per notebook: the figures (PNG) it must draw, the tables whose files must equal the report's, and lines of
# its output that give the number of runs and seeds
NOTEBOOKS = {
    "convergence_vs_m": (
        ["fig4_convergence_1.png"],
        ["fig4_convergence_1_data", "fig4_thresholds", "runs"],
        ["6 done and in the numbers",
         "4 runs; seeds per M: M=1: n=2 (seeds [0, 1]), M=4: n=2 (seeds [0, 1])"],
    ),
    "efficiency": (
        ["fig2_efficiency.png"],
        ["table2_efficiency", "table2_differences", "fig2_efficiency_data"],
        ["6 done and in the numbers",
         "Table 2: 6 measured rows (runs), seeds [0, 1]",
         "Fig. 2: 6 measured points"],
    ),
    "ablations": (
        [],
        ["table3_ablations", "table3_differences"],
        ["6 done and in the numbers",
         "3 seed groups of 6 done runs",
         "B=2, M=1, rope3d=False, shuffle_orders=train on cpu: n=2 seeds [0, 1]",
         "Table 3: 2 comparisons (1 batching, 1 component)"],
    ),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory, synth) -> Path:
    """A real sweep: Mini-Diffuser tiny at M = 1 and 4 and rope3d=false at M = 1, two seeds each, 4 steps."""
    root = tmp_path_factory.mktemp("notebook_sweep")
    data = root / "data"
    synth.make_dataset(data, episodes=3, kinds=("voxel1cm",))
    common = ["model.preset=tiny", "model.options.shuffle_orders=train", f"data.path={data}",
              "data.name=synthetic", "data.num_points=64", "data.eval_keysteps=2", "data.workers=0", "train.B=2",
              "train.steps=4", "train.eval_every=2", "train.ckpt_every=2", "train.warmup_steps=1",
              "train.progress=false", "train.sampler=ddim", "train.sampler_steps=2"]  # evaluation: 2 steps
    cells = [["train.M=1"], ["train.M=4"], ["train.M=1", "model.options.rope3d=false"]]
    sweep = root / "tiny.yaml"
    sweep.write_text(f"description: the notebooks' test sweep\noverrides: {json.dumps(common)}\n"
                     f"grid: {{train.seed: {json.dumps(list(SEEDS))}}}\ncells: {json.dumps(cells)}\n")
    out = root / "results"
    threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        _, outcomes = run_sweep(str(sweep), ["cluster=local"], out=str(out))
    finally:
        if threads is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = threads
    assert sorted(outcomes.values()) == ["done"] * len(cells) * len(SEEDS)
    return out


@pytest.fixture(scope="module")
def report(results, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    render_report(results, out)
    return out


def _run(name: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """``python notebooks/NAME.py`` from the repository root, headless (no display), one thread."""
    environ = {k: v for k, v in os.environ.items()
               if k not in ("DISPLAY", "WAYLAND_DISPLAY", "MPLBACKEND", "MDH_RESULTS", "MDH_NOTEBOOK_OUT")}
    environ.update(OMP_NUM_THREADS="1", TMPDIR=str(tmp_path), **env)
    return subprocess.run([sys.executable, str(Path("notebooks") / f"{name}.py")], cwd=REPO, env=environ,
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_and_matches_the_report(name, results, report, tmp_path):
    figures, tables, lines = NOTEBOOKS[name]
    out = tmp_path / "out"
    proc = _run(name, tmp_path, MDH_RESULTS=str(results), MDH_NOTEBOOK_OUT=str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for png in figures:
        path = out / png
        assert path.is_file() and path.stat().st_size > 0, f"{name} did not draw {png}"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.with_suffix(".pdf").stat().st_size > 0
    for table in tables:  # the same function on the same records: the same files as `mdh report`
        for ext in ("csv", "md", "tex"):
            assert (out / f"{table}.{ext}").read_text() == (report / f"{table}.{ext}").read_text(), table
        if not table.endswith("_data"):  # printed as the report's Markdown file reads
            assert (report / f"{table}.md").read_text() in proc.stdout, table
    for line in lines:
        assert line in proc.stdout, f"{name}: {line!r} not in its output:\n{proc.stdout[-3000:]}"


def test_defaults_and_a_missing_results_folder(tmp_path):
    """Without MDH_NOTEBOOK_OUT the files go to a new temporary folder; a missing results folder stops the
    notebook with a message that names MDH_RESULTS."""
    proc = _run("ablations", tmp_path, MDH_RESULTS=str(tmp_path / "nope"))
    assert proc.returncode != 0 and "MDH_RESULTS" in proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _run("ablations", tmp_path, MDH_RESULTS=str(empty))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "0 done and in the numbers" in proc.stdout and "Table 3: 0 comparisons" in proc.stdout
    out = Path(next(line for line in proc.stdout.splitlines() if line.startswith("output:")).split(None, 1)[1])
    assert out.parent == tmp_path and out.name.startswith("mdh-notebook-")
    assert (out / "table3_ablations.csv").is_file()


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_a_valid_jupytext_notebook(name):
    """``jupytext --to notebook`` converts it to a notebook nbformat validates (a header markdown cell, a
    ``parameters`` cell), and jupytext writes it back unchanged apart from the version line it adds."""
    import jupytext  # a dev dependency (pyproject): a missing one is a broken install, not a reason to skip
    import nbformat  # jupytext's own dependency
    path = REPO / "notebooks" / f"{name}.py"
    proc = subprocess.run([sys.executable, "-m", "jupytext", "--to", "notebook", "--output", "-", str(path)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    nb = nbformat.reads(proc.stdout, as_version=nbformat.NO_CONVERT)
    nbformat.validate(nb)  # raises on an invalid notebook
    assert nb.nbformat == 4 and nb.metadata.kernelspec.language == "python"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    assert [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    text = path.read_text()
    again = jupytext.writes(jupytext.reads(text, fmt="py:percent"), fmt="py:percent")
    assert [x for x in again.splitlines() if "jupytext_version" not in x] == text.splitlines()
