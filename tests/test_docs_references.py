"""The documentation stands on its own: it names no document that is not in the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "benchmarks" / "README.md",
]
_MD = re.compile(r"(?:\]\(|`)([A-Za-z0-9_./-]+\.md)(?:\)|`)")


def _exists(page: Path, name: str) -> bool:
    return any((base / name).is_file() for base in (page.parent, ROOT, ROOT / "docs"))


def test_every_markdown_file_the_docs_name_is_in_the_repository() -> None:
    missing = [
        f"{page.relative_to(ROOT)}: {name}"
        for page in PAGES
        for name in _MD.findall(page.read_text(encoding="utf-8"))
        if not _exists(page, name)
    ]
    assert not missing, f"the docs name files that are not in the repository: {missing}"


def test_no_page_sends_the_reader_to_the_spec_outside_the_repository() -> None:
    found = [
        f"{page.relative_to(ROOT)}:{n}"
        for page in PAGES
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), start=1)
        if re.search(r"\bSPEC\b", line)
    ]
    assert not found, f"state the contract in docs/contract.md instead: {found}"
