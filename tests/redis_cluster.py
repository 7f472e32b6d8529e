"""Private Redis Clusters and Sentinel set-ups for tests: real servers on free loopback ports.

Built on :class:`tests.redis_server.RedisServer` (own directories, stopped by PID,
never the system Redis). Failovers are made fast for tests: a cluster's
``cluster-node-timeout`` and a sentinel's ``down-after-milliseconds`` are 1 s by
default, so a SIGKILLed master is replaced within a few seconds.

- :class:`Cluster`: ``masters`` masters, each with ``replicas`` replicas, formed
  with ``redis-cli --cluster create``; ``url`` is a ``redis+cluster://`` URL.
- :class:`SentinelSet`: a master, one replica and three sentinels; ``url`` is a
  ``redis+sentinel://`` URL for the service ``mymaster``.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.redis_server import RedisServer, _free_port, require_redis_server

__all__ = ["Cluster", "ClusterNodeServer", "SentinelSet", "cluster_fixture", "sentinel_fixture"]

_READY_TIMEOUT = 30.0


def _until(check: Callable[[], bool], what: str, timeout: float = _READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def _text(reply: Any) -> str:
    return reply.decode() if isinstance(reply, bytes) else str(reply)


class ClusterNodeServer(RedisServer):
    """One cluster-enabled ``redis-server``."""

    def __init__(self, directory: Path, *, node_timeout_ms: int, persistent: bool) -> None:
        super().__init__(directory, persistent=persistent)
        self.node_timeout_ms = node_timeout_ms

    def _pick_port(self) -> int:
        while True:  # the cluster bus listens on port + 10000: it must be a port too
            port = _free_port()
            if port + 10000 <= 65535:
                return port

    def _args(self) -> list[str]:
        return [
            *super()._args(),
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(self.directory / "nodes.conf"),
            "--cluster-node-timeout",
            str(self.node_timeout_ms),
            # a replica with stale data still takes over (tests kill masters on purpose)
            "--cluster-replica-validity-factor",
            "0",
            # a replica syncs at once (the default waits 5 s for more replicas to join)
            "--repl-diskless-sync-delay",
            "0",
        ]

    def info(self, section: str = "") -> dict[str, str]:
        raw = _text(self.command("CLUSTER", "INFO") if section == "cluster" else b"")
        pairs = (line.split(":", 1) for line in raw.splitlines() if ":" in line)
        return {k.strip(): v.strip() for k, v in pairs}

    def role(self) -> str:
        return _text(self.command("ROLE")[0])


class Cluster:
    """A Redis Cluster of ``masters`` masters with ``replicas`` replicas each."""

    def __init__(
        self,
        directory: Path,
        *,
        masters: int = 3,
        replicas: int = 0,
        node_timeout_ms: int = 1000,
        persistent: bool = False,
    ) -> None:
        require_redis_server()
        self.replicas = replicas
        self.nodes = []
        for i in range(masters * (1 + replicas)):
            d = directory / f"node-{i}"
            d.mkdir(parents=True)
            self.nodes.append(
                ClusterNodeServer(d, node_timeout_ms=node_timeout_ms, persistent=persistent)
            )

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def live(self) -> list[ClusterNodeServer]:
        return [n for n in self.nodes if n.process is not None]

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        cli = shutil.which("redis-cli")
        if cli is None:
            pytest.skip("redis-cli not found (needed to form a Redis Cluster)")
        if not (self.nodes[0].directory / "formed").exists():
            subprocess.run(
                [
                    cli,
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{n.port}" for n in self.nodes),
                    "--cluster-replicas",
                    str(self.replicas),
                    "--cluster-yes",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=60,
            )
            (self.nodes[0].directory / "formed").touch()
        self.wait_ok()

    def wait_ok(self, timeout: float = _READY_TIMEOUT) -> None:
        """Every live node sees the cluster as ok and knows every node; every replica is
        in sync with its master."""
        live = self.live()

        def ok() -> bool:
            for node in live:
                info = node.info("cluster")
                if info.get("cluster_state") != "ok":
                    return False
                if int(info.get("cluster_known_nodes", 0)) < len(self.nodes):
                    return False
                role = node.command("ROLE")
                if role[0] == b"slave" and role[3] != b"connected":
                    return False
            return True

        _until(ok, "the cluster to be ok", timeout)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def kill_all(self) -> None:
        for node in self.nodes:
            node.kill()

    def masters(self) -> list[ClusterNodeServer]:
        return [n for n in self.live() if n.role() == "master"]

    def master_of(self, name: str) -> ClusterNodeServer:
        """The live master that serves the slot of the Redis name ``name``."""
        slot = int(self.live()[0].command("CLUSTER", "KEYSLOT", name))
        for node in self.masters():
            for line in _text(node.command("CLUSTER", "NODES")).splitlines():
                fields = line.split()
                if "myself" not in fields[2]:
                    continue
                for part in fields[8:]:
                    lo, _, hi = part.partition("-")
                    if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                        return node
        raise LookupError(f"no live master serves slot {slot}")

    def promoted(self, old: ClusterNodeServer) -> bool:
        """A replica of the killed master ``old`` is a master and the cluster is ok."""
        try:
            self.wait_ok(timeout=0.01)
        except RuntimeError:
            return False
        return len(self.masters()) == len(self.nodes) // (1 + self.replicas)

    def command_all(self, *args: str | bytes) -> list[Any]:
        return [n.command(*args) for n in self.masters()]

    def check_no_lease_without_expiry(self) -> None:
        for node in self.masters():
            node.check_no_lease_without_expiry()

    def flushall(self) -> None:
        self.command_all("FLUSHALL")


def cluster_fixture(
    *,
    name: str = "redis_cluster",
    masters: int = 3,
    replicas: int = 0,
    persistent: bool = False,
    scope: Any = "function",
) -> Callable[..., Iterator[Cluster]]:
    """A pytest fixture (named ``name``) giving a running, formed cluster."""

    @pytest.fixture(name=name, scope=scope)
    def fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
        directory = tmp_path_factory.mktemp(name)
        cluster = Cluster(directory, masters=masters, replicas=replicas, persistent=persistent)
        try:
            cluster.start()
            yield cluster
            if cluster.live():
                cluster.check_no_lease_without_expiry()
        finally:
            cluster.kill_all()

    return fixture


# -- Sentinel ---------------------------------------------------------------------------------


class SentinelServer(RedisServer):
    """One ``redis-server <conf> --sentinel`` watching the service ``mymaster``."""

    def __init__(self, directory: Path, *, master_port: int, down_after_ms: int) -> None:
        super().__init__(directory)
        self.master_port = master_port
        self.down_after_ms = down_after_ms
        self.myid = secrets.token_hex(20)
        # the other sentinels and the replica, declared up front: otherwise a sentinel
        # learns of them by hello messages every 2 s, and a set-up took 7 s to be ready
        self.known: list[str] = []

    def _args(self) -> list[str]:
        conf = self.directory / "sentinel.conf"
        conf.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            f"dir {self.directory}\n"
            f"logfile {self.directory / 'redis.log'}\n"
            f"sentinel monitor mymaster 127.0.0.1 {self.master_port} 2\n"
            f"sentinel down-after-milliseconds mymaster {self.down_after_ms}\n"
            "sentinel failover-timeout mymaster 10000\n"
            "sentinel parallel-syncs mymaster 1\n"
            f"sentinel myid {self.myid}\n" + "".join(f"{line}\n" for line in self.known)
        )
        return [self.binary, str(conf), "--sentinel"]


class SentinelSet:
    """A master, a replica of it, and three sentinels (quorum 2)."""

    def __init__(self, directory: Path, *, down_after_ms: int = 1000) -> None:
        require_redis_server()
        for sub in ("master", "replica", "s0", "s1", "s2"):
            (directory / sub).mkdir(parents=True)
        self.master = RedisServer(directory / "master")
        self.replica = RedisServer(directory / "replica")
        self.directory = directory
        self.down_after_ms = down_after_ms
        self.sentinels: list[SentinelServer] = []

    @property
    def servers(self) -> list[RedisServer]:
        return [self.master, self.replica]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/mymaster/0"

    def start(self) -> None:
        self.master.start()
        self.replica.start()
        for server in self.servers:  # a replica syncs at once (the default waits 5 s)
            server.command("CONFIG", "SET", "repl-diskless-sync-delay", "0")
        self.replica.command("REPLICAOF", "127.0.0.1", str(self.master.port))
        _until(
            lambda: self.replica.command("ROLE")[3] == b"connected",
            "the replica to sync",
        )
        for i in range(3):
            s = SentinelServer(
                self.directory / f"s{i}",
                master_port=self.master.port,
                down_after_ms=self.down_after_ms,
            )
            s.port = _free_port()
            self.sentinels.append(s)
        for s in self.sentinels:
            s.known = [f"sentinel known-replica mymaster 127.0.0.1 {self.replica.port}"] + [
                f"sentinel known-sentinel mymaster 127.0.0.1 {o.port} {o.myid}"
                for o in self.sentinels
                if o is not s
            ]
            s.start()

        def ready() -> bool:
            for s in self.sentinels:
                info = s.command("SENTINEL", "MASTER", "mymaster")
                fields = info  # redis-py parses SENTINEL MASTER into a dict
                if int(fields[b"num-other-sentinels"]) < 2 or int(fields[b"num-slaves"]) < 1:
                    return False
            return True

        _until(ready, "the sentinels to know each other and the replica")

    def current_master_port(self) -> int:
        _host, port = self.sentinels[0].command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster")
        return int(port)

    def server_on(self, port: int) -> RedisServer:
        return next(s for s in self.servers if s.port == port)

    def failed_over(self, old_port: int) -> bool:
        """Every sentinel names another master, and that master accepts writes."""
        ports = set()
        for s in self.sentinels:
            _host, port = s.command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster")
            ports.add(int(port))
        if len(ports) != 1 or old_port in ports:
            return False
        new = self.server_on(ports.pop())
        return bool(new.command("ROLE")[0] == b"master")

    def stop(self) -> None:
        for s in self.sentinels:
            s.kill()
        self.master.kill()
        self.replica.kill()


def sentinel_fixture(*, name: str = "redis_sentinel") -> Callable[..., Iterator[SentinelSet]]:
    @pytest.fixture(name=name)
    def fixture(tmp_path: Path) -> Iterator[SentinelSet]:
        setup = SentinelSet(tmp_path / name)
        try:
            setup.start()
            yield setup
        finally:
            setup.stop()

    return fixture
