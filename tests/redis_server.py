"""A private ``redis-server`` for one test: free loopback port, own directory, stopped after.

Never touches a system Redis. Where the binary is missing the test is skipped
with the reason, except in CI (``CI=true``), where a missing binary fails it.

Use :func:`redis_server_fixture` in a test module::

    redis_server = redis_server_fixture()             # no persistence
    durable_redis = redis_server_fixture(persistent=True, name="durable_redis")
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

__all__ = ["RedisServer", "redis_server_fixture", "require_redis_server"]

_START_TIMEOUT = 20.0


def require_redis_server() -> str:
    """The path of ``redis-server``; skip (or fail in CI) when there is none."""
    path = shutil.which("redis-server")
    if path is None:
        reason = (
            "redis-server not found on PATH: the Redis tests start their own server "
            "(install it, e.g. `apt-get install redis-server` or `brew install redis`)"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and {reason}")
        pytest.skip(reason)
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1; restartable on the same port and directory."""

    def __init__(self, directory: Path, *, persistent: bool = False) -> None:
        self.binary = require_redis_server()
        self.directory = directory
        self.persistent = persistent
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _args(self) -> list[str]:
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            "--logfile",
            str(self.directory / "redis.log"),
            "--enable-debug-command",
            "local",  # DEBUG SLEEP, from loopback only
        ]
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        return args

    def _pick_port(self) -> int:
        return _free_port()

    def start(self) -> None:
        """Start it (on a new free port the first time, on the same port after a stop)."""
        assert self.process is None, "already running"
        first = self.port == 0
        for _attempt in range(5):
            if first:
                self.port = self._pick_port()
            self.process = subprocess.Popen(
                self._args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            deadline = time.monotonic() + _START_TIMEOUT
            while time.monotonic() < deadline:
                if _ping(self.port):
                    return
                if self.process.poll() is not None:
                    break  # port taken meanwhile, most likely: try another
                time.sleep(0.02)
            self._reap()
            if not first:
                time.sleep(0.2)  # the old socket may linger a moment
        log = self.directory / "redis.log"
        detail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise RuntimeError(f"redis-server did not start on port {self.port}: {detail}")

    def _reap(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGCONT)
                process.kill()
        process.wait(timeout=10)

    def stop(self) -> None:
        """Shut it down cleanly (SIGTERM: with persistence, everything is on disk)."""
        process = self.process
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGCONT)
            process.terminate()
        try:
            process.wait(timeout=10)
        finally:
            self._reap()

    def kill(self) -> None:
        """SIGKILL: whatever was not written to disk is lost."""
        self._reap()

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: the server stops answering, connections stay open."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def command(self, *args: str | bytes) -> Any:
        """Run one command with a plain synchronous client (for test set-up and checks)."""
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10)
        try:
            return client.execute_command(*args)  # type: ignore[no-untyped-call]
        finally:
            client.close()

    def check_no_lease_without_expiry(self) -> None:
        """Every lease (``*:l``) and note (``*:n``) must carry an expiry."""
        self.resume()
        for pattern in ("*}:l", "*}:n"):
            for name in self.command("KEYS", pattern):
                pttl = self.command("PTTL", name)
                assert pttl != -1, f"{name!r} has no expiry"

    def command_calls(self) -> dict[str, int]:
        """``INFO commandstats`` as {command: calls}."""
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10)
        try:
            info = client.info("commandstats")
        finally:
            client.close()
        return {
            name.removeprefix("cmdstat_"): int(stats["calls"])
            for name, stats in info.items()
            if isinstance(stats, dict)
        }


def redis_server_fixture(
    *, persistent: bool = False, name: str = "redis_server"
) -> Callable[..., Iterator[RedisServer]]:
    """A pytest fixture (named ``name``) giving each test its own running server."""

    @pytest.fixture(name=name)
    def fixture(tmp_path: Path) -> Iterator[RedisServer]:
        directory = tmp_path / f"redis-{name}"
        directory.mkdir()
        server = RedisServer(directory, persistent=persistent)
        server.start()
        try:
            yield server
            if server.process is not None:
                server.check_no_lease_without_expiry()
        finally:
            server.kill()

    return fixture
