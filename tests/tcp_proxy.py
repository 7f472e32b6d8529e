"""A TCP proxy for tests, to make a process "die" or be partitioned from Redis for real.

``TcpProxy(host, port)`` listens on a free loopback port and forwards every connection to
``host:port``, in the running asyncio event loop (plain protocols and transports, so that
:meth:`TcpProxy.cut` is synchronous). A client connected through it (for example a
``redis.asyncio.Redis`` given to a ``RedisStore``) sees, after ``cut()``, what a dead peer or
a network partition looks like: every connection is aborted at once (no byte more goes
through, in either direction) and every new connection is accepted and aborted at once.
The upstream server sees its clients disconnect.

Use::

    proxy = TcpProxy("127.0.0.1", server.port)
    await proxy.start()
    client = redis.asyncio.Redis(host="127.0.0.1", port=proxy.port)
    ...
    proxy.cut()
    ...
    await proxy.aclose()
"""

from __future__ import annotations

import asyncio
from typing import cast

__all__ = ["TcpProxy"]


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``host:upstream_port`` until :meth:`cut`."""

    def __init__(self, host: str, upstream_port: int) -> None:
        self._target = (host, upstream_port)
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._connecting: set[asyncio.Task[None]] = set()
        self.refusing = False
        self.port = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Link(self), "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def cut(self) -> None:
        """Abort every connection now, and every later one as soon as it is accepted."""
        self.refusing = True
        for link in list(self._links):
            link.abort()

    async def aclose(self) -> None:
        """Cut, stop listening, and wait until nothing of the proxy is left running."""
        self.cut()
        for task in list(self._connecting):
            task.cancel()
        if self._connecting:
            await asyncio.gather(*self._connecting, return_exceptions=True)
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()


class _Link(asyncio.Protocol):
    """One proxied connection: this side faces the client, ``_up`` the server."""

    def __init__(self, proxy: TcpProxy) -> None:
        self._proxy = proxy
        self._down: asyncio.Transport | None = None
        self._up: asyncio.Transport | None = None
        self._pending = bytearray()  # from the client, before the upstream connection is made
        self._dead = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._down = cast("asyncio.Transport", transport)
        if self._proxy.refusing:
            self._dead = True
            self._down.abort()
            return
        self._proxy._links.add(self)
        task = asyncio.get_running_loop().create_task(self._connect())
        self._proxy._connecting.add(task)
        task.add_done_callback(self._proxy._connecting.discard)

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            up, _ = await loop.create_connection(lambda: _Back(self), *self._proxy._target)
        except OSError:
            self.abort()
            return
        if self._dead:
            up.abort()
            return
        self._up = up
        if self._pending:
            up.write(bytes(self._pending))
            self._pending.clear()

    def data_received(self, data: bytes) -> None:
        if self._dead:
            return
        if self._up is None:
            self._pending += data
        else:
            self._up.write(data)

    def from_upstream(self, data: bytes) -> None:
        if not self._dead and self._down is not None:
            self._down.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def close(self) -> None:
        """One side ended: end the other one too (gracefully)."""
        if self._dead:
            return
        self._dead = True
        self._proxy._links.discard(self)
        for transport in (self._down, self._up):
            if transport is not None:
                transport.close()

    def abort(self) -> None:
        self._dead = True
        self._proxy._links.discard(self)
        for transport in (self._down, self._up):
            if transport is not None:
                transport.abort()


class _Back(asyncio.Protocol):
    """The upstream side of a :class:`_Link`."""

    def __init__(self, link: _Link) -> None:
        self._link = link

    def data_received(self, data: bytes) -> None:
        self._link.from_upstream(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._link.close()
