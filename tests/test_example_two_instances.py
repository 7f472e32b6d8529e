"""examples/two_instances.py: two real processes on one Redis build each report once, and
a brand-new third process is served from Redis."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .redis_server import RedisServer, redis_server_fixture

pytestmark = pytest.mark.redis

redis_server = redis_server_fixture()

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "two_instances.py"


def test_two_instances_build_each_report_once(redis_server: RedisServer) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), redis_server.url],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    lines = done.stdout.splitlines()
    for report in ("sales", "stock", "staff"):
        assert f"{report}: built 1 time(s)" in lines, done.stdout
    late = next(line for line in lines if line.startswith("C (started later)"))
    assert late.endswith("ran 0 here, joined 0, hits 30"), late
    ran = sum(
        int(line.split("ran ")[1].split(" here")[0])
        for line in lines
        if line.startswith(("A:", "B:"))
    )
    assert ran == 3  # three reports, one execution each, between the two replicas
