"""A private PostgreSQL cluster for the tests: ``initdb`` + ``pg_ctl`` on a free loopback
port in a temporary directory; stopped (and removed) after. Never touches the machine's
own cluster.

The binaries are found on PATH, else in ``/usr/lib/postgresql/*/bin``. Where there are
none the test is skipped with the reason, except in CI (``CI=true``), where it fails.
As root (CI), the cluster runs as the ``postgres`` user (``initdb`` refuses root).

Fixtures: ``postgres_server`` (one cluster for the session: starting one costs seconds)
and ``pg_table`` (a fresh table name per test, so tests never see each other's rows).
A test that stops, kills or restarts the server leaves it running again.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

__all__ = ["PostgresServer", "pg_table", "postgres_server", "require_postgres_binaries"]


def require_postgres_binaries() -> tuple[str, str]:
    """``(initdb, pg_ctl)``; skip (or fail in CI) when they are missing."""
    found: list[str] = []
    for name in ("initdb", "pg_ctl"):
        path = shutil.which(name)
        if path is None:
            candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
            path = candidates[-1] if candidates else None
        if path is None:
            reason = (
                f"{name} not found (PATH, /usr/lib/postgresql/*/bin): the PostgreSQL tests "
                "start their own cluster (install PostgreSQL's server binaries)"
            )
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(f"CI=true and {reason}")
            pytest.skip(reason)
        found.append(path)
    return found[0], found[1]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One private cluster on 127.0.0.1; restartable on the same port and data."""

    def __init__(self) -> None:
        self.initdb, self.pg_ctl = require_postgres_binaries()
        self.base = Path(tempfile.mkdtemp(prefix="prefetch_ingest_pg_"))
        self.data = self.base / "data"
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.base, user="postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.port = _free_port()
        args = ["-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"]
        subprocess.run(
            [*self.as_user, self.initdb, *args],
            check=True,
            capture_output=True,
            timeout=120,
        )

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _ctl(self, *args: str, check: bool = True) -> None:
        subprocess.run(
            [*self.as_user, self.pg_ctl, "-D", str(self.data), *args],
            check=check,
            capture_output=True,
            timeout=120,
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 "
            # fsync off: only a crash of the machine would lose data, never one of the
            # server (commits wait for their WAL write as usual: synchronous_commit on)
            "-c max_connections=300 -c fsync=off"
        )
        for _attempt in range(3):
            try:
                self._ctl("-o", options, "-l", str(self.base / "log"), "-w", "start")
                return
            except subprocess.CalledProcessError:
                time.sleep(0.2)  # the old socket may linger a moment after a kill
        log = (self.base / "log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"PostgreSQL did not start on port {self.port}: {log}")

    def stop(self) -> None:
        """A clean, fast shutdown: every client is disconnected; committed data stays."""
        self._ctl("-m", "fast", "-w", "stop", check=False)

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends (a crash: recovery on the next start)."""
        pid = self.postmaster_pid
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            if os.getpgid(pid) == pid and os.getpgid(0) != pid:
                os.killpg(pid, signal.SIGKILL)  # pg_ctl's setsid: its own group, backends in
            else:
                os.kill(pid, signal.SIGKILL)
        for _ in range(500):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.01)

    def running(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        """Run one statement with a plain synchronous connection (set-up and checks)."""
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10) as conn:
            cur = conn.execute(query, params or None)
            return cur.fetchall() if cur.description is not None else []

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.remove()


@pytest.fixture
def pg_table(postgres_server: PostgresServer) -> Iterator[str]:
    """A table name of this test's own; every lease row left must carry an expiry."""
    name = "t_" + uuid.uuid4().hex[:12]
    yield name
    if not postgres_server.running():
        postgres_server.start()
    exists = postgres_server.sql("SELECT to_regclass(%s) IS NOT NULL", name)[0][0]
    if exists:
        bad = postgres_server.sql(
            f"SELECT count(*) FROM {name} WHERE l_token IS NOT NULL AND l_until IS NULL"
        )
        assert bad[0][0] == 0, "a lease row with no expiry"
