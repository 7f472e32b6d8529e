"""docs/reliability.md cannot drift from the suite: every test it names exists, and
every test of the fault modules is named in it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reliability.md"
FAULT_MODULES = (
    "test_bad_input.py",
    "test_soak.py",
    "test_redis_faults.py",
    "test_postgres_faults.py",
    "test_redis_failover.py",
)
_REF = re.compile(r"`((?:[a-z0-9_]+/)*test_[a-z0-9_]+\.py)::(test_[a-z0-9_]+)`")


def _tests_in(module: str) -> set[str]:
    tree = ast.parse((ROOT / "tests" / module).read_text())
    return {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    }


def _references() -> set[tuple[str, str]]:
    return set(_REF.findall(DOC.read_text()))


def test_every_test_the_table_names_exists() -> None:
    missing = sorted(
        f"{module}::{name}"
        for module, name in _references()
        if not (ROOT / "tests" / module).is_file() or name not in _tests_in(module)
    )
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"


def test_every_fault_test_is_in_the_table() -> None:
    named = _references()
    absent = sorted(
        f"{module}::{name}"
        for module in FAULT_MODULES
        for name in _tests_in(module)
        if (module, name) not in named
    )
    assert not absent, f"fault tests missing from docs/reliability.md: {absent}"
