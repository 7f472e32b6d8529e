"""The rendered API reference: every public name, real defaults, enum members, no private names.

The page is built with Sphinx, as a reader sees it (``docs/api.md`` through autodoc).
"""

from __future__ import annotations

import html
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PUBLIC_MODULES = [
    "prefetch_ingest",
    "prefetch_ingest.ingest",
    "prefetch_ingest.redis",
    "prefetch_ingest.stores",
    "prefetch_ingest.otel",
]


@pytest.fixture(scope="module")
def api_page(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """{object id: its rendered signature line} of the built api.html."""
    out = tmp_path_factory.mktemp("docs_html")
    # in a subprocess, as CI builds it (Sphinx's own deprecation warnings are not ours)
    built = subprocess.run(
        [sys.executable, "-m", "sphinx", "-q", "-W", "-b", "html", str(ROOT / "docs"), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, f"sphinx-build failed:\n{built.stderr}"
    text = (out / "api.html").read_text(encoding="utf-8")
    entries: dict[str, str] = {}
    for m in re.finditer(r'<dt class="sig sig-object py" id="([^"]+)">(.*?)</dt>', text, re.S):
        entries[m.group(1)] = html.unescape(re.sub(r"<[^>]+>", "", m.group(2))).replace("¶", "")
    return entries


def _public_names() -> list[str]:
    names = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        names += [f"{module_name}.{n}" for n in getattr(module, "__all__", ())]
    return names


def test_every_public_name_has_an_entry(api_page: dict[str, str]) -> None:
    documented = set(api_page)
    short = {i.rsplit(".", 1)[-1] for i in documented}
    missing = [
        n for n in _public_names() if n not in documented and n.rsplit(".", 1)[-1] not in short
    ]
    assert not missing, f"public names without an entry on the API page: {missing}"


def test_no_private_name_has_an_entry(api_page: dict[str, str]) -> None:
    private = [i for i in api_page if any(part.startswith("_") for part in i.split("."))]
    assert not private, private


def test_signatures_show_real_defaults(api_page: dict[str, str]) -> None:
    unreadable = [i for i, line in api_page.items() if "attr_dict" in line or "NOTHING" in line]
    assert not unreadable, f"defaults shown as attrs internals: {unreadable}"
    assert "started_at=None" in api_page["prefetch_ingest.Snapshot"]
    assert "background=False" in api_page["prefetch_ingest.Snapshot"]
    prefetcher = api_page["prefetch_ingest.Prefetcher"]
    assert "loader: None" not in prefetcher  # not the first overload's narrow type


def test_the_prefetcher_signature_matches_the_code(api_page: dict[str, str]) -> None:
    import inspect

    from prefetch_ingest import Prefetcher

    shown = api_page["prefetch_ingest.Prefetcher"]
    for p in list(inspect.signature(Prefetcher.__init__).parameters.values())[1:]:
        default = p.default
        text = "time.monotonic" if callable(default) else repr(default)
        assert f"{p.name}={text}" in shown, f"{p.name}={text} not in {shown!r}"


@pytest.mark.parametrize("enum_name", ["Status", "Source"])
def test_enum_members_are_listed(api_page: dict[str, str], enum_name: str) -> None:
    import prefetch_ingest

    enum = getattr(prefetch_ingest, enum_name)
    for member in enum:
        entry = f"prefetch_ingest.{enum_name}.{member.name}"
        assert entry in api_page, f"{entry} is not on the API page"
        assert repr(member.value) in api_page[entry]
