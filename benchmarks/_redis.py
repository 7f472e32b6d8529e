"""Scenario 7: prefetch_ingest with its Redis store, against redis-py's bare ``GET``.

The benchmark starts its own ``redis-server`` (no persistence) on a free
loopback port in a temporary directory and stops it afterwards; it never
touches a Redis it did not start.

- commands per hit and per cold load: ``CONFIG RESETSTAT``, the calls, then
  the sum of ``INFO commandstats`` (leaving out ``INFO``/``CONFIG`` themselves);
- hit latency: ``await pf.get(key)`` of a completed key in a loop, against
  ``await client.get(name)`` in the same loop (the floor of a networked hit),
  interleaved, medians;
- one cold key, P processes x C concurrent callers each, released together by
  a barrier: how many times the loader ran across all processes;
- the same hit loop and stampede on a 3-master Redis Cluster (no replicas,
  ``redis-cli --cluster create``), through a ``redis+cluster://`` URL, against
  ``RedisCluster.get`` in the same loop.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio

from ._results import Check, Row, ScenarioResult, median
from ._scenarios import Progress, Sizes

__all__ = ["redis_scenario"]

TITLE = "7. Redis store: one redis-server on loopback"
_SKIP_COMMANDS = ("info", "config", "ping", "client", "hello")


# ---------------------------------------------------------------------------
# a private redis-server


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def _redis_server(binary: str) -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="pi-bench-redis-") as workdir:
        port = _free_port()
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                workdir,
                "--maxmemory-policy",
                "noeviction",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10.0
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as c:
                        c.sendall(b"PING\r\n")
                        if c.recv(16).startswith(b"+PONG"):
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {port}")
                time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def _redis_cluster(binary: str, masters: int = 3) -> Iterator[str | None]:
    """A private cluster of ``masters`` masters; its ``redis+cluster://`` URL (None: no
    ``redis-cli`` to form it, or it did not form)."""
    cli = shutil.which("redis-cli")
    if cli is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="pi-bench-cluster-") as workdir:
        procs: list[subprocess.Popen[bytes]] = []
        ports: list[int] = []
        try:
            for i in range(masters):
                port = _free_port()
                while port + 10000 > 65535:  # the cluster bus listens on port + 10000
                    port = _free_port()
                node_dir = os.path.join(workdir, f"node-{i}")
                os.mkdir(node_dir)
                procs.append(
                    subprocess.Popen(
                        [
                            binary,
                            "--port",
                            str(port),
                            "--bind",
                            "127.0.0.1",
                            "--save",
                            "",
                            "--appendonly",
                            "no",
                            "--dir",
                            node_dir,
                            "--cluster-enabled",
                            "yes",
                            "--cluster-config-file",
                            os.path.join(node_dir, "nodes.conf"),
                            "--maxmemory-policy",
                            "noeviction",
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
                ports.append(port)
            for port in ports:
                _wait_ping(port)
            created = subprocess.run(
                [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-yes"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=60,
            )
            if created.returncode != 0 or not _cluster_ok(cli, ports):
                yield None
                return
            yield "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)
        finally:
            for proc in procs:
                proc.kill()
                proc.wait(timeout=10)


def _wait_ping(port: int) -> None:
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as c:
                c.sendall(b"PING\r\n")
                if c.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"redis-server on port {port} did not start")


def _cluster_ok(cli: str, ports: list[int]) -> bool:
    deadline = time.monotonic() + 20.0
    while time.monotonic() < deadline:
        states = [
            subprocess.run(
                [cli, "-p", str(p), "CLUSTER", "INFO"], capture_output=True, text=True
            ).stdout
            for p in ports
        ]
        if all("cluster_state:ok" in s for s in states):
            return True
        time.sleep(0.05)
    return False


# ---------------------------------------------------------------------------
# counting commands


async def _reset_stats(admin: Any) -> None:
    await admin.config_resetstat()


async def _commands(admin: Any) -> dict[str, int]:
    info: dict[str, Any] = await admin.info("commandstats")
    out: dict[str, int] = {}
    for name, stats in info.items():
        command = name.removeprefix("cmdstat_")
        if command.split("|")[0] in _SKIP_COMMANDS:
            continue
        out[command] = int(stats["calls"])
    return out


def _counting_client(url: str) -> Any:
    """A redis.asyncio client that counts the commands it sends (its round trips)."""
    import redis.asyncio as aioredis

    class CountingRedis(aioredis.Redis):
        sent: dict[str, int]

        async def execute_command(self, *args: Any, **options: Any) -> Any:
            name = str(args[0]).lower()
            self.sent[name] = self.sent.get(name, 0) + 1
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]

    client: Any = CountingRedis.from_url(url)
    client.sent = {}
    return client


async def _interleaved(
    ours: Callable[[], Awaitable[Any]],
    bare: Callable[[], Awaitable[Any]],
    hits: int,
    repeats: int,
    ours_samples: list[float],
    bare_samples: list[float],
) -> None:
    """Seconds per call of each, ``hits`` calls per sample, the two interleaved (which
    goes first alternates), appended to the sample lists."""
    for r in range(repeats):
        for which in ("ours", "bare") if r % 2 == 0 else ("bare", "ours"):
            call, samples = (ours, ours_samples) if which == "ours" else (bare, bare_samples)
            start = time.perf_counter()
            for _ in range(hits):
                await call()
            samples.append((time.perf_counter() - start) / hits)


def _describe(counts: dict[str, int], per: int) -> str:
    return ", ".join(f"{n} {c / per:.2f}" for n, c in sorted(counts.items())) or "none"


# ---------------------------------------------------------------------------
# P processes x C callers


def _cross_worker(
    url: str,
    keys: list[str],
    callers: int,
    sleep: float,
    barrier: Any,
    results: Any,
) -> None:
    """One process: for each key, wait at the barrier, then ``callers`` concurrent gets.

    Reports (pid, loader runs, callers served, errors by type); never raises, so
    a failing store shows up in the table rather than as a hung benchmark.
    """
    import asyncio
    import threading

    from prefetch_ingest import Prefetcher
    from prefetch_ingest.redis import RedisStore

    runs = 0
    served = 0
    errors: dict[str, int] = {}

    async def load(key: str) -> str:
        nonlocal runs
        runs += 1
        await asyncio.sleep(sleep)
        return "value:" + key

    async def main() -> None:
        async with Prefetcher(load, store=RedisStore(url, lease=10.0)) as pf:

            async def caller(key: str) -> None:
                nonlocal served
                try:
                    if await pf.get(key) == "value:" + key:
                        served += 1
                except Exception as exc:
                    name = type(exc).__name__
                    cause = exc.__cause__
                    if cause is not None:
                        name += f" ({type(cause).__name__})"
                    errors[name] = errors.get(name, 0) + 1

            for key in keys:
                await anyio.to_thread.run_sync(barrier.wait, 60.0)
                async with anyio.create_task_group() as tg:
                    for _ in range(callers):
                        tg.start_soon(caller, key)

    try:
        asyncio.run(main())
    except (Exception, threading.BrokenBarrierError) as exc:
        errors[f"worker: {type(exc).__name__}"] = 1
    finally:
        results.put((os.getpid(), runs, served, errors))


def _cross_processes(
    url: str, processes: int, callers: int, rounds: int, sleep: float
) -> tuple[int, int, list[int], dict[str, int]]:
    import queue

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(processes)
    results = ctx.Queue()
    keys = [f"cross-{os.getpid()}-{i}" for i in range(rounds)]
    procs = [
        ctx.Process(target=_cross_worker, args=(url, keys, callers, sleep, barrier, results))
        for _ in range(processes)
    ]
    for p in procs:
        p.start()
    got: list[tuple[int, int, int, dict[str, int]]] = []
    errors: dict[str, int] = {}
    try:
        for _ in procs:
            got.append(results.get(timeout=60 + 30 * rounds))
    except queue.Empty:
        errors["a process did not report"] = len(procs) - len(got)
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join()
    for _, _, _, errs in got:
        for name, count in errs.items():
            errors[name] = errors.get(name, 0) + count
    runs = sum(r[1] for r in got)
    served = sum(r[2] for r in got)
    return runs, served, [r[1] for r in got], errors


# ---------------------------------------------------------------------------
# the scenario


async def redis_scenario(sizes: Sizes, say: Progress) -> ScenarioResult:
    binary = shutil.which("redis-server")
    if binary is None:
        return ScenarioResult("redis", TITLE, "µs/hit", [], skipped="redis-server not found")
    try:
        import redis.asyncio as aioredis

        from prefetch_ingest import Prefetcher
        from prefetch_ingest.redis import RedisStore
    except ImportError as exc:
        return ScenarioResult("redis", TITLE, "µs/hit", [], skipped=f"cannot import: {exc}")

    say("redis ...")
    with _redis_server(binary) as url:
        admin = aioredis.Redis.from_url(url)
        bare = aioredis.Redis.from_url(url)
        try:
            result = await _measure(url, admin, bare, Prefetcher, RedisStore, sizes, say)
        finally:
            await admin.aclose()
            await bare.aclose()
    with _redis_cluster(binary) as cluster_url:
        if cluster_url is None:
            result.notes.append("Cluster: not measured (no redis-cli, or it did not form).")
        else:
            await _measure_cluster(cluster_url, result, Prefetcher, RedisStore, sizes, say)
    return result


async def _measure_cluster(
    url: str, result: ScenarioResult, prefetcher: Any, store: Any, sizes: Sizes, say: Progress
) -> None:
    """Rows for a 3-master cluster: hit latency against ``RedisCluster.get``, the stampede."""
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    hits = sizes.redis_hits
    host_ports = [hp.split(":") for hp in url.removeprefix("redis+cluster://").split(",")]
    bare = RedisCluster(startup_nodes=[ClusterNode(h, int(p)) for h, p in host_ports])

    async def load(key: str) -> str:
        return "value:" + key

    ours_samples: list[float] = []
    bare_samples: list[float] = []
    try:
        await bare.set("bare-hot", b'"value:hot"')
        async with prefetcher(load, store=store(url)) as pf:
            await pf.get("hot")
            await _interleaved(
                lambda: pf.get("hot"),
                lambda: bare.get("bare-hot"),
                hits,
                sizes.redis_repeats,
                ours_samples,
                bare_samples,
            )
    finally:
        await bare.aclose()
    say("redis cluster: latency done")
    cross_sleep = 0.2
    cross_runs, cross_served, per_process, cross_errors = await anyio.to_thread.run_sync(
        _cross_processes,
        url,
        sizes.redis_processes,
        sizes.redis_callers,
        sizes.redis_repeats,
        cross_sleep,
    )
    say("redis cluster: cross-process stampede done")
    rounds = sizes.redis_repeats
    callers_total = sizes.redis_processes * sizes.redis_callers
    ours_us = median(ours_samples) * 1e6
    bare_us = median(bare_samples) * 1e6
    desc = f"{sizes.redis_processes} processes x {sizes.redis_callers} callers, {rounds} round(s)"
    result.rows += [
        Row(
            "RedisCluster GET (bare, 3 masters)",
            "baseline",
            bare_us,
            samples=[x * 1e6 for x in bare_samples],
            extra={"hits_per_s": 1e6 / bare_us, "trips_per_hit": 1.0, "cmds_per_hit": 1.0},
        ),
        Row(
            "prefetch_ingest (Cluster, 3 masters)",
            "ours",
            ours_us,
            samples=[x * 1e6 for x in ours_samples],
            extra={
                "hits_per_s": 1e6 / ours_us,
                "trips_per_hit": 1.0,
                "cmds_per_hit": 1.0,
                "cross_executions": cross_runs // max(rounds, 1)
                if cross_runs % max(rounds, 1) == 0
                else cross_runs,
                "cross_served": cross_served,
                "cross_errors": _describe(cross_errors, 1) if cross_errors else "-",
            },
        ),
    ]
    result.notes.append(
        f"Cluster: 3 masters, no replicas, through a redis+cluster:// URL; hit rate "
        f"{bare_us / ours_us:.2f} of a bare RedisCluster GET loop ({ours_us:.0f} against "
        f"{bare_us:.0f} µs per hit); {desc}: {cross_runs} executions for {rounds} key(s) "
        f"(per process {per_process}), {cross_served} of {callers_total * rounds} served."
    )
    result.checks.append(
        Check(
            f"redis cluster: one execution per cold key across {desc}, every caller served",
            cross_runs == rounds and cross_served == callers_total * rounds,
            f"{cross_runs} executions for {rounds} key(s) (per process {per_process}), "
            f"{cross_served} of {callers_total * rounds} served; errors: "
            f"{_describe(cross_errors, 1) if cross_errors else 'none'}",
        )
    )


async def _measure(
    url: str,
    admin: Any,
    bare: Any,
    prefetcher: Any,
    store: Any,
    sizes: Sizes,
    say: Progress,
) -> ScenarioResult:
    hits = sizes.redis_hits
    cold = max(10, hits // 100)
    runs = 0

    async def load(key: str) -> str:
        nonlocal runs
        runs += 1
        return "value:" + key

    ours_samples: list[float] = []
    bare_samples: list[float] = []
    client = _counting_client(url)
    async with prefetcher(load, store=store(client)) as pf:
        key = "hot"
        await pf.get(key)
        await bare.set("bare-hot", b'"value:hot"')
        # bytes Redis holds for the hot key's record beyond the encoded value itself
        from prefetch_ingest.stores.keys import digest_of

        stored = await admin.strlen(f"prefetch_ingest:{{{digest_of(key)}}}:r")
        overhead = int(stored) - len(b'"value:hot"')

        # commands per hit: sent by the client (round trips), run by the server
        await _reset_stats(admin)
        client.sent.clear()
        for _ in range(hits):
            await pf.get(key)
        per_hit = await _commands(admin)
        sent_hit = dict(client.sent)
        # commands per cold load
        await _reset_stats(admin)
        client.sent.clear()
        for i in range(cold):
            await pf.get(f"cold-{i}")
        per_cold = await _commands(admin)
        sent_cold = dict(client.sent)
    await client.aclose()

    # latency, interleaved, on a plain client (the counting one costs time of its own)
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    async with prefetcher(load, store=store(client)) as pf:
        await pf.get(key)
        await _interleaved(
            lambda: pf.get(key),
            lambda: bare.get("bare-hot"),
            hits,
            sizes.redis_repeats,
            ours_samples,
            bare_samples,
        )
    await client.aclose()
    say("redis: commands and latency done")

    cross_sleep = 0.2
    cross_runs, cross_served, per_process, cross_errors = await anyio.to_thread.run_sync(
        _cross_processes,
        url,
        sizes.redis_processes,
        sizes.redis_callers,
        sizes.redis_repeats,
        cross_sleep,
    )
    say("redis: cross-process stampede done")
    rounds = sizes.redis_repeats
    callers_total = sizes.redis_processes * sizes.redis_callers
    cmds_hit = sum(per_hit.values()) / hits
    cmds_cold = sum(per_cold.values()) / cold
    trips_hit = sum(sent_hit.values()) / hits
    trips_cold = sum(sent_cold.values()) / cold
    ours_us = median(ours_samples) * 1e6
    bare_us = median(bare_samples) * 1e6
    desc = f"{sizes.redis_processes} processes x {sizes.redis_callers} callers, {rounds} round(s)"
    rows = [
        Row(
            "redis-py GET (bare)",
            "floor",
            bare_us,
            samples=[x * 1e6 for x in bare_samples],
            extra={"hits_per_s": 1e6 / bare_us, "trips_per_hit": 1.0, "cmds_per_hit": 1.0},
        ),
        Row(
            "prefetch_ingest",
            "ours",
            ours_us,
            samples=[x * 1e6 for x in ours_samples],
            extra={
                "hits_per_s": 1e6 / ours_us,
                "cmds_per_hit": cmds_hit,
                "cmds_per_cold": cmds_cold,
                "trips_per_hit": trips_hit,
                "trips_per_cold": trips_cold,
                "record_overhead": overhead,
                "hit_cmds": _describe(per_hit, hits),
                "cold_cmds": _describe(per_cold, cold),
                "cross_executions": cross_runs // max(rounds, 1)
                if cross_runs % max(rounds, 1) == 0
                else cross_runs,
                "cross_served": cross_served,
                "cross_errors": _describe(cross_errors, 1) if cross_errors else "-",
                "cross_desc": desc,
            },
        ),
    ]
    checks = [
        Check(
            f"redis: one execution per cold key across {desc}, every caller served",
            cross_runs == rounds and cross_served == callers_total * rounds,
            f"{cross_runs} executions for {rounds} key(s) (per process {per_process}), "
            f"{cross_served} of {callers_total * rounds} served; errors: "
            f"{_describe(cross_errors, 1) if cross_errors else 'none'}",
        ),
        Check(
            "redis: a hit costs one round trip and one command",
            trips_hit <= 1.0 and cmds_hit <= 1.0,
            f"sent {_describe(sent_hit, hits)}; ran {_describe(per_hit, hits)}",
        ),
    ]
    return ScenarioResult(
        "redis",
        TITLE,
        "µs/hit",
        rows,
        columns=[
            ("hits_per_s", "hits/s", ",.0f"),
            ("trips_per_hit", "round trips/hit", ".2f"),
            ("cmds_per_hit", "cmds/hit", ".2f"),
            ("trips_per_cold", "round trips/cold", ".2f"),
            ("cmds_per_cold", "cmds/cold", ".2f"),
            ("record_overhead", "record bytes beyond value", "d"),
            ("cross_executions", "cross-process executions", "d"),
            ("cross_served", "served", ",d"),
            ("cross_errors", "errors", "s"),
        ],
        notes=[
            f"Round trips: commands the store's client sent (counted in a redis.asyncio "
            f"subclass); per hit ({hits:,} gets of one completed key): "
            f"{_describe(sent_hit, hits)}; per cold load ({cold} new keys, one at a time): "
            f"{_describe(sent_cold, cold)}.",
            f"Commands: what the server ran, INFO commandstats after CONFIG RESETSTAT, "
            f"commands inside Lua scripts included; per hit: {_describe(per_hit, hits)}; "
            f"per cold load: {_describe(per_cold, cold)}.",
            f"Cross-process: {desc}, one new key per round, released together by a "
            f"barrier, loader sleeping {cross_sleep:g} s; executions counted in the loaders "
            f"of all processes (per round).",
            "Latency: one coroutine, sequential awaits on one connection each; no peer is "
            "measured on Redis (the floor is redis-py itself).",
        ],
        checks=checks,
        floor_name="redis-py GET (bare)",
        floor_header="x bare GET",
    )
