"""The FastAPI example under ``uvicorn --workers N`` as a real subprocess, and ways to reach
each of its workers.

The workers of one uvicorn share its listening socket: which one accepts a new
connection is the kernel's choice. The tests want to know, and sometimes to
choose, who answers:

- :class:`ServiceWorkers` starts ``python -m uvicorn examples.fastapi_service.app:app
  --workers N`` on a free port, waits until every worker has answered (each
  response names its worker in ``X-Worker-Pid``), and stops it by its PID;
- :func:`pinned` opens new connections until one is accepted by the wanted
  worker and hands it over as an httpx client (one connection, kept alive);
- :class:`PinningProxy` is an ASGI app standing where nginx would: it sends
  each request to the next worker in turn, over such a connection, and cuts an
  event stream after a few events, as a proxy's timeout would, so that the
  browser reconnects it (to the other worker). Each exchange is recorded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx

from .redis_server import _free_port

__all__ = ["Exchange", "PinningProxy", "ServiceWorkers", "pinned", "worker_of"]

REPO = Path(__file__).resolve().parent.parent
_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 20.0
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"host",
        b"date",
        b"server",
    }
)


def worker_of(response: httpx.Response) -> int:
    """The PID of the worker that answered ``response``."""
    return int(response.headers["x-worker-pid"])


class _Exited(Exception):
    """uvicorn exited before its workers answered (its port was taken meanwhile, say)."""


class ServiceWorkers:
    """``uvicorn examples.fastapi_service.app:app --workers N`` on a free loopback port.

    Args:
        env: the environment of the service (``REDIS_URL``, ``DATABASE_URL`` ...).
        log: where uvicorn's output goes.
        workers: how many worker processes.
    """

    def __init__(self, env: Mapping[str, str], log: Path, *, workers: int = 2) -> None:
        self.env = dict(env)
        self.log = log
        self.workers = workers
        self.port = 0
        self.pids: tuple[int, ...] = ()
        self.process: subprocess.Popen[bytes] | None = None
        self.store = "memory"  # which store the environment chooses (for the tests' checks)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self, port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "uvicorn",
            "examples.fastapi_service.app:app",
            "--workers",
            str(self.workers),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--timeout-graceful-shutdown",
            "5",
        ]

    def start(self) -> None:
        """Start it; return once every worker has answered a request."""
        for _attempt in range(3):
            port = _free_port()
            with self.log.open("ab") as log:
                # its own session: the workers are in the process group of its PID
                self.process = subprocess.Popen(
                    self.command(port),
                    cwd=REPO,
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            try:
                self.pids = self._wait_for_workers(port)
            except _Exited:
                self.stop()
                continue
            except BaseException:
                self.stop()
                raise
            self.port = port
            return
        raise RuntimeError(f"uvicorn did not start: {self.log_tail()}")

    def _wait_for_workers(self, port: int) -> tuple[int, ...]:
        assert self.process is not None
        deadline = time.monotonic() + _START_TIMEOUT
        seen: set[int] = set()
        while len(seen) < self.workers:
            if self.process.poll() is not None:
                raise _Exited
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{len(seen)} of {self.workers} workers answered in {_START_TIMEOUT} s: "
                    f"{self.log_tail()}"
                )
            try:  # a new connection each time: any worker may accept it
                response = httpx.get(f"http://127.0.0.1:{port}/stats", timeout=10)
            except httpx.TransportError:
                time.sleep(0.05)  # not listening yet: poll again
                continue
            seen.add(worker_of(response))
        return tuple(sorted(seen))

    def stop(self) -> None:
        """SIGTERM to uvicorn (it stops its workers); SIGKILL to its process group after."""
        process, self.process = self.process, None
        if process is None:
            return
        try:
            if process.poll() is None:
                process.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=_STOP_TIMEOUT)
        finally:
            # whatever is left of it (a worker of a uvicorn that did not stop in
            # time): the group is the one its own PID leads
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=_STOP_TIMEOUT)
        left = [pid for pid in self.pids if _alive(pid)]
        assert not left, f"workers {left} outlived uvicorn"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


@contextlib.asynccontextmanager
async def pinned(base: str, pid: int, *, attempts: int = 200) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client whose one connection was accepted by worker ``pid``.

    New connections are opened (one per attempt) and probed with ``GET /stats``
    until one is answered by that worker; the client then keeps it alive, so
    that its next requests go to the same worker (check with :func:`worker_of`).
    """
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    for _attempt in range(attempts):
        client = httpx.AsyncClient(base_url=base, limits=limits, timeout=30)
        try:
            probe = await client.get("/stats")
            if worker_of(probe) == pid:
                yield client
                return
        finally:
            await client.aclose()
    raise AssertionError(f"no new connection reached worker {pid} in {attempts} attempts")


@dataclass
class Exchange:
    """One request the proxy forwarded."""

    method: str
    path: str
    worker: int
    status: int
    body: bytes
    cut: bool
    """True when the proxy ended the response (an event stream) before the service did."""


class PinningProxy:
    """An ASGI app that forwards each request to the next of ``workers`` in turn.

    Args:
        upstream: the service's base URL.
        workers: the PIDs of its workers.
        cut_streams_after: end each ``.../events`` response after this many
            server-sent events (None: never), as a proxy's timeout would.
    """

    def __init__(
        self, upstream: str, workers: Sequence[int], *, cut_streams_after: int | None = None
    ) -> None:
        self.upstream = upstream
        self.workers = tuple(workers)
        self.cut_streams_after = cut_streams_after
        self.exchanges: list[Exchange] = []
        self._turn = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        assert scope["type"] == "http", scope["type"]
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        worker = self.workers[self._turn % len(self.workers)]
        self._turn += 1
        async with anyio.create_task_group() as tg:

            async def until_disconnected() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()  # the browser went away: so does the upstream request

            tg.start_soon(until_disconnected)
            await self._forward(scope, bytes(body), worker, send)
            tg.cancel_scope.cancel()

    async def _forward(self, scope: Any, body: bytes, worker: int, send: Any) -> None:
        path: str = scope["path"]
        query: bytes = scope["query_string"]
        target = path + ("?" + query.decode() if query else "")
        headers = [
            (name, value)
            for name, value in scope["headers"]
            if name.lower() not in _HOP_BY_HOP and name.lower() != b"content-length"
        ]
        limit = self.cut_streams_after if path.endswith("/events") else None
        relayed = bytearray()
        exchange = Exchange(scope["method"], target, worker, 0, b"", cut=False)
        try:
            async with pinned(self.upstream, worker) as client:
                request = client.build_request(
                    scope["method"], target, headers=headers, content=body
                )
                response = await client.send(request, stream=True)
                try:
                    assert worker_of(response) == worker
                    exchange.status = response.status_code
                    await send(
                        {
                            "type": "http.response.start",
                            "status": response.status_code,
                            "headers": [
                                (name, value)
                                for name, value in response.headers.raw
                                if name.lower() not in _HOP_BY_HOP
                            ],
                        }
                    )
                    events = 0
                    async for chunk in response.aiter_raw():
                        if limit is not None:
                            end = 0
                            while events < limit and (found := chunk.find(b"\n\n", end)) >= 0:
                                events += 1
                                end = found + 2
                            if events >= limit:
                                chunk, exchange.cut = chunk[:end], True
                        relayed += chunk
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                        if exchange.cut:
                            break
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                finally:
                    await response.aclose()
        finally:
            exchange.body = bytes(relayed)
            self.exchanges.append(exchange)
