"""results/reference/paper_numbers.csv holds exactly the numbers of shared/reference/paper_numbers.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness.report.reference import PAPER_NUMBERS, load_paper_numbers

REPO = Path(__file__).resolve().parents[2]
PAPER_MD = REPO.parent / "shared" / "reference" / "paper_numbers.md"


def _markdown_table2(text: str) -> dict[str, tuple[int, float, float, float]]:
    section = text.split("## Table 2 summary", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not cells[1].isdigit():
            continue
        success = float(re.match(r"[\d.]+", cells[2]).group())  # "75.5 (text: ...)" -> 75.5
        rows[cells[0]] = (int(cells[1]), success, float(cells[3]), float(cells[4]))
    return rows


@pytest.fixture(scope="module")
def paper_md() -> str:
    if not PAPER_MD.is_file():
        pytest.skip(f"{PAPER_MD} is not in this checkout")
    return PAPER_MD.read_text()


def test_csv_is_versioned_and_names_its_source():
    paper = load_paper_numbers()
    assert paper.version == "1" and "2505.09430" in paper.source
    assert "2505.09430" in (PAPER_NUMBERS.parent / "README.md").read_text()
    assert PAPER_NUMBERS.read_text().splitlines()[0].startswith("version,")


def test_table2_rows_equal_the_markdown(paper_md):
    expected = _markdown_table2(paper_md)
    assert len(expected) == 10
    got = {p.method: (p.year, p.success_pct, p.train_time_v100x8_days, p.memory_gb)
           for p in load_paper_numbers().table2}
    assert got == expected


def test_table3_claims_equal_the_markdown(paper_md):
    claims = load_paper_numbers().claims
    m = re.search(r"for \+(\d+)% memory and \+(\d+)% compute time per step", paper_md)
    assert (claims["batching_M64_vs_M1"].delta_memory_pct, claims["batching_M64_vs_M1"].delta_time_pct) == \
        (float(m.group(1)), float(m.group(2)))
    m = re.search(r"\+(\d+)% training time, \+(\d+)% memory", paper_md)
    assert (claims["backbone_head_3dda"].delta_time_pct, claims["backbone_head_3dda"].delta_memory_pct) == \
        (float(m.group(1)), float(m.group(2)))
    assert claims["backbone_head_3dda"].delta_success_points is None  # "comparable success": no number
    m = re.search(r"Removing 3D RoPE: success (-[\d.]+) points", paper_md)
    assert claims["no_rope3d"].delta_success_points == float(m.group(1))
    m = re.search(r"Local kernel-based query: \+(\d+) point", paper_md)
    assert claims["local_query"].delta_success_points == float(m.group(1))
    assert "roughly doubles both memory and compute" in paper_md
    doubled = claims["batch_B_doubled"]
    assert (doubled.delta_memory_pct, doubled.delta_time_pct) == (100.0, 100.0)  # ~2x


def test_a_broken_csv_is_refused_with_its_path(tmp_path):
    bad = tmp_path / "p.csv"
    text = PAPER_NUMBERS.read_text().replace("SAM2Act,2025,86.8", "SAM2Act,2025,x")
    bad.write_text(text)
    with pytest.raises(ValueError, match="p.csv"):
        load_paper_numbers(bad)
