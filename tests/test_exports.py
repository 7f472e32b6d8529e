"""The public surface: the contract's names (docs/contract.md) are importable from the root,
and __all__ lists exactly what the root exports."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import prefetch_ingest

SPEC_NAMES = {
    "Prefetcher",
    "Status",
    "Snapshot",
    "Stats",
    "Progress",
    "report_progress",
    "PrefetchError",
    "PrefetcherClosed",
    # version 2 of the contract
    "Served",
    "Source",
    "LoadCancelled",
    "current_fence",
    "Admission",
    "LagAdmission",
}


def test_the_version_is_the_same_in_the_package_and_its_metadata() -> None:
    from importlib.metadata import version

    assert prefetch_ingest.__version__ == version("prefetch-ingest")


def test_every_name_of_the_spec_is_exported() -> None:
    assert set(prefetch_ingest.__all__) >= SPEC_NAMES
    for name in prefetch_ingest.__all__:
        assert getattr(prefetch_ingest, name) is not None


def test_all_lists_exactly_the_public_names() -> None:
    public = {
        name
        for name in vars(prefetch_ingest)
        if not name.startswith("_")
        and name not in {"annotations"}
        and not isinstance(getattr(prefetch_ingest, name), type(sys))
    }
    assert public == set(prefetch_ingest.__all__)


def test_the_status_values_are_the_json_strings() -> None:
    values = [s.value for s in prefetch_ingest.Status]
    assert values == ["not_started", "pending", "running", "completed", "failed"]
    assert str(prefetch_ingest.Status.RUNNING) == "running"


def test_the_package_is_typed() -> None:
    spec = importlib.util.find_spec("prefetch_ingest")
    assert spec is not None and spec.origin is not None
    from pathlib import Path

    assert (Path(spec.origin).parent / "py.typed").is_file()


def test_the_core_imports_nothing_beyond_its_three_dependencies() -> None:
    code = (
        "import sys, prefetch_ingest\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'redis', 'psycopg', 'psycopg_pool', 'trio', 'fastapi', 'httpx', 'hypothesis',"
        " 'pytest'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == ""
