"""The published numbers (results/reference/paper_numbers.csv): Table 2 rows and Table 3 claims.

Source: arXiv 2505.09430 as transcribed in ../shared/reference/paper_numbers.md; the CSV's ``version``
column says which transcription a report used (results/reference/README.md describes the columns).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "results" / "reference"
PAPER_NUMBERS = REFERENCE_DIR / "paper_numbers.csv"
SOURCE = "arXiv 2505.09430 (Mini-Diffuser), transcribed in ../shared/reference/paper_numbers.md"
COLUMNS = ("version", "table", "key", "method", "year", "success_pct", "train_time_v100x8_days", "memory_gb",
           "row", "base", "delta_memory_pct", "delta_time_pct", "delta_success_points", "note")
_NUMBERS = ("success_pct", "train_time_v100x8_days", "memory_gb", "delta_memory_pct", "delta_time_pct",
            "delta_success_points")


@dataclass(frozen=True)
class PublishedRow:
    """One Table 2 method: success %, training time in V100 x 8 x day, memory in GB."""

    key: str
    method: str
    year: int
    success_pct: float
    train_time_v100x8_days: float
    memory_gb: float
    note: str


@dataclass(frozen=True)
class Claim:
    """One Table 3 claim: ``row`` compared with ``base``; deltas are row vs base (None: not claimed)."""

    key: str
    row: str
    base: str
    delta_memory_pct: float | None
    delta_time_pct: float | None
    delta_success_points: float | None
    note: str


@dataclass(frozen=True)
class PaperNumbers:
    version: str
    source: str
    path: Path
    table2: list[PublishedRow]
    claims: dict[str, Claim]


def load_paper_numbers(path: str | Path | None = None) -> PaperNumbers:
    """Read and check the reference CSV (default: results/reference/paper_numbers.csv). ValueError names
    the file and line of the first problem."""
    path = Path(path) if path is not None else PAPER_NUMBERS
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise ValueError(f"{path}: expected the header {','.join(COLUMNS)}, got {reader.fieldnames}")
        rows = list(reader)
    versions = {r["version"] for r in rows}
    if len(versions) != 1 or not next(iter(versions), ""):
        raise ValueError(f"{path}: every row must carry the same non-empty version, got {sorted(versions)}")
    table2, claims = [], {}
    for lineno, r in enumerate(rows, start=2):
        try:
            num = {k: float(r[k]) if r[k].strip() else None for k in _NUMBERS}
        except ValueError as e:
            raise ValueError(f"{path}: line {lineno}: {e}") from None
        if r["table"] == "table2":
            if None in (num["success_pct"], num["train_time_v100x8_days"], num["memory_gb"]) or not r["year"]:
                raise ValueError(f"{path}: line {lineno}: a table2 row needs year, success, time and memory")
            table2.append(PublishedRow(r["key"], r["method"], int(r["year"]), num["success_pct"],
                                       num["train_time_v100x8_days"], num["memory_gb"], r["note"]))
        elif r["table"] == "table3":
            claims[r["key"]] = Claim(r["key"], r["row"], r["base"], num["delta_memory_pct"],
                                     num["delta_time_pct"], num["delta_success_points"], r["note"])
        else:
            raise ValueError(f"{path}: line {lineno}: table must be table2 or table3, got {r['table']!r}")
    return PaperNumbers(version=versions.pop(), source=SOURCE, path=path, table2=table2, claims=claims)
