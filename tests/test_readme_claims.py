"""README's claims table names, for every claim, the test or benchmark that shows it; every name must exist.

The table is the README section "What is tested, and where". A row's evidence is one or more backticked pytest
node IDs (`tests/test_x.py::test_name`, parametrised ids allowed) or benchmark scripts (`benchmarks/x.py`). A
node ID anywhere else in README is checked too. Existence is checked on the source (ast): the file exists and
defines that test function (or class and method), so a renamed or deleted test breaks this test, not the claim.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
TABLE_HEADING = "## What is tested, and where"
NODE_ID = re.compile(r"`(tests/[\w/]+\.py)::([\w:]+)(?:\[[^\]`]*\])?`")
BENCHMARK = re.compile(r"`(benchmarks/\w+\.py)")


def claims_table(text: str) -> list[tuple[str, str]]:
    """(claim, evidence) for every row of the table under TABLE_HEADING."""
    section = text.split(TABLE_HEADING, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    cells = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]  # after header and rule
    return [(row[0], row[-1]) for row in cells]


def defined_names(path: Path) -> set[str]:
    """`name` for module-level functions and classes, `Class::method` for methods."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {f"{node.name}::{item.name}" for item in node.body if isinstance(item, ast.FunctionDef)}
    return names


def missing_evidence(text: str) -> list[str]:
    missing = []
    for file, name in NODE_ID.findall(text):
        path = REPO / file
        if not path.is_file() or name not in defined_names(path):
            missing.append(f"{file}::{name}")
    missing += [file for file in BENCHMARK.findall(text) if not (REPO / file).is_file()]
    return missing


def test_readme_has_a_claims_table_with_evidence_in_every_row():
    rows = claims_table(README.read_text())
    assert len(rows) >= 20, f"the claims table has {len(rows)} rows"
    empty = [claim for claim, evidence in rows if not (NODE_ID.search(evidence) or BENCHMARK.search(evidence))]
    assert not empty, f"claims with no test or benchmark named: {empty}"


def test_every_named_test_and_benchmark_exists():
    missing = missing_evidence(README.read_text())
    if missing:
        pytest.fail("README names tests or benchmarks that do not exist:\n" + "\n".join(missing), pytrace=False)


def test_the_check_catches_a_renamed_test():
    text = "| claim | shown by |\n|---|---|\n| x | `tests/test_readme_claims.py::test_that_was_renamed` |"
    assert missing_evidence(text) == ["tests/test_readme_claims.py::test_that_was_renamed"]
    assert missing_evidence("`tests/test_readme_claims.py::test_every_named_test_and_benchmark_exists[a-b]`") == []
    assert missing_evidence("`benchmarks/no_such_script.py --json x`") == ["benchmarks/no_such_script.py"]
