"""Training cost: GPU-hours (or CPU-hours) and their V100-day equivalents from a versioned factor table.

``gpu_factors.csv`` (next to this file) maps ``torch.cuda.get_device_name()`` strings to a factor: how many
V100-hours one hour of that GPU is worth (measured training throughput, see the file's header). The
paper's unit is 8-V100-days (``v100x8_days``). A device without a row gets no factor and no V100 figure:
a guessed factor would be a fabricated result. CPU runs report CPU-hours only.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from datetime import date
from pathlib import Path

DEFAULT_FACTORS_PATH = Path(__file__).with_name("gpu_factors.csv")
COLUMNS = ("device_pattern", "factor_vs_v100", "basis", "source_url", "date")
UNKNOWN_DEVICE_BASIS = "unknown device: no factor in gpu_factors.csv"
# A MIG slice is a fraction of a GPU; its parent's whole-GPU factor would over-credit it.
_PARTIAL_DEVICE = re.compile(r"\bMIG\b", re.IGNORECASE)
_VERSION_LINE = re.compile(r"^#\s*version\s*:\s*(\S.*?)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class GpuFactor:
    """One row: ``pattern`` (case-insensitive regex over device names), ``factor`` (V100-hours per hour of
    this GPU), ``basis`` (how the factor was obtained), ``source_url``, ``date`` (ISO, row recorded)."""

    pattern: str
    factor: float
    basis: str
    source_url: str
    date: str

    def matches(self, device_name: str) -> bool:
        return re.search(self.pattern, device_name, re.IGNORECASE) is not None


class FactorTable(list):
    """``list[GpuFactor]`` plus the table's ``version`` (from its ``# version:`` line) and ``path``."""

    def __init__(self, rows=(), version: str | None = None, path: Path | None = None):
        super().__init__(rows)
        self.version = version
        self.path = path


def _bad(path: Path, line: int, column: str, problem: str) -> ValueError:
    return ValueError(f"{path}: line {line}, column '{column}': {problem}")


def _parse_row(path: Path, lineno: int, fields: list[str]) -> GpuFactor:
    if len(fields) != len(COLUMNS):
        raise _bad(path, lineno, "*", f"expected {len(COLUMNS)} fields ({','.join(COLUMNS)}), got {len(fields)}: "
                                      f"{fields!r}")
    pattern, factor_text, basis, url, day = (f.strip() for f in fields)
    if not pattern:
        raise _bad(path, lineno, "device_pattern", "empty pattern")
    try:
        re.compile(pattern, re.IGNORECASE)
    except re.error as err:
        raise _bad(path, lineno, "device_pattern", f"not a valid regular expression {pattern!r}: {err}") from None
    try:
        factor = float(factor_text)
    except ValueError:
        factor = float("nan")
    if not (math.isfinite(factor) and factor > 0):
        raise _bad(path, lineno, "factor_vs_v100", f"expected a positive number, got {factor_text!r}")
    if not basis:
        raise _bad(path, lineno, "basis", "empty: say how the factor was obtained")
    if not re.match(r"^https?://\S+$", url):
        raise _bad(path, lineno, "source_url", f"expected an http(s) URL, got {url!r}")
    try:
        date.fromisoformat(day)
    except ValueError:
        raise _bad(path, lineno, "date", f"expected an ISO date YYYY-MM-DD, got {day!r}") from None
    return GpuFactor(pattern=pattern, factor=factor, basis=basis, source_url=url, date=day)


def load_factors(path: str | Path | None = None) -> FactorTable:
    """Read and validate a factor CSV (default: the packaged ``gpu_factors.csv``).

    Format: ``#`` comment lines (one must be ``# version: <text>``), then the header
    ``device_pattern,factor_vs_v100,basis,source_url,date``, then one row per device; blank lines are
    skipped. Raises ValueError naming the file, line and column of the first problem.
    """
    path = Path(path) if path is not None else DEFAULT_FACTORS_PATH
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise ValueError(f"{path}: cannot read the GPU factor table: {err}") from err
    version = None
    header_seen = False
    rows: list[GpuFactor] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if line.lstrip().startswith("#"):
            m = _VERSION_LINE.match(line.strip())
            if m and version is None:
                version = m.group(1)
            continue
        fields = next(csv.reader([line]))
        if not header_seen:
            if tuple(f.strip() for f in fields) != COLUMNS:
                raise _bad(path, lineno, "*", f"expected the header {','.join(COLUMNS)}, got {line!r}")
            header_seen = True
            continue
        rows.append(_parse_row(path, lineno, fields))
    if not header_seen:
        raise _bad(path, len(lines) or 1, "*", f"no header line {','.join(COLUMNS)}")
    if version is None:
        raise _bad(path, 1, "*", "no '# version: <text>' comment line: the factor table must be versioned")
    return FactorTable(rows, version=version, path=path)


def lookup_factor(device_name: str, factors: list[GpuFactor] | None = None) -> GpuFactor | None:
    """First row whose pattern matches ``device_name`` (case-insensitive), or None.

    MIG slices (names containing "MIG") get None: a slice is not the whole GPU the factor describes.
    """
    if not device_name or _PARTIAL_DEVICE.search(device_name):
        return None
    for row in factors if factors is not None else load_factors():
        if row.matches(device_name):
            return row
    return None


def _check(name: str, value, allow_none: bool, integer: bool = False, minimum: float = 0.0):
    if value is None and allow_none:
        return
    ok = isinstance(value, int) and not isinstance(value, bool) if integer else \
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum:
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"{name} must be {kind} >= {minimum:g}{' or None' if allow_none else ''}, got {value!r}")


def cost_summary(device_kind: str, device_name: str, device_count: int, wall_time_s: float,
                 median_step_s: float | None, recipe_steps: int | None,
                 factors: list[GpuFactor] | None = None) -> dict:
    """Cost of a run and the projected cost of the full recipe.

    ``device_kind``: torch device type ("cuda", "cpu", ...); ``device_name``: ``torch.cuda.get_device_name()``
    (or a CPU description); ``device_count``: devices used; ``wall_time_s``: the run's wall time in seconds;
    ``median_step_s``: median training-step time in seconds; ``recipe_steps``: training steps of the full
    recipe (projection skipped when either is None); ``factors``: a factor table (default: the packaged one).

    Returns ``gpu_hours`` (wall x count, CUDA only) or ``cpu_hours`` (wall x count, CPU only: machine-hours,
    not core-hours); ``factor`` / ``factor_basis`` / ``factor_source`` of the matched row;
    ``v100_days`` = gpu_hours x factor / 24 and ``v100x8_days`` = v100_days / 8 (the paper's unit);
    ``projected_recipe_hours`` = median_step_s x recipe_steps / 3600 x count (device-hours; steps only, no
    evaluation or data-loading stalls) and its ``projected_recipe_v100_days`` / ``_v100x8_days``;
    ``factor_table_version``. Every V100 figure is None on CPU and on GPUs without a factor.
    """
    if not isinstance(device_kind, str) or not device_kind:
        raise ValueError(f"device_kind must be a torch device type such as 'cuda' or 'cpu', got {device_kind!r}")
    _check("device_count", device_count, allow_none=False, integer=True, minimum=1)
    _check("wall_time_s", wall_time_s, allow_none=False)
    _check("median_step_s", median_step_s, allow_none=True)
    _check("recipe_steps", recipe_steps, allow_none=True, integer=True)
    kind = device_kind.lower()
    is_gpu = kind == "cuda"
    hours = wall_time_s / 3600.0 * device_count
    projected = None
    if median_step_s is not None and recipe_steps is not None:
        projected = median_step_s * recipe_steps / 3600.0 * device_count

    version = getattr(factors, "version", None)
    row = None
    if is_gpu:
        table = factors if factors is not None else load_factors()
        version = getattr(table, "version", None)
        row = lookup_factor(device_name, table)
        basis = row.basis if row is not None else UNKNOWN_DEVICE_BASIS
    elif kind == "cpu":
        basis = "not applicable: cpu run (V100 figures are computed only for CUDA devices)"
    else:
        basis = f"not applicable: device kind {device_kind!r} has no V100 factor"
    if version is None and factors is None:
        version = load_factors().version

    def v100_days(device_hours):
        return None if row is None or device_hours is None else device_hours * row.factor / 24.0

    run_days, recipe_days = v100_days(hours if is_gpu else None), v100_days(projected)
    return {
        "device_kind": device_kind,
        "device_name": device_name,
        "device_count": device_count,
        "gpu_hours": hours if is_gpu else None,
        "cpu_hours": hours if kind == "cpu" else None,
        "factor": row.factor if row is not None else None,
        "factor_basis": basis,
        "factor_source": row.source_url if row is not None else None,
        "v100_days": run_days,
        "v100x8_days": None if run_days is None else run_days / 8.0,
        "projected_recipe_hours": projected,
        "projected_recipe_v100_days": recipe_days,
        "projected_recipe_v100x8_days": None if recipe_days is None else recipe_days / 8.0,
        "factor_table_version": version,
    }
